"""The device's queues and what both data paths share: the per-queue state, the guest memory, the
negotiated features, and the steps every path ends with.

This module owns :class:`QueueSet`, the one object the device, :class:`nicsim.virtio.tx.TxPath` and
:class:`nicsim.virtio.rx.RxPath` all hold, so the two paths never import the device: one
:class:`QueueState` per started queue (a :class:`DeviceQueue`, split or packed, plus the device's bookkeeping;
queue ``2k`` is receiveq ``k``, ``2k + 1`` transmitq ``k``, virtio 1.2 §5.1.2), the memory table, what
the negotiated feature bits mean to the paths, the inflight hooks and the wakeup callback; and the
shared steps: publishing used entries bracketed by the inflight hooks, counting bad chains as drops,
deciding an interrupt with :mod:`nicsim.virtio.policy`, finding and sending an interrupt a stall
re-check owes the driver, marking a queue broken. It also owns the results those steps produce
(:class:`QueueResult`, :class:`RingProbe`) and the error for calls made out of order
(:class:`DeviceStateError`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from nicsim.errors import LocalError
from nicsim.virtio.features import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    has,
)
from nicsim.virtio.inflight import InflightHooks
from nicsim.virtio.policy import NotifyPolicy, should_interrupt
from nicsim.virtio.port import ETH_HLEN, MAX_FRAME, vnet_hdr_len
from nicsim.virtio.stats import DeviceStats
from rings.chains import ChainBatch, ErrorCode
from rings.dirty_log import DirtyLog
from rings.errors import GuestError
from rings.memory import GuestMemory
from rings.packed import PackedQueue
from rings.packed_layout import EVENT_SIZE, PDESC_SIZE
from rings.packed_walk import SavedChains
from rings.pool import PacketPool
from rings.short_chains import ShortChain
from rings.split import SplitQueue

CHAIN_REASONS = tuple(f"chain_{c.name.lower()}" for c in ErrorCode if c != ErrorCode.OK)
DROP_REASONS = (
    *CHAIN_REASONS,
    "short_header",   # TX chain shorter than the virtio-net header
    "runt",           # TX frame shorter than an Ethernet header
    "no_rx_buffer",   # RX frame with no guest buffer and a full backlog
    "too_big",        # RX frame larger than the guest's buffers allow
    "queue_stopped",  # RX frames still queued when their queue stopped
    "port_error",     # the port raised while handling a TX batch
    "ring_error",     # the guest corrupted a ring (e.g. avail.idx); the queue is marked broken
    "ring_disabled",  # TX chains discarded, RX frames refused: the ring is started but disabled
    "over_mtu",       # a frame (gso_type NONE) longer than the negotiated MTU allows, TX or RX
)

VLAN_HLEN = 4  # an 802.1Q tag: a tagged frame of a full MTU is that much longer
GSO_TYPE_OFFSET = 1  # struct virtio_net_hdr: flags u8, gso_type u8 (virtio 1.2 §5.1.6)
GSO_ECN = 0x80  # a flag on top of the GSO type, not a type of its own


class DeviceStateError(LocalError, RuntimeError):
    """Our side called the device out of order (e.g. process_tx on a stopped queue). ``queue`` if known."""

    def __init__(self, message: str, *, queue: int | None = None) -> None:
        super().__init__(message if queue is None else f"{message} (queue {queue})")
        self.queue = queue


# What an interrupt decision made in a compiled round did (``QueueSet.decided_interrupt``).
IRQ_NONE = 0  # no used entry since the last decision
IRQ_SUPPRESSED = 1  # the driver wants none for them (they need none later either)
IRQ_LATER = 2  # the driver wants one, the policy waits (no EVENT_IDX: coalescing)
IRQ_SENT = 3  # the call eventfd was written (or the ring has none)
IRQ_FAILED = 4  # the write failed with an errno other than EAGAIN (a saturated counter)
NOT_RUN = -1  # the round did not decide (the caller does)


@dataclass(slots=True, kw_only=True)  # not frozen: made every round, and frozen's __init__ is 5x slower
class QueueResult:
    """What one device call did to one queue. ``interrupt``: signal the queue's call eventfd now (the
    device already counted it). ``more``: work is left (poll again without waiting for a kick).
    ``blocked``: the pool ran out, or the port took no chain this round (``DevicePort.tx_budget``:
    a paced sender) (backpressure; the next call resumes). ``error``: the guest broke
    the ring and the queue is stopped until reset. ``pending``: how much work is left, where the
    round counted it (a TX round: the chains still on the avail ring), else 0."""

    queue: int
    processed: int = 0
    dropped: int = 0
    interrupt: bool = False
    more: bool = False
    pending: int = 0
    blocked: bool = False
    error: GuestError | None = None


@dataclass(frozen=True, kw_only=True)
class RingProbe:
    """What a stall watchdog sees of one queue, without touching it. ``progress``: the device's
    (``last_avail_idx``, ``used_idx``); ``avail_pending``: avail entries not taken yet;
    ``irq_owed``: used entries were published since the last interrupt and the ring (used_event or
    the flags, read now) says the driver wants one for them."""

    progress: tuple[int, int]
    avail_pending: int
    irq_owed: bool


class DeviceQueue(Protocol):
    """What the device uses of a ring, split (:class:`~rings.split.SplitQueue`) or packed
    (:class:`~rings.packed.PackedQueue`). On a split ring a head and a used entry are one chain; on a
    packed ring ``pop_avail`` returns buffer ids, and ``last_avail_idx``, ``used_idx`` and
    ``kick_after`` count ring descriptors (a chain of two counts two): the interrupt policy's
    ``unsignalled`` then counts descriptors too, which only makes ``irq_coalesce`` (no EVENT_IDX)
    signal a little sooner; with EVENT_IDX the ring's answer is followed as is."""

    index: int
    size: int
    last_avail_idx: int
    used_idx: int

    @property
    def vring_base(self) -> int: ...

    def avail_pending(self, mem: GuestMemory) -> int: ...

    def pop_avail(self, mem: GuestMemory, max_count: int) -> npt.NDArray[np.uint16]: ...

    def unpop_avail(self, count: int) -> None: ...

    def walk(self, mem: GuestMemory, heads: npt.ArrayLike, *, indirect: bool = True) -> ChainBatch: ...

    def peek_short(
        self, mem: GuestMemory, count: int, *, indirect: bool = True
    ) -> list[ShortChain] | None: ...

    def skip_avail(self, count: int) -> None: ...

    def push_used(self, mem: GuestMemory, ids: npt.ArrayLike, lengths: npt.ArrayLike) -> None: ...

    def push_used_few(self, mem: GuestMemory, ids: Sequence[int], lengths: Sequence[int]) -> None: ...

    def needs_interrupt(self, mem: GuestMemory, *, old_used_idx: int, event_idx: bool) -> bool: ...

    def suppress_kicks(self, mem: GuestMemory, suppress: bool, *, event_idx: bool) -> None: ...

    def kick_after(self, mem: GuestMemory, count: int) -> None: ...


