"""The RX half of the virtio-net device: the bounded backlog of frames waiting for guest buffers, the
virtio-net header, and the plan that places frames into buffers (one per frame, or several with
VIRTIO_NET_F_MRG_RXBUF).

This module owns no queue and no pool: :class:`nicsim.virtio.device.VirtioNetDevice` pops the guest's RX
chains, asks :func:`plan_rx` which chain gets which bytes, builds one staging array (header + frame,
back to back) and scatters it into the chains' writable segments with one vectorised copy per
memory region. A header-passing port (the tap) hands frames that already carry the kernel's
virtio-net header; staging keeps it (offloads negotiated) or zeroes it, and always fills num_buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from nicsim.virtio.port import HDR_LEN_V1
from rings.memory import GuestMemory
from rings.split import ChainBatch

NUM_BUFFERS_OFFSET = 10  # in struct virtio_net_hdr_v1 (virtio 1.2 §5.1.6), le16


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


def scatter_chains(
    mem: GuestMemory, cb: ChainBatch, per_chain: npt.NDArray[np.int64], staging: npt.NDArray[np.uint8]
) -> None:
    """Write ``per_chain[k]`` bytes of ``staging`` into chain ``k``'s writable segments, chains taking
    consecutive slices of ``staging`` in order (0 for chains that get nothing)."""
    wl = np.where(cb.seg_writable, cb.seg_len, 0).astype(np.int64)
    excl = np.cumsum(wl) - wl
    has = cb.seg_count > 0
    chain_base = np.zeros(len(cb), dtype=np.int64)
    chain_base[has] = excl[cb.first_seg[has]]
    woff = excl - chain_base[cb.seg_chain]
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
