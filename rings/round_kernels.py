"""Compiled kernels for a whole device round on a split ring, and the work arrays they fill.

A round of 256 chains through numpy and the separate walk, allocate, track, used-push and free
kernels still costs about 30 numpy and kernel calls at 0.3-0.8 µs each (issue 15's notes). Here a
round is two calls:

- :func:`_take_split_py` pops ``k`` heads off the avail ring, walks them (the walk of
  :mod:`rings.kernels`), checks each chain's length against the caller's bounds, and takes ``k``
  pool descriptors and tracks the chains in them: the pool's own ``allocate_batch`` and ``track``,
  record for record;
- :func:`_complete_split_py` frees a round's descriptors (the pool's ``free_batch``, same checks,
  same LIFO order) and writes its used entries; the caller publishes ``used.idx`` afterwards, so the
  store that exposes the entries stays one numpy store after a call boundary.

Both decline, with nothing changed, whatever they do not take whole (a chain the walker would mark
or follow indirectly, a length out of bounds, a round needing overflow descriptors, a descriptor that
is not in use): the numpy path then does the round and raises or marks what is wrong.
:func:`_scatter_template_py` writes one frame into many single-buffer chains, a call per guest memory
region they lie in (the generator's RX round), and :func:`_sum_frames_py` sums a round's frame bytes
the same way (a sink that reads them).

Two ports need nothing of a round but that, so theirs is one call, fused: :func:`_absorb_split_py`
(the sink's TX: take, sum, return) and :func:`_fill_split_py` (the generator's RX: take, write the
frame, return). Each publishes ``used.idx`` itself, chunk by chunk behind a store fence
(:func:`_return_chunk_py`), and runs further rounds while the ring keeps up and the driver wants no
interrupt (:func:`_next_round_py`).

The chains land in a :class:`RoundArea`, arrays sized for one ring that are kept and reused, so a
round boxes no new array; :meth:`RoundArea.batch` gives the :class:`~rings.chains.ChainBatch` of a
round as views of them. A batch's arrays are its round's only until the area is reused: whoever
keeps a batch past the round (a port completing later) keeps its area with it.

Like :mod:`rings.kernels`, these are plain Python over arrays, compiled by ``kernels.enable()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .barrier import full_fence
from .chains import ChainBatch
from .layout import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    vring_need_event,
)

# The helpers the kernels call by name: the Python sources; ``kernels.enable`` links the compiled
# ones in instead (``rings.kernels.link``).
from .pool_kernels import _free_normal_py as _free_normal
from .walk_kernel import U32_MAX
from .walk_kernel import _walk_into_py as _walk_into

__all__ = ["U32_MAX", "RoundArea"]

_Arr = npt.NDArray[Any]
# The flags whose value tells a lone receive buffer (WRITE alone: neither NEXT nor INDIRECT).
_ONE_BUFFER = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT


class RoundArea:
    """The arrays one round's chains are walked into (capacity: one ring's worth of chains and of
    segments), plus the constant arrays a round hands out (positions 0..n-1, zero lengths)."""

    __slots__ = (
        "counts", "descs", "error", "first", "heads", "lens", "outputs", "positions", "rlen", "s_addr",
        "s_chain", "s_desc", "s_len", "s_offset", "s_region", "s_writable", "size", "wlen", "zeros",
    )  # fmt: skip

    def __init__(self, size: int) -> None:
        self.size = size
        self.heads = np.zeros(size, np.uint16)
        self.descs = np.zeros(size, np.int32)
        self.first = np.zeros(size, np.int64)
        self.counts = np.zeros(size, np.int64)
        self.rlen = np.zeros(size, np.int64)
        self.wlen = np.zeros(size, np.int64)
        self.lens = np.zeros(size, np.uint32)  # per chain: frame length (TX) or used length (RX)
        self.s_chain = np.zeros(size, np.int64)
        self.s_desc = np.zeros(size, np.int64)
        self.s_addr = np.zeros(size, np.uint64)
        self.s_len = np.zeros(size, np.uint32)
        self.s_writable = np.zeros(size, np.bool_)
        self.s_region = np.zeros(size, np.int32)
        self.s_offset = np.zeros(size, np.uint64)
        self.error = np.zeros(size, np.uint8)  # never written: a round the kernel takes has no bad chain
        self.zeros = np.zeros(size, np.uint32)
        self.positions = np.arange(size, dtype=np.int64)

        # The arrays :func:`_take_split_py` writes, in its argument order.
        self.outputs = (self.heads, self.descs, self.lens, self.first, self.counts, self.rlen, self.wlen,
                        self.s_chain, self.s_desc, self.s_addr, self.s_len, self.s_writable, self.s_region,
                        self.s_offset)  # fmt: skip

    def batch(self, n: int, m: int) -> ChainBatch:
        """The ChainBatch of the round's ``n`` chains and ``m`` segments (views of this area)."""
        return ChainBatch(
            heads=self.heads[:n], first_seg=self.first[:n], seg_count=self.counts[:n],
            readable_len=self.rlen[:n], writable_len=self.wlen[:n], error=self.error[:n], errors={},
            seg_chain=self.s_chain[:m], seg_desc=self.s_desc[:m], seg_addr=self.s_addr[:m],
            seg_len=self.s_len[:m], seg_writable=self.s_writable[:m], seg_region=self.s_region[:m],
            seg_offset=self.s_offset[:m],
        )  # fmt: skip


