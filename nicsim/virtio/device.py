"""The virtio-net device (virtio 1.2 §5.1), I/O-free: TX from the guest's avail rings to a port, RX from
the port into the guest's buffers, every in-flight guest buffer tracked by a pool descriptor.

This module owns :class:`VirtioNetDevice`: its configuration (queue pairs, the packet pool, the port,
the notification policy), the feature bits it offers and the ones negotiated, the queue lifecycle
(start, stop on GET_VRING_BASE, shutdown), the kick decisions, and the snapshot. It composes the two
data paths, :class:`~nicsim.virtio.tx.TxPath` and :class:`~nicsim.virtio.rx.RxPath`, which share a
:class:`~nicsim.virtio.queues.QueueSet` (the per-queue state, the memory table, what the negotiated
features mean, the interrupt decision) and never import this module. It reads and writes no fd: the
asyncio server calls :meth:`VirtioNetDevice.process_tx`, :meth:`~VirtioNetDevice.poll_rx` and
:meth:`~VirtioNetDevice.deliver_rx` when a kick or a port wakes it, signals the call eventfd when a
result says ``interrupt``, and calls :meth:`~VirtioNetDevice.stop_queue` / :meth:`~VirtioNetDevice.shutdown`
on GET_VRING_BASE and teardown. Nothing is lost silently: every frame is delivered or counted as a drop
with a reason, and pool exhaustion is backpressure (stop taking buffers; the next call resumes), never
a drop. Offloads (CSUM, GUEST_CSUM, HOST_/GUEST_TSO4/6) are offered only on top of the base set and only
when the port declares it can honour them (``DevicePort.features``); the port hears what was
negotiated, and a header-passing port (``DevicePort.vnet_hdr``) gets the guest's virtio-net header on TX
and supplies the kernel's on RX, with one pool descriptor per guest chain however large the (GSO) frame.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.virtio import lane
from nicsim.virtio.announce import OwnFrames, rarp_frame
from nicsim.virtio.features import (
    OFFLOAD_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
)
from nicsim.virtio.features import has as has_bit
from nicsim.virtio.inflight import InflightHooks
from nicsim.virtio.lane import LaneCall, LaneSettings
from nicsim.virtio.policy import NotifyPolicy
from nicsim.virtio.port import Buffer, DevicePort
from nicsim.virtio.queues import (
    DROP_REASONS,
    SHORT_ROUND,
    DeviceQueue,
    DeviceStateError,
    QueueResult,
    QueueSet,
    QueueState,
    RingProbe,
)  # fmt: skip
from nicsim.virtio.rx import RxPath
from nicsim.virtio.stats import DeviceStats
from nicsim.virtio.tx import TxPath
from rings.dirty_log import DirtyLog
from rings.errors import GuestError
from rings.memory import GuestMemory
from rings.packed import PackedQueue
from rings.packed_walk import SavedChains
from rings.pool import PacketPool
from rings.round_kernels import RoundArea

# Defined with the data paths (which may not import this module); callers know them from here.
__all__ = [
    "DEVICE_NEEDS_RESET", "DROP_REASONS", "DeviceStateError", "QueueResult", "RingProbe", "VirtioNetDevice",
]  # fmt: skip

DEVICE_NEEDS_RESET = 0x40  # device status bit (virtio 1.2 §2.1): an error only a device reset clears


class VirtioNetDevice:
    """One virtio-net device with ``pairs`` queue pairs, wired to ``port``."""

    def __init__(
        self,
        *,
        port: DevicePort,
        pairs: int = 1,
        pool: PacketPool | None = None,
        policy: NotifyPolicy | None = None,
        on_wakeup: Callable[[int], None] | None = None,
        short_round: int = SHORT_ROUND,
    ) -> None:
        """``short_round``: rounds of at most this many chains take the scalar path (0: none do)."""
        if pairs < 1:
            raise ValueError("a virtio-net device needs at least one queue pair")
        self.pairs = pairs
        self.num_queues = 2 * pairs
        self.policy = policy or NotifyPolicy()
        self.pool = pool if pool is not None else PacketPool(4096, name="virtio-net")
        self.port = port
        self.stats = DeviceStats(self.num_queues, DROP_REASONS)
        self._qs = QueueSet(self.num_queues, pool=self.pool, stats=self.stats, policy=self.policy,
                            short_round=short_round)  # fmt: skip
        self._qs.on_wakeup = on_wakeup
        self._offloads = port.features() & OFFLOAD_FEATURES
        self._tx = TxPath(self._qs, port)
        self._rx = RxPath(self._qs, port, pairs, offloads=bool(self._offloads))
        if pairs > 1:
            self._tx.on_sent = self._rx.learn_tx  # flows' RX pair follows their TX pair (nicsim.virtio.steer)
        port.attach(self._rx)  # the port pushes straight into the RX path
        self._lane_areas: dict[int, RoundArea] = {}  # a request lane's work arrays, per queue
        self.announced = 0  # RARPs sent for SEND_RARP
        self.announce_failed = 0

    # -- state the server sets ----------------------------------------------------------------------

    @property
    def inflight(self) -> InflightHooks | None:
        """The inflight hooks (the server sets them with INFLIGHT_SHMFD), or None."""
        return self._qs.inflight

    @inflight.setter
    def inflight(self, hooks: InflightHooks | None) -> None:
        self._qs.inflight = hooks

    @property
    def on_wakeup(self) -> Callable[[int], None] | None:
        """Called with a queue index when work arrives outside a device call (a port pushed a frame)."""
        return self._qs.on_wakeup

    @on_wakeup.setter
    def on_wakeup(self, fn: Callable[[int], None] | None) -> None:
        self._qs.on_wakeup = fn

    @property
    def on_delivered(self) -> Callable[[int], None] | None:
        """Called with a queue index when a port's frames went straight into that ring's buffers
        outside a device call (the switch), leaving only its interrupt to decide
        (:meth:`interrupt_due`); None: ``on_wakeup`` is called instead."""
        return self._qs.on_delivered

    @on_delivered.setter
    def on_delivered(self, fn: Callable[[int], None] | None) -> None:
        self._qs.on_delivered = fn

    def interrupt_due(self, index: int) -> bool:
        """Whether ring ``index`` wants an interrupt now for the used entries published since the last
        one (EVENT_IDX's used_event, or the NO_INTERRUPT flag); counts it when True."""
        st, mem = self._qs.running(index)
        return self._qs.decide_interrupt(index, st, mem, idle=True)

    @property
    def mem(self) -> GuestMemory | None:
        return self._qs.mem

    def set_memory(self, mem: GuestMemory | None) -> None:
        """A new memory table (queues never hold views, so running queues simply use it from now on)."""
        self._qs.mem = mem

    # -- features -----------------------------------------------------------------------------------

    def device_features(self) -> int:
        bits = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC)
        if not self.port.small_frames:
            # Mergeable buffers carry any frame (a GSO frame, a jumbo one). A port whose frames all fit
            # a small buffer does without: a Linux guest's small-buffer receive path is the cheaper.
            bits |= 1 << VIRTIO_NET_F_MRG_RXBUF
        # MTU: the device honours a host MTU (set_mtu); a Linux guest sizes its buffers to it.
        bits |= 1 << VIRTIO_NET_F_MTU
        # Packed virtqueues (§2.8): QEMU offers them to the guest only with ``packed=on``.
        bits |= 1 << VIRTIO_F_RING_PACKED
        if self.policy.use_event_idx:
            bits |= 1 << VIRTIO_F_EVENT_IDX
        if self.pairs > 1:
            bits |= 1 << VIRTIO_NET_F_MQ
        # The one source of the offered set (the server adds only the vhost-user bit): a port without
        # offloads adds nothing, so its device offers exactly what it always did.
        return bits | self._offloads

    def set_features(self, bits: int) -> None:
        extra = bits & ~self.device_features()
        if extra:
            raise DeviceStateError(f"features 0x{extra:x} were never offered")
        if any(s is not None for s in self._qs.states):
            if bits == self._qs.features:
                return  # the same bits again (QEMU: once per queue pair): nothing changes
            raise DeviceStateError("features changed while queues run")
        # The port configures its offloads (a tap: TUNSETOFFLOAD, TUNSETVNETHDRSZ) before anything
        # flows; if it cannot, it raises and the features are refused.
        self.port.negotiated(bits)
        self._qs.set_features(bits)

    @property
    def features(self) -> int:
        return self._qs.features

    def set_mtu(self, mtu: int) -> None:
        """The host MTU the driver was given (vhost-user NET_SET_MTU; QEMU's ``host_mtu``). Recorded at
        once (QEMU sends it before SET_FEATURES); enforced while VIRTIO_NET_F_MTU is negotiated: a
        frame with gso_type NONE longer than ``mtu`` plus an Ethernet and a VLAN header is dropped as
        ``over_mtu``, from the guest and toward it. The port hears it first (a tap sets its TAP's MTU);
        if it raises OSError, nothing changes."""
        self.port.mtu_changed(mtu)
        self._qs.set_mtu(mtu)

    @property
    def mtu(self) -> int | None:
        """The host MTU NET_SET_MTU gave, or None."""
        return self._qs.mtu

    @property
    def frame_limit(self) -> int:
        """The longest frame with gso_type NONE either direction carries now (header excluded)."""
        return self._qs.frame_limit

    # -- announce -----------------------------------------------------------------------------------

    def announce(self, mac: bytes) -> bool:
        """Broadcast the RARP QEMU asks for with vhost-user SEND_RARP after a migration (for a guest
        without VIRTIO_NET_F_GUEST_ANNOUNCE; :mod:`nicsim.virtio.announce` says who does what), out of
        the port like a frame the guest sent: a switch learns ``mac`` and floods it, a tap writes it.
        Counted in ``announced``; False if the port raised (counted in ``announce_failed``)."""
        frames = OwnFrames([rarp_frame(mac)], hdr_len=self._qs.hdr_len)
        try:
            self.port.transmit(frames)  # owned bytes: a port that keeps them needs nothing back
        except Exception:  # the port's failure is not the frontend's: count it, keep serving
            self.announce_failed += 1
            return False
        self.announced += 1
        return True

    def has(self, bit: int) -> bool:
        return has_bit(self._qs.features, bit)

    @property
    def event_idx(self) -> bool:
        return self._qs.event_idx

    @property
    def mergeable(self) -> bool:
        return self._qs.mergeable

    @property
    def hdr_len(self) -> int:
        return self._qs.hdr_len

    # -- queue lifecycle ----------------------------------------------------------------------------

    def start_queue(
        self, index: int, queue: DeviceQueue, *, resubmit: npt.ArrayLike | SavedChains = ()
    ) -> None:
        """Start a queue; ``resubmit``: what a crashed backend had in flight (inflight recovery), TX
        chains to process again before the avail ring, RX chains to give back unused (len 0): heads
        on a split ring, on a packed one the chains with their saved descriptors
        (``rings.inflight_packed``), since their ring slots may hold used descriptors by now."""
        qs = self._qs
        qs.check_index(index)
        if qs.states[index] is not None:
            raise DeviceStateError("queue already started", queue=index)
        if qs.mem is None:
            raise DeviceStateError("no guest memory yet", queue=index)
        st = QueueState(queue)
        if isinstance(resubmit, SavedChains):
            if not isinstance(queue, PackedQueue):
                raise DeviceStateError("saved packed chains resubmitted on a split ring", queue=index)
            if resubmit.ids.shape[0] and index % 2 == 1:
                st.saved = resubmit
            elif resubmit.ids.shape[0]:
                # Recorded (how many ring descriptors each took) so push_used skips the right number.
                queue.resubmit(qs.mem, resubmit, indirect=qs.indirect)
                n = int(resubmit.ids.shape[0])
                qs.mark_used(index, queue, qs.mem, resubmit.ids, np.zeros(n, np.uint32))
            qs.states[index] = st
            return
        heads = np.asarray(resubmit, np.uint16).reshape(-1)
        if heads.shape[0] and index % 2 == 1:
            st.resubmit = heads
        elif heads.shape[0]:
            qs.mark_used(index, queue, qs.mem, heads, np.zeros(heads.shape[0], np.uint32))
        qs.states[index] = st

    def stop_queue(self, index: int) -> int:
        """Stop a queue (GET_VRING_BASE): every chain it holds is returned on the used ring (TX with
        len 0: the port's pending batches are cancelled), its pool descriptors are freed, RX frames
        still queued for it are dropped as ``queue_stopped``. Returns the GET_VRING_BASE value:
        ``last_avail_idx`` on a split ring, positions and wrap counters on a packed one."""
        self._qs.check_index(index)
        st = self._qs.states[index]
        if st is None:
            raise DeviceStateError("queue not started", queue=index)
        if index % 2 == 1:
            self._tx.cancel(index, st)
        else:
            self._rx.drop_backlog(index // 2)
        self._qs.states[index] = None
        return st.q.vring_base

    def set_enabled(self, index: int, enabled: bool) -> None:
        """Enable or disable a ring (vhost-user SET_VRING_ENABLE), independently of started/stopped.

        vhost-user spec, "Ring states": a started ring that is disabled is still processed, without
        side effects: for a network device the backend "must not supply any new RX packets, but must
        process and discard any TX packets". So ``process_tx`` takes its chains and returns them unread
        (len 0, counted as ``ring_disabled``); its RX queue fills no buffer and a frame pushed for it
        is dropped as ``ring_disabled`` (frames already waiting in the backlog keep waiting: they are
        delivered once the ring is enabled, or dropped as ``queue_stopped`` when it stops). A stopped
        ring is not processed at all, enabled or not."""
        self._qs.check_index(index)
        changed = self._qs.enabled[index] != enabled
        self._qs.enabled[index] = enabled
        if changed and index % 2 == 0:
            self.port.pair_enabled(index // 2, enabled)

    def enabled(self, index: int) -> bool:
        return self._qs.enabled[index]

    # -- errors -------------------------------------------------------------------------------------

    @property
    def needs_reset(self) -> bool:
        """A ring broke (the guest corrupted it): report DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2) until
        the driver resets the device (:meth:`driver_reset`)."""
        return self._qs.needs_reset

    def ring_failed(self, index: int, err: GuestError) -> None:
        """The caller caught ``err`` from a call on ring ``index`` that returns no ``QueueResult``
        (kick suppression, re-arm): mark the queue broken as ``process_tx`` / ``poll_rx`` do (counted
        once as ``ring_error``) and set DEVICE_NEEDS_RESET. Idempotent."""
        qs = self._qs
        st = qs.states[index] if 0 <= index < qs.num_queues else None
        if st is not None and st.broken is None:
            qs.broke(index, st, err)
        qs.needs_reset = True

    def driver_reset(self) -> None:
        """The driver reset the device (device status written 0, virtio 1.2 §2.4): DEVICE_NEEDS_RESET
        clears. Queues are stopped one by one by their owner (vhost-user: GET_VRING_BASE)."""
        self._qs.needs_reset = False

    def queue(self, index: int) -> DeviceQueue | None:
        st = self._qs.states[index]
        return None if st is None else st.q

    def shutdown(self) -> None:
        """Stop every queue, then close the pool (NdisFreePacketPool: only once every descriptor is
        back, which stopping the queues guarantees). Idempotent."""
        if self._qs.closed:
            return
        for i in range(self.num_queues):
            if self._qs.states[i] is not None:
                self.stop_queue(i)
        self._qs.closed = True
        self.port.close()
        self.pool.close()

    # -- notifications ------------------------------------------------------------------------------

    def kicked(self, index: int) -> None:
        """Count a kick the server read from the queue's kick eventfd."""
        self.stats.kicks[index] += 1

    def suppress_kicks(self, index: int) -> None:
        """Ask the guest not to kick while we poll (§2.7.7 NO_NOTIFY / §2.7.10 avail_event)."""
        st, mem = self._qs.running(index)
        st.q.suppress_kicks(mem, True, event_idx=self._qs.event_idx)
        if self._qs.logging:
            self._qs.log_used(st.q)  # the flag or avail_event just written is in the used ring

    def rearm_kicks(self, index: int, *, after: int = 0) -> bool:
        """Enable kicks, then re-check avail to close the race with a guest that published just before
        seeing the change (§2.7.10); the ring fences between the store that enables and the re-check's
        load of ``avail.idx`` (``rings.barrier``), without which x86 may do the load first. True: safe
        to sleep; False: work arrived (kicks suppressed again, process it). With EVENT_IDX, ``after`` >
        0 asks for the kick only once more than ``after`` entries are pending (a batch); up to
        ``after`` pending entries then wait for that kick or the caller's timer. Without EVENT_IDX the
        flag cannot express a batch and ``after`` is ignored."""
        st, mem = self._qs.running(index)
        q = st.q
        event_idx = self._qs.event_idx
        if after > 0 and event_idx:
            after = min(after, q.size - 1)
            q.kick_after(mem, after)
        else:
            after = 0
            q.suppress_kicks(mem, False, event_idx=event_idx)
        if self._qs.logging:
            self._qs.log_used(q)  # the flag or avail_event just written is in the used ring
        # ``after`` counts ring entries: chains on a split ring, descriptors on a packed one.
        pending = q.avail_descriptors(mem) if isinstance(q, PackedQueue) else q.avail_pending(mem)
        if pending <= after:
            return True
        q.suppress_kicks(mem, True, event_idx=event_idx)
        return False

    # -- live migration ---------------------------------------------------------------------------

    def set_dirty_log(self, log: DirtyLog | None) -> None:
        """The dirty log QEMU shares for a migration (SET_LOG_BASE), or None (gone with the session)."""
        self._qs.dirty_log = log

    def set_log_all(self, on: bool) -> None:
        """VHOST_F_LOG_ALL: log every write to guest memory from now on (a migration runs), or stop."""
        self._qs.log_all = on

    @property
    def logging(self) -> bool:
        return self._qs.logging

    def probe(self, index: int) -> RingProbe:
        """Look at a queue for the pump's stall watchdog (reads the ring, changes nothing)."""
        st, mem = self._qs.running(index)
        return self._qs.probe(st, mem)

    def recheck_stalled(self, index: int) -> bool:
        """The pump found queue ``index`` stalled: count it (``stall_rechecks``) and say whether to
        signal now (the ring wants an interrupt no interrupt covered; already counted). The caller
        then runs a round for any work pending."""
        st, mem = self._qs.running(index)
        return self._qs.recheck_interrupt(index, st, mem)

    # -- the data paths -----------------------------------------------------------------------------

    def process_tx(self, index: int, *, irq_fd: int | None = None) -> QueueResult:
        """Take up to ``policy.tx_batch`` chains off TX queue ``index`` and hand their frames to the port;
        ``irq_fd``: see :meth:`nicsim.virtio.tx.TxPath.process` (the round may signal it itself)."""
        return self._tx.process(index, irq_fd=irq_fd)

    def deliver_rx(self, pair: int = 0) -> QueueResult:
        """Move frames the port queued into the guest's RX buffers (after an RX kick or a wakeup)."""
        return self._rx.round(pair, pull=False)

    def poll_rx(self, pair: int = 0, now: float = 0.0) -> QueueResult:
        """Flush the backlog, then let a pull-style port (the generator) fill the posted buffers."""
        return self._rx.round(pair, pull=True, now=now)

    def push(self, frame: Buffer, *, pair: int | None = None) -> bool:
        return self._rx.push(frame, pair=pair)

    def push_many(self, data: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64],
                  lengths: npt.NDArray[np.uint32], *, pair: int | None = None) -> int:  # fmt: skip
        return self._rx.push_many(data, offsets, lengths, pair=pair)

    def push_template(self, template: npt.NDArray[np.uint8], count: int, *, pair: int = 0) -> int:
        return self._rx.push_template(template, count, pair=pair)

    def place_round(
        self, kernel: Callable[..., tuple[int, ...]], extra: tuple[Any, ...], *, pair: int = 0
    ) -> tuple[int, ...] | None:
        return self._rx.place_round(kernel, extra, pair=pair)

    def lane_call(self, pair: int, settings: LaneSettings) -> LaneCall | None:
        """A request lane's call for ``pair`` (:func:`nicsim.virtio.lane.prepare`), or None."""
        return lane.prepare(self._qs, self._tx, self._rx, self.port, pair, settings, self._lane_areas)

    def lane_settle(self, call: LaneCall) -> None:
        """Book what a request lane's call did (:func:`nicsim.virtio.lane.settle`)."""
        lane.settle(self._qs, self.port, call)

    def rx_space(self, pair: int = 0) -> int:
        return self._rx.rx_space(pair)

    def rx_backlog(self, pair: int = 0) -> int:
        """Frames the port queued for ``pair`` that wait for guest buffers. ``on_wakeup`` is not called
        while a port runs inside ``process_tx`` (re-entrancy), so the server asks this after a TX round."""
        return self._rx.rx_backlog(pair)

    def wake(self, pair: int = 0) -> None:
        """A pull-style port's source became ready (e.g. its fd is readable): poll its RX soon."""
        self._rx.wake(pair)

    # -- reporting ----------------------------------------------------------------------------------

    def pool_info(self) -> dict[str, int]:
        return {"usage": int(self.pool.usage), "high_water": int(self.pool.high_water),
                "capacity": int(self.pool.capacity)}

    def snapshot(self) -> dict[str, Any]:
        out = self.stats.snapshot(pool=None if self._qs.closed else self.pool_info())
        out["port"] = {"name": self.port.name, **self.port.stats()}
        out["rx_backlog"] = [len(b) for b in self._rx.backlog]
        out["mtu"] = self._qs.mtu
        out["announced"] = self.announced
        out["announce_failed"] = self.announce_failed
        return out
