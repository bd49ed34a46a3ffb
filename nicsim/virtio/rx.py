"""The RX path of the virtio-net device (virtio 1.2 §5.1.6.3-4): from the port, through a bounded
backlog, into the guest's receive buffers, and onto the used ring.

This module owns :class:`RxPath`, the sink a port pushes frames into (one frame, many, or one template
written many times) and the round ``VirtioNetDevice.deliver_rx`` / ``poll_rx`` run: flush the backlog,
then (poll) let a pull-style port fill the buffers still posted. A round pops the guest's RX chains,
asks :func:`plan_rx` which chain gets which bytes (one buffer per frame, or several with
VIRTIO_NET_F_MRG_RXBUF), builds one staging array (header + frame, back to back) and scatters it into
the chains' writable segments with one vectorised copy per memory region; the consumed prefix goes on
the used ring and the chains no frame used are given back. A header-passing port (the tap) hands
frames that already carry the kernel's virtio-net header; staging keeps it (offloads negotiated) or
zeroes it, and always fills num_buffers. Pool exhaustion is backpressure: frames wait in the backlog,
which drops (``no_rx_buffer``) only when full. A started ring that is disabled fills no buffer and
drops the frames pushed for it (``ring_disabled``). A round of a few frames that each fit the one
buffer they go to is delivered with plain ints by :class:`~nicsim.virtio.rx_short.ShortRx` (the same
bytes, entries and counts); it declines anything else before touching the ring, and the round goes on
here. Frames handed as views of another guest's memory (the switch, :meth:`RxPath.push_views`) skip
the backlog and the staging when buffers are posted: :mod:`nicsim.virtio.rx_direct` copies them once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.virtio.port import (
    ETH_HLEN,
    HDR_LEN_V1,
    MAX_FRAME,
    NUM_BUFFERS_OFFSET,
    Buffer,
    DevicePort,
    TxFrames,
)
from nicsim.virtio.queues import GSO_ECN, GSO_TYPE_OFFSET, QueueResult, QueueSet, QueueState
from nicsim.virtio.rx_direct import write_frames
from nicsim.virtio.rx_short import ShortRx
from nicsim.virtio.steer import FlowSteering
from rings import kernels
from rings.chains import ChainBatch
from rings.errors import GuestError
from rings.memory import GuestMemory
from rings.round_kernels import U32_MAX, RoundArea
from rings.split import SplitQueue


@dataclass(frozen=True, kw_only=True)
class RxPlan:
    """Which frames go where. Frames are taken in order; ``placed`` of them fit now. ``chains`` good
    chains are consumed; ``chain_bytes[j]`` is what chain ``j`` (among the good ones) receives;
    ``nbufs[i]`` is how many chains placed frame ``i`` spans; ``dropped`` lists frames dropped as too
    big (indices into the offered frames, all before the first frame left waiting)."""

    placed_frames: npt.NDArray[np.int64]  # indices of frames placed, in order
    nbufs: npt.NDArray[np.int64]
    chain_bytes: npt.NDArray[np.int64]
    dropped: npt.NDArray[np.int64]
    consumed: int  # frames considered (placed + dropped); the rest wait

    @property
    def chains(self) -> int:
        return int(self.chain_bytes.shape[0])


_EMPTY = np.empty(0, dtype=np.int64)
_HEADER_FIELDS = np.arange(NUM_BUFFERS_OFFSET, dtype=np.int64)  # a header's bytes but num_buffers


def plan_rx(need: npt.NDArray[np.int64], wlen: npt.NDArray[np.int64], *, mergeable: bool) -> RxPlan:
    """Place frames needing ``need`` bytes (header included) into good chains of ``wlen`` bytes.

    Without MRG_RXBUF each frame takes exactly one chain and a frame larger than the chain offered is
    dropped (the chain goes to the next frame). With MRG_RXBUF a frame spans as many chains as it needs
    (virtio 1.2 §5.1.6.4.2); a frame that needs more chains than are posted now waits.
    """
    nf, nc = int(need.shape[0]), int(wlen.shape[0])
    m = min(nf, nc)
    fits = need[:m] <= wlen[:m]
    if bool(fits.all()):  # the common case: one buffer per frame, vectorised
        placed = np.arange(m, dtype=np.int64)
        return RxPlan(placed_frames=placed, nbufs=np.ones(m, np.int64), chain_bytes=need[:m].copy(),
                      dropped=_EMPTY, consumed=m)
    placed_l: list[int] = []
    nbufs_l: list[int] = []
    bytes_l: list[int] = []
    dropped_l: list[int] = []
    c = 0
    w = wlen.tolist()
    for i in range(nf):
        if c >= nc:
            break
        n = int(need[i])
        if not mergeable:
            if n > w[c]:
                dropped_l.append(i)
                continue
            placed_l.append(i)
            nbufs_l.append(1)
            bytes_l.append(n)
            c += 1
            continue
        # Mergeable: take chains until the frame fits; if the posted chains run out, it waits.
        left, k, parts = n, c, []
        while left > 0 and k < nc:
            take = min(left, w[k])
            parts.append(take)
            left -= take
            k += 1
        if left > 0:
            break
        placed_l.append(i)
        nbufs_l.append(len(parts))
        bytes_l.extend(parts)
        c = k
    consumed = max(placed_l[-1] if placed_l else -1, dropped_l[-1] if dropped_l else -1) + 1
    return RxPlan(
        placed_frames=np.array(placed_l, np.int64), nbufs=np.array(nbufs_l, np.int64),
        chain_bytes=np.array(bytes_l, np.int64), dropped=np.array(dropped_l, np.int64), consumed=consumed,
    )


def expand(
    a_start: npt.NDArray[np.int64], b_start: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Byte indices of many ``[a, a+len)`` / ``[b, b+len)`` range pairs, flattened, no Python loop."""
    total = int(lengths.sum())
    base = np.cumsum(lengths) - lengths
    within = np.arange(total, dtype=np.int64) - np.repeat(base, lengths)
    return np.repeat(a_start, lengths) + within, np.repeat(b_start, lengths) + within