class QueueState:
    """One started queue: the ring, and what the device keeps about it between calls."""

    __slots__ = ("broken", "irq_used", "q", "resubmit", "saved", "signalled_used")

    def __init__(self, q: DeviceQueue) -> None:
        self.q = q
        # Heads in flight when a previous backend died (rings.inflight recovery): processed before the
        # avail ring, each completed exactly once (vhost-user spec, "Inflight I/O tracking").
        self.resubmit: npt.NDArray[np.uint16] = np.zeros(0, np.uint16)
        # The same on a packed ring (rings.inflight_packed recovery): the chains with the descriptors
        # the region saved, since their ring slots may hold used descriptors by now.
        self.saved: SavedChains | None = None
        self.signalled_used = q.used_idx  # used.idx at the last decision (vhost's signalled_used)
        # used.idx at the last interrupt actually sent: a decision against one (signalled_used moved on)
        # may have read a used_event the driver was replacing, which a stall re-check looks at again.
        self.irq_used = q.used_idx
        self.broken: GuestError | None = None

    @property
    def resubmit_count(self) -> int:
        """Chains a previous backend left in flight that are still to be processed."""
        saved = 0 if self.saved is None else int(self.saved.ids.shape[0])
        return int(self.resubmit.shape[0]) + saved


SHORT_ROUND = 8
"""Rounds of at most this many chains take the scalar path (``nicsim.virtio.tx_short`` / ``rx_short``).
The numpy path costs about the same for 1 chain as for 24 (measured in-process, 98-byte frames: TX
about 41 us, RX about 100 us a round), the scalar one grows by about 2 us (TX) and 3 us (RX) a chain
from about 12 us: they cross near 14 chains for TX and 30 for RX, so up to 8 both gain clearly."""