def _take_split_py(
    avail_ring: _Arr, d_addr: _Arr, d_len: _Arr, d_flags: _Arr, d_next: _Arr, starts: _Arr, sizes: _Arr,
    datas: Any, start: int, k: int, indirect: bool, tx: bool, min_len: int, max_len: int, lens_off: int,
    p_used: int, p_capacity: int, p_state: _Arr, p_ever: _Arr, p_stack: _Arr, p_queue: _Arr, p_head: _Arr,
    p_addr: _Arr, p_length: _Arr, p_reserved: _Arr, queue: int,
    heads: _Arr, descs: _Arr, lens: _Arr, first: _Arr, counts: _Arr, rlen: _Arr, wlen: _Arr, s_chain: _Arr,
    s_desc: _Arr, s_addr: _Arr, s_len: _Arr, s_writable: _Arr, s_region: _Arr, s_offset: _Arr,
) -> tuple[int, int]:  # pragma: no cover - compiled by numba; run as Python by the tests' reference check
    """Pop, walk, allocate and track ``k`` chains starting at avail slot ``start``. The length
    checked against ``[min_len, max_len]`` is the readable one for TX (``tx``), the writable one for
    RX; ``lens[j]`` gets that length minus ``lens_off``. Each chain is tracked in a descriptor as the
    device's numpy path tracks it (TX: its first segment's address and readable length; RX: address 0
    and writable length). Returns ``(segments, sum of lens)``, or ``(-1, 0)`` with nothing written
    outside the caller's arrays."""
    if p_used + k > p_capacity:
        return -1, 0  # overflow descriptors, or too few: the pool's numpy path decides
    mask = avail_ring.shape[0] - 1
    for j in range(k):
        heads[j] = avail_ring[(start + j) & mask]
    m = _walk_into(heads, k, d_addr, d_len, d_flags, d_next, starts, sizes, datas, indirect,
                   first, counts, rlen, wlen, s_chain, s_desc, s_addr, s_len, s_writable, s_region, s_offset)
    if m < 0:
        return -1, 0
    total = 0
    for j in range(k):
        length = rlen[j] if tx else wlen[j]
        if length < min_len or length > max_len:
            return -1, 0
        lens[j] = length - lens_off
        total += length - lens_off
    for j in range(k):
        i = p_stack[p_used + j]
        descs[j] = i
        p_state[i] = 1  # STATE_IN_USE
        p_ever[i] = 1
        p_queue[i] = queue
        p_head[i] = heads[j]
        # Statements, not ``a if tx else 0``: numba would unify u64 and int to float64 and round
        # addresses above 2^53.
        if tx:
            p_addr[i] = s_addr[first[j]]
            p_length[i] = rlen[j]
        else:
            p_addr[i] = 0
            p_length[i] = wlen[j]
        for b in range(p_reserved.shape[1]):
            p_reserved[i, b] = 0
    return m, total


