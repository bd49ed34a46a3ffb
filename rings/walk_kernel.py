"""The chain walk as a compiled kernel's source: the common case of a batch walk in one call, with
numpy's walker (:class:`~rings.walker.ChainWalker`) as the reference and the fallback.

A numpy round costs about 0.6 µs per numpy call, and a validated walk of 256 chains takes several
dozen calls whatever the chains look like; the same walk in a compiled loop costs a few microseconds
(measured in issue 15's notes). So the kernel here takes only the batches it can finish without a
single error: split-ring chains of any depth, no INDIRECT descriptor (when negotiated), readable
before writable, at most 2^32 - 1 bytes, every non-empty segment inside one guest memory region; an
INDIRECT descriptor (when negotiated) whose table is whole descriptors inside one region, holds no
INDIRECT entry and chains within itself and within the queue size (§2.7.5.3.1): Linux sends every
multi-segment frame (a TCP stream's GSO frames) that way. Any
other batch, a malformed chain anywhere in it included, is declined before anything is decided, and
the walker walks it (and marks what is wrong). A batch the kernel takes gives exactly the ChainBatch
the walker would have given; ``tests/test_kernels.py`` checks that on random and malformed tables.

Plain Python over arrays; :mod:`rings.kernels` compiles it. :func:`_walk_into_py` is the walk itself,
into arrays the caller owns (the compiled rounds of :mod:`rings.round_kernels` call it too);
:func:`_walk_split_py` sizes and allocates them first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .layout import DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

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
    datas: Any,
    indirect: bool,
) -> _Arrays:  # pragma: no cover - compiled by numba; run as Python only by the tests' reference check
    """The kernel's source. Returns ``(taken, first_seg, seg_count, readable_len, writable_len,
    seg_chain, seg_desc, seg_addr, seg_len, seg_writable, seg_region, seg_offset)``; ``taken`` False
    (and empty arrays) when the batch needs the numpy walker. ``datas``: the memory regions' bytes (a
    tuple, in region order), where indirect tables are read."""
    n = heads.shape[0]
    size = d_addr.shape[0]
    total = 0
    # Pass 1: how many segments, bounded by the queue size per chain (§2.7.5.2), declining at a chain
    # that leaves the table or loops (the walker marks those). An indirect table counts as many as
    # the queue size at most (pass 2 checks it).
    for c in range(n):
        cur = np.int64(heads[c])
        depth = 0
        while True:
            if cur >= size or depth == size:
                return _declined(n)
            if indirect and (d_flags[cur] & VIRTQ_DESC_F_INDIRECT) != 0:
                depth += min(np.int64(d_len[cur]) // DESC_SIZE, size - depth)
                break
            depth += 1
            if (d_flags[cur] & VIRTQ_DESC_F_NEXT) == 0:
                break
            cur = np.int64(d_next[cur])
        total += depth
    first = np.empty(n, np.int64)
    counts = np.empty(n, np.int64)
    rlen = np.empty(n, np.int64)
    wlen = np.empty(n, np.int64)
    s_chain = np.empty(total, np.int64)
    s_desc = np.empty(total, np.int64)
    s_addr = np.empty(total, np.uint64)
    s_len = np.empty(total, np.uint32)
    s_writable = np.empty(total, np.bool_)
    s_region = np.empty(total, np.int32)
    s_offset = np.empty(total, np.uint64)
    # Pass 2: the segments, with every check.
    got = _walk_into(heads, n, d_addr, d_len, d_flags, d_next, starts, sizes, datas, indirect, first, counts,
                     rlen, wlen, s_chain, s_desc, s_addr, s_len, s_writable, s_region, s_offset)
    if got < 0:
        return _declined(n)
    return (True, first, counts, rlen, wlen, s_chain[:got], s_desc[:got], s_addr[:got], s_len[:got],
            s_writable[:got], s_region[:got], s_offset[:got])  # fmt: skip


def _walk_into_py(
    heads: npt.NDArray[np.uint16], n: int, d_addr: npt.NDArray[np.uint64], d_len: npt.NDArray[np.uint32],
    d_flags: npt.NDArray[np.uint16], d_next: npt.NDArray[np.uint16], starts: npt.NDArray[np.uint64],
    sizes: npt.NDArray[np.uint64], datas: Any, indirect: bool, first: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64], rlen: npt.NDArray[np.int64], wlen: npt.NDArray[np.int64],
    s_chain: npt.NDArray[np.int64],
    s_desc: npt.NDArray[np.int64], s_addr: npt.NDArray[np.uint64], s_len: npt.NDArray[np.uint32],
    s_writable: npt.NDArray[np.bool_], s_region: npt.NDArray[np.int32], s_offset: npt.NDArray[np.uint64],
) -> int:  # pragma: no cover - compiled by numba
    """The walk of chains ``heads[:n]`` into arrays the caller owns (segment arrays of any capacity):
    the number of segments, or -1 (the outputs then hold garbage, nothing else is touched) at the
    first thing the walker would mark or treat specially, or when the segments would not fit. An
    INDIRECT descriptor ends its chain's walk in the descriptor table (the walker ignores its NEXT,
    as it ignores its WRITE: §2.7.5.3.2): its table's entries follow, each recorded with the INDIRECT
    descriptor's index, as the walker records them."""
    size = d_addr.shape[0]
    cap = s_chain.shape[0]
    nreg = starts.shape[0]
    s = 0
    for c in range(n):
        cur = np.int64(heads[c])
        first[c] = s
        seen_writable = False
        r = np.int64(0)
        w = np.int64(0)
        depth = 0
        while True:
            # Out of the table, a loop (deeper than the queue size, §2.7.5.2), or no room: decline.
            if cur >= size or depth == size or s == cap:
                return -1
            f = d_flags[cur]
            if indirect and (f & VIRTQ_DESC_F_INDIRECT) != 0:
                at = s
                s = _walk_table(c, cur, depth, size, d_addr[cur], np.int64(d_len[cur]), starts, sizes, datas,
                                seen_writable, s, s_chain, s_desc, s_addr, s_len, s_writable, s_region,
                                s_offset)  # fmt: skip
                if s < 0:
                    return -1
                depth += s - at
                for k in range(at, s):
                    if s_writable[k]:
                        w += np.int64(s_len[k])
                    else:
                        r += np.int64(s_len[k])
                break
            writable = (f & VIRTQ_DESC_F_WRITE) != 0
            if seen_writable and not writable:
                return -1  # §2.7.4.2: readable after writable
            seen_writable = writable
            length = np.uint64(d_len[cur])
            addr = d_addr[cur]
            if writable:
                w += np.int64(length)
            else:
                r += np.int64(length)
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
                    return -1
            s_chain[s] = c
            s_desc[s] = cur
            s_addr[s] = addr
            s_len[s] = d_len[cur]
            s_writable[s] = writable
            s_region[s] = region
            s_offset[s] = offset
            s += 1
            depth += 1
            if (f & VIRTQ_DESC_F_NEXT) == 0:
                break
            cur = np.int64(d_next[cur])
        if r + w > U32_MAX:
            return -1  # the used ring's len is u32
        counts[c] = depth
        rlen[c] = r
        wlen[c] = w
    return s