def stage_frames(
    scratch: npt.NDArray[np.uint8],
    hdr_len: int,
    data: npt.NDArray[np.uint8],
    offsets: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    nbufs: npt.NDArray[np.int64],
    *,
    carried: bool = False,
    keep_hdr: bool = False,
) -> npt.NDArray[np.uint8]:
    """Header + frame for every frame, back to back, in (a prefix of) ``scratch``; returns that prefix.

    ``carried``: every frame already starts with its ``hdr_len``-byte header (a header-passing port such
    as the tap, whose kernel wrote it) and ``lengths`` include it; its flags/gso fields are kept when
    ``keep_hdr`` (the driver negotiated GUEST_CSUM), else zeroed. ``num_buffers`` is always ours."""
    need = lengths if carried else lengths + hdr_len
    start = np.cumsum(need) - need
    total = int(need.sum())
    out = scratch[:total]
    if carried:
        _copy_ranges(out, start, data, offsets, lengths)
    if not (carried and keep_hdr):
        # flags 0, GSO_NONE: frames carry complete checksums (§5.1.6.4.1: without GUEST_CSUM the
        # device MUST set flags to zero).
        out[start[:, None] + np.arange(min(hdr_len, NUM_BUFFERS_OFFSET), dtype=np.int64)[None, :]] = 0
    if hdr_len >= HDR_LEN_V1:
        out[start + NUM_BUFFERS_OFFSET] = (nbufs & 0xFF).astype(np.uint8)
        out[start + NUM_BUFFERS_OFFSET + 1] = (nbufs >> 8).astype(np.uint8)
    if not carried:
        _copy_ranges(out, start + hdr_len, data, offsets, lengths)
    return out


# Above this mean length a Python loop of slice copies (one memcpy each) beats building two int64
# index arrays per byte; GSO frames of 64 KB (offloads) are ~300x past it.
SLICE_COPY_MIN = 1024


def _copy_ranges(
    dst: npt.NDArray[np.uint8], dst_start: npt.NDArray[np.int64],
    src: npt.NDArray[np.uint8], src_start: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
) -> None:
    n = int(lengths.shape[0])
    if n and int(lengths.sum()) >= SLICE_COPY_MIN * n:
        for d, s, k in zip(dst_start.tolist(), src_start.tolist(), lengths.tolist(), strict=True):
            dst[d : d + k] = src[s : s + k]
        return
    di, si = expand(dst_start, src_start, lengths)
    dst[di] = src[si]


def _writable_offsets(cb: ChainBatch) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per segment: its device-writable length (0 for a readable one), and where it starts within its
    chain's writable space (§2.7.4.2: the writable descriptors follow the readable ones)."""
    wl = np.where(cb.seg_writable, cb.seg_len, 0).astype(np.int64)
    excl = np.cumsum(wl) - wl
    has = cb.seg_count > 0
    chain_base = np.zeros(len(cb), dtype=np.int64)
    chain_base[has] = excl[cb.first_seg[has]]
    return wl, excl - chain_base[cb.seg_chain]


def scatter_chains(
    mem: GuestMemory, cb: ChainBatch, per_chain: npt.NDArray[np.int64], staging: npt.NDArray[np.uint8]
) -> None:
    """Write ``per_chain[k]`` bytes of ``staging`` into chain ``k``'s writable segments, chains taking
    consecutive slices of ``staging`` in order (0 for chains that get nothing)."""
    wl, woff = _writable_offsets(cb)
    copy = np.clip(per_chain[cb.seg_chain] - woff, 0, wl)
    src_base = np.cumsum(per_chain) - per_chain
    src = src_base[cb.seg_chain] + woff
    used = np.flatnonzero(copy > 0)
    if used.shape[0] and int(copy[used].sum()) >= SLICE_COPY_MIN * used.shape[0]:
        # Big buffers (GSO frames in mergeable buffers): one slice copy per segment.
        for seg, off in zip(used.tolist(), src[used].tolist(), strict=True):
            n = int(copy[seg])
            mem.segment(int(cb.seg_region[seg]), int(cb.seg_offset[seg]), n)[:] = staging[off : off + n]
        return
    mem.scatter(cb.seg_region, cb.seg_offset, copy, staging, src)


def scatter_template(
    mem: GuestMemory, cb: ChainBatch, template: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint32]:
    """Copy ``template`` (a virtio-net header plus one frame) into every good chain's device-writable
    space, spilling across its writable segments, vectorised over the batch (the generator's path when
    :func:`scatter_template_words` does not apply). Returns the bytes written per chain:
    ``min(len(template), writable_len)``, 0 for bad chains, ready to be the used-ring lengths."""
    wl, woff = _writable_offsets(cb)
    copy = np.clip(template.shape[0] - woff, 0, wl)
    mem.scatter(cb.seg_region, cb.seg_offset, copy, template, woff)
    written = np.minimum(cb.writable_len, template.shape[0])
    return np.where(cb.error == 0, written, 0).astype(np.uint32)