def _complete_split_py(
    used_ring: _Arr, start: int, heads: _Arr, lens: _Arr, descs: _Arr,
    p_used: int, p_capacity: int, p_state: _Arr, p_stack: _Arr,
) -> int:  # pragma: no cover - compiled by numba
    """Free a round's descriptors (``_free_normal``: every one a normal descriptor in use, none
    twice) and write its used entries ``(heads[j], lens[j])`` from used slot ``start`` on. Returns
    the pool's new ``used``, or -1 with nothing written. ``used.idx`` is the caller's to publish."""
    left: int = _free_normal(descs, p_state, p_stack, p_used, p_capacity)
    if left < 0:
        return -1
    mask = used_ring.shape[0] - 1
    for j in range(heads.shape[0]):
        pos = (start + j) & mask
        used_ring[pos, 0] = heads[j]
        used_ring[pos, 1] = lens[j]
    return left


def _scatter_template_py(
    data: _Arr, region: int, n: int, s_region: _Arr, s_offset: _Arr, s_len: _Arr, s_writable: _Arr,
    tmpl: _Arr, lens: _Arr,
) -> int:  # pragma: no cover - compiled by numba
    """Write ``tmpl`` at the start of those of ``n`` single-segment chains (segment ``j`` is chain
    ``j``'s) that lie in region ``region``, whose bytes are ``data``, and its length into their
    ``lens[j]`` (the used entries' lengths). Returns the lowest region above ``region`` that other
    chains lie in (the caller's next call), -1 when there is none, or -2 having written nothing when
    a chain cannot take the template: a segment not writable, shorter than ``tmpl`` or untranslated."""
    length = tmpl.shape[0]
    following = -1
    for j in range(n):
        r = s_region[j]
        if r < 0 or not s_writable[j] or s_len[j] < length:
            return -2
        if r > region and (following < 0 or r < following):
            following = r
    for j in range(n):
        if s_region[j] == region:
            off = np.intp(s_offset[j])
            # A view, then an element loop: numba vectorises this; a slice assignment copies byte by
            # byte (about 20x slower at 1500 bytes).
            buf = data[off : off + length]
            for b in range(length):
                buf[b] = tmpl[b]
            lens[j] = length
    return following


def _sum_frames_py(
    data: _Arr, region: int, m: int, s_chain: _Arr, s_region: _Arr, s_offset: _Arr, s_len: _Arr,
    s_writable: _Arr, hdr: int,
) -> tuple[Any, int]:  # pragma: no cover - compiled by numba
    """The sum of every frame byte that lies in region ``region`` (bytes ``data``) of a round's ``m``
    segments: each chain's readable bytes after its first ``hdr`` (the virtio-net header), modulo
    2^64. Returns ``(sum, the lowest region above this one that other such bytes lie in, or -1)``: a
    round of frames is read by one call per memory region (a TX sink that reads every byte)."""
    total = np.uint64(0)
    following = -1
    chain = -1
    consumed = np.int64(0)
    for s in range(m):
        if s_chain[s] != chain:
            chain = s_chain[s]
            consumed = np.int64(0)
        if s_writable[s]:
            continue  # §2.7.4.2: writable descriptors follow the readable ones; they carry no frame
        n = np.int64(s_len[s])
        skip = hdr - consumed
        consumed += n
        if skip >= n:
            continue
        skip = max(skip, np.int64(0))
        r = s_region[s]
        if r != region:
            if r > region and (following < 0 or r < following):
                following = r
            continue
        buf = data[np.intp(s_offset[s]) + skip : np.intp(s_offset[s]) + n]
        acc = np.uint64(0)
        for b in range(buf.shape[0]):
            acc += np.uint64(buf[b])
        total += acc
    return total, following


