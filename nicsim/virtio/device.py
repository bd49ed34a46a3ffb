"""The virtio-net device (virtio 1.2 §5.1), I/O-free: TX from the guest's avail rings to a port, RX from
the port into the guest's buffers, every in-flight guest buffer tracked by a pool descriptor.

This module owns the per-queue device state (a :class:`~rings.split.SplitQueue` per ring; queue ``2k``
is receiveq ``k``, ``2k + 1`` transmitq ``k``, §5.1.2), the negotiated features, the packet pool, the
port, the stats and the interrupt/kick decisions of :mod:`nicsim.virtio.policy`. It reads and writes no fd:
the asyncio server calls :meth:`VirtioNetDevice.process_tx`, :meth:`~VirtioNetDevice.poll_rx` and
:meth:`~VirtioNetDevice.deliver_rx` when a kick or a port wakes it, signals the call eventfd when a
result says ``interrupt``, and calls :meth:`~VirtioNetDevice.stop_queue` / :meth:`~VirtioNetDevice.shutdown`
on GET_VRING_BASE and teardown. The TX batch view lives in :mod:`nicsim.virtio.tx`, the RX placement in
:mod:`nicsim.virtio.rx`. Nothing is lost silently: every frame is delivered or counted as a drop with a
reason, and pool exhaustion is backpressure (stop taking buffers; the next call resumes), never a drop.
Offloads (CSUM, GUEST_CSUM, HOST_/GUEST_TSO4/6) are offered only on top of the base set and only when the
port declares it can honour them (``DevicePort.features``); the port hears what was negotiated, and a
header-passing port (``DevicePort.vnet_hdr``) gets the guest's virtio-net header on TX and supplies the
kernel's on RX, with one pool descriptor per guest chain however large the (GSO) frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.virtio.features import (
    OFFLOAD_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
)
from nicsim.virtio.inflight import InflightHooks
from nicsim.virtio.policy import NotifyPolicy, should_interrupt
from nicsim.virtio.port import ETH_HLEN, HDR_LEN_V1, MAX_FRAME, Buffer, DevicePort, vnet_hdr_len
from nicsim.virtio.rx import (
    RxBacklog,
    plan_rx,
    scatter_chains,
    scatter_template_words,
    stage_frames,
)
from nicsim.virtio.stats import DeviceStats
from nicsim.virtio.tx import TxBatch
from rings.errors import GuestError
from rings.memory import GuestMemory
from rings.pool import PacketPool
from rings.split import ChainBatch, ErrorCode, SplitQueue

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
)


class DeviceStateError(RuntimeError):
    """Our side called the device out of order (e.g. process_tx on a stopped queue). ``queue`` if known."""

    def __init__(self, message: str, *, queue: int | None = None) -> None:
        super().__init__(message if queue is None else f"{message} (queue {queue})")
        self.queue = queue


@dataclass(frozen=True, kw_only=True)
class QueueResult:
    """What one device call did to one queue. ``interrupt``: signal the queue's call eventfd now (the
    device already counted it). ``more``: work is left (poll again without waiting for a kick).
    ``blocked``: the pool ran out (backpressure; the next call resumes). ``error``: the guest broke
    the ring and the queue is stopped until reset."""

    queue: int
    processed: int = 0
    dropped: int = 0
    interrupt: bool = False
    more: bool = False
    blocked: bool = False
    error: GuestError | None = None


class _Queue:
    __slots__ = ("broken", "deferred", "q", "resubmit", "signalled_used")

    def __init__(self, q: SplitQueue) -> None:
        self.q = q
        # Heads in flight when a previous backend died (rings.inflight recovery): processed before the
        # avail ring, each completed exactly once (vhost-user spec, "Inflight I/O tracking").
        self.resubmit: npt.NDArray[np.uint16] = np.zeros(0, np.uint16)
        self.signalled_used = q.used_idx  # used.idx at the last interrupt (vhost's signalled_used)
        self.deferred: dict[int, TxBatch] = {}  # id(batch) -> batch the port has not completed
        self.broken: GuestError | None = None


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
    ) -> None:
        if pairs < 1:
            raise ValueError("a virtio-net device needs at least one queue pair")
        self.pairs = pairs
        self.num_queues = 2 * pairs
        self.policy = policy or NotifyPolicy()
        self.pool = pool if pool is not None else PacketPool(4096, name="virtio-net")
        self.port = port
        self.stats = DeviceStats(self.num_queues, DROP_REASONS)
        self.on_wakeup = on_wakeup
        self.features = 0
        self.mem: GuestMemory | None = None
        self._queues: list[_Queue | None] = [None] * self.num_queues
        backlog_bytes = max(self.policy.rx_backlog * 2048, 2 * MAX_FRAME)
        self._offloads = self.port.features() & OFFLOAD_FEATURES
        if self._offloads:
            # GSO frames of up to 64 KB arrive from the port: room for several of them.
            backlog_bytes = max(backlog_bytes, 8 * (MAX_FRAME + HDR_LEN_V1))
        self._backlog = [RxBacklog(self.policy.rx_backlog, backlog_bytes) for _ in range(pairs)]
        self._scratch: npt.NDArray[np.uint8] = np.zeros(self.policy.rx_batch * 2048, np.uint8)
        self._tmpl_key: tuple[int, int, int] | None = None
        self._tmpl: npt.NDArray[np.uint8] = np.zeros(0, np.uint8)
        self._in_call = False
        self._closed = False
        self.inflight: InflightHooks | None = None  # set by the server with INFLIGHT_SHMFD
        self.port.attach(self)

    # -- configuration ------------------------------------------------------------------------------

    def device_features(self) -> int:
        bits = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_F_INDIRECT_DESC)
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
        if any(s is not None for s in self._queues):
            raise DeviceStateError("features changed while queues run")
        # The port configures its offloads (a tap: TUNSETOFFLOAD, TUNSETVNETHDRSZ) before anything
        # flows; if it cannot, it raises and the features are refused.
        self.port.negotiated(bits)
        self.features = bits

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def event_idx(self) -> bool:
        return self.has(VIRTIO_F_EVENT_IDX)

    @property
    def mergeable(self) -> bool:
        return self.has(VIRTIO_NET_F_MRG_RXBUF)

    @property
    def hdr_len(self) -> int:
        return vnet_hdr_len(self.features)

    def set_memory(self, mem: GuestMemory | None) -> None:
        """A new memory table (queues never hold views, so running queues simply use it from now on)."""
        self.mem = mem

    def start_queue(self, index: int, queue: SplitQueue, *, resubmit: npt.ArrayLike = ()) -> None:
        """Start a queue; ``resubmit``: heads a crashed backend had in flight (inflight recovery), TX
        chains to process again before the avail ring, RX chains to return unused (len 0)."""
        self._check_index(index)
        if self._queues[index] is not None:
            raise DeviceStateError("queue already started", queue=index)
        if self.mem is None:
            raise DeviceStateError("no guest memory yet", queue=index)
        st = _Queue(queue)
        heads = np.asarray(resubmit, np.uint16).reshape(-1)
        if heads.shape[0] and index % 2 == 1:
            st.resubmit = heads
        elif heads.shape[0]:
            self._mark_used(index, queue, self.mem, heads, np.zeros(heads.shape[0], np.uint32))
        self._queues[index] = st

    def stop_queue(self, index: int) -> int:
        """Stop a queue (GET_VRING_BASE): every chain it holds is returned on the used ring (TX with
        len 0: the port's pending batches are cancelled), its pool descriptors are freed, RX frames
        still queued for it are dropped as ``queue_stopped``. Returns ``last_avail_idx``."""
        self._check_index(index)
        st = self._queues[index]
        if st is None:
            raise DeviceStateError("queue not started", queue=index)
        for batch in list(st.deferred.values()):
            batch.cancelled = True
            self._return_tx(st, batch)
        if index % 2 == 0:
            n = self._backlog[index // 2].clear()
            if n:
                self.stats.drop(index, "queue_stopped", n)
        self._queues[index] = None
        return st.q.last_avail_idx

    def queue(self, index: int) -> SplitQueue | None:
        st = self._queues[index]
        return None if st is None else st.q

    def shutdown(self) -> None:
        """Stop every queue, then close the pool (NdisFreePacketPool: only once every descriptor is
        back, which stopping the queues guarantees). Idempotent."""
        if self._closed:
            return
        for i in range(self.num_queues):
            if self._queues[i] is not None:
                self.stop_queue(i)
        self._closed = True
        self.port.close()
        self.pool.close()

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_queues:
            raise DeviceStateError(f"no queue {index}; the device has {self.num_queues}", queue=index)
        if self._closed:
            raise DeviceStateError("device shut down", queue=index)

    def _running(self, index: int) -> tuple[_Queue, GuestMemory]:
        self._check_index(index)
        st = self._queues[index]
        if st is None or self.mem is None:
            raise DeviceStateError("queue not started", queue=index)
        return st, self.mem

    # -- notifications ------------------------------------------------------------------------------

    def kicked(self, index: int) -> None:
        """Count a kick the server read from the queue's kick eventfd."""
        self.stats.kicks[index] += np.uint64(1)

    def suppress_kicks(self, index: int) -> None:
        """Ask the guest not to kick while we poll (§2.7.7 NO_NOTIFY / §2.7.10 avail_event)."""
        st, mem = self._running(index)
        st.q.suppress_kicks(mem, True, event_idx=self.event_idx)

    def rearm_kicks(self, index: int, *, after: int = 0) -> bool:
        """Enable kicks, then re-check avail to close the race with a guest that published just before
        seeing the change (§2.7.10). True: safe to sleep; False: work arrived (kicks suppressed again,
        process it). With EVENT_IDX, ``after`` > 0 asks for the kick only once more than ``after``
        entries are pending (a batch); up to ``after`` pending entries then wait for that kick or the
        caller's timer. Without EVENT_IDX the flag cannot express a batch and ``after`` is ignored."""
        st, mem = self._running(index)
        q = st.q
        if after > 0 and self.event_idx:
            after = min(after, q.size - 1)
            q.kick_after(mem, after)
        else:
            after = 0
            q.suppress_kicks(mem, False, event_idx=self.event_idx)
        if q.avail_pending(mem) <= after:
            return True
        q.suppress_kicks(mem, True, event_idx=self.event_idx)
        return False

    def _decide_interrupt(self, index: int, st: _Queue, mem: GuestMemory, *, idle: bool) -> bool:
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
        st.signalled_used = q.used_idx
        self.stats.interrupts[index] += np.uint64(1)
        return True

    def _wake(self, index: int) -> None:
        if self.on_wakeup is not None and not self._in_call:
            self.on_wakeup(index)

    # -- TX -----------------------------------------------------------------------------------------

    def process_tx(self, index: int) -> QueueResult:
        """Take up to ``policy.tx_batch`` chains off TX queue ``index`` and hand their frames to the port."""
        if index % 2 != 1:
            raise DeviceStateError("not a transmit queue", queue=index)
        st, mem = self._running(index)
        if st.broken is not None:
            return QueueResult(queue=index, error=st.broken)
        q = st.q
        try:
            pending = q.avail_pending(mem) + st.resubmit.shape[0]
        except GuestError as err:
            return self._break(index, st, err)
        want = min(pending, self.policy.tx_batch)
        if want == 0:
            return QueueResult(queue=index, interrupt=self._decide_interrupt(index, st, mem, idle=True))
        descs = self.pool.allocate_batch(want, partial=True)
        k = int(descs.shape[0])
        if k == 0:
            return QueueResult(queue=index, more=True, blocked=True)
        heads = self._pop_tx(index, st, mem, k)
        cb = q.walk(mem, heads, indirect=self.has(VIRTIO_F_INDIRECT_DESC))
        if cb.seg_addr.shape[0] == k and not cb.errors:
            addrs = cb.seg_addr  # one segment per chain (the common case): its first is its only one
        else:
            addrs = np.zeros(k, np.uint64)
            has = cb.seg_count > 0
            addrs[has] = cb.seg_addr[cb.first_seg[has]]
        # The walker bounds every chain's length to u32 (CHAIN_TOO_LONG): the cast is exact.
        self.pool.track(descs, queue=index, heads=heads, addrs=addrs,
                        lengths=cb.readable_len.astype(np.uint32))  # fmt: skip
        self.stats.add_inflight(index, k)
        hdr = self.hdr_len
        if not cb.errors and not np.count_nonzero(cb.readable_len < hdr + ETH_HLEN):
            # Every chain good and holding at least a header and an Ethernet header: one reduction.
            dropped = 0
            pos = np.arange(k)
            done_now = pos[:0]
        else:
            good = cb.error == 0
            dropped = self._count_chain_errors(index, cb)
            short = good & (cb.readable_len < hdr)
            runt = good & ~short & (cb.readable_len < hdr + ETH_HLEN)
            if short.any():
                self.stats.drop(index, "short_header", int(short.sum()))
            if runt.any():
                self.stats.drop(index, "runt", int(runt.sum()))
            ok = good & ~short & ~runt
            dropped += int(k - ok.sum()) - dropped
            pos = np.flatnonzero(ok)
            done_now = np.flatnonzero(~ok)  # returned with len 0 right away (§2.7.8: still used)
        if pos.shape[0]:
            batch = TxBatch(queue=index, mem=mem, chains=cb, positions=pos,
                            descriptors=descs if pos.shape[0] == k else descs[pos],
                            hdr_len=hdr, on_complete=self._tx_completed)
            self.stats.packets[index] += np.uint64(batch.count)
            self.stats.bytes[index] += np.uint64(int(batch.lengths.sum(dtype=np.uint64)))
            self.stats.batches[index] += np.uint64(1)
            self._in_call = True
            try:
                finished = self.port.transmit(batch)
            except Exception:
                self.stats.drop(index, "port_error", batch.count)
                batch.completed = True
                finished = True
                raise
            finally:
                self._in_call = False
                if finished or batch.completed:
                    batch.completed = True
                    done_now = np.arange(k)
                else:
                    st.deferred[id(batch)] = batch
                self._return(st, mem, index, heads[done_now], descs[done_now])
        else:
            self._return(st, mem, index, heads, descs)
        try:
            more = q.avail_pending(mem) + st.resubmit.shape[0] > 0
        except GuestError as err:
            return self._break(index, st, err)
        irq = self._decide_interrupt(index, st, mem, idle=not more)
        return QueueResult(queue=index, processed=k, dropped=dropped, interrupt=irq, more=more)

    def _count_chain_errors(self, index: int, cb: ChainBatch) -> int:
        if not cb.errors:  # the walker sets ``errors[k]`` with every ``error[k]``
            return 0
        bad = cb.error[cb.error != 0]
        if bad.shape[0] == 0:
            return 0
        for code, n in zip(*np.unique(bad, return_counts=True), strict=True):
            self.stats.drop(index, CHAIN_REASONS[int(code) - 1], int(n))
        return int(bad.shape[0])

    def _return(
        self, st: _Queue, mem: GuestMemory, index: int, heads: npt.NDArray[Any], descs: npt.NDArray[np.int32]
    ) -> None:
        if heads.shape[0] == 0:
            return
        self._mark_used(index, st.q, mem, heads, np.zeros(heads.shape[0], np.uint32))
        self.pool.free_batch(descs)
        self.stats.add_inflight(index, -int(descs.shape[0]))

    def _pop_tx(self, index: int, st: _Queue, mem: GuestMemory, k: int) -> npt.NDArray[np.uint16]:
        """``k`` TX heads: resubmitted ones first (still marked in flight), then the avail ring's."""
        again, st.resubmit = st.resubmit[:k], st.resubmit[k:]
        fresh = st.q.pop_avail(mem, k - int(again.shape[0]))
        if self.inflight is not None:
            self.inflight.popped(index, fresh)
        return np.concatenate([again, fresh]) if again.shape[0] else fresh

    def _mark_used(
        self, index: int, q: SplitQueue, mem: GuestMemory, heads: npt.NDArray[Any],
        lens: npt.NDArray[np.uint32],
    ) -> None:
        """push_used, bracketed by the inflight hooks (spec, "When supplying used buffers")."""
        hooks = self.inflight
        if hooks is not None:
            hooks.before_used(index, heads)
        q.push_used(mem, heads, lens)
        if hooks is not None:
            hooks.after_used(index, heads, q.used_idx)

    def _tx_completed(self, batch: TxBatch) -> None:
        """An asynchronous port finished a batch: return its chains (len 0: TX writes nothing)."""
        if batch.cancelled:
            return
        st = self._queues[batch.queue]
        if st is None or id(batch) not in st.deferred:
            return
        self._return_tx(st, batch)
        self._wake(batch.queue)

    def _return_tx(self, st: _Queue, batch: TxBatch) -> None:
        st.deferred.pop(id(batch), None)
        if self.mem is not None:
            self._return(st, self.mem, batch.queue, batch.heads, batch.descriptors)

    def _break(self, index: int, st: _Queue, err: GuestError) -> QueueResult:
        st.broken = err
        self.stats.drop(index, "ring_error")
        return QueueResult(queue=index, error=err)

    # -- RX: the sink the port pushes into ------------------------------------------------------------

    def push(self, frame: Buffer, *, pair: int = 0) -> bool:
        arr = frame if isinstance(frame, np.ndarray) else np.frombuffer(bytes(frame), dtype=np.uint8)
        rxq = 2 * pair
        if arr.shape[0] > MAX_FRAME + (self.hdr_len if self.port.vnet_hdr else 0):
            self.stats.drop(rxq, "too_big")
            return False
        bl = self._backlog[pair]
        was_empty = len(bl) == 0
        if not bl.append(arr):
            self.stats.drop(rxq, "no_rx_buffer")
            return False
        if was_empty:
            self._wake(rxq)
        return True

    def push_many(
        self,
        data: npt.NDArray[np.uint8],
        offsets: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.uint32],
        *,
        pair: int = 0,
    ) -> int:
        kept = 0
        for off, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
            kept += self.push(data[off : off + n], pair=pair)
        return kept

    def push_template(self, template: npt.NDArray[np.uint8], count: int, *, pair: int = 0) -> int:
        rxq = 2 * pair
        st = self._queues[rxq]
        if st is None or self.mem is None or st.broken is not None or count <= 0:
            return 0
        if len(self._backlog[pair]):
            self._flush_backlog(rxq, st, self.mem)
            if len(self._backlog[pair]):
                return 0
        return self._deliver_template(rxq, st, self.mem, template, count)

    def rx_backlog(self, pair: int = 0) -> int:
        """Frames the port queued for ``pair`` that wait for guest buffers. ``on_wakeup`` is not called
        while a port runs inside ``process_tx`` (re-entrancy), so the server asks this after a TX round."""
        return len(self._backlog[pair])

    def wake(self, pair: int = 0) -> None:
        """A pull-style port's source became ready (e.g. its fd is readable): poll its RX soon."""
        self._wake(2 * pair)

    def rx_space(self, pair: int = 0) -> int:
        st = self._queues[2 * pair]
        if st is None or self.mem is None or st.broken is not None:
            return 0
        try:
            return st.q.avail_pending(self.mem)
        except GuestError:
            return 0

    # -- RX: device side ----------------------------------------------------------------------------

    def deliver_rx(self, pair: int = 0) -> QueueResult:
        """Move frames the port queued into the guest's RX buffers (after an RX kick or a wakeup)."""
        rxq = 2 * pair
        st, mem = self._running(rxq)
        if st.broken is not None:
            return QueueResult(queue=rxq, error=st.broken)
        before = int(self.stats.packets[rxq])
        drops = self.stats.drops_total(rxq)
        try:
            self._flush_backlog(rxq, st, mem)
        except GuestError as err:
            return self._break(rxq, st, err)
        more = len(self._backlog[pair]) > 0 and self.rx_space(pair) > 0
        return QueueResult(
            queue=rxq, processed=int(self.stats.packets[rxq]) - before,
            dropped=self.stats.drops_total(rxq) - drops, more=more,
            interrupt=self._decide_interrupt(rxq, st, mem, idle=not more),
            blocked=len(self._backlog[pair]) > 0 and self.pool.available == 0,
        )

    def poll_rx(self, pair: int = 0, now: float = 0.0) -> QueueResult:
        """Flush the backlog, then let a pull-style port (the generator) fill the posted buffers."""
        rxq = 2 * pair
        st, mem = self._running(rxq)
        if st.broken is not None:
            return QueueResult(queue=rxq, error=st.broken)
        before = int(self.stats.packets[rxq])
        drops = self.stats.drops_total(rxq)
        try:
            self._flush_backlog(rxq, st, mem)
            budget = min(st.q.avail_pending(mem), self.policy.rx_batch) if not len(self._backlog[pair]) else 0
            produced = self.port.poll_rx(pair, budget, now) if budget else 0
            # More only if buffers are still posted after a round that produced (the batch limit cut
            # it short); a round that filled every posted buffer is done, not one round early.
            more = (produced > 0 or len(self._backlog[pair]) > 0) and st.q.avail_pending(mem) > 0
        except GuestError as err:
            return self._break(rxq, st, err)
        return QueueResult(
            queue=rxq, processed=int(self.stats.packets[rxq]) - before,
            dropped=self.stats.drops_total(rxq) - drops, more=more,
            interrupt=self._decide_interrupt(rxq, st, mem, idle=not more),
            blocked=budget > 0 and produced == 0 and self.pool.available == 0,
        )

    def _flush_backlog(self, rxq: int, st: _Queue, mem: GuestMemory) -> None:
        bl = self._backlog[rxq // 2]
        while len(bl):
            offsets, lengths = bl.frames()
            n = min(len(bl), self.policy.rx_batch)
            taken = self._deliver(rxq, st, mem, bl.data, offsets[:n], lengths[:n])
            if taken == 0:
                return
            bl.pop(taken)

    def _take_chains(
        self, rxq: int, st: _Queue, mem: GuestMemory, want: int
    ) -> tuple[ChainBatch, npt.NDArray[np.int32]] | None:
        want = min(want, st.q.avail_pending(mem), self.policy.rx_batch)
        if want <= 0:
            return None
        descs = self.pool.allocate_batch(want, partial=True)
        k = int(descs.shape[0])
        if k == 0:
            return None  # backpressure: frames stay queued until descriptors come back
        heads = st.q.pop_avail(mem, k)
        cb = st.q.walk(mem, heads, indirect=self.has(VIRTIO_F_INDIRECT_DESC))
        # The walker bounds every chain's length to u32 (CHAIN_TOO_LONG): the cast is exact.
        self.pool.track(descs, queue=rxq, heads=heads, addrs=np.zeros(k, np.uint64),
                        lengths=cb.writable_len.astype(np.uint32))  # fmt: skip
        self.stats.add_inflight(rxq, k)
        return cb, descs

    def _finish_chains(
        self, rxq: int, st: _Queue, mem: GuestMemory, cb: ChainBatch, descs: npt.NDArray[np.int32],
        good_pos: npt.NDArray[np.int64], used_good: int, chain_bytes: npt.NDArray[np.int64],
    ) -> None:
        """Publish the consumed prefix of the popped chains, rewind the rest (they stay the guest's,
        un-popped), free every descriptor taken for this round."""
        k = len(cb)
        if used_good == k:
            # Every chain good and used (the common case): the lengths are the used-ring entries.
            cut, lens = k, chain_bytes.astype(np.uint32)
        else:
            # The consumed prefix ends at the first good chain no frame used; bad chains before it
            # are returned with len 0 (§2.7.8), chains from it on are given back to the avail ring.
            cut = int(good_pos[used_good]) if used_good < good_pos.shape[0] else k
            lens = np.zeros(k, np.uint32)
            lens[good_pos[:used_good]] = chain_bytes.astype(np.uint32)
            self._count_chain_errors(rxq, _prefix_errors(cb, cut))
        if cut:
            self._mark_used(rxq, st.q, mem, cb.heads[:cut], lens[:cut])
        st.q.last_avail_idx = (st.q.last_avail_idx - (k - cut)) & 0xFFFF
        self.pool.free_batch(descs)
        self.stats.add_inflight(rxq, -k)

    def _deliver(
        self, rxq: int, st: _Queue, mem: GuestMemory, data: npt.NDArray[np.uint8],
        offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
    ) -> int:
        """Place frames ``data[offsets[i]:][:lengths[i]]`` in order; returns how many were consumed
        (placed or dropped as too big); the rest wait."""
        # With MRG_RXBUF a frame may span several buffers: take a full batch, give back what is unused.
        want = self.policy.rx_batch if self.mergeable else int(lengths.shape[0])
        got = self._take_chains(rxq, st, mem, want)
        if got is None:
            return 0
        cb, descs = got
        good_pos = np.flatnonzero(cb.error == 0)
        hdr = self.hdr_len
        carried = self.port.vnet_hdr  # the frames start with the port's (the kernel's) header
        need = lengths.astype(np.int64) + (0 if carried else hdr)
        plan = plan_rx(need, cb.writable_len[good_pos].astype(np.int64), mergeable=self.mergeable)
        if plan.dropped.shape[0]:
            self.stats.drop(rxq, "too_big", int(plan.dropped.shape[0]))
        placed = plan.placed_frames
        if placed.shape[0]:
            total = int(need[placed].sum())
            if self._scratch.shape[0] < total:
                self._scratch = np.zeros(total, np.uint8)
            staging = stage_frames(
                self._scratch, hdr, data, offsets[placed], lengths[placed].astype(np.int64), plan.nbufs,
                carried=carried, keep_hdr=self.has(VIRTIO_NET_F_GUEST_CSUM),
            )
            per_chain = np.zeros(len(cb), np.int64)
            per_chain[good_pos[: plan.chains]] = plan.chain_bytes
            scatter_chains(mem, cb, per_chain, staging)
            self.stats.packets[rxq] += np.uint64(placed.shape[0])
            frame_bytes = int(lengths[placed].sum()) - (hdr * int(placed.shape[0]) if carried else 0)
            self.stats.bytes[rxq] += np.uint64(frame_bytes)
            self.stats.batches[rxq] += np.uint64(1)
        self._finish_chains(rxq, st, mem, cb, descs, good_pos, plan.chains, plan.chain_bytes)
        return plan.consumed

    def _deliver_template(
        self, rxq: int, st: _Queue, mem: GuestMemory, template: npt.NDArray[np.uint8], count: int
    ) -> int:
        hdr = self.hdr_len
        need = template.shape[0] + hdr
        got = self._take_chains(rxq, st, mem, count)
        if got is None:
            return 0
        cb, descs = got
        good_pos = np.arange(len(cb)) if not cb.errors else np.flatnonzero(cb.error == 0)
        if good_pos.shape[0] == 0 or int(cb.writable_len[good_pos].min()) >= need:
            # Fast path: one buffer per frame; header (num_buffers = 1) + frame, one vectorised scatter.
            key = (id(template), template.shape[0], hdr)
            if self._tmpl_key != key:
                self._tmpl = np.zeros(need, np.uint8)
                if hdr >= HDR_LEN_V1:
                    self._tmpl[10] = 1
                self._tmpl[hdr:] = template
                self._tmpl_key = key
            if not scatter_template_words(mem, cb, good_pos, self._tmpl):
                cb.write_template(mem, self._tmpl)
            n = int(good_pos.shape[0])
            self.stats.packets[rxq] += np.uint64(n)
            self.stats.bytes[rxq] += np.uint64(n * template.shape[0])
            self.stats.batches[rxq] += np.uint64(1)
            self._finish_chains(rxq, st, mem, cb, descs, good_pos, n, np.full(n, need, np.int64))
            return n
        # General path (small or mergeable buffers): rewind and place through the planner.
        st.q.last_avail_idx = (st.q.last_avail_idx - len(cb)) & 0xFFFF
        self.pool.free_batch(descs)
        self.stats.add_inflight(rxq, -len(cb))
        n = min(count, len(cb))
        return self._deliver(rxq, st, mem, template, np.zeros(n, np.int64),
                             np.full(n, template.shape[0], np.int64))

    # -- reporting ----------------------------------------------------------------------------------

    def pool_info(self) -> dict[str, int]:
        return {"usage": int(self.pool.usage), "high_water": int(self.pool.high_water),
                "capacity": int(self.pool.capacity)}

    def snapshot(self) -> dict[str, Any]:
        out = self.stats.snapshot(pool=None if self._closed else self.pool_info())
        out["port"] = {"name": self.port.name, **self.port.stats()}
        out["rx_backlog"] = [len(b) for b in self._backlog]
        return out


def _prefix_errors(cb: ChainBatch, cut: int) -> ChainBatch:
    """A view of ``cb`` restricted to its first ``cut`` chains, enough for counting their errors."""
    if cut == len(cb):
        return cb
    return replace(cb, error=cb.error[:cut])
