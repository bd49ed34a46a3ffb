"""The notification policy: when to interrupt the guest, when to keep polling, when to re-arm kicks.

Under TCG every kick (a trapped doorbell write) and every interrupt (injected by QEMU's main thread)
costs the guest far more than moving a packet, so these few decisions set guest throughput. This module
owns them as one small frozen dataclass of knobs plus pure functions; the device applies the
interrupt decision (it knows the rings), the asyncio server applies the polling decision (it owns time).

The ring still has the last word: with VIRTIO_F_EVENT_IDX the guest says which used index it wants to
hear about (virtio 1.2 §2.7.10), without it VIRTQ_AVAIL_F_NO_INTERRUPT suppresses interrupts
(§2.7.7); the policy can only withhold further, never signal what the guest suppressed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class NotifyPolicy:
    """Knobs, with defaults chosen for a TCG guest (fewest notifications without adding latency when idle)."""

    use_event_idx: bool = True   # honour VIRTIO_F_EVENT_IDX when the driver negotiated it
    tx_batch: int = 256          # chains taken off a TX avail ring per round
    rx_batch: int = 256          # RX buffers filled per round
    irq_coalesce: int = 64       # while work keeps coming, interrupt at most once per this many used entries
    irq_on_idle: bool = True     # when a queue runs dry, signal whatever is still unsignalled
    poll_rounds: int = 8         # empty rounds polled with kicks suppressed before re-arming
    poll_us: float = 50.0        # ...or for this long since the last work, whichever ends first
    rx_backlog: int = 256        # frames a port may queue while the guest has no RX buffer

    def __post_init__(self) -> None:
        for name in ("tx_batch", "rx_batch", "irq_coalesce", "rx_backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"NotifyPolicy.{name} must be >= 1")
        if self.poll_rounds < 0 or self.poll_us < 0:
            raise ValueError("NotifyPolicy.poll_rounds and poll_us must be >= 0")


class PollAction(enum.Enum):
    PROCESS = "process"   # there is work: run another round now
    POLL = "poll"         # nothing now, but traffic was flowing: yield once and look again, kicks still off
    REARM = "rearm"       # quiet long enough: enable kicks, re-check avail, then sleep until a kick


def should_interrupt(policy: NotifyPolicy, *, unsignalled: int, idle: bool, ring_wants: bool) -> bool:
    """Whether to signal the call eventfd now.

    ``unsignalled`` is the number of used entries added since the last interrupt, ``idle`` whether the
    queue has no more work this round, ``ring_wants`` the ring's own answer (EVENT_IDX or flags).
    """
    if unsignalled <= 0 or not ring_wants:
        return False
    if idle:
        return policy.irq_on_idle
    return unsignalled >= policy.irq_coalesce


def poll_action(policy: NotifyPolicy, *, more: bool, empty_rounds: int, idle_us: float) -> PollAction:
    """What the server does after a round: ``more`` if the round left work, ``empty_rounds`` how many
    consecutive rounds found nothing, ``idle_us`` microseconds since the last round that found work."""
    if more:
        return PollAction.PROCESS
    if empty_rounds < policy.poll_rounds and idle_us < policy.poll_us:
        return PollAction.POLL
    return PollAction.REARM