def _absorb_split_py(
    avail_ring: _Arr, d_addr: _Arr, d_len: _Arr, d_flags: _Arr, d_next: _Arr, starts: _Arr, sizes: _Arr,
    start: int, k: int, indirect: bool, min_len: int, max_len: int, hdr: int,
    p_used: int, p_capacity: int, p_state: _Arr, p_ever: _Arr, p_stack: _Arr, p_queue: _Arr, p_head: _Arr,
    p_addr: _Arr, p_length: _Arr, p_reserved: _Arr, queue: int,
    heads: _Arr, descs: _Arr, lens: _Arr, first: _Arr, counts: _Arr, rlen: _Arr, wlen: _Arr, s_chain: _Arr,
    s_desc: _Arr, s_addr: _Arr, s_len: _Arr, s_writable: _Arr, s_region: _Arr, s_offset: _Arr,
    used_ring: _Arr, used_start: int, zeros: _Arr, datas: Any, read: bool, used_head: _Arr, every: int,
    avail: _Arr, rounds: int, again: int, event_idx: bool, signalled: int,
) -> tuple[int, int, Any]:  # pragma: no cover - compiled by numba
    """Whole TX rounds for a port that absorbs frames (the sink), in one call. A round is
    :func:`_take_split_py` of up to ``k`` chains (popped, walked, checked, each held by a pool
    descriptor), with ``read`` the sum of every frame byte (:func:`_sum_frames_py`, region by region:
    ``datas`` is the tuple of the regions' bytes), then :func:`_complete_split_py` (descriptors freed,
    used entries of length 0 written from used slot ``used_start`` on) and ``used.idx``
    (``used_head[1]``) published behind a store fence: after every ``every`` chains (0: once per
    round), so the other side refills while the round goes on. The first round takes ``k`` chains;
    after it, up to ``rounds`` in all, another round takes what is pending (``avail`` is the whole
    avail ring, for its index), at most ``k``, while that is at least ``again`` and the driver wants
    no interrupt for what is used since ``signalled`` (:func:`_wants_interrupt_py`): a frontend that
    keeps up is served without a return to Python per round. Returns ``(chains, frame bytes, byte sum)``;
    ``(-1, 0, 0)`` with nothing changed when the first take declines (the caller's other paths do
    the round; a later one only ends the call), ``(-2, 0, 0)`` when a free declined after its take (a
    bug: the caller raises)."""
    size = avail_ring.shape[0]
    taken = 0
    total = 0
    checksum = np.uint64(0)
    n = k
    for r in range(max(rounds, 1)):
        m, part = _take_split(avail_ring, d_addr, d_len, d_flags, d_next, starts, sizes, datas, start + taken,
                              n, indirect, True, min_len, max_len, hdr, p_used, p_capacity, p_state, p_ever,
                              p_stack, p_queue, p_head, p_addr, p_length, p_reserved, queue, heads, descs,
                              lens, first, counts, rlen, wlen, s_chain, s_desc, s_addr, s_len, s_writable,
                              s_region, s_offset)  # fmt: skip
        if m < 0:
            if r == 0:
                return -1, 0, np.uint64(0)
            break
        in_use = p_used + n
        step = every if every > 0 else max(n, 1)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            s_lo = first[lo]
            s_hi = first[hi - 1] + counts[hi - 1]
            region = 0
            while read and region >= 0:
                got, region = _sum_frames(datas[region], region, s_hi - s_lo, s_chain[s_lo:s_hi],
                                          s_region[s_lo:s_hi], s_offset[s_lo:s_hi], s_len[s_lo:s_hi],
                                          s_writable[s_lo:s_hi], hdr)
                checksum += got
            in_use = _return_chunk(used_ring, used_head, used_start + taken, lo, hi, heads, zeros, descs,
                                   in_use, p_capacity, p_state, p_stack)
            if in_use < 0:
                return -2, 0, np.uint64(0)
        taken += n
        total += part
        n = _next_round(avail, size, start + taken, used_start + taken, signalled, event_idx, r + 1, rounds,
                        again, k)
        if n == 0:
            break
    return taken, total, checksum