def _walk_table_py(
    c: int, d: Any, dep: int, size: int, taddr: Any, tlen: Any, starts: npt.NDArray[np.uint64],
    sizes: npt.NDArray[np.uint64], datas: Any, seen_writable: bool, s: int, s_chain: npt.NDArray[np.int64],
    s_desc: npt.NDArray[np.int64], s_addr: npt.NDArray[np.uint64], s_len: npt.NDArray[np.uint32],
    s_writable: npt.NDArray[np.bool_], s_region: npt.NDArray[np.int32], s_offset: npt.NDArray[np.uint64],
) -> int:  # pragma: no cover - compiled by numba
    """The entries of chain ``c``'s indirect table (descriptor ``d``, at depth ``dep`` of its chain)
    from segment ``s`` on: the next free segment after them, or -1 where the walker would mark
    something (a length not a positive multiple of 16, a table outside one memory region, a nested
    INDIRECT entry, an entry chaining outside the table, more entries than the table or the queue
    size allows, readable after writable, a segment outside memory) or the segments would not fit."""
    if tlen == 0 or tlen % DESC_SIZE != 0:
        return -1
    nreg = starts.shape[0]
    ulen = np.uint64(tlen)
    treg = -1
    toff = np.int64(0)
    for i in range(nreg):
        if taddr >= starts[i] and ulen <= sizes[i] and taddr - starts[i] <= sizes[i] - ulen:
            treg = i
            toff = np.int64(taddr - starts[i])
            break
    if treg < 0:
        return -1
    table = datas[treg]
    count = tlen // DESC_SIZE
    limit = min(count, size - dep)
    cap = s_chain.shape[0]
    j = np.int64(0)
    steps = 0
    while True:
        if s == cap:
            return -1
        o = toff + DESC_SIZE * j
        addr = np.uint64(0)
        for b in range(8):
            addr |= np.uint64(table[o + b]) << np.uint64(8 * b)
        length = np.uint32(np.uint32(table[o + 8]) | (np.uint32(table[o + 9]) << np.uint32(8))
                           | (np.uint32(table[o + 10]) << np.uint32(16))
                           | (np.uint32(table[o + 11]) << np.uint32(24)))  # fmt: skip
        f = np.uint16(table[o + 12]) | (np.uint16(table[o + 13]) << np.uint16(8))
        nxt = np.int64(table[o + 14]) | (np.int64(table[o + 15]) << 8)
        if (f & VIRTQ_DESC_F_INDIRECT) != 0:
            return -1  # §2.7.5.3.1: no INDIRECT inside an indirect table
        writable = (f & VIRTQ_DESC_F_WRITE) != 0
        if seen_writable and not writable:
            return -1
        seen_writable = writable
        ulen = np.uint64(length)
        # The translation and the stores of _walk_into_py's loop, repeated rather than shared: a
        # compiled helper doing them once per segment made every round 4x slower (backend-only 64 B,
        # the sink's TX and the generator's RX: 27 -> 7 M pps; the walk of 256 chains 7 -> 30 us).
        region = np.int32(-1)
        offset = np.uint64(0)
        if length != 0:
            for i in range(nreg):
                if addr >= starts[i] and ulen <= sizes[i] and addr - starts[i] <= sizes[i] - ulen:
                    region = np.int32(i)
                    offset = addr - starts[i]
                    break
            if region < 0:
                return -1
        s_chain[s] = c
        s_desc[s] = d
        s_addr[s] = addr
        s_len[s] = length
        s_writable[s] = writable
        s_region[s] = region
        s_offset[s] = offset
        s += 1
        steps += 1
        if (f & VIRTQ_DESC_F_NEXT) == 0:
            return s
        if nxt >= count or steps >= limit:
            return -1  # outside the table, or still going after as many entries as it may hold
        j = nxt


def _declined_py(n: int) -> _Arrays:  # pragma: no cover - compiled by numba
    e64 = np.empty(0, np.int64)
    return (
        False, e64, e64, e64, e64, e64, e64, np.empty(0, np.uint64), np.empty(0, np.uint32),
        np.empty(0, np.bool_), np.empty(0, np.int32), np.empty(0, np.uint64),
    )  # fmt: skip


# What the sources call by name when run as Python (the tests' reference check); ``kernels.enable``
# compiles them with the compiled helpers bound instead (``rings.kernels.link``).
_declined = _declined_py
_walk_into = _walk_into_py
_walk_table = _walk_table_py