class QueueSet:
    """The state the device and its two data paths share, and the steps they share."""

    def __init__(
        self, num_queues: int, *, pool: PacketPool, stats: DeviceStats, policy: NotifyPolicy,
        short_round: int = SHORT_ROUND,
    ) -> None:
        self.num_queues = num_queues
        self.pool = pool
        self.stats = stats
        self.policy = policy
        # The most chains a round may take through the scalar path; 0 sends every round down the
        # numpy path (the reference the scalar one is tested against).
        self.short_round = short_round
        self.states: list[QueueState | None] = [None] * num_queues
        # vhost-user SET_VRING_ENABLE, tracked apart from started/stopped (spec "Ring states"); a
        # device nobody disables (no vhost-user, or no protocol features) has every ring enabled.
        self.enabled: list[bool] = [True] * num_queues
        self.mem: GuestMemory | None = None
        self.inflight: InflightHooks | None = None  # set by the server with INFLIGHT_SHMFD
        self.on_wakeup: Callable[[int], None] | None = None
        # Told instead of on_wakeup when frames went straight into a ring's buffers and only its
        # interrupt is left to decide (the switch); None: on_wakeup.
        self.on_delivered: Callable[[int], None] | None = None
        self.in_call = False  # a port runs inside process_tx: no wakeups (the server asks afterwards)
        # A live migration's dirty log (vhost-user SET_LOG_BASE) and whether it is on (VHOST_F_LOG_ALL):
        # while ``logging``, every write to guest memory is logged (:meth:`log_used`, and RX data in rx).
        self.dirty_log: DirtyLog | None = None
        self.log_all = False
        self.closed = False
        # DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2): a ring broke; latched until the driver resets the device.
        self.needs_reset = False
        self.mtu: int | None = None  # NET_SET_MTU's value (the host MTU the driver was told)
        self.set_features(0)

    def set_features(self, bits: int) -> None:
        """What the negotiated bits mean to the paths, worked out once (the paths read plain fields)."""
        self.features = bits
        self.event_idx = has(bits, VIRTIO_F_EVENT_IDX)
        self.indirect = has(bits, VIRTIO_F_INDIRECT_DESC)
        self.mergeable = has(bits, VIRTIO_NET_F_MRG_RXBUF)
        self.guest_csum = has(bits, VIRTIO_NET_F_GUEST_CSUM)
        self.hdr_len = vnet_hdr_len(bits)
        self._update_frame_limit()

    def set_mtu(self, mtu: int | None) -> None:
        """The host MTU (vhost-user NET_SET_MTU, which QEMU sends before SET_FEATURES)."""
        self.mtu = mtu
        self._update_frame_limit()

    def _update_frame_limit(self) -> None:
        # virtio 1.2 §5.1.4 (VIRTIO_NET_F_MTU negotiated): neither the driver on TX nor the device on
        # RX passes a packet with gso_type NONE or ECN longer than mtu plus the low-level (Ethernet)
        # header; that header may carry an 802.1Q tag. GSO frames are bounded by MAX_FRAME only, as
        # is everything when the bit or the MTU is missing.
        limit = MAX_FRAME
        if self.mtu is not None and has(self.features, VIRTIO_NET_F_MTU):
            limit = min(limit, self.mtu + ETH_HLEN + VLAN_HLEN)
        # The longest frame (virtio-net header excluded) with gso_type NONE either direction may carry.
        self.frame_limit = limit

    # -- lookup ---------------------------------------------------------------------------------------

    def check_index(self, index: int) -> None:
        if not 0 <= index < self.num_queues:
            raise DeviceStateError(f"no queue {index}; the device has {self.num_queues}", queue=index)
        if self.closed:
            raise DeviceStateError("device shut down", queue=index)

    def running(self, index: int) -> tuple[QueueState, GuestMemory]:
        self.check_index(index)
        st = self.states[index]
        if st is None or self.mem is None:
            raise DeviceStateError("queue not started", queue=index)
        return st, self.mem

    # -- the steps both paths share -------------------------------------------------------------------

    def mark_used(
        self, index: int, q: DeviceQueue, mem: GuestMemory, heads: npt.NDArray[Any],
        lens: npt.NDArray[np.uint32], *, filled: bool = False,
    ) -> None:
        """push_used, bracketed by the inflight hooks (spec, "When supplying used buffers").
        ``filled``: the heads are the first chains of the ring's last pop, taken and filled in this
        same call and not recorded as popped (RX): the hooks record them first."""
        hooks = self.inflight
        if hooks is not None:
            if filled:
                hooks.filling(index, q, mem, heads)
            hooks.before_used(index, q, heads)
        q.push_used(mem, heads, lens)
        if self.logging:
            self.log_used(q)
        if hooks is not None:
            hooks.after_used(index, q, heads)

    def release(
        self, index: int, q: DeviceQueue, mem: GuestMemory, heads: npt.NDArray[np.uint16],
        lens: npt.NDArray[np.uint32], descs: npt.NDArray[np.int32], *, filled: bool = False,
    ) -> None:
        """:meth:`mark_used` of a round's chains and ``pool.free_batch`` of the descriptors that held
        them, in one compiled call (``SplitQueue.complete_round``) when nothing needs the used entries
        on their way (inflight hooks, the dirty log); the numpy way otherwise, or when the kernel
        declines (the pool then raises what is wrong)."""
        if not (self.inflight is None and not self.logging and isinstance(q, SplitQueue)
                and q.complete_round(mem, heads, lens, descs, self.pool)):  # fmt: skip
            self.mark_used(index, q, mem, heads, lens, filled=filled)
            self.pool.free_batch(descs)
        self.stats.add_inflight(index, -int(descs.shape[0]))

    def mark_used_few(
        self, index: int, q: DeviceQueue, mem: GuestMemory, heads: list[int], lens: list[int], *,
        filled: bool = False,
    ) -> None:
        """:meth:`mark_used` for a short round's few entries, as ints (the hooks get arrays)."""
        hooks = self.inflight
        if hooks is not None or self.logging:
            ids, lengths = np.array(heads, np.uint16), np.array(lens, np.uint32)
            self.mark_used(index, q, mem, ids, lengths, filled=filled)
            return
        q.push_used_few(mem, heads, lens)

    @property
    def logging(self) -> bool:
        """A migration is under way: every write to guest memory goes in the dirty log."""
        return self.log_all and self.dirty_log is not None

    def log_used(self, q: DeviceQueue) -> None:
        """Log what the device writes of the ring. Split: the used ring's pages (entries, index,
        ``avail_event``: all of it, a page or two). Packed: used descriptors are written in the
        descriptor ring itself (16 bytes each, §2.8.6), the kick hints in the device event suppression
        area (§2.8.10): both, whole."""
        assert self.dirty_log is not None
        if isinstance(q, SplitQueue):
            self.dirty_log.mark(q.used_addr, 6 + 8 * q.size)
        else:
            assert isinstance(q, PackedQueue)
            self.dirty_log.mark(q.desc_addr, PDESC_SIZE * q.size)
            self.dirty_log.mark(q.device_addr, EVENT_SIZE)

    def count_chain_errors(self, index: int, cb: ChainBatch) -> int:
        """Count the batch's bad chains as drops, by error code; returns how many there were."""
        if not cb.errors:  # the walker sets ``errors[k]`` with every ``error[k]``
            return 0
        bad = cb.error[cb.error != 0]
        if bad.shape[0] == 0:
            return 0
        for code, n in zip(*np.unique(bad, return_counts=True), strict=True):
            self.stats.drop(index, CHAIN_REASONS[int(code) - 1], int(n))
        return int(bad.shape[0])

    def decide_interrupt(self, index: int, st: QueueState, mem: GuestMemory, *, idle: bool) -> bool:
        """Whether to signal ``index`` now for used entries not yet signalled; counts it when True."""
        q = st.q
        unsignalled = (q.used_idx - st.signalled_used) & 0xFFFF
        if unsignalled == 0:
            return False
        wants = q.needs_interrupt(mem, old_used_idx=st.signalled_used, event_idx=self.event_idx)
        if not should_interrupt(self.policy, unsignalled=unsignalled, idle=idle, ring_wants=wants,
                                event_idx=self.event_idx):  # fmt: skip
            if not wants:
                # The guest suppressed it: these entries need no interrupt later either (§2.7.10
                # compares against the index at which we last decided).
                st.signalled_used = q.used_idx
            return False
        st.signalled_used = st.irq_used = q.used_idx
        self.stats.interrupts[index] += 1
        return True

    def decided_interrupt(self, index: int, st: QueueState, code: int) -> None:
        """The bookkeeping of :meth:`decide_interrupt` for a decision a compiled round made and acted on
        (``IRQ_*``: the round wrote the call eventfd itself, ``nicsim.ports.fd_kernels``)."""
        if code == IRQ_SUPPRESSED:
            st.signalled_used = st.q.used_idx
        elif code in (IRQ_SENT, IRQ_FAILED):
            st.signalled_used = st.irq_used = st.q.used_idx
            self.stats.interrupts[index] += 1

    def probe(self, st: QueueState, mem: GuestMemory) -> RingProbe:
        q = st.q
        owed = q.used_idx != st.irq_used and q.needs_interrupt(
            mem, old_used_idx=st.irq_used, event_idx=self.event_idx
        )
        return RingProbe(progress=(q.last_avail_idx, q.used_idx), avail_pending=q.avail_pending(mem),
                         irq_owed=owed)  # fmt: skip

    def recheck_interrupt(self, index: int, st: QueueState, mem: GuestMemory) -> bool:
        """A stall re-check: signal now if the ring wants an interrupt for any used entry published
        since the last one sent (the decision then may have read an old used_event or flags: both
        sides waiting is the stall). Counts the re-check, and the interrupt if there is one.

        With EVENT_IDX a driver that polled those entries itself has moved ``used_event`` to
        ``used.idx`` since, so nothing is owed. Without it the flag cannot say whether it did: a burst
        the driver polled to its end with NO_INTERRUPT set, then went quiet, costs one spurious
        interrupt (harmless: §2.7.7 lets the device send one) and one count here."""
        self.stats.stall_rechecks[index] += 1
        if not self.probe(st, mem).irq_owed:
            return False
        st.signalled_used = st.irq_used = st.q.used_idx
        self.stats.interrupts[index] += 1
        return True

    def broke(self, index: int, st: QueueState, err: GuestError) -> QueueResult:
        """The guest corrupted the ring: the queue stays stopped until the frontend resets it, and the
        device needs a reset (virtio 1.2 §2.1.2: it SHOULD set DEVICE_NEEDS_RESET in that state)."""
        st.broken = _detached(err)
        self.needs_reset = True
        self.stats.drop(index, "ring_error")
        return QueueResult(queue=index, error=err)

    def wake(self, index: int) -> None:
        if self.on_wakeup is not None and not self.in_call:
            self.on_wakeup(index)

    def delivered(self, index: int) -> None:
        """Used entries were published on ``index`` outside a round: its interrupt is to be decided."""
        if self.on_delivered is None:
            self.wake(index)
        elif not self.in_call:
            self.on_delivered(index)


def _detached(err: GuestError) -> GuestError:
    """``err`` without the frames it was raised through (its cause's too): they hold views of guest
    memory, which the broken queue, and any log record that keeps the error, would keep mapped after
    the memory table is replaced or the session closes."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return err