def _fill_split_py(
    avail_ring: _Arr, d_addr: _Arr, d_len: _Arr, d_flags: _Arr, d_next: _Arr, starts: _Arr, sizes: _Arr,
    start: int, k: int, indirect: bool, need: int,
    p_used: int, p_capacity: int, p_state: _Arr, p_ever: _Arr, p_stack: _Arr, p_queue: _Arr, p_head: _Arr,
    p_addr: _Arr, p_length: _Arr, p_reserved: _Arr, queue: int,
    heads: _Arr, descs: _Arr, lens: _Arr, first: _Arr, counts: _Arr, rlen: _Arr, wlen: _Arr, s_chain: _Arr,
    s_desc: _Arr, s_addr: _Arr, s_len: _Arr, s_writable: _Arr, s_region: _Arr, s_offset: _Arr,
    used_ring: _Arr, used_start: int, datas: Any, tmpl: _Arr, used_head: _Arr, every: int,
    avail: _Arr, rounds: int, again: int, event_idx: bool, signalled: int, limit: int,
) -> tuple[int, int]:  # pragma: no cover - compiled by numba
    """Whole RX rounds of one frame written into buffers (the generator's), in one call. A round is
    :func:`_take_split_py` of chains of at least ``need`` writable bytes, ``tmpl`` (header and frame,
    ``need`` bytes) into each (:func:`_scatter_template_py`, region by region: ``datas`` is the tuple
    of the regions' bytes), then :func:`_complete_split_py` (descriptors freed, used entries of length
    ``need`` from used slot ``used_start`` on) and ``used.idx`` (``used_head[1]``) published behind a
    store fence, after every ``every`` chains (0: once per round). The first round takes ``k`` chains;
    more rounds follow as in :func:`_absorb_split_py` (``rounds``, ``again``, no interrupt wanted),
    each only of chains of one descriptor that takes the frame (checked before the take), ``limit``
    chains in all at most (the frames the port asked to send).

    Returns ``(chains written, segments of the first round)``: ``(-1, 0)`` with nothing changed when
    the first take declines; ``(0, segments)`` for a first round taken but not written, its chains
    having several segments (the caller writes and completes it: the take is done, nothing else);
    ``(-2, 0)`` when a free declined after its take (a bug: the caller raises)."""
    size = avail_ring.shape[0]
    mask = size - 1
    length = tmpl.shape[0]
    done = 0
    n = k
    segments = 0
    for r in range(max(rounds, 1)):
        if r > 0:
            for j in range(n):  # a later round only of chains the scatter takes whole
                head = avail_ring[(start + done + j) & mask]
                if head >= size or d_flags[head] & _ONE_BUFFER != VIRTQ_DESC_F_WRITE or d_len[head] < length:
                    n = j
                    break
            if n == 0:
                break
        m, _ = _take_split(avail_ring, d_addr, d_len, d_flags, d_next, starts, sizes, datas, start + done, n,
                           indirect, False, need, U32_MAX, 0, p_used, p_capacity, p_state, p_ever, p_stack,
                           p_queue, p_head, p_addr, p_length, p_reserved, queue, heads, descs, lens, first,
                           counts, rlen, wlen, s_chain, s_desc, s_addr, s_len, s_writable, s_region,
                           s_offset)  # fmt: skip
        if m < 0:
            if r == 0:
                return -1, 0
            break
        if r == 0:
            segments = m
        whole = m == n
        for j in range(n):
            if not whole or s_region[j] < 0 or not s_writable[j] or s_len[j] < length:
                if r == 0:
                    return 0, m  # (what the scatter refuses, checked before the first chunk is written)
                return -2, 0  # (checked before the take: cannot happen)
        in_use = p_used + n
        step = every if every > 0 else max(n, 1)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            region = 0
            while region >= 0:
                region = _scatter_template(datas[region], region, hi - lo, s_region[lo:hi], s_offset[lo:hi],
                                           s_len[lo:hi], s_writable[lo:hi], tmpl, lens[lo:hi])
            in_use = _return_chunk(used_ring, used_head, used_start + done, lo, hi, heads, lens, descs,
                                   in_use, p_capacity, p_state, p_stack)
            if in_use < 0:
                return -2, 0
        done += n
        left = limit - done
        if left <= 0:
            break
        n = _next_round(avail, size, start + done, used_start + done, signalled, event_idx, r + 1, rounds,
                        again, k if k < left else left)
        if n == 0:
            break
    return done, segments


