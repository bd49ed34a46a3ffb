"""Compiled kernels for the hot path: the common case of a batch walk in one call, with numpy's walker
as the reference and the fallback.

A numpy round costs about 0.6 µs per numpy call, and a validated walk of 256 chains takes several
dozen calls whatever the chains look like; the same walk in a compiled loop costs a few microseconds
(measured in issue 15's notes). So the kernel here takes only the batches it can finish without a
single error: split-ring chains of any depth, no INDIRECT descriptor (when negotiated), readable
before writable, at most 2^32 - 1 bytes, every non-empty segment inside one guest memory region. Any
other batch, a malformed chain anywhere in it included, is declined before anything is decided, and
:class:`~rings.walker.ChainWalker` walks it (and marks what is wrong). A batch the kernel takes gives
exactly the ChainBatch the walker would have given; ``tests/test_kernels.py`` checks that on random and
malformed tables.

The kernels are written as plain Python over arrays and compiled with numba (an established package
with wheels, needing no compiler here) only when :func:`enable` is called: importing this module
imports no compiler, and a machine without numba keeps the numpy path. The compiled code is cached on
disk (numba's ``cache=True``), so only the first process after an install pays the compile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .chains import ChainBatch
from .layout import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

__all__ = ["disable", "enable", "enabled", "engine", "free_normal", "track", "walk_split"]

U32_MAX = 0xFFFF_FFFF

_Arrays = tuple[Any, ...]


def _walk_split_py(
    heads: npt.NDArray[np.uint16],
    d_addr: npt.NDArray[np.uint64],
    d_len: npt.NDArray[np.uint32],
    d_flags: npt.NDArray[np.uint16],
    d_next: npt.NDArray[np.uint16],
    starts: npt.NDArray[np.uint64],
    sizes: npt.NDArray[np.uint64],
    indirect: bool,
) -> _Arrays:  # pragma: no cover - compiled by numba; run as Python only by the tests' reference check
    """The kernel's source. Returns ``(taken, first_seg, seg_count, readable_len, writable_len,
    seg_chain, seg_desc, seg_addr, seg_len, seg_writable, seg_region, seg_offset)``; ``taken`` False
    (and empty arrays) when the batch needs the numpy walker."""
    n = heads.shape[0]
    size = d_addr.shape[0]
    counts = np.empty(n, np.int64)
    first = np.empty(n, np.int64)
    total = 0
    # Pass 1: the shape of every chain, bounded by the queue size (§2.7.5.2), declining at the first
    # thing the walker would mark or treat specially.
    for c in range(n):
        cur = np.int64(heads[c])
        depth = 0
        while True:
            if cur >= size or depth == size:
                return _declined(n)
            f = d_flags[cur]
            if indirect and (f & VIRTQ_DESC_F_INDIRECT) != 0:
                return _declined(n)
            depth += 1
            if (f & VIRTQ_DESC_F_NEXT) == 0:
                break
            cur = np.int64(d_next[cur])
        first[c] = total
        counts[c] = depth
        total += depth
    rlen = np.zeros(n, np.int64)
    wlen = np.zeros(n, np.int64)
    s_chain = np.empty(total, np.int64)
    s_desc = np.empty(total, np.int64)
    s_addr = np.empty(total, np.uint64)
    s_len = np.empty(total, np.uint32)
    s_writable = np.empty(total, np.bool_)
    s_region = np.empty(total, np.int32)
    s_offset = np.empty(total, np.uint64)
    nreg = starts.shape[0]
    # Pass 2: the segments, chain by chain, with the order, length and translation checks.
    for c in range(n):
        cur = np.int64(heads[c])
        seen_writable = False
        s = first[c]
        for _ in range(counts[c]):
            f = d_flags[cur]
            writable = (f & VIRTQ_DESC_F_WRITE) != 0
            if seen_writable and not writable:
                return _declined(n)  # §2.7.4.2: readable after writable
            seen_writable = writable
            length = np.uint64(d_len[cur])
            addr = d_addr[cur]
            if writable:
                wlen[c] += np.int64(length)
            else:
                rlen[c] += np.int64(length)
            region = np.int32(-1)
            offset = np.uint64(0)
            if length != 0:  # zero lengths are never translated (CVE-2020-10725)
                for i in range(nreg):
                    # offset + length <= size, written so that nothing wraps.
                    if addr >= starts[i] and length <= sizes[i] and addr - starts[i] <= sizes[i] - length:
                        region = np.int32(i)
                        offset = addr - starts[i]
                        break
                if region < 0:
                    return _declined(n)
            s_chain[s] = c
            s_desc[s] = cur
            s_addr[s] = addr
            s_len[s] = d_len[cur]
            s_writable[s] = writable
            s_region[s] = region
            s_offset[s] = offset
            s += 1
            cur = np.int64(d_next[cur])
        if rlen[c] + wlen[c] > U32_MAX:
            return _declined(n)  # the used ring's len is u32
    return (True, first, counts, rlen, wlen, s_chain, s_desc, s_addr, s_len, s_writable, s_region, s_offset)


def _declined_py(n: int) -> _Arrays:  # pragma: no cover - compiled by numba
    e64 = np.empty(0, np.int64)
    return (
        False, e64, e64, e64, e64, e64, e64, np.empty(0, np.uint64), np.empty(0, np.uint32),
        np.empty(0, np.bool_), np.empty(0, np.int32), np.empty(0, np.uint64),
    )  # fmt: skip


def _free_normal_py(
    idx: npt.NDArray[Any], state: npt.NDArray[np.uint8], stack: npt.NDArray[np.intp], used: int, capacity: int
) -> int:  # pragma: no cover - compiled by numba
    """``PacketPool.free_batch`` of normal (not overflow) descriptors, every one in use and none twice:
    marks them free and pushes them reversed, as the pool does; returns the new ``used``. -1, with
    nothing changed, for anything else (the pool's numpy path then raises the precise error)."""
    n = idx.shape[0]
    for j in range(n):
        i = idx[j]
        if i < 0 or i >= capacity or state[i] != 1:  # 1: STATE_IN_USE; 2: seen earlier in this batch
            for k in range(j):
                state[idx[k]] = 1
            return -1
        state[i] = 2
    for j in range(n):
        state[idx[j]] = 0
        stack[used - 1 - j] = idx[j]
    left: int = used - n
    return left


def _track_py(
    idx: npt.NDArray[Any], state: npt.NDArray[np.uint8], queue_f: npt.NDArray[np.int32],
    head_f: npt.NDArray[np.uint16], addr_f: npt.NDArray[np.uint64], length_f: npt.NDArray[np.uint32],
    queue: int, heads: npt.NDArray[np.uint16], addrs: npt.NDArray[np.uint64], lengths: npt.NDArray[np.uint32],
) -> bool:  # pragma: no cover - compiled by numba
    """``PacketPool.track`` of allocated descriptors: False, with nothing written, when an index is
    out of range or not allocated (the pool's numpy path then raises the precise error)."""
    size = state.shape[0]
    for j in range(idx.shape[0]):
        i = idx[j]
        if i < 0 or i >= size or state[i] == 0:
            return False
    for j in range(idx.shape[0]):
        i = idx[j]
        queue_f[i] = queue
        head_f[i] = heads[j]
        addr_f[i] = addrs[j]
        length_f[i] = lengths[j]
    return True


# What the kernel functions call by name: the Python sources until ``enable`` compiles them.
_declined = _declined_py
_compiled_walk: Callable[..., _Arrays] | None = None
free_normal: Callable[..., int] | None = None
"""The compiled :func:`_free_normal_py` once enabled (the pool calls it), else None."""
track: Callable[..., bool] | None = None
"""The compiled :func:`_track_py` once enabled (the pool calls it), else None."""
_why_not: str = "not enabled"


def enable() -> bool:
    """Compile (or load from numba's cache) the kernels and use them; False, with the reason in
    :func:`engine`, when numba is missing or fails. Idempotent."""
    global _compiled_walk, _declined, _why_not, free_normal, track
    if _compiled_walk is not None:
        return True
    try:
        import numba
    except ImportError as exc:  # the numpy path stays: slower, never wrong
        _why_not = f"numba is not installed ({exc})"
        return False
    try:
        # The GIL stays held: the pool kernels mark descriptors they are checking, which no other
        # thread may see (the interlocked pool calls them under its lock anyway).
        jit = numba.njit(cache=True, boundscheck=False)
        _declined = jit(_declined_py)
        walk = jit(_walk_split_py)
        free_fn, track_fn = jit(_free_normal_py), jit(_track_py)
        _compile_now(walk)
    except Exception as exc:  # numba raises its own error classes; any of them means: no kernels
        _declined = _declined_py
        _why_not = f"numba could not compile the kernels ({type(exc).__name__}: {exc})"
        return False
    _compiled_walk, free_normal, track = walk, free_fn, track_fn
    return True


def _compile_now(walk: Callable[..., _Arrays]) -> None:
    """Compile for the argument types the rings pass, now rather than in the first round."""
    e = np.empty
    walk(e(0, np.uint16), e(1, np.uint64), e(1, np.uint32), e(1, np.uint16), e(1, np.uint16),
         e(1, np.uint64), e(1, np.uint64), True)  # fmt: skip


def disable() -> None:
    """Back to the numpy walker everywhere (the reference; tests compare the two)."""
    global _compiled_walk, _why_not, free_normal, track
    _compiled_walk = free_normal = track = None
    _why_not = "disabled"


def enabled() -> bool:
    return _compiled_walk is not None


def engine() -> str:
    """What walks the batches, for stats and ``--help``: ``compiled`` or ``numpy (why)``."""
    return "compiled" if _compiled_walk is not None else f"numpy ({_why_not})"


def walk_split(
    heads: npt.NDArray[np.uint16],
    table: Any,
    starts: npt.NDArray[np.uint64],
    sizes: npt.NDArray[np.uint64],
    *,
    indirect: bool,
    walk: Callable[..., _Arrays] | None = None,
) -> ChainBatch | None:
    """The ChainBatch of ``heads`` over descriptor ``table`` (a :class:`~rings.walker.DescriptorTable`)
    and guest memory regions ``starts``/``sizes`` (sorted), or None when the kernels are off or the
    batch needs the numpy walker. ``walk`` overrides the kernel (the tests pass the Python source)."""
    fn = walk if walk is not None else _compiled_walk
    if fn is None:
        return None
    out = fn(heads, table.d_addr, table.d_len, table.d_flags, table.d_next, starts, sizes, indirect)
    if not out[0]:
        return None
    n = heads.shape[0]
    return ChainBatch(
        heads=heads, first_seg=out[1], seg_count=out[2], readable_len=out[3], writable_len=out[4],
        error=np.zeros(n, np.uint8), errors={}, seg_chain=out[5], seg_desc=out[6], seg_addr=out[7],
        seg_len=out[8], seg_writable=out[9], seg_region=out[10], seg_offset=out[11],
    )  # fmt: skip