class RxBacklog:
    """Frames a port pushed while the guest had no RX buffer: at most ``max_frames`` frames and
    ``max_bytes`` bytes, preallocated, FIFO. Past either bound the caller drops (``no_rx_buffer``)."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.data: npt.NDArray[np.uint8] = np.zeros(max_bytes, np.uint8)
        self.offsets: npt.NDArray[np.int64] = np.zeros(max_frames, np.int64)
        self.lengths: npt.NDArray[np.int64] = np.zeros(max_frames, np.int64)
        self.head = 0   # first queued frame slot
        self.count = 0  # frames queued
        self.end = 0    # first free byte
        self._state = np.zeros(3, np.int64)  # the three for a compiled round (state)

    def __len__(self) -> int:
        return self.count

    def _compact(self) -> None:
        if self.count == 0:
            self.head = self.end = 0
            return
        lo = int(self.offsets[self.head])
        sl = slice(self.head, self.head + self.count)
        self.data[: self.end - lo] = self.data[lo : self.end]
        self.offsets[: self.count] = self.offsets[sl] - lo
        self.lengths[: self.count] = self.lengths[sl]
        self.head, self.end = 0, self.end - lo

    def full(self) -> bool:
        """No frame fits any more: every slot is taken."""
        return bool(self.count >= self.offsets.shape[0])

    def append(self, frame: npt.NDArray[np.uint8]) -> bool:
        n = int(frame.shape[0])
        cap_f, cap_b = self.offsets.shape[0], self.data.shape[0]
        if self.count >= cap_f or n > cap_b:
            return False
        if self.head + self.count >= cap_f or self.end + n > cap_b:
            self._compact()
            if self.end + n > cap_b:
                return False
        slot = self.head + self.count
        self.data[self.end : self.end + n] = frame
        self.offsets[slot] = self.end
        self.lengths[slot] = n
        self.end += n
        self.count += 1
        return True

    def extend(self, data: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64],
               lengths: npt.NDArray[np.int64]) -> bool:  # fmt: skip
        """Queue every frame ``data[offsets[i]:][:lengths[i]]`` with one vectorised copy, or none:
        False (nothing queued) when they do not all fit, and the caller appends them one by one."""
        n, total = int(lengths.shape[0]), int(lengths.sum())
        cap_f, cap_b = self.offsets.shape[0], self.data.shape[0]
        if self.count + n > cap_f or total > cap_b:
            return False
        if self.head + self.count + n > cap_f or self.end + total > cap_b:
            self._compact()
            if self.end + total > cap_b:
                return False
        start = self.end + np.cumsum(lengths) - lengths
        _copy_ranges(self.data, start, data, offsets, lengths)
        slots = slice(self.head + self.count, self.head + self.count + n)
        self.offsets[slots] = start
        self.lengths[slots] = lengths
        self.end += total
        self.count += n
        return True

    def state(self) -> npt.NDArray[np.int64]:
        """``[head, count, end]`` for a compiled round that queues frames itself (the switch's
        forward): it writes each frame at ``end`` into slot ``head + count`` (no compacting) and
        moves count and end on; :meth:`kernel_queued` takes them back."""
        self._state[0], self._state[1], self._state[2] = self.head, self.count, self.end
        return self._state

    def kernel_queued(self, n: int) -> None:
        """A compiled round queued ``n`` frames through :meth:`state`."""
        assert int(self._state[1]) == self.count + n
        self.count, self.end = self.count + n, int(self._state[2])

    def frames(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(offsets, lengths) of the queued frames, oldest first (views; valid until the next change)."""
        sl = slice(self.head, self.head + self.count)
        return self.offsets[sl], self.lengths[sl]

    def pop(self, n: int) -> None:
        self.head += n
        self.count -= n
        if self.count == 0:
            self.head = self.end = 0

    def clear(self) -> int:
        n = self.count
        self.head = self.count = self.end = 0
        return n


def scatter_template_words(
    mem: GuestMemory, cb: ChainBatch, good_pos: npt.NDArray[np.int64], tmpl: npt.NDArray[np.uint8]
) -> bool:
    """Fast path of the generator: one template into many single-segment buffers, at any alignment.

    Each region gets a cached window view (row ``o`` is ``data[o : o + len(tmpl)]``, strides (1, 1)),
    so one fancy-indexed assignment of ``n`` rows writes the whole batch: numpy copies each row as a
    block, with ``n`` index elements instead of ``n * len(tmpl)`` (DPDK's virtio-user posts buffers at
    4 mod 8: the 12-byte header before 8-aligned data). Writes exactly ``len(tmpl)`` bytes per buffer;
    a row index past the window (which translation already rules out) raises IndexError. Returns False,
    writing nothing, when the batch does not qualify (a good chain with several segments, a
    device-readable one, or one shorter than the template); the caller then uses the byte scatter."""
    n = good_pos.shape[0]
    length = tmpl.shape[0]
    # A good chain has at least one segment and a bad one none: as many segments as good chains
    # means one segment each.
    if n == 0 or length == 0 or cb.seg_len.shape[0] != n:
        return False
    if np.count_nonzero(cb.seg_writable & (cb.seg_len >= length)) != n:
        return False
    offs = cb.seg_offset.astype(np.intp)
    regions = cb.seg_region
    r0 = int(regions[0])
    if regions.shape[0] == 1 or not np.count_nonzero(regions != r0):
        _template_window(mem, r0, length)[offs] = tmpl
        return True
    for r in np.unique(regions).tolist():
        _template_window(mem, r, length)[offs[regions == r]] = tmpl
    return True


def _template_window(mem: GuestMemory, region: int, length: int) -> npt.NDArray[np.uint8]:
    """Rows ``data[o : o + length]`` of region ``region`` for every ``o`` (a view, cached in ``mem``:
    released with the memory table)."""

    def build(m: GuestMemory) -> npt.NDArray[np.uint8]:
        data = m.regions[region].data
        step = data.strides[0]
        rows = max(data.shape[0] - length + 1, 0)
        win: npt.NDArray[np.uint8] = np.lib.stride_tricks.as_strided(
            data, shape=(rows, length), strides=(step, step), writeable=True
        )
        return win

    return mem.cached(("template_window", region, length), build)


