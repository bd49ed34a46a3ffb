"""The TX path of the virtio-net device (virtio 1.2 §5.1.6.2): from the guest's avail ring, through
pool descriptors, to the port, and back to the used ring.

This module owns :class:`TxPath`, everything ``VirtioNetDevice.process_tx`` does: take up to
``policy.tx_batch`` chains (resubmitted heads from inflight recovery first; on a packed ring, walked
from the descriptors the inflight region saved), walk them, track each in a
pool descriptor, count bad, header-short and runt chains as drops and return them at once (len 0), and
hand the good frames to the port; chains come back when the port is done, at once or later for an
asynchronous port, or when the queue stops. A started ring that is disabled has its chains taken and
returned unread instead (vhost-user "Ring states"). It also owns :class:`TxBatch`, the view the port gets of
one batch with the virtio-net header already skipped: lengths as one numpy array (a counting port never
reads a byte), a per-frame view when the frame sits in one segment (zero copy), a vectorised gather of
the whole batch, and the header-and-frame segment views a header-passing port writes out with one
``writev``.
A round of a few chains (at most ``QueueSet.short_round``), each a good chain of one or two readable
descriptors (direct, or in its head's indirect table), is read with plain ints instead
(``rings.short_chains``) and handed over as a :class:`~nicsim.virtio.tx_short.ShortTxBatch`: a guest
sending one packet at a time pays for no numpy batch. Any other round goes the numpy way, which alone
sorts out and counts bad chains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.virtio.policy import PLAIN_FRAME
from nicsim.virtio.port import ABSORB_SUM, ETH_HLEN, HDR_LEN_V1, MAX_FRAME, DevicePort, SendTarget, TxFrames
from nicsim.virtio.queues import (
    GSO_ECN,
    GSO_TYPE_OFFSET,
    IRQ_FAILED,
    NOT_RUN,
    DeviceStateError,
    QueueResult,
    QueueSet,
    QueueState,
)
from nicsim.virtio.tx_short import ShortTxBatch
from rings import kernels
from rings.chains import ChainBatch
from rings.errors import GuestError
from rings.memory import GuestMemory
from rings.packed import PackedQueue
from rings.packed_walk import split_saved
from rings.round_kernels import U32_MAX, RoundArea
from rings.split import SplitQueue, region_bytes

log = logging.getLogger("nicsim.server")
_ONE = np.ones(1, np.uint64)  # the 8-byte 1 a call eventfd write adds


class TxBatch:
    """One batch of good TX chains handed to a port (implements :class:`nicsim.virtio.port.TxFrames`)."""

    __slots__ = (
        "_chains",
        "_complete",
        "_frame_bytes",
        "_gathered",
        "_lengths",
        "_segments",
        "_whole_round",
        "area",
        "cancelled",
        "completed",
        "descriptors",
        "hdr_len",
        "heads",
        "mem",
        "pair",
        "positions",
        "queue",
    )

    def __init__(
        self,
        *,
        queue: int,
        mem: GuestMemory,
        chains: ChainBatch | None,
        positions: npt.NDArray[np.int64],
        descriptors: npt.NDArray[np.int32],
        hdr_len: int,
        on_complete: Callable[[TxBatch], None],
        lengths: npt.NDArray[np.uint32] | None = None,
        area: RoundArea | None = None,
        segments: int = 0,
        frame_bytes: int | None = None,
    ) -> None:
        """``chains``: the round's walk; or None with ``area`` (a compiled round: every chain of it
        handed over, its ``segments`` segments walked into the area, ``lengths`` given), and the
        ChainBatch is made from the area only if a port asks for frames, not just lengths."""
        self.queue = queue
        self.pair = queue // 2
        self.mem = mem
        self._chains = chains
        self._segments = segments
        self.positions = positions            # chain positions in ``chains`` of the frames handed over
        self.descriptors = descriptors        # pool descriptors tracking those heads
        self.hdr_len = hdr_len
        # The compiled round's arrays that ``chains`` views: the batch's until it completes.
        self.area = area
        self._whole_round = chains is None  # the area's first ``count`` chains are the batch's frames
        if chains is None:
            assert area is not None and lengths is not None
            self.heads = area.heads[: positions.shape[0]]
        else:
            # Positions are ascending and distinct: as many as there are chains means all of them.
            every = positions.shape[0] == len(chains)
            self.heads = chains.heads if every else chains.heads[positions]  # returned on the used ring
            if lengths is None:
                readable = chains.readable_len if every else chains.readable_len[positions]
                lengths = (readable - hdr_len).astype(np.uint32)
        self._lengths = lengths  # of the frames, the virtio-net header left out
        self._frame_bytes = frame_bytes
        self._complete = on_complete
        self._gathered: tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]] | None = None
        self.completed = False
        self.cancelled = False  # the device returned the chains itself (queue stopped)

    @property
    def chains(self) -> ChainBatch:
        if self._chains is None:
            assert self.area is not None
            self._chains = self.area.batch(int(self.positions.shape[0]), self._segments)
        return self._chains

    @property
    def count(self) -> int:
        return int(self.positions.shape[0])

    @property
    def lengths(self) -> npt.NDArray[np.uint32]:
        return self._lengths

    def byte_sum(self) -> int | None:
        summer = kernels.sum_frames
        if summer is None:
            return None
        area = self.area
        if self._chains is None and area is not None:
            # A compiled round: every chain is a frame, its segments in the area's first ones (no
            # ChainBatch of views needed: the kernel takes whole arrays and a count).
            m = self._segments
            seg = (area.s_chain, area.s_region, area.s_offset, area.s_len, area.s_writable)
        else:
            cb = self.chains
            if self.positions.shape[0] != len(cb):
                return None  # (some chains of the round were dropped: not every segment is a frame's)
            m = int(cb.seg_len.shape[0])
            seg = (cb.seg_chain, cb.seg_region, cb.seg_offset, cb.seg_len, cb.seg_writable)
        regions = self.mem.regions
        total, region = 0, 0
        while region >= 0:
            part, region = summer(regions[region].data, region, m, *seg, self.hdr_len)
            total += int(part)
        return total & 0xFFFF_FFFF_FFFF_FFFF

    @property
    def frame_bytes(self) -> int:
        if self._frame_bytes is None:
            self._frame_bytes = int(self._lengths.sum(dtype=np.uint64))
        return self._frame_bytes

    def frame(self, i: int) -> npt.NDArray[np.uint8]:
        cb = self.chains
        skip = self.hdr_len
        pieces: list[npt.NDArray[np.uint8]] = []
        for s in cb.segments(int(self.positions[i])):
            if cb.seg_writable[s]:
                break  # §2.7.4.2: writable descriptors follow the readable ones; they carry no frame
            n = int(cb.seg_len[s])
            if skip >= n:
                skip -= n
                continue
            pieces.append(cb.segment_view(self.mem, s)[skip:])
            skip = 0
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, np.uint8)

    def bare_frames(self, hdr_len: int) -> tuple[list[npt.NDArray[np.uint8]], npt.NDArray[np.uint8]] | None:
        """Every frame without its virtio-net header, as a view of guest memory, and the headers,
        ``(count, hdr_len)`` bytes, when each chain is one readable segment holding its header and
        frame (Linux's layout with VERSION_1 for all but TCP's cloned frames): numpy calls per
        memory region and a view per frame, not :meth:`iovec`'s views per segment. None otherwise."""
        cb, pos = self.chains, self.positions
        first = cb.first_seg[pos]
        if not bool((cb.seg_count[pos] == 1).all()):
            return None
        lens = cb.seg_len[first].astype(np.int64)
        regions = cb.seg_region[first]
        if bool((lens < hdr_len).any() or cb.seg_writable[first].any() or (regions < 0).any()):
            return None
        offsets = cb.seg_offset[first].astype(np.int64)
        datas = region_bytes(self.mem)
        headers = np.empty((first.shape[0], hdr_len), np.uint8)
        span = np.arange(hdr_len, dtype=np.int64)
        for r in np.unique(regions).tolist():
            mine = regions == r
            headers[mine] = datas[r][offsets[mine][:, None] + span]
        frames = [datas[r][o + hdr_len : o + n] for r, o, n in zip(regions.tolist(), offsets.tolist(),
                                                                    lens.tolist(), strict=True)]  # fmt: skip
        return frames, headers

    def round_arrays(self) -> tuple[Any, ...] | None:
        """The compiled round this batch is, as a kernel reads it: ``(the regions' bytes, first,
        counts, lens, s_len, s_writable, s_region, s_offset)`` of the round's area (chain ``j``'s
        segments from ``first[j]``, ``lens[j]`` its frame bytes), or None for a batch of the numpy
        path or a part of a round."""
        area = self.area
        if area is None or not self._whole_round:
            return None
        return (region_bytes(self.mem), area.first, area.counts, area.lens, area.s_len, area.s_writable,
                area.s_region, area.s_offset)  # fmt: skip

    def tail(self, start: int) -> TxBatch:
        """Frames ``start:`` of this batch, for a port that handled the first ones itself: the same
        chains (read only: the batch itself is completed and returned, not the tail)."""
        return TxBatch(queue=self.queue, mem=self.mem, chains=self.chains, positions=self.positions[start:],
                       descriptors=self.descriptors[start:], hdr_len=self.hdr_len, on_complete=self._complete,
                       lengths=self._lengths[start:])  # fmt: skip

    def iovec(self, i: int) -> list[npt.NDArray[np.uint8]]:
        # The header goes along unchanged (§5.1.6.2: its flags/gso fields ask the other side for
        # checksum or segmentation), so nothing is skipped; writable segments carry no frame.
        cb = self.chains
        out: list[npt.NDArray[np.uint8]] = []
        for s in cb.segments(int(self.positions[i])):
            if cb.seg_writable[s]:
                break
            out.append(cb.segment_view(self.mem, s))
        return out

    def gather(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        if self._gathered is None:
            data, starts = self.chains.gather_readable(self.mem)
            self._gathered = data, starts[self.positions] + self.hdr_len
        return self._gathered

    def complete(self) -> None:
        if not self.completed:
            self.completed = True
            self._complete(self)


def _gso_type(cb: ChainBatch, mem: GuestMemory, pos: int) -> int:
    """The gso_type byte of chain ``pos``'s virtio-net header (its readable segments, in order)."""
    skip = GSO_TYPE_OFFSET
    for s in cb.segments(pos):
        if cb.seg_writable[s]:
            break
        n = int(cb.seg_len[s])
        if skip < n:
            return int(cb.segment_view(mem, s)[skip])
        skip -= n
    return 0


class TxPath:
    """The device's transmit path: guest avail ring -> pool descriptors -> port -> used ring."""

    def __init__(self, queues: QueueSet, port: DevicePort) -> None:
        self._qs = queues
        self._port = port
        self._pool = queues.pool
        self._stats = queues.stats
        # id(batch) -> batch the port has not completed, per queue (empty for receive queues).
        self._deferred: list[dict[int, TxBatch | ShortTxBatch]] = [{} for _ in range(queues.num_queues)]
        # Work arrays for compiled rounds, per queue: one in use per batch a port holds, the rest here.
        self._areas: list[list[RoundArea]] = [[] for _ in range(queues.num_queues)]
        self._zeros = np.zeros(0, np.uint32)  # used lengths of returned TX chains (TX writes nothing)
        self._scratch: tuple[npt.NDArray[Any], ...] | None = None  # the send kernel's (send_scratch)
        # Told each batch before the port is: with several queue pairs, the RX path learns which pair
        # each flow transmits on (virtio 1.2 §5.1.6.5.5, nicsim.virtio.steer).
        self.on_sent: Callable[[TxFrames], None] | None = None

    def process(self, index: int, *, irq_fd: int | None = None) -> QueueResult:
        """Take up to ``policy.tx_batch`` chains off TX queue ``index`` and hand their frames to the port.
        ``irq_fd``: a round that writes its frames to a file descriptor may decide the ring's
        interrupt and write this call eventfd itself (-1: decide, write none), before its writes;
        its result then asks for no interrupt (``interrupt`` False: sent)."""
        if index % 2 != 1:
            raise DeviceStateError("not a transmit queue", queue=index)
        qs = self._qs
        st, mem = qs.running(index)
        if st.broken is not None:
            return QueueResult(queue=index, error=st.broken)
        if not qs.enabled[index]:
            return self._discard(index, st, mem)
        q = st.q
        try:
            pending = q.avail_pending(mem) + st.resubmit_count
        except GuestError as err:
            return qs.broke(index, st, err)
        want = min(pending, qs.policy.tx_batch)
        if st.saved is not None:
            want = min(want, int(st.saved.ids.shape[0]))  # a round of saved chains only (packed)
        if want == 0:
            return QueueResult(queue=index, interrupt=qs.decide_interrupt(index, st, mem, idle=True))
        budget = self._port.tx_budget(index // 2) if not st.resubmit_count else None
        if budget is not None:
            if budget <= 0:  # their receiver has no buffer: they wait in the guest's ring, not ours
                return QueueResult(queue=index, more=True, blocked=True)
            want = min(want, budget)
        if (not st.resubmit_count and isinstance(q, SplitQueue) and self.on_sent is None
                and qs.inflight is None and not qs.logging):  # fmt: skip
            target = self._port.send_target(index // 2)
            if target is not None:
                done = self._process_sent(index, st, mem, q, want, target, irq_fd)
                if done is not None:
                    return done
        if (want <= qs.short_round and not st.resubmit_count
                and not (self._port.compiled_rounds and kernels.take_split is not None)):  # fmt: skip
            done = self._process_short(index, st, mem, want)
            if done is not None:
                return done
        if kernels.take_split is not None and not st.resubmit_count and isinstance(q, SplitQueue):
            if self._port.absorbs and self.on_sent is None and qs.inflight is None and not qs.logging:
                done = self._process_absorbed(index, st, mem, q, want)
                if done is not None:
                    return done
            done = self._process_compiled(index, st, mem, q, want)
            if done is not None:
                return done
        descs = self._pool.allocate_batch(want, partial=True)
        k = int(descs.shape[0])
        if k == 0:
            return QueueResult(queue=index, more=True, blocked=True)
        heads, cb = self._take(index, st, mem, k)
        if cb.seg_addr.shape[0] == k and not cb.errors:
            addrs = cb.seg_addr  # one segment per chain (the common case): its first is its only one
        else:
            addrs = np.zeros(k, np.uint64)
            has = cb.seg_count > 0
            addrs[has] = cb.seg_addr[cb.first_seg[has]]
        # The walker bounds every chain's length to u32 (CHAIN_TOO_LONG): the cast is exact.
        self._pool.track(descs, queue=index, heads=heads, addrs=addrs,
                         lengths=cb.readable_len.astype(np.uint32))  # fmt: skip
        self._stats.add_inflight(index, k)
        hdr = qs.hdr_len
        rlen = cb.readable_len
        if (not cb.errors and not np.count_nonzero(rlen < hdr + ETH_HLEN)
                and (qs.frame_limit >= MAX_FRAME or int(rlen.max()) <= hdr + qs.frame_limit)):  # fmt: skip
            # Every chain good, holding at least a header and an Ethernet header, and none longer than
            # the MTU allows: one or two reductions.
            dropped = 0
            pos = np.arange(k)
            done_now = pos[:0]
        else:
            dropped, pos, done_now = self._sort_out(index, cb, mem, hdr)
        if pos.shape[0]:
            batch = TxBatch(queue=index, mem=mem, chains=cb, positions=pos,
                            descriptors=descs if pos.shape[0] == k else descs[pos],
                            hdr_len=hdr, on_complete=self._completed)  # fmt: skip
            self._hand_over(index, st, mem, batch, heads, descs, done_now)
        else:
            self._return(st, mem, index, heads, descs)
        return self._round_result(index, st, mem, k, dropped)

    def _process_compiled(
        self, index: int, st: QueueState, mem: GuestMemory, q: SplitQueue, want: int
    ) -> QueueResult | None:
        """``process`` for a round of good chains on a split ring in two compiled calls
        (``SplitQueue.take_round``, then ``complete_round`` in :meth:`_return`); None, having changed
        nothing, for a round the kernel does not take whole (a bad, indirect, runt or over-MTU chain,
        too few normal pool descriptors): the numpy path then takes it, and counts any drop."""
        qs = self._qs
        area = self._area(index, q.size)
        hdr = qs.hdr_len
        shortest, longest = self._chain_bounds()
        got = q.take_round(mem, want, self._pool, area, queue=index, indirect=qs.indirect, tx=True,
                           min_len=shortest, max_len=longest, lens_off=hdr)  # fmt: skip
        if got is None:
            self._areas[index].append(area)
            return None
        segments, frame_bytes = got
        batch = TxBatch(queue=index, mem=mem, chains=None, positions=area.positions[:want],
                        descriptors=area.descs[:want], hdr_len=hdr, on_complete=self._completed,
                        lengths=area.lens[:want], area=area, segments=segments,
                        frame_bytes=frame_bytes)  # fmt: skip
        if qs.inflight is not None:
            qs.inflight.popped(index, q, mem, batch.heads)
        self._stats.add_inflight(index, want)
        self._hand_over(index, st, mem, batch, batch.heads, batch.descriptors, area.positions[:0])
        return self._round_result(index, st, mem, want)

    def _chain_bounds(self) -> tuple[int, int]:
        """The readable bytes a chain may have for a compiled round to take it: a header and an
        Ethernet header at least, and no frame longer than the MTU allows (no bound past MAX_FRAME)."""
        qs = self._qs
        hdr = qs.hdr_len
        return hdr + ETH_HLEN, U32_MAX if qs.frame_limit >= MAX_FRAME else hdr + qs.frame_limit

    def _area(self, index: int, size: int) -> RoundArea:
        """Work arrays for a compiled round on queue ``index`` (of ``size``), the caller's until it
        puts them back in ``self._areas[index]``."""
        areas = self._areas[index]
        area = areas.pop() if areas else RoundArea(size)
        return area if area.size == size else RoundArea(size)

    def _process_sent(
        self, index: int, st: QueueState, mem: GuestMemory, q: SplitQueue, want: int, target: SendTarget,
        irq_fd: int | None,
    ) -> QueueResult | None:
        """``process`` for a port that lets the device write its frames to a file descriptor
        (``DevicePort.send_target``: the tap), on a split ring with no hook on the frames' way (a
        capture, the inflight region, the dirty log): the round is one compiled call
        (``SplitQueue.kernel_round`` with the port's kernel) that takes the chains, checks each
        frame's header, writes each good one with one ``writev`` and returns them all; the port is
        told what was written and why the rest was not. A request's round costs a call instead of a
        hundred. None, having changed nothing, for what the kernel does not take whole (as
        ``_process_compiled``)."""
        qs = self._qs
        area = self._area(index, q.size)
        scratch = self.send_scratch(q.size)
        shortest, longest = self._chain_bounds()
        # No GSO frame: a TCP stream's rounds keep the general path. Measured (tcp-tx, alternated),
        # sending them here too left the guest's ring empty sooner, so the guest kicked twice as
        # often (4-5k -> 11-12k kicks in 4 s) and sent 3.6-3.7 instead of 4.1-4.4 Gbit/s.
        longest = min(longest, qs.hdr_len + PLAIN_FRAME)
        # The round decides the ring's interrupt and writes it itself, between returning the chains
        # and writing the frames, when the caller lets it (``irq_fd``): what a lone request's guest
        # waits for ends with that interrupt, and the TAP's kernel answers inside the writev.
        policy = qs.policy
        irq = (irq_fd is not None, q.avail_view(mem), int(q.size), int(st.signalled_used), bool(qs.event_idx),
               bool(policy.irq_on_idle), int(policy.irq_coalesce), -1 if irq_fd is None else int(irq_fd),
               _ONE)  # fmt: skip
        try:
            got = q.kernel_round(mem, want, self._pool, area, target.kernel, queue=index,
                                 indirect=qs.indirect, min_len=shortest, max_len=longest, hdr=qs.hdr_len,
                                 extra=(target.fd, target.allow, target.tries, *scratch, irq))  # fmt: skip
        finally:
            self._areas[index].append(area)
        if got is None:
            return None
        chains, frame_bytes, frames, nbytes, decided = (int(x) for x in got)
        if decided != NOT_RUN:
            qs.decided_interrupt(index, st, decided)
            if decided == IRQ_FAILED:
                log.warning("queue %d: call eventfd write failed", index)
        stats = self._stats
        stats.held_briefly(index, chains)
        stats.count(index, chains, frame_bytes)
        failed: list[tuple[int, int]] = []
        if frames < chains:
            codes, errnos = scratch[2], scratch[3]
            failed = [(int(codes[j]), int(errnos[j])) for j in np.flatnonzero(codes[:chains]).tolist()]
        self._port.wrote(frames, nbytes, failed)
        return self._round_result(index, st, mem, chains)

    def send_scratch(self, size: int) -> tuple[npt.NDArray[Any], ...]:
        """The send kernel's work arrays for a ring of ``size``: an iovec row per segment, room for a
        virtio-net header's bytes (12 at most), a code and an errno per chain (a round is over before
        the next starts: one set serves every queue)."""
        scratch = self._scratch
        if scratch is None or scratch[2].shape[0] < size:
            # (and the frames' bytes, copied out before the chains are returned, with each one's
            # offset and length: a round's chains are at most HDR_LEN_V1 + PLAIN_FRAME long)
            scratch = self._scratch = (np.zeros((size, 2), np.uint64), np.zeros(16, np.uint8),
                                       np.zeros(size, np.uint8), np.zeros(size, np.int32),
                                       np.zeros(size * (HDR_LEN_V1 + PLAIN_FRAME), np.uint8),
                                       np.zeros((size, 2), np.int64))  # fmt: skip
        return scratch

    def _process_absorbed(
        self, index: int, st: QueueState, mem: GuestMemory, q: SplitQueue, want: int
    ) -> QueueResult | None:
        """``process`` for a port that only absorbs frames (``DevicePort.absorbs``: the sink), on a
        split ring with no hook on the frames' way (steering, the inflight region, the dirty log): the
        round is one compiled call (``SplitQueue.absorb_round``) that takes, reads and returns every
        chain, and the port is told the totals. While the ring keeps at least ``min_round`` chains
        pending after a round and the driver wants no interrupt yet, the call runs another, up to
        ``fused_rounds`` in all (a frontend that keeps up is served without a return to Python per
        round). None, having changed nothing, for what the kernel does not take whole (as
        ``_process_compiled``)."""
        qs = self._qs
        policy = qs.policy
        area = self._area(index, q.size)
        shortest, longest = self._chain_bounds()
        port = self._port
        try:
            got = q.absorb_round(mem, want, self._pool, area, queue=index, indirect=qs.indirect,
                                 min_len=shortest, max_len=longest, hdr=qs.hdr_len,
                                 read=port.absorbs == ABSORB_SUM, every=policy.publish_every,
                                 rounds=policy.fused_rounds, again=policy.min_round, event_idx=qs.event_idx,
                                 signalled=st.signalled_used)  # fmt: skip
        finally:
            self._areas[index].append(area)
        if got is None:
            return None
        frames, frame_bytes, byte_sum = got
        stats = self._stats
        stats.held_briefly(index, want)
        stats.count(index, frames, frame_bytes)
        port.absorb(frames, frame_bytes, byte_sum)
        return self._round_result(index, st, mem, frames)

    def _process_short(self, index: int, st: QueueState, mem: GuestMemory, want: int) -> QueueResult | None:
        """``process`` for a round of a few chains, with plain ints instead of numpy batches; None,
        having changed nothing, unless every chain is a good one of one or two device-readable
        descriptors (``rings.short_chains``) holding at least a header and an Ethernet header (the
        general path then takes the round, and counts any drop)."""
        qs, pool = self._qs, self._pool
        q = st.q
        chains = q.peek_short(mem, want, indirect=qs.indirect)
        hdr = qs.hdr_len
        shortest, longest = hdr + ETH_HLEN, hdr + qs.frame_limit
        if chains is None or any(c.writable or not shortest <= c.readable_len <= longest for c in chains):
            return None
        k = min(want, pool.available)
        if k == 0:
            return QueueResult(queue=index, more=True, blocked=True)
        del chains[k:]
        descs = [pool.allocate() for _ in range(k)]
        for d, c in zip(descs, chains, strict=True):
            pool.track_one(d, queue=index, head=c.head, addr=c.addr, length=c.readable_len)
        self._stats.add_inflight(index, k)
        q.skip_avail(k)
        if qs.inflight is not None:
            qs.inflight.popped(index, q, mem, np.array([c.head for c in chains], np.uint16))
        batch = ShortTxBatch(queue=index, mem=mem, chains=chains, descriptors=descs, hdr_len=hdr,
                             on_complete=self._completed)  # fmt: skip
        self._hand_over_short(index, st, mem, batch)
        return self._round_result(index, st, mem, k)

    def _round_result(self, index: int, st: QueueState, mem: GuestMemory, processed: int, dropped: int = 0
                      ) -> QueueResult:  # fmt: skip
        """The end of a round: whether more is pending (chains left over from a previous backend
        included), and the interrupt decision."""
        qs = self._qs
        try:
            pending = st.q.avail_pending(mem) + st.resubmit_count
        except GuestError as err:
            return qs.broke(index, st, err)
        irq = qs.decide_interrupt(index, st, mem, idle=not pending)
        return QueueResult(queue=index, processed=processed, dropped=dropped, interrupt=irq, more=pending > 0,
                           pending=pending)  # fmt: skip

    def _hand_over_short(self, index: int, st: QueueState, mem: GuestMemory, batch: ShortTxBatch) -> None:
        """``_hand_over`` for a short round (nothing was sorted out before)."""
        stats = self._stats
        stats.count(index, batch.count, batch.frame_bytes)
        if self.on_sent is not None:
            self.on_sent(batch)
        self._qs.in_call = True
        try:
            finished = self._port.transmit(batch)
        except Exception:
            stats.drop(index, "port_error", batch.count)
            batch.completed = True
            finished = True
            raise
        finally:
            self._qs.in_call = False
            if finished or batch.completed:
                batch.completed = True
                self._qs.mark_used_few(index, st.q, mem, batch.head_list, [0] * batch.count)
                for d in batch.desc_list:
                    self._pool.free(d)
                self._stats.add_inflight(index, -batch.count)
            else:
                self._deferred[index][id(batch)] = batch

    def _discard(self, index: int, st: QueueState, mem: GuestMemory) -> QueueResult:
        """A started ring that is disabled: take up to ``tx_batch`` chains and return them unread (len 0),
        counted as ``ring_disabled`` (vhost-user spec, "Ring states": process and discard TX; the guest
        gets its buffers back). No pool descriptor tracks them: they are on the used ring again before
        this call returns, so nothing is in flight; nor are they walked, since nothing reads them.

        Chains a previous backend left in flight (inflight recovery) are not discarded: the guest sent
        them while the ring was enabled, and a frontend that reconnects starts each ring before it
        enables it (QEMU: SET_VRING_KICK, then SET_VRING_ENABLE), so they wait for the enable."""
        qs = self._qs
        q = st.q
        try:
            k = min(q.avail_pending(mem), qs.policy.tx_batch)
            if k:
                heads = q.pop_avail(mem, k)
                k = int(heads.shape[0])
                # Published in this same call: recorded for the inflight region as RX chains are.
                qs.mark_used(index, q, mem, heads, np.zeros(k, np.uint32), filled=True)
                self._stats.drop(index, "ring_disabled", k)
            more = q.avail_pending(mem) > 0
        except GuestError as err:
            return qs.broke(index, st, err)
        irq = qs.decide_interrupt(index, st, mem, idle=not more)
        return QueueResult(queue=index, processed=k, dropped=k, interrupt=irq, more=more)

    def _sort_out(
        self, index: int, cb: ChainBatch, mem: GuestMemory, hdr: int
    ) -> tuple[int, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Count bad, header-short, runt and over-MTU chains as drops. Returns (dropped, positions of
        the frames for the port, positions returned with len 0 right away: §2.7.8, a dropped chain is
        still used)."""
        good = cb.error == 0
        self._qs.count_chain_errors(index, cb)  # by reason; the total is every chain not ``ok``
        short = good & (cb.readable_len < hdr)
        runt = good & ~short & (cb.readable_len < hdr + ETH_HLEN)
        if short.any():
            self._stats.drop(index, "short_header", int(short.sum()))
        if runt.any():
            self._stats.drop(index, "runt", int(runt.sum()))
        ok = good & ~short & ~runt
        limit = self._qs.frame_limit
        if limit < MAX_FRAME:
            # Only a frame with gso_type NONE or ECN must fit the MTU (§5.1.4); a GSO frame is cut to
            # it by whoever segments it. Few frames are long: their headers are read one by one.
            over = np.flatnonzero(ok & (cb.readable_len > hdr + limit))
            big = [p for p in over.tolist() if _gso_type(cb, mem, p) & ~GSO_ECN == 0]
            if big:
                ok[big] = False
                self._stats.drop(index, "over_mtu", len(big))
        return int(len(cb) - ok.sum()), np.flatnonzero(ok), np.flatnonzero(~ok)

    def _hand_over(
        self, index: int, st: QueueState, mem: GuestMemory, batch: TxBatch, heads: npt.NDArray[np.uint16],
        descs: npt.NDArray[np.int32], done_now: npt.NDArray[np.int64],
    ) -> None:
        """Give the batch to the port; return what it is done with (all of it, unless it keeps the
        batch to complete later) and the chains sorted out before."""
        self._stats.count(index, batch.count, batch.frame_bytes)
        if self.on_sent is not None:
            self.on_sent(batch)
        self._qs.in_call = True
        try:
            finished = self._port.transmit(batch)
        except Exception:
            self._stats.drop(index, "port_error", batch.count)
            batch.completed = True
            finished = True
            raise
        finally:
            self._qs.in_call = False
            if finished or batch.completed:
                batch.completed = True
                self._return(st, mem, index, heads, descs)  # every chain of the round, as popped
                if batch.area is not None:
                    self._areas[index].append(batch.area)
            else:
                self._deferred[index][id(batch)] = batch
                if done_now.shape[0]:
                    self._return(st, mem, index, heads[done_now], descs[done_now])

    def _take(
        self, index: int, st: QueueState, mem: GuestMemory, k: int
    ) -> tuple[npt.NDArray[np.uint16], ChainBatch]:
        """Up to ``k`` TX chains and their walk: resubmitted ones first (still marked in flight), then
        the avail ring's. On a packed ring the resubmitted chains come alone, walked from the
        descriptors the inflight region saved (``PackedQueue.resubmit``, which also records how many
        ring descriptors each took, for ``push_used``)."""
        q, qs = st.q, self._qs
        if st.saved is not None:
            assert isinstance(q, PackedQueue)
            chunk, rest = split_saved(st.saved, k)
            st.saved = rest if rest.ids.shape[0] else None
            cb = q.resubmit(mem, chunk, indirect=qs.indirect)
            return chunk.ids, cb
        again, st.resubmit = st.resubmit[:k], st.resubmit[k:]
        fresh = q.pop_avail(mem, k - int(again.shape[0]))
        if qs.inflight is not None:
            qs.inflight.popped(index, q, mem, fresh)
        heads = np.concatenate([again, fresh]) if again.shape[0] else fresh
        return heads, q.walk(mem, heads, indirect=qs.indirect)

    def _return(
        self, st: QueueState, mem: GuestMemory, index: int, heads: npt.NDArray[Any],
        descs: npt.NDArray[np.int32],
    ) -> None:
        """Chains the device is done with: used with len 0 (TX writes nothing), descriptors freed."""
        k = int(heads.shape[0])
        if k == 0:
            return
        if self._zeros.shape[0] < k:
            self._zeros = np.zeros(max(k, 256), np.uint32)
        self._qs.release(index, st.q, mem, heads, self._zeros[:k], descs)

    def _completed(self, batch: TxBatch | ShortTxBatch) -> None:
        """An asynchronous port finished a batch: return its chains."""
        if batch.cancelled:
            return
        st = self._qs.states[batch.queue]
        if st is None or id(batch) not in self._deferred[batch.queue]:
            return
        self._release(st, batch)
        self._qs.wake(batch.queue)

    def _release(self, st: QueueState, batch: TxBatch | ShortTxBatch) -> None:
        self._deferred[batch.queue].pop(id(batch), None)
        if self._qs.mem is not None:
            self._return(st, self._qs.mem, batch.queue, batch.heads, batch.descriptors)
        if isinstance(batch, TxBatch) and batch.area is not None:
            self._areas[batch.queue].append(batch.area)

    def cancel(self, index: int, st: QueueState) -> None:
        """Queue ``index`` stops: return every batch a port still holds (it must not complete them)."""
        for batch in list(self._deferred[index].values()):
            batch.cancelled = True
            self._release(st, batch)