def _return_chunk_py(
    used_ring: _Arr, used_head: _Arr, used_start: int, lo: int, hi: int, heads: _Arr, lens: _Arr,
    descs: _Arr, in_use: int, p_capacity: int, p_state: _Arr, p_stack: _Arr,
) -> int:  # pragma: no cover - compiled by numba
    """Give chains ``lo:hi`` of a fused round back: :func:`_complete_split_py` (their descriptors
    freed, their used entries ``(heads, lens)`` written from used slot ``used_start + lo``), then
    ``used.idx`` (``used_head[1]``) published as ``used_start + hi`` behind a store fence. Returns
    the pool's new ``used``, or -1 having written nothing when the free is refused."""
    left: int = _complete_split(used_ring, used_start + lo, heads[lo:hi], lens[lo:hi], descs[lo:hi], in_use,
                                p_capacity, p_state, p_stack)
    if left < 0:
        return -1
    _store_fence()  # the entries before the index that exposes them (§2.7.8)
    used_head[1] = (used_start + hi) & 0xFFFF
    return left


def _next_round_py(
    avail: _Arr, size: int, next_avail: int, used_idx: int, signalled: int, event_idx: bool, done: int,
    rounds: int, again: int, k: int,
) -> int:  # pragma: no cover - compiled by numba
    """How many chains a fused call's next round takes (0: the call ends), after ``done`` of its
    ``rounds`` rounds: the ring's pending entries from avail slot ``next_avail`` (``avail`` is the
    whole avail ring), at most ``k``, if at least ``again``, the index is sane, and the driver wants
    no interrupt for the used entries up to ``used_idx`` since ``signalled`` (else the caller
    signals first)."""
    if done >= rounds:
        return 0
    _full_fence()  # used.idx stored before used_event (or the flags) is loaded (§2.7.10)
    if _wants_interrupt(avail, size, used_idx, signalled, event_idx):
        return 0
    pending = int(avail[1] - next_avail) & 0xFFFF
    _load_fence()  # avail.idx before the entries it exposes (§2.7.13.3)
    if pending > size or pending < max(again, 1):
        return 0  # (a corrupt index is the caller's to report: avail_pending raises)
    return pending if pending < k else k


def _wants_interrupt_py(
    avail: _Arr, size: int, used_idx: int, signalled: int, event_idx: bool
) -> bool:  # pragma: no cover - compiled by numba
    """Whether the driver wants an interrupt for the used entries from ``signalled`` to ``used_idx``
    (§2.7.10 ``vring_need_event`` on ``used_event`` with EVENT_IDX, else §2.7.7 the avail flags)."""
    new = used_idx & 0xFFFF
    old = signalled & 0xFFFF
    if new == old:
        return False
    if event_idx:
        return vring_need_event(int(avail[2 + size]), new, old)
    return not int(avail[0]) & VIRTQ_AVAIL_F_NO_INTERRUPT


def _full_fence_py() -> None:
    """Stores before it are visible before loads after it: ``rings.barrier.full_fence`` in Python;
    ``kernels.enable`` links in a compiled sequentially consistent fence (x86-64: ``mfence``)."""
    full_fence()


def _store_fence_py() -> None:
    """Stores before it are made visible before stores after it: nothing to do in Python, where each
    numpy store is a C call of its own; ``kernels.enable`` links in a compiled release fence."""


def _load_fence_py() -> None:
    """Loads before it are done before loads after it: nothing to do in Python; ``kernels.enable``
    links in a compiled acquire fence."""


# The helpers the fused kernels call by name (as above: the Python sources, until kernels.enable
# links the compiled ones in).
_store_fence = _store_fence_py
_load_fence = _load_fence_py
_full_fence = _full_fence_py
_return_chunk = _return_chunk_py
_next_round = _next_round_py
_wants_interrupt = _wants_interrupt_py
_take_split = _take_split_py
_complete_split = _complete_split_py
_sum_frames = _sum_frames_py
_scatter_template = _scatter_template_py