class RxPath:
    """The device's receive path: port -> backlog -> guest RX buffers -> used ring. It is the
    :class:`~nicsim.virtio.port.RxSink` the port pushes into."""

    def __init__(self, queues: QueueSet, port: DevicePort, pairs: int, *, offloads: bool) -> None:
        self._qs = queues
        self._port = port
        self._pool = queues.pool
        self._stats = queues.stats
        policy = queues.policy
        backlog_bytes = max(policy.rx_backlog * 2048, 2 * MAX_FRAME)
        if offloads:
            # GSO frames of up to 64 KB arrive from the port: room for several of them.
            backlog_bytes = max(backlog_bytes, 8 * (MAX_FRAME + HDR_LEN_V1))
        self.backlog = [RxBacklog(policy.rx_backlog, backlog_bytes) for _ in range(pairs)]
        self._pairs = pairs
        self.steering = FlowSteering()
        self._scratch: npt.NDArray[np.uint8] = np.zeros(policy.rx_batch * 2048, np.uint8)
        self._short = ShortRx(queues)  # rounds of a few frames, one buffer each
        self._tmpl_key: tuple[int, int, int] | None = None
        self._tmpl: npt.NDArray[np.uint8] = np.zeros(0, np.uint8)
        self._areas: dict[int, RoundArea] = {}  # compiled rounds' work arrays, per receive queue
        self._recv_iov = np.zeros((1, 2), np.uint64)  # a receive kernel's one iovec (_pull)
        self._recv_drops = np.zeros(2, np.int64)  # and the reads it dropped, by reason

    # -- the sink the port pushes into -----------------------------------------------------------------

    def enabled_pairs(self) -> list[int]:
        """The pairs whose RX ring runs and is enabled (QEMU enables a pair with SET_VRING_ENABLE when
        the guest asks for it, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET); pair 0 when none does yet."""
        qs = self._qs
        on = [p for p in range(self._pairs) if qs.enabled[2 * p] and qs.states[2 * p] is not None]
        return on or [0]

    def learn_tx(self, batch: TxFrames) -> None:
        """A batch the guest sent on ``batch.pair``: its flows' replies go back to that pair."""
        for i in range(batch.count):
            self.steering.transmitted(batch.frame(i), batch.pair)

    def steer(self, frame: npt.NDArray[np.uint8]) -> int:
        """The pair a frame pushed without one goes to (:mod:`nicsim.virtio.steer`)."""
        if self._pairs == 1:
            return 0
        return self.steering.pick(frame, self.enabled_pairs(), self._qs.hdr_len if self._port.vnet_hdr else 0)

    def push(self, frame: Buffer, *, pair: int | None = None) -> bool:
        arr = frame if isinstance(frame, np.ndarray) else np.frombuffer(bytes(frame), dtype=np.uint8)
        if pair is None:
            pair = self.steer(arr)
        rxq = 2 * pair
        if self._disabled(rxq):
            self._stats.drop(rxq, "ring_disabled")
            return False
        hdr = self._qs.hdr_len if self._port.vnet_hdr else 0
        if arr.shape[0] > MAX_FRAME + hdr:
            self._stats.drop(rxq, "too_big")
            return False
        if arr.shape[0] > self._qs.frame_limit + hdr and self._over_mtu(arr, hdr):
            self._stats.drop(rxq, "over_mtu")
            return False
        bl = self.backlog[pair]
        was_empty = len(bl) == 0
        if not bl.append(arr):
            self._stats.drop(rxq, "no_rx_buffer")
            return False
        if was_empty:
            self._qs.wake(rxq)
        return True

    @staticmethod
    def _over_mtu(arr: npt.NDArray[np.uint8], hdr: int) -> bool:
        """A frame longer than the MTU allows must not reach the driver unless it is a GSO frame
        (virtio 1.2 §5.1.4): bare frames never are; a header-passing port's say so in gso_type."""
        return hdr == 0 or int(arr[GSO_TYPE_OFFSET]) & ~GSO_ECN == 0

    def push_many(self, data: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64],
                  lengths: npt.NDArray[np.uint32], *, pair: int | None = None) -> int:  # fmt: skip
        n = int(lengths.shape[0])
        if pair is None and len(self.backlog) == 1:
            pair = 0  # one pair: nothing to steer
        if pair is not None and n and not self._disabled(2 * pair):
            hdr = self._qs.hdr_len if self._port.vnet_hdr else 0
            bl = self.backlog[pair]
            # The common case (a generator's batch of distinct frames): none too big for the frame or
            # the MTU, and all fit the backlog: one copy. Anything else goes frame by frame.
            if int(lengths.max()) <= min(MAX_FRAME, self._qs.frame_limit) + hdr:
                was_empty = len(bl) == 0
                if bl.extend(data, offsets, lengths.astype(np.int64)):
                    if was_empty:
                        self._qs.wake(2 * pair)
                    return n
        kept = 0
        for off, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
            kept += self.push(data[off : off + n], pair=pair)
        return kept

    def push_views(
        self, frames: Sequence[npt.NDArray[np.uint8]], *, pair: int | None = None, queue: bool = True,
        headers: npt.NDArray[np.uint8] | None = None,
    ) -> npt.NDArray[np.bool_]:
        """Frames as views (another guest's TX buffers): written straight into the buffers posted now,
        one copy each, when nothing waits in the backlog before them; the rest are pushed (copied into
        the backlog, or dropped), or with ``queue=False`` dropped at once (``no_rx_buffer``), leaving
        the backlog to frames that may wait. Returns which frames were kept. Without ``pair``, each
        frame goes to the pair its flow hashes to (in order within each pair). ``headers``: for a
        header-passing port, each frame's virtio-net header apart, (n, 10) bytes (the frames are then
        bare); kept when the driver negotiated GUEST_CSUM, as :meth:`push` keeps a port's header."""
        carried = self._port.vnet_hdr and headers is None  # the frames start with the port's header
        if pair is None:
            on = self.enabled_pairs() if self._pairs > 1 else [0]
            if len(on) == 1:
                pair = on[0]
            else:
                hdr = self._qs.hdr_len if carried else 0
                pick = self.steering.pick
                to = np.fromiter((pick(f, on, hdr) for f in frames), np.int64, len(frames))
                kept = np.zeros(len(frames), np.bool_)
                for p in on:
                    idx = np.flatnonzero(to == p)
                    if idx.size:
                        part = None if headers is None else headers[idx]
                        kept[idx] = self.push_views([frames[i] for i in idx.tolist()], pair=p, queue=queue,
                                                    headers=part)  # fmt: skip
                return kept
        kept = np.zeros(len(frames), np.bool_)
        rxq = 2 * pair
        qs = self._qs
        st, mem = qs.states[rxq], qs.mem
        start = 0
        if (st is not None and mem is not None and st.broken is None and qs.enabled[rxq] and frames
                and not len(self.backlog[pair]) and not carried):  # fmt: skip
            try:
                short = None
                if len(frames) <= qs.short_round and not qs.logging:  # the short path does not log
                    short = self._short.deliver_views(rxq, st, mem, frames, headers)
                if short is not None:
                    kept[:short] = True
                    start = short
                else:
                    start = self._deliver_views(rxq, st, mem, frames, kept, headers) or 0
            except GuestError as err:
                qs.broke(rxq, st, err)  # the ring's pump reports it; the frames go the push way
            if start:
                qs.delivered(rxq)  # the interrupt for the entries published here is decided now
        if not queue:
            if start < len(frames):
                self._stats.drop(rxq, "no_rx_buffer", len(frames) - start)
            return kept
        rest = len(frames) - start
        # A guest slower than its senders (its ring and backlog full): push would refuse each of these
        # (none is over the MTU) as no_rx_buffer; one count, not a call per frame.
        if (rest > 1 and self.backlog[pair].full() and not self._disabled(rxq)
                and max(f.shape[0] for f in frames[start:]) <= qs.frame_limit):  # fmt: skip
            self._stats.drop(rxq, "no_rx_buffer", rest)
            return kept
        joined = self._port.vnet_hdr and headers is not None
        for i in range(start, len(frames)):
            frame = frames[i]
            if joined:
                assert headers is not None
                head = np.zeros(qs.hdr_len, np.uint8)
                keep = min(qs.hdr_len, NUM_BUFFERS_OFFSET)
                head[:keep] = headers[i, :keep]
                frame = np.concatenate((head, frame))  # the backlog copies anyway: header and frame
            kept[i] = self.push(frame, pair=pair)
        return kept

    def _deliver_views(
        self, rxq: int, st: QueueState, mem: GuestMemory, frames: Sequence[npt.NDArray[np.uint8]],
        kept: npt.NDArray[np.bool_], headers: npt.NDArray[np.uint8] | None = None,
    ) -> int | None:  # fmt: skip
        """:meth:`_deliver` for frames given as views, without staging; returns how many it consumed,
        or None, having done nothing, when a frame is over the MTU and not a GSO frame, or over
        MAX_FRAME (push, or the staging path, counts it too_big or over_mtu, in order)."""
        qs = self._qs
        lengths = np.fromiter((f.shape[0] for f in frames), np.int64, len(frames))
        over = lengths > qs.frame_limit
        if over.any() and (headers is None or int(lengths.max()) > MAX_FRAME
                           or bool(((headers[over, GSO_TYPE_OFFSET] & ~GSO_ECN) == 0).any())):  # fmt: skip
            return None  # only GSO frames pass the MTU
        got = self._take_chains(rxq, st, mem, qs.policy.rx_batch if qs.mergeable else len(frames))
        if got is None:
            return 0
        cb, descs = got
        good_pos = np.flatnonzero(cb.error == 0)
        hdr = qs.hdr_len
        need = lengths + hdr
        plan = plan_rx(need, cb.writable_len[good_pos].astype(np.int64), mergeable=qs.mergeable)
        if plan.dropped.shape[0]:
            self._stats.drop(rxq, "too_big", int(plan.dropped.shape[0]))
        placed = plan.placed_frames
        if placed.shape[0]:
            write_frames(mem, cb, good_pos, hdr, frames, placed, plan.nbufs, need,
                         headers=headers if qs.guest_csum else None)  # fmt: skip
            self._count(rxq, int(placed.shape[0]), int(lengths[placed].sum()))
            kept[placed] = True
        self._finish_chains(rxq, st, mem, cb, descs, good_pos, plan.chains, plan.chain_bytes)
        return plan.consumed

    def push_template(self, template: npt.NDArray[np.uint8], count: int, *, pair: int = 0) -> int:
        rxq = 2 * pair
        st = self._qs.states[rxq]
        mem = self._qs.mem
        if st is None or mem is None or st.broken is not None or count <= 0 or not self._qs.enabled[rxq]:
            return 0
        if len(self.backlog[pair]):
            self._flush_backlog(rxq, st, mem)
            if len(self.backlog[pair]):
                return 0
        return self._deliver_template(rxq, st, mem, template, count)

    def place_round(
        self, kernel: Callable[..., tuple[int, ...]], extra: tuple[Any, ...], *, pair: int = 0
    ) -> tuple[int, ...] | None:
        """Frames another port's compiled round places into the pair's posted buffers itself
        (``nicsim.ports.switch_kernel``: a guest's TX round straight into this guest's buffers), when
        nothing needs a hook on their way: one pair (nothing to steer), a split ring, no inflight
        region, no dirty log. ``kernel`` runs as ``SplitQueue.kernel_round`` runs it, on the posted
        chains (``min_len`` 1 when a frame may take several, MRG_RXBUF, else 0; ``max_len`` the MTU),
        with ``extra`` and then the pair's backlog (its arrays and ``[head, count, end]``), where it
        queues what no buffer is left for, as :meth:`push_views` would (with frames already waiting
        it takes no chain: nothing may pass them), and drops what the backlog cannot take
        (``no_rx_buffer``). It returns ``(chains used, frames placed, their bytes without headers,
        ..., frames dropped, frames queued)``. The frames are counted, the ring woken for a backlog
        that was empty, and the interrupt decided here. Returns the kernel's tuple, or None when it
        did not run."""
        rxq = 2 * pair
        qs = self._qs
        st, mem = qs.states[rxq], qs.mem
        if (self._pairs != 1 or st is None or mem is None or st.broken is not None or not qs.enabled[rxq]
                or qs.inflight is not None or qs.logging or not isinstance(st.q, SplitQueue)):  # fmt: skip
            return None
        q = st.q
        bl = self.backlog[pair]
        waiting = len(bl)
        try:
            pending = 0 if waiting else q.avail_pending(mem)
        except GuestError as err:
            qs.broke(rxq, st, err)  # the ring's pump reports it; the frames go the push way
            return None
        area = self._area(rxq, q)
        hdr = qs.hdr_len
        got = q.kernel_round(mem, min(pending, area.size), self._pool, area, kernel, queue=rxq,
                             indirect=qs.indirect, min_len=int(qs.mergeable), max_len=qs.frame_limit, hdr=hdr,
                             extra=(*extra, bl.data, bl.offsets, bl.lengths, bl.state()),
                             any_count=True)  # fmt: skip
        if got is None:
            return None
        chains, frames, dropped, queued = int(got[0]), int(got[1]), int(got[6]), int(got[7])
        if queued:
            bl.kernel_queued(queued)
            if not waiting:
                qs.wake(rxq)
        if dropped:
            self._stats.drop(rxq, "no_rx_buffer", dropped)
        if frames:
            self._stats.held_briefly(rxq, chains)
            self._count(rxq, frames, int(got[2]))
            qs.delivered(rxq)  # the interrupt for the entries published here is decided now
        return got

    def rx_space(self, pair: int = 0) -> int:
        st = self._qs.states[2 * pair]
        mem = self._qs.mem
        if st is None or mem is None or st.broken is not None or not self._qs.enabled[2 * pair]:
            return 0
        try:
            return st.q.avail_pending(mem)
        except GuestError:
            return 0

    def rx_backlog(self, pair: int = 0) -> int:
        return len(self.backlog[pair])

    def wake(self, pair: int = 0) -> None:
        self._qs.wake(2 * pair)

    def _disabled(self, rxq: int) -> bool:
        """Started but disabled (vhost-user "Ring states"): the backend "must not supply any new RX
        packets". A frame for such a ring is dropped rather than queued: the ring may stay disabled
        for good (a queue pair the guest does not use), and a full backlog would blame no_rx_buffer."""
        return not self._qs.enabled[rxq] and self._qs.states[rxq] is not None

    def drop_backlog(self, pair: int) -> None:
        """The pair's receive queue stops: frames still waiting for it are dropped (``queue_stopped``)."""
        n = self.backlog[pair].clear()
        if n:
            self._stats.drop(2 * pair, "queue_stopped", n)

    # -- device side -----------------------------------------------------------------------------------

    def round(self, pair: int, *, pull: bool, now: float = 0.0) -> QueueResult:
        """One RX round on ``pair``: flush the backlog into the guest's buffers; with ``pull``, then let
        a pull-style port (the generator, the tap) fill the buffers still posted."""
        rxq = 2 * pair
        qs = self._qs
        st, mem = qs.running(rxq)
        if st.broken is not None:
            return QueueResult(queue=rxq, error=st.broken)
        if not qs.enabled[rxq]:
            return QueueResult(queue=rxq)  # started but disabled: no buffer is filled, nothing is lost
        stats = self._stats
        before = int(stats.packets[rxq])
        drops = stats.drops_total(rxq)
        bl = self.backlog[pair]
        try:
            self._flush_backlog(rxq, st, mem)
            if pull:
                pending = st.q.avail_pending(mem) if not len(bl) else 0
                # A port that sends one frame over and over (DevicePort.bulk_rx) is offered several
                # rounds' worth: the device fills them in one compiled call while buffers keep coming.
                budget = min(pending, qs.policy.rx_batch)
                if budget and self._port.bulk_rx:
                    budget = qs.policy.rx_batch * qs.policy.fused_rounds
                produced = self._pull(pair, st, mem, budget, now) if budget else 0
                if produced and len(bl):
                    # A port that pushes what it reads (the tap): deliver it in this round, not the next.
                    self._flush_backlog(rxq, st, mem)
                # More only if buffers are still posted after a round that produced (the batch limit
                # cut it short) and the port may have more (a drained tap says so: ``finished``); a
                # round that filled every posted buffer is done, not one round early.
                drained = bool(getattr(self._port, "finished", False))
                more = (len(bl) > 0 or (produced > 0 and not drained)) and st.q.avail_pending(mem) > 0
                blocked = budget > 0 and produced == 0 and self._pool.available == 0
            else:
                more = len(bl) > 0 and self.rx_space(pair) > 0
                blocked = len(bl) > 0 and self._pool.available == 0
        except GuestError as err:
            return qs.broke(rxq, st, err)
        return QueueResult(
            queue=rxq, processed=int(stats.packets[rxq]) - before,
            dropped=stats.drops_total(rxq) - drops, more=more,
            interrupt=qs.decide_interrupt(rxq, st, mem, idle=not more), blocked=blocked,
        )

    def _pull(self, pair: int, st: QueueState, mem: GuestMemory, budget: int, now: float) -> int:
        """A pull-style port's frames for ``pair``, up to ``budget``: read by the device itself when
        the port offers its descriptor (``DevicePort.recv_target``: the tap) on a split ring with no
        hook on the frames' way (the inflight region, the dirty log) and nothing to steer (one pair,
        or the port's kernel chose the queue), in one compiled call that reads each frame and places
        it into a posted buffer (``nicsim.ports.fd_kernels``: a reply's delivery costs a call instead
        of dozens); else the port's :meth:`~DevicePort.poll_rx`. A frame the call reads but no single
        buffer takes whole goes to the port, which pushes it as its own poll would."""
        target = self._port.recv_target(pair)
        qs, q = self._qs, st.q
        if (target is None or not isinstance(q, SplitQueue) or qs.inflight is not None or qs.logging
                or not (target.queue_chosen or len(self.backlog) == 1)):  # fmt: skip
            return self._port.poll_rx(pair, budget, now)
        rxq = 2 * pair
        area = self._area(rxq, q)
        drops = self._recv_drops
        drops[:] = 0
        hdr = qs.hdr_len
        got = q.kernel_round(mem, budget, self._pool, area, target.kernel, queue=rxq, indirect=qs.indirect,
                             min_len=hdr + ETH_HLEN, max_len=qs.frame_limit + hdr, hdr=hdr,
                             extra=(target.fd, target.buf, self._recv_iov, target.burst, qs.guest_csum,
                                    drops))  # fmt: skip
        if got is None:
            return self._port.poll_rx(pair, budget, now)
        placed, nbytes, pending, status, err = (int(x) for x in got)
        if placed:
            self._stats.held_briefly(rxq, placed)
            self._stats.count(rxq, placed, nbytes - placed * hdr)
        done = placed + self._port.received(pair, placed, nbytes, pending, status, err, drops)
        if pending and done < budget:
            # A frame for several buffers (a TCP stream's GSO frame, mergeable buffers): the port's
            # poll reads the rest of the round into the backlog, which delivers them in one batch.
            done += self._port.poll_rx(pair, budget - done, now)
        return done

    def _flush_backlog(self, rxq: int, st: QueueState, mem: GuestMemory) -> None:
        bl = self.backlog[rxq // 2]
        while len(bl):
            offsets, lengths = bl.frames()
            n = min(len(bl), self._qs.policy.rx_batch)
            taken = self._deliver(rxq, st, mem, bl.data, offsets[:n], lengths[:n])
            if taken == 0:
                return
            bl.pop(taken)

    def _take_chains(
        self, rxq: int, st: QueueState, mem: GuestMemory, want: int
    ) -> tuple[ChainBatch, npt.NDArray[np.int32]] | None:
        want = min(want, st.q.avail_pending(mem), self._qs.policy.rx_batch)
        if want <= 0:
            return None
        q = st.q
        if kernels.take_split is not None and isinstance(q, SplitQueue):
            area = self._area(rxq, q)
            got = q.take_round(mem, want, self._pool, area, queue=rxq, indirect=self._qs.indirect, tx=False,
                               min_len=0, max_len=U32_MAX, lens_off=0)  # fmt: skip
            if got is not None:
                self._stats.add_inflight(rxq, want)
                return area.batch(want, got[0]), area.descs[:want]
        descs = self._pool.allocate_batch(want, partial=True)
        k = int(descs.shape[0])
        if k == 0:
            return None  # backpressure: frames stay queued until descriptors come back
        heads = q.pop_avail(mem, k)
        cb = q.walk(mem, heads, indirect=self._qs.indirect)
        # The walker bounds every chain's length to u32 (CHAIN_TOO_LONG): the cast is exact.
        self._pool.track(descs, queue=rxq, heads=heads, addrs=np.zeros(k, np.uint64),
                         lengths=cb.writable_len.astype(np.uint32))  # fmt: skip
        self._stats.add_inflight(rxq, k)
        return cb, descs

    def _give_back(self, rxq: int, st: QueueState, descs: npt.NDArray[np.int32], unused: int) -> None:
        """End a round: the last ``unused`` popped chains go back to the avail ring (un-popped, still
        the guest's), and every descriptor taken for the round is freed."""
        st.q.unpop_avail(unused)
        self._pool.free_batch(descs)
        self._stats.add_inflight(rxq, -int(descs.shape[0]))

    def _finish_chains(
        self, rxq: int, st: QueueState, mem: GuestMemory, cb: ChainBatch, descs: npt.NDArray[np.int32],
        good_pos: npt.NDArray[np.int64], used_good: int, chain_bytes: npt.NDArray[np.int64],
    ) -> None:
        """Publish the consumed prefix of the popped chains and give the rest back."""
        k = len(cb)
        if used_good == k:
            # Every chain good and used (the common case): the lengths are the used-ring entries.
            if not self._qs.logging:
                self._publish_all(rxq, st, mem, cb.heads, descs, chain_bytes.astype(np.uint32))
                return
            cut, lens = k, chain_bytes.astype(np.uint32)
        else:
            # The consumed prefix ends at the first good chain no frame used; bad chains before it
            # are returned with len 0 (§2.7.8), chains from it on are given back to the avail ring.
            cut = int(good_pos[used_good]) if used_good < good_pos.shape[0] else k
            lens = np.zeros(k, np.uint32)
            lens[good_pos[:used_good]] = chain_bytes.astype(np.uint32)
            self._qs.count_chain_errors(rxq, _prefix_errors(cb, cut))
        if cut:
            qs = self._qs
            if qs.logging:
                # Every buffer of the published chains may have been written: log them all (a buffer
                # only partly written costs a spurious page copy at worst, a missed one a stale page).
                assert qs.dirty_log is not None
                seg = np.flatnonzero(cb.seg_writable & (cb.seg_chain < cut))
                qs.dirty_log.mark_ranges(cb.seg_addr[seg], cb.seg_len[seg])
            qs.mark_used(rxq, st.q, mem, cb.heads[:cut], lens[:cut], filled=True)
        self._give_back(rxq, st, descs, k - cut)

    def _publish_all(
        self, rxq: int, st: QueueState, mem: GuestMemory, heads: npt.NDArray[np.uint16],
        descs: npt.NDArray[np.int32], lens: npt.NDArray[np.uint32],
    ) -> None:
        """Every chain of the round used with ``lens`` (nothing to log), its descriptors freed."""
        self._qs.release(rxq, st.q, mem, heads, lens, descs, filled=True)

    def _deliver(
        self, rxq: int, st: QueueState, mem: GuestMemory, data: npt.NDArray[np.uint8],
        offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
    ) -> int:
        """Place frames ``data[offsets[i]:][:lengths[i]]`` in order; returns how many were consumed
        (placed or dropped as too big); the rest wait."""
        qs = self._qs
        carried = self._port.vnet_hdr  # the frames start with the port's (the kernel's) header
        if lengths.shape[0] <= qs.short_round and not qs.logging:  # the short path does not log
            taken = self._short.deliver(rxq, st, mem, data, offsets, lengths, carried=carried)
            if taken is not None:
                return taken
        if carried and qs.mergeable and int(lengths.sum()) >= SLICE_COPY_MIN * int(lengths.shape[0]):
            taken = self._deliver_carried(rxq, st, mem, data, offsets, lengths)
            if taken is not None:
                return taken
        # With MRG_RXBUF a frame may span several buffers: take a full batch, give back what is unused.
        want = qs.policy.rx_batch if qs.mergeable else int(lengths.shape[0])
        got = self._take_chains(rxq, st, mem, want)
        if got is None:
            return 0
        cb, descs = got
        good_pos = np.flatnonzero(cb.error == 0)
        hdr = qs.hdr_len
        need = lengths.astype(np.int64) + (0 if carried else hdr)
        plan = plan_rx(need, cb.writable_len[good_pos].astype(np.int64), mergeable=qs.mergeable)
        if plan.dropped.shape[0]:
            self._stats.drop(rxq, "too_big", int(plan.dropped.shape[0]))
        placed = plan.placed_frames
        if placed.shape[0]:
            total = int(need[placed].sum())
            if self._scratch.shape[0] < total:
                self._scratch = np.zeros(total, np.uint8)
            staging = stage_frames(
                self._scratch, hdr, data, offsets[placed], lengths[placed].astype(np.int64), plan.nbufs,
                carried=carried, keep_hdr=qs.guest_csum,
            )
            per_chain = np.zeros(len(cb), np.int64)
            per_chain[good_pos[: plan.chains]] = plan.chain_bytes
            scatter_chains(mem, cb, per_chain, staging)
            frame_bytes = int(lengths[placed].sum()) - (hdr * int(placed.shape[0]) if carried else 0)
            self._count(rxq, int(placed.shape[0]), frame_bytes)
        self._finish_chains(rxq, st, mem, cb, descs, good_pos, plan.chains, plan.chain_bytes)
        return plan.consumed

    def _deliver_carried(
        self, rxq: int, st: QueueState, mem: GuestMemory, data: npt.NDArray[np.uint8],
        offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
    ) -> int | None:  # fmt: skip
        """:meth:`_deliver` for big frames a header-passing port queued with their headers (a TCP
        stream's GSO frames from the TAP) into mergeable buffers: each header and frame go from the
        backlog straight into the guest's buffers (:func:`~nicsim.virtio.rx_direct.write_frames`, a
        compiled call per frame), not through a staging copy and a slice copy per buffer. None, having
        done nothing, for a frame over the MTU that is not a GSO frame (push refused those; an MTU
        changed since): the staging path drops it in its turn."""
        hdr = self._qs.hdr_len
        frames = [data[o + hdr : o + n] for o, n in zip(offsets.tolist(), lengths.tolist(), strict=True)]
        headers = data[offsets[:, None] + _HEADER_FIELDS]
        return self._deliver_views(rxq, st, mem, frames, np.zeros(len(frames), np.bool_), headers)

    def _deliver_template(
        self, rxq: int, st: QueueState, mem: GuestMemory, template: npt.NDArray[np.uint8], count: int
    ) -> int:
        hdr = self._qs.hdr_len
        need = template.shape[0] + hdr
        if kernels.scatter_template is not None:
            done = self._template_compiled(rxq, st, mem, template, count, need)
            if done is not None:
                return done
        got = self._take_chains(rxq, st, mem, count)
        if got is None:
            return 0
        cb, descs = got
        good_pos = np.arange(len(cb)) if not cb.errors else np.flatnonzero(cb.error == 0)
        if good_pos.shape[0] == 0 or int(cb.writable_len[good_pos].min()) >= need:
            # Fast path: one buffer per frame; header (num_buffers = 1) + frame, one vectorised scatter.
            tmpl = self._with_header(template, hdr)
            if not scatter_template_words(mem, cb, good_pos, tmpl):
                scatter_template(mem, cb, tmpl)
            n = int(good_pos.shape[0])
            self._count(rxq, n, n * template.shape[0])
            self._finish_chains(rxq, st, mem, cb, descs, good_pos, n, np.full(n, need, np.int64))
            return n
        # General path (small or mergeable buffers): give every chain back, place through the planner.
        self._give_back(rxq, st, descs, len(cb))
        n = min(count, len(cb))
        return self._deliver(rxq, st, mem, template, np.zeros(n, np.int64),
                             np.full(n, template.shape[0], np.int64))  # fmt: skip

    def _template_compiled(
        self, rxq: int, st: QueueState, mem: GuestMemory, template: npt.NDArray[np.uint8], count: int,
        need: int,
    ) -> int | None:
        """The template into up to ``count`` buffers in one compiled call (``SplitQueue.fill_round``:
        take the round, every chain good and at least ``need`` bytes long, write the frame, publish
        it). Returns how many frames were placed, or None, having changed nothing, for a round the
        kernels do not take (the numpy path then does)."""
        qs = self._qs
        q = st.q
        if qs.logging or qs.inflight is not None or not isinstance(q, SplitQueue):
            return None
        want = min(count, q.avail_pending(mem), qs.policy.rx_batch)
        if want <= 0:
            return None
        area = self._area(rxq, q)
        tmpl = self._with_header(template, qs.hdr_len)
        policy = qs.policy
        got = q.fill_round(mem, want, self._pool, area, queue=rxq, indirect=qs.indirect, tmpl=tmpl,
                           every=policy.publish_every, rounds=policy.fused_rounds, again=policy.min_round,
                           event_idx=qs.event_idx, signalled=st.signalled_used, limit=count)  # fmt: skip
        if got is None:
            return None
        written, segments = got
        stats = self._stats
        if written:
            stats.held_briefly(rxq, want)
            self._count(rxq, written, written * template.shape[0])
            return written
        stats.add_inflight(rxq, want)  # the chains are ours until _finish_chains returns them
        self._count(rxq, want, want * template.shape[0])
        # Chains of several buffers: the numpy scatter, into the round the kernel took.
        cb = area.batch(want, segments)
        scatter_template(mem, cb, tmpl)
        self._finish_chains(rxq, st, mem, cb, area.descs[:want], np.arange(want), want,
                            np.full(want, need, np.int64))  # fmt: skip
        return want

    def _area(self, rxq: int, q: SplitQueue) -> RoundArea:
        """The receive queue's work arrays (a round is over before the next starts: one is enough)."""
        area = self._areas.get(rxq)
        if area is None or area.size != q.size:
            area = self._areas[rxq] = RoundArea(q.size)
        return area

    def _with_header(self, template: npt.NDArray[np.uint8], hdr: int) -> npt.NDArray[np.uint8]:
        """The virtio-net header (num_buffers = 1) and ``template`` behind it, built once per template."""
        key = (id(template), template.shape[0], hdr)
        if self._tmpl_key != key:
            self._tmpl = np.zeros(template.shape[0] + hdr, np.uint8)
            if hdr >= HDR_LEN_V1:
                self._tmpl[NUM_BUFFERS_OFFSET] = 1
            self._tmpl[hdr:] = template
            self._tmpl_key = key
        return self._tmpl

    def _count(self, rxq: int, frames: int, frame_bytes: int) -> None:
        self._stats.count(rxq, frames, frame_bytes)


def _prefix_errors(cb: ChainBatch, cut: int) -> ChainBatch:
    """A view of ``cb`` restricted to its first ``cut`` chains, enough for counting their errors."""
    if cut == len(cb):
        return cb
    return replace(cb, error=cb.error[:cut])
