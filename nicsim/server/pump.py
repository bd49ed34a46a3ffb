"""One virtqueue's notifications on the event loop: the kick and call eventfds and the polling loop.

This module owns ``RingPump``: it watches the ring's kick eventfd with ``loop.add_reader``, writes the
call eventfd only when a device result says ``interrupt`` (the device has already asked the ring:
EVENT_IDX or the NO_INTERRUPT flag) or lets a TX round write it itself (a round to a TAP, between
returning its chains and writing its frames: ``process_tx(irq_fd=...)``, unless an interrupt is held),
and runs the device's rounds following :mod:`nicsim.virtio.policy`. A
wakeup (kick, port wakeup or timer) suppresses kicks and runs rounds, up to ``rounds_per_call`` back to
back per loop callback while work is left; a kick's first round runs in the kick's own callback. After a
TX round of a few frames (a request) the pair's RX pump runs a round at once
(:func:`~nicsim.virtio.policy.poll_for_reply`): its reply may already be at the port. When the ring runs
dry the pump busy-polls for a while if its last round moved a whole batch (``full_poll_us``), or if
told to (``poll_us``; not an RX ring whose port has nothing to give and wakes it when it has, such
as a TAP), then re-arms kicks with a re-check (``rearm_kicks``) and
sleeps on the kick eventfd; a TX ring that carries sparse requests wakes the loop every
``warm_tick_us`` meanwhile, running nothing, so that the next request does not find the core deep
asleep, and if they come at a steady pace it polls for the next one, kicks off, from ``poll_ahead_us``
before it is due until as long after (a timerfd starts it: asyncio's timers are a millisecond late).
If the wakeup moved a batch (traffic flows) and the guest negotiated EVENT_IDX, the re-arm
asks for the kick only once ``kick_batch`` more buffers are posted, with a
``batch_wait_us`` timer for a guest that stops short; otherwise the first buffer kicks. An RX ring whose
push-style port has nothing queued sleeps until the device's ``on_wakeup``; frames the switch writes
straight into a sleeping ring's buffers only have its interrupt decided (``delivered``), with no round
and no kick suppression around it; a pull-style port (the
generator) sleeps on the kick like TX, so a guest with no buffers posted costs no CPU. A lost notification
cannot stall a ring for good: while the ring is active a watchdog ticks every ``stall_recheck_ms``, and a
sleeping ring (no round scheduled, no timer set) that had work pending at two ticks in a row with none of
its indices moved (:func:`~nicsim.virtio.policy.is_stalled`) is re-checked: the interrupt the ring wants
is sent, a round is run, and the device counts it (``stall_rechecks``). A tick only reads the ring (no
round), so an idle ring still costs no rounds. Nor can a bug wedge a ring: a round that raises is logged,
counted (``round_errors``) and tried again 1 ms later, and a pump found busy with no round scheduled is
restarted by the watchdog (``wedges``). A TX interrupt of a sparse round may be held (off by default) for
the pair's RX interrupt (:func:`~nicsim.virtio.policy.defer_tx_interrupt`): the RX pump sends it just
before its own, or its ``tx_irq_wait_us`` deadline does, or stopping the ring does. Counters of what the
pump did (wakeups by cause, rounds, sleeps, interrupts held and merged) are in :meth:`RingPump.snapshot`.
A ring the guest broke stops and writes the err eventfd (the device then reports DEVICE_NEEDS_RESET). It
owns the three eventfds it is given and closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable

from nicsim.ports.base import Port
from nicsim.server.precise_timer import PreciseTimer
from nicsim.virtio.device import DeviceStateError, QueueResult, VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_RING_PACKED
from nicsim.virtio.policy import (
    AHEAD_GAPS,
    PollAction,
    chase_tx,
    defer_tx_interrupt,
    is_request,
    is_stalled,
    keep_warm,
    paced_gap,
    poll_action,
    poll_ahead,
    poll_for_reply,
    request_response,
    streaming,
)
from nicsim.virtio.port import DevicePort
from rings.errors import GuestError, RingsError

log = logging.getLogger("nicsim.server")

_ONE = struct.pack("=Q", 1)
_RETRY_S = 0.001  # pool exhausted, a rate-limited port, a paced sender: look again this much later
PUMP_COUNTERS = (
    "wakeups_kick", "wakeups_timer", "wakeups_stall", "wakeups_other", "wakeups_reply", "rounds", "sleeps",
    "batch_sleeps", "irqs_held", "irqs_merged", "round_errors", "wedges", "delivered", "warm_ticks",
    "wakeups_ahead", "ahead_hits", "wakeups_lane",
)


def _pull_style(port: DevicePort) -> bool:
    return type(port).poll_rx is not Port.poll_rx


class RingPump:
    """Kick/call/err eventfds of ring ``index`` and the loop that runs the device on it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        device: VirtioNetDevice,
        index: int,
        *,
        after_tx: Callable[[int], None] | None = None,
    ) -> None:
        self.loop = loop
        self.device = device
        self.index = index
        self.after_tx = after_tx  # told the pair after a TX round did work (replies may be queued)
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.active = False  # the device queue runs (and the ring is enabled, or is a TX ring)
        self.broken = False
        self.counters = dict.fromkeys(PUMP_COUNTERS, 0)
        self._tx = index % 2 == 1
        self._watching = False
        self._busy = False  # rounds are scheduled (kicks suppressed); False: asleep, kicks armed
        self._handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._empty_rounds = 0
        self._last_work = 0.0
        self._moved = 0  # buffers moved since this wakeup began
        self._moved_bytes = 0  # ...and their frames' bytes
        self._gap_us = 0.0  # from the work before to the last round that found work (request/response)
        self._last_batch = 0  # buffers the last round that found work moved
        self._last_bytes = 0  # the frame bytes the last round that found work moved
        self._last_full = False  # the last round that found work moved a whole batch
        self._seen = (0, 0)  # RX: the ring's packets and bytes when a port last delivered to it
        self._watchdog: asyncio.TimerHandle | None = None
        self._stall_mark: tuple[int, ...] | None = None  # progress at the last tick that found work
        # TX: a due interrupt held for the pair's RX one (``defer_tx_interrupt``), and its deadline.
        # RX: the pair's TX pump, whose held interrupt goes out just before this ring's own.
        self._irq_held: asyncio.TimerHandle | None = None
        # TX: the warm tick (``warm_tick_us``) while sparse requests come; see :meth:`_keep_warm`.
        self._warm: asyncio.TimerHandle | None = None
        # TX: polling for a request due at a steady pace (``poll_ahead_us``): the timer that starts it,
        # the window it starts (monotonic), the end of the one being polled (0: not polling ahead),
        # when the last request that set the pace came, and the gaps before the last few.
        self._ahead: PreciseTimer | None = None
        self._no_ahead = False  # no timerfd here
        self._ahead_start = self._ahead_end = 0.0
        self._poll_until = 0.0
        self._last_request = 0.0
        self._gaps: deque[float] = deque(maxlen=AHEAD_GAPS)
        self.tx_partner: RingPump | None = None
        self._rx_peer: RingPump | None = None
        # TX: offers the pair to its request lane (nicsim.server.lane) after a request's round; True
        # when the lane took it (this pump and the pair's RX pump are then parked).
        self.offer_lane: Callable[[], bool] | None = None
        self.parked = False  # a request lane holds the ring: no kick watched, no round, no timer

    # -- fds --------------------------------------------------------------------------------------

    def set_kick(self, fd: int | None) -> None:
        self._unwatch()
        _close(self.kick_fd)
        self.kick_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
        if self.active:
            self._watch()
            self.wake()  # the guest may have kicked the old fd in between

    def set_call(self, fd: int | None) -> None:
        _close(self.call_fd)
        self.call_fd = fd

    def set_err(self, fd: int | None) -> None:
        _close(self.err_fd)
        self.err_fd = fd

    # -- lifecycle --------------------------------------------------------------------------------

    def activate(self) -> None:
        """The device queue started (and the ring is enabled, or TX): watch kicks, look at the ring once."""
        if self.active:
            return
        self.active, self.broken = True, False
        self._watch()
        self._stall_mark = None
        self._arm_watchdog()
        self.wake()

    def pair_with(self, tx: RingPump) -> None:
        """This RX pump and ``tx``, the same queue pair's TX pump, share held interrupts."""
        self.tx_partner, tx._rx_peer = tx, self

    def deactivate(self) -> None:
        """Stop watching and polling (the device queue itself is stopped by the caller); a held
        interrupt is sent, since the used entries it announces are in the ring."""
        self.active = False
        self._halt()

    def _halt(self) -> None:
        """Send a held interrupt (its used entries are in the ring), stop watching kicks, cancel
        every round and timer, disarm the watchdog: what stopping, breaking and parking share."""
        self.release_interrupt()
        self._unwatch()
        self._cancel()
        self._cool()
        self._disarm_watchdog()

    def park(self) -> None:
        """A request lane takes the ring: stop watching kicks, cancel every round and timer (a held
        interrupt is sent first: the lane decides the ring's interrupts from now on)."""
        self.parked = True
        self._halt()

    def unpark(self) -> None:
        """The lane gave the ring back: watch kicks again and look at the ring at once."""
        if not self.parked:
            return
        self.parked = False
        if self.active and not self.broken:
            self._watch()
            self._arm_watchdog()
            self.wake("wakeups_lane")

    def close(self) -> None:
        """Deactivate and close every eventfd; idempotent."""
        self.deactivate()
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
        for name in ("kick_fd", "call_fd", "err_fd"):
            _close(getattr(self, name))
            setattr(self, name, None)

    @property
    def busy(self) -> bool:
        """Rounds are scheduled (kicks suppressed, polling included); False: asleep on the kick."""
        return self._busy

    def snapshot(self) -> dict[str, int]:
        return dict(self.counters)

    # -- running ----------------------------------------------------------------------------------

    def wake(self, cause: str = "wakeups_other", *, now: bool = False) -> None:
        """Run rounds from the next loop iteration on (``now``: the first one in this call), unless
        already running (a pending batch timer is cancelled: the wakeup serves the batch)."""
        if not self.active or self.broken or self._busy or self.parked:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        try:
            self.device.suppress_kicks(self.index)
        except (RingsError, DeviceStateError) as err:
            self._fail(err)
            return
        self.counters[cause] += 1
        self._busy = True
        self._empty_rounds = 0
        self._moved = self._moved_bytes = 0
        if now:
            self._round()
        else:
            self._handle = self.loop.call_soon(self._round)

    def poll_reply(self) -> None:
        """RX: the pair's TX ring just sent a request (:func:`~nicsim.virtio.policy.poll_for_reply`):
        run a round now if the port may hold its reply (a pull-style port is read; a push-style one
        queued it already), rather than in a later loop turn after the port's own wakeup."""
        if not self._busy and (_pull_style(self.device.port) or self.device.rx_backlog(self.index // 2)):
            self.wake("wakeups_reply", now=True)

    def delivered(self) -> None:
        """RX: a port put frames straight into this ring's buffers (another guest's TX round through
        the switch). Asleep, the ring is not woken for a round that would only decide the interrupt
        (and suppress and re-arm kicks around it): the interrupt is decided and sent here. Running,
        its next round decides it."""
        if not self.active or self.broken or self.parked:
            return
        self._note_delivered()
        if self._busy:
            return
        try:
            due = self.device.interrupt_due(self.index)
        except (RingsError, DeviceStateError) as err:
            self._fail(err)
            return
        self.counters["delivered"] += 1
        if due:
            self.signal()

    def _note_delivered(self) -> None:
        """Frames a port put straight into this ring are its traffic as much as a round's: the last
        work, batch and bytes that :meth:`streaming` reads. Without them the pair's TX ring took a
        TCP receiver's ACKs beside a stream arriving through the switch for requests, and polled
        for 2 ms after each (``rr_poll_us``): 300k empty rounds in a 4 s two-guest run."""
        stats = self.device.stats
        packets, nbytes = stats.packets[self.index], stats.bytes[self.index]
        moved = packets - self._seen[0]
        if moved > 0:
            self._last_batch, self._last_bytes = moved, nbytes - self._seen[1]
            self._last_work = time.monotonic()
        self._seen = (packets, nbytes)

    def signal(self) -> None:
        """Interrupt the guest (write the call eventfd). An RX ring first sends the interrupt its
        pair's TX ring is holding, so the frontend sees both at once (one interrupt, with one INTx line)."""
        partner = self.tx_partner
        if partner is not None and partner._irq_held is not None:
            partner.counters["irqs_merged"] += 1
            partner.release_interrupt()
        self._write_eventfd(self.call_fd, "call")

    def hold_interrupt(self) -> None:
        """TX: the round's interrupt waits for the pair's next RX interrupt, at most ``tx_irq_wait_us``."""
        if self._irq_held is None:
            self.counters["irqs_held"] += 1
            wait = self.device.policy.tx_irq_wait_us * 1e-6
            self._irq_held = self.loop.call_later(wait, self.release_interrupt)

    def release_interrupt(self) -> None:
        """Send the held interrupt now: the RX ring signals, the deadline passed, a round moved a batch,
        or the ring stops."""
        if self._irq_held is not None:
            self._irq_held.cancel()
            self._irq_held = None
            self.signal()

    def signal_error(self) -> None:
        """Tell the frontend the ring broke (write the err eventfd of SET_VRING_ERR, if it gave one)."""
        self._write_eventfd(self.err_fd, "err")

    def _write_eventfd(self, fd: int | None, name: str) -> None:
        if fd is None:
            return
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass  # the counter is saturated: the other side has a notification pending anyway
        except OSError as err:
            log.warning("ring %d: %s eventfd write failed: %s", self.index, name, err)

    def _on_kick(self) -> None:
        assert self.kick_fd is not None
        try:
            os.read(self.kick_fd, 8)
        except BlockingIOError:
            return
        except OSError as err:
            log.warning("ring %d: kick eventfd read failed: %s", self.index, err)
            self._unwatch()
            return
        self.device.kicked(self.index)
        # The round runs in this callback: a loop turn (an epoll_wait and the loop's own bookkeeping)
        # less between the guest's kick and its packet on the wire.
        self.wake("wakeups_kick", now=True)

    def _on_timer(self) -> None:
        self._handle = None
        self.wake("wakeups_timer")

    def _one_round(self, now: float) -> QueueResult | None:
        """One device round; None if the ring broke (the pump is stopped)."""
        self.counters["rounds"] += 1
        sent = int(self.device.stats.bytes[self.index])
        try:
            if self._tx:
                res = self.device.process_tx(self.index, irq_fd=self._own_irq_fd())
            else:
                res = self.device.poll_rx(self.index // 2, now)
        except (RingsError, DeviceStateError) as err:
            self._fail(err)
            return None
        except Exception:
            # A port raised: the device returned the chains and counted them as port_error.
            log.exception("ring %d: the port raised; its batch was dropped", self.index)
            res = QueueResult(queue=self.index, more=True)
        nbytes = int(self.device.stats.bytes[self.index]) - sent if res.processed else 0
        if res.interrupt:
            if self._tx and self.paired_rx_active() and defer_tx_interrupt(self.device.policy,
                                                                           processed=res.processed,
                                                                           nbytes=nbytes):
                self.hold_interrupt()
            elif self._irq_held is not None:
                self.release_interrupt()  # one write announces the held entries and these
            else:
                self.signal()
        if res.error is not None:
            self._fail(res.error)
            return None
        if res.processed:
            self._gap_us = (now - self._last_work) * 1e6
            if self._poll_until:
                self._poll_until = 0.0
                self.counters["ahead_hits"] += 1
            self._last_batch, self._last_bytes = res.processed, nbytes
            policy = self.device.policy
            self._last_full = res.processed >= (policy.tx_batch if self._tx else policy.rx_batch)
            self._empty_rounds, self._last_work = 0, now
            self._moved += res.processed
            self._moved_bytes += nbytes
            if self._tx:
                peer = self._rx_peer
                reply = peer is not None and poll_for_reply(policy, processed=res.processed, nbytes=nbytes)
                warm = keep_warm(policy, processed=res.processed, nbytes=nbytes)
                ahead = (policy.poll_ahead_us > 0 and not self._no_ahead
                         and is_request(policy, processed=res.processed, nbytes=nbytes))  # fmt: skip
                # A request, unless it is a TCP receiver's ACK (asked only then: a stream's rounds skip it).
                if (reply or warm or ahead) and not (peer is not None and peer.streaming(now)):
                    if reply and peer is not None:
                        peer.poll_reply()
                    if warm:
                        self._keep_warm()
                    if ahead:
                        self._plan_ahead(now)
                elif self._gaps:
                    self._gaps.clear()  # a stream's round: the pace of requests starts again
                if self.after_tx is not None:
                    self.after_tx(self.index // 2)
        else:
            self._empty_rounds += 1
        return res

    def _own_irq_fd(self) -> int | None:
        """TX: the call eventfd a round may write itself (-1: none set), or None: the pump signals.
        A round that writes its frames to a TAP decides and sends the interrupt between returning the
        chains and writing the frames (``VirtioNetDevice.process_tx``), unless a held interrupt
        (``tx_irq_wait_us``) must go with the RX one."""
        if self.device.policy.tx_irq_wait_us > 0 or self._irq_held is not None:
            return None
        return -1 if self.call_fd is None else self.call_fd

    def streaming(self, now: float) -> bool:
        """This ring carries a stream (:func:`~nicsim.virtio.policy.streaming`): the pair's TX ring
        then neither polls for replies nor for the next request."""
        return streaming(self.device.policy, last_batch=self._last_batch, last_bytes=self._last_bytes,
                         idle_us=(now - self._last_work) * 1e6)  # fmt: skip

    def paired_rx_active(self) -> bool:
        """Whether an RX pump will send this TX ring's held interrupt with its own (else the deadline)."""
        return self._rx_peer is not None and self._rx_peer.active and not self._rx_peer.broken

    def _round(self) -> None:
        self._handle = None
        try:
            self._rounds()
        except Exception:
            # A bug in a round (or in what it calls back: the pair's pump, a port's wakeup) must not
            # leave the pump marked busy with nothing scheduled: kicks and the watchdog would skip it
            # for good and the ring would stall with every counter at rest. Said loudly, counted, and
            # the ring is looked at again shortly.
            log.exception("ring %d: a round failed; looking at the ring again in %.0f ms", self.index,
                          _RETRY_S * 1e3)  # fmt: skip
            self.counters["round_errors"] += 1
            if self.active and not self.broken and self._handle is None:
                self._busy = True
                self._later(_RETRY_S)

    def _rounds(self) -> None:
        if not self.active:
            self._busy = False
            return
        policy = self.device.policy
        now = time.monotonic()
        # A tight loop while the ring has more than one round of work: one loop callback (and one
        # epoll_wait) per ``rounds_per_call`` rounds instead of per round.
        res = self._one_round(now)
        more = res is not None and self._more(res)
        batch = policy.tx_batch if self._tx else policy.rx_batch
        for _ in range(policy.rounds_per_call - 1):
            if res is None or not more or res.blocked or not self.active or res.processed > batch:
                break  # (more than a batch: a fused call ran its rounds; the loop's other work is due)
            now = time.monotonic()
            res = self._one_round(now)
            more = res is not None and self._more(res)
        if res is None:
            return
        if not self.active:
            self._busy = False
            return
        if res.blocked:
            self._later(_RETRY_S)
            return
        peer_streams = self._rx_peer is not None and self._rx_peer.streaming(now)
        if (self.offer_lane is not None and self._tx and res.processed and not more and not peer_streams
                and is_request(policy, processed=res.processed, nbytes=self._last_bytes)
                and self.offer_lane()):  # fmt: skip
            return  # the lane serves the next requests (this pump is parked)
        rr = (self._tx and request_response(policy, gap_us=self._gap_us, last_batch=self._last_batch,
                                            last_bytes=self._last_bytes) and not peer_streams)  # fmt: skip
        # An RX ring whose port has nothing (a TAP with nothing to read) is not busy-polled: the port
        # wakes it when it has, and each empty round there is a failed readv that delays the TX ring's
        # polls (--poll-us 20000, a 3000-ping flood, five alternated pairs: four faster, the medians
        # of their p50s 0.238 -> 0.207 ms).
        ahead = now < self._poll_until
        if not ahead:
            self._poll_until = 0.0
        action = poll_action(policy, more=more, empty_rounds=self._empty_rounds,
                             idle_us=(now - self._last_work) * 1e6, rr=rr, full=self._last_full,
                             pollable=self._tx or self._rx_has_work(), ahead=ahead)  # fmt: skip
        if action is not PollAction.REARM:
            self._handle = self.loop.call_soon(self._round)
            return
        self._rearm(res, rr=rr)

    def _more(self, res: QueueResult) -> bool:
        """Whether to run another round now for the work ``res`` left; a TX packet stream's few
        leftover chains wait for the batch instead (:func:`~nicsim.virtio.policy.chase_tx`)."""
        if not self._tx or not res.more or not self.device.event_idx or self.device.has(VIRTIO_F_RING_PACKED):
            # (Packed rings chase: measured, waiting for the batch there cost guest TX a quarter of
            # its frames, 900 -> 689 k pps at 64 B; their event offsets are not avail_event's.)
            return res.more
        return chase_tx(self.device.policy, pending=res.pending, moved=self._moved,
                        processed=res.processed, nbytes=self._last_bytes if res.processed else 0)  # fmt: skip

    def _rearm(self, res: QueueResult, *, rr: bool = False) -> None:
        if not self._tx and not self._rx_has_work():
            # Nothing to deliver: posted buffers are not work. Sleep until the port wakes us
            # (on_wakeup) or the guest kicks.
            self._sleep(0, idle_rx=True)
            return
        q = self.device.queue(self.index)
        batch = 0
        # Request/response traffic wants its next request served at once, however many requests the
        # polling before this sleep served one by one: no batch (its 1 ms wait would be the RTT).
        if q is not None and not rr and (self._tx or _pull_style(self.device.port)):
            batch = self.device.policy.kick_target(queue_size=q.size, moved=self._moved, tx=self._tx,
                                                   nbytes=self._moved_bytes)
        self._sleep(batch, idle_rx=False, starved=not self._tx and not res.processed)

    def _sleep(self, batch: int, *, idle_rx: bool, starved: bool = False) -> None:
        """Re-arm kicks (for the first buffer, or for ``batch`` more) and sleep if nothing is due.
        ``starved``: an RX round had buffers but the port offered nothing (rate limit, pool short)."""
        try:
            quiet = self.device.rearm_kicks(self.index, after=batch)
        except (RingsError, DeviceStateError) as err:
            self._fail(err)
            return
        if not quiet and not idle_rx:
            self._moved = self._moved_bytes = 0
            if starved:
                self._later(_RETRY_S)  # looking again at once would only spin
            else:
                # The guest published in the race window, or a batch is there: keep going.
                self._handle = self.loop.call_soon(self._round)
            return
        if self.kick_fd is None:
            self._later(_RETRY_S)  # SET_VRING_KICK said "no fd": the frontend wants us to poll
            return
        self.counters["sleeps"] += 1
        self._busy = False
        if batch:
            self.counters["batch_sleeps"] += 1
            self._handle = self.loop.call_later(self.device.policy.batch_wait_us * 1e-6, self._on_timer)

    def _rx_has_work(self) -> bool:
        port = self.device.port
        if _pull_style(port) and not getattr(port, "finished", False):
            return True
        return self.device.rx_backlog(self.index // 2) > 0

    def _later(self, delay: float) -> None:
        self._handle = self.loop.call_later(delay, self._round)

    def _keep_warm(self) -> None:
        """TX, after a request's round: wake the loop every ``warm_tick_us`` until ``warm_for_ms`` pass
        with no request, so the core is never long asleep when the next one comes. The tick does
        nothing else: waking the core is its work (see ``NotifyPolicy.warm_tick_us``)."""
        tick_us = self.device.policy.warm_tick_us
        if self._warm is None and tick_us > 0:
            self._warm = self.loop.call_later(tick_us * 1e-6, self._on_warm_tick)

    def _on_warm_tick(self) -> None:
        self._warm = None
        if not self.active or self.broken:
            return
        self.counters["warm_ticks"] += 1
        if (time.monotonic() - self._last_work) * 1e3 < self.device.policy.warm_for_ms:
            self._keep_warm()

    def _cool(self) -> None:
        if self._warm is not None:
            self._warm.cancel()
            self._warm = None
        if self._ahead is not None:
            self._ahead.cancel()
        self._poll_until = 0.0

    def _plan_ahead(self, now: float) -> None:
        """TX, after a request's round: if requests come at a steady pace (:func:`poll_ahead`), start
        polling for the next one shortly before it is due (:meth:`_on_ahead`). Timed by a timerfd:
        asyncio's timers fire up to a millisecond late, after the request."""
        if self._ahead is not None and self._ahead.armed and now < self._ahead_start:
            # Before the window planned for the next request: another frame (an IPv6 router
            # solicitation, an ARP probe), not the request; the window stays where it is. Measured in
            # the bench's ping cells, each such frame cost about four windows when it moved them.
            return
        policy = self.device.policy
        gap_us = (now - self._last_request) * 1e6
        self._last_request = now
        if not paced_gap(policy, gap_us):
            # Back to back (a flood, an RPC loop: rr_poll_us polls between them), or the first request
            # in a long while: no pace to go by.
            self._gaps.clear()
            window = None
        else:
            self._gaps.append(gap_us)
            window = poll_ahead(policy, self._gaps)
        if window is None:
            if self._ahead is not None:
                self._ahead.cancel()
            return
        if self._ahead is None:
            try:
                self._ahead = PreciseTimer(self.loop, self._on_ahead)
            except OSError as err:
                log.warning("ring %d: no timerfd (%s): requests at a steady pace are not polled for",
                            self.index, err)  # fmt: skip
                self._no_ahead = True
                return
        start_us, end_us = window
        self._ahead_start, self._ahead_end = now + start_us * 1e-6, now + end_us * 1e-6
        self._ahead.set_at(self._ahead_start)

    def _on_ahead(self) -> None:
        if not self.active or self.broken:
            return
        self._poll_until = self._ahead_end
        self.wake("wakeups_ahead")

    def _fail(self, err: Exception) -> None:
        # The guest broke the ring (or we called out of order): stop it until the frontend resets it.
        log.error("ring %d stopped: %s", self.index, err)
        self.broken = True
        self._halt()
        if isinstance(err, GuestError):
            # Not silently: the device sets DEVICE_NEEDS_RESET (GET_STATUS reports it; virtio 1.2
            # §2.1.2) and the err eventfd, vhost-user's channel for "this ring is in error", fires.
            self.device.ring_failed(self.index, err)
            self.signal_error()

    # -- the stall watchdog -----------------------------------------------------------------------

    def _arm_watchdog(self) -> None:
        period_ms = self.device.policy.stall_recheck_ms
        if period_ms > 0 and self._watchdog is None:
            self._watchdog = self.loop.call_later(period_ms * 1e-3, self._on_watchdog)

    def _disarm_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _on_watchdog(self) -> None:
        self._watchdog = None
        if not self.active or self.broken:
            return
        self._check_stall()
        if self.active and not self.broken:
            self._arm_watchdog()

    def _check_stall(self) -> None:
        if self._busy and self._handle is None:
            # Busy with no round scheduled: no code path leaves the pump so, and nothing would ever
            # wake it again. Restart it rather than trust that no bug ever will.
            log.error("ring %d: rounds were due but none was scheduled; restarting them", self.index)
            self.counters["wedges"] += 1
            self._busy = False
            self.wake("wakeups_stall")
            return
        if self._busy or self._handle is not None:
            # Rounds are scheduled, or a timer (batch wait, retry) will look at the ring anyway.
            self._stall_mark = None
            return
        try:
            probe = self.device.probe(self.index)
        except DeviceStateError:
            self._stall_mark = None
            return
        except RingsError as err:
            self._fail(err)
            return
        work = probe.avail_pending > 0 and (self._tx or self._rx_has_work())
        pending = work or probe.irq_owed
        if not is_stalled(pending=pending, progress=probe.progress, previous=self._stall_mark):
            self._stall_mark = probe.progress if pending else None
            return
        self._stall_mark = None
        log.debug("ring %d: work pending and no progress for %.0f ms: re-checking (a notification was lost)",
                  self.index, self.device.policy.stall_recheck_ms)  # fmt: skip
        try:
            owed = self.device.recheck_stalled(self.index)
        except (RingsError, DeviceStateError) as err:
            self._fail(err)
            return
        if owed:
            self.signal()
        self.wake("wakeups_stall")

    def _watch(self) -> None:
        if self.kick_fd is not None and not self._watching:
            self.loop.add_reader(self.kick_fd, self._on_kick)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching and self.kick_fd is not None:
            self.loop.remove_reader(self.kick_fd)
        self._watching = False

    def _cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._busy = False


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
