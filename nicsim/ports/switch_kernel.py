"""The switch's forward in one compiled call: a sender's TX round straight into one receiver's RX
buffers, with the forwarding table read and refreshed as the switch would.

Through the switch's general path every frame of a round becomes a Python view, its header is checked
and its addresses are learned and looked up in numpy calls, and the receiver's device writes the
views into its buffers: a few microseconds of Python per frame, which on a 64-byte stream is most of
nicsim's time. :func:`_forward_split_py` does the common case in one call per round: a guest's
frames to an address the table has already learned on one other guest's port.

It runs on the receiver's RX queue (``SplitQueue.kernel_round`` passes that queue's arguments first:
its chains are taken, each held by a pool descriptor, written and returned with ``used.idx``
published, frame by frame), and reads the sender's round from the arrays its compiled take walked
the chains into (the sender's device returns those chains itself, as for any port). Frame by frame,
in order, it takes a frame while it is one the switch would send to ``dest`` as it is:

- its virtio-net header passes the checks the switch makes (``vnet_hdr.reason_code``, and for a GSO
  frame ``tcp_layout``'s), and asks for a checksum or segmentation only of a receiver that does them
  itself (GUEST_CSUM, GUEST_TSO4/6): the header then travels with the frame;
- its source address is a station address learned on the sender's port (the entry is refreshed,
  as learning it again would), its destination a live entry on ``dest``'s port;
- it fits the receiver's MTU (a GSO frame: MAX_FRAME).

Such a frame goes into the receiver's next posted buffer, or the next several with MRG_RXBUF; once
no buffer is left it goes into the receiver's backlog, as ``RxPath.push_views`` would queue it, and
past the backlog it is dropped and counted. The first frame that is not such a frame ends the call,
untouched: the switch's general path takes it and the rest of the round (learning, flooding,
segmentation, a backlog to compact, drops and their reasons), so nothing is lost or counted twice.
The source is plain Python over arrays; :func:`enable` compiles it with numba, linked to ``rings``'
compiled take, return and free. The numpy path stays the reference the tests compare it with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.ports.fd_kernels import ALLOW_CSUM, ALLOW_TSO4, ALLOW_TSO6
from nicsim.ports.vnet_hdr import (
    ETH_P_8021Q,
    ETH_P_IPV4,
    ETH_P_IPV6,
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    HDR_FIELDS,
    IPPROTO_TCP,
    OK,
)  # fmt: skip
from nicsim.ports.vnet_hdr import reason_code as _reason_code
from nicsim.virtio.port import ETH_HLEN, HDR_LEN_V1, MAX_FRAME, NUM_BUFFERS_OFFSET
from rings import kernels
from rings.pool_kernels import _free_normal_py as _free_normal
from rings.round_kernels import U32_MAX
from rings.round_kernels import _return_chunk_py as _return_chunk
from rings.round_kernels import _take_split_py as _take_split

__all__ = ["HEAD_BYTES", "STOPS", "enable", "kernel"]

_Arr = npt.NDArray[Any]

# Why a call stopped before the sender's last frame (its fourth item); the general path takes it.
DONE, HEADER, OFFLOAD, GROUP, UNLEARNED, ELSEWHERE, TOO_BIG, NO_BUFFER = range(8)
STOPS = ("done", "header", "offload", "group", "unlearned", "elsewhere", "too_big", "no_buffer")
PREFIX = 72  # a frame's first bytes the checks read: both MACs and, for a GSO frame, its TCP/IP headers
OUT = 96  # where in ``head`` the receiver's header is built (the sender's header and prefix come first)
HEAD_BYTES = OUT + 16  # the ``head`` scratch array
# Where the header's num_buffers bytes landed in the receiver's first buffer (``spots``: region, offset).
_SPOT_LO, _SPOT_HI = 0, 2
_GROUP_BIT = 1 << 40  # the I/G bit of a MAC key (the first octet's least significant bit)

forward_split: Callable[..., tuple[int, int, int, int, int, int, int, int]] | None = None
"""The compiled :func:`_forward_split_py` once :func:`enable` ran with the ``rings`` kernels on."""


def _mac(head: _Arr, at: int) -> int:  # pragma: no cover - compiled by numba
    key = 0
    for b in range(6):
        key = (key << 8) | int(head[at + b])
    return key


def _find(keys: _Arr, key: int) -> int:  # pragma: no cover - compiled by numba
    """The position of ``key`` in the sorted ``keys``, or -1 (a binary search, as the table's)."""
    lo, hi = 0, keys.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if keys[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < keys.shape[0] and keys[lo] == key else -1


def _tcp_ok(head: _Arr, at: int, n: int, gso: int) -> bool:
    """:func:`nicsim.ports.vnet_hdr.tcp_layout` is not None, for the ``n``-byte frame whose first
    bytes (:data:`PREFIX`, or all of a shorter one) are ``head[at:]``: the checks the switch makes on
    a GSO frame before it passes it on."""
    l3 = ETH_HLEN
    if n < l3 + 20:
        return False
    ethertype = int(head[at + 12]) << 8 | int(head[at + 13])
    if ethertype == ETH_P_8021Q:
        l3 += 4
        ethertype = int(head[at + 16]) << 8 | int(head[at + 17])
    version = int(head[at + l3]) >> 4
    if gso == GSO_TCPV4:
        if ethertype != ETH_P_IPV4 or n < l3 + 20 or version != 4:
            return False
        ihl = (int(head[at + l3]) & 0xF) * 4
        if ihl < 20 or int(head[at + l3 + 9]) != IPPROTO_TCP:
            return False
        l4 = l3 + ihl
    elif gso == GSO_TCPV6:
        if ethertype != ETH_P_IPV6 or n < l3 + 40 or version != 6 or int(head[at + l3 + 6]) != IPPROTO_TCP:
            return False
        l4 = l3 + 40
    else:
        return False
    if n < l4 + 20 or l4 + 13 > PREFIX:
        return False  # (an IPv4 header with options past the prefix: the general path looks at it)
    thl = (int(head[at + l4 + 12]) >> 4) * 4
    return thl >= 20 and n >= l4 + thl


def _forward_split_py(
    avail_ring: _Arr, d_addr: _Arr, d_len: _Arr, d_flags: _Arr, d_next: _Arr, starts: _Arr, sizes: _Arr,
    datas: Any, start: int, k: int, indirect: bool, mergeable: bool, limit: int, hdr: int,
    p_used: int, p_capacity: int, p_state: _Arr, p_ever: _Arr, p_stack: _Arr, p_queue: _Arr, p_head: _Arr,
    p_addr: _Arr, p_length: _Arr, p_reserved: _Arr, queue: int,
    heads: _Arr, descs: _Arr, lens: _Arr, first: _Arr, counts: _Arr, rlen: _Arr, wlen: _Arr, s_chain: _Arr,
    s_desc: _Arr, s_addr: _Arr, s_len: _Arr, s_writable: _Arr, s_region: _Arr, s_offset: _Arr,
    used_ring: _Arr, used_start: int, zeros: _Arr, used_head: _Arr,
    a_datas: Any, a_first: _Arr, a_counts: _Arr, a_lens: _Arr, a_s_len: _Arr, a_s_writable: _Arr,
    a_s_region: _Arr, a_s_offset: _Arr, a_hdr: int, a_lo: int, a_hi: int, allow: int, carried: bool,
    takes: int, f_keys: _Arr, f_ports: _Arr, f_seen: _Arr, now: float, ageing: float, ingress: int,
    dest: int, head: _Arr, spots: _Arr, bl_data: _Arr, bl_offsets: _Arr, bl_lengths: _Arr, bl_state: _Arr,
) -> tuple[int, int, int, int, int, int, int, int]:  # pragma: no cover - numba compiles it; tests compare
    """Forward the sender's frames ``a_lo:a_hi``, in order, into the receiver's posted buffers (the
    receiver's queue first, as ``SplitQueue.kernel_round`` passes it: ``k`` chains at most, ``limit``
    its MTU, ``hdr`` its header length; ``mergeable``: a frame may take several chains, MRG_RXBUF),
    while each is a frame the switch would send to port ``dest`` as it is (see the module). The
    sender's round: chain ``j``'s readable segments from ``a_first[j]`` (``a_counts[j]`` of them)
    over its regions' bytes ``a_datas``, ``a_lens[j]`` frame bytes after an ``a_hdr``-byte header;
    ``allow`` the offloads it may ask (``fd_kernels.ALLOW_*``); ``carried``: headers travel (the
    switch's offloads); ``takes`` what the receiver takes as it is (its RX offloads, in the same bits:
    ``fd_kernels.allowed``). The table: sorted ``f_keys``,
    their ``f_ports`` and ``f_seen`` (refreshed for each forwarded frame's source). ``head`` and
    ``spots`` are scratch. The receiver's chains are taken several at a time, chain ``g`` of the call
    kept at index ``g`` of its area's arrays; a frame's chains are returned together, and those
    taken and not used are given back untouched at the end.

    Once no chain is left (``k`` of them taken; 0 when frames already wait), a frame for ``dest``
    goes into the receiver's backlog (``RxBacklog``: ``bl_data``, ``bl_offsets``, ``bl_lengths`` and
    ``bl_state``, its head, count and end, updated here), or is dropped when every slot is taken;
    an empty ``bl_offsets``: no backlog, the call stops there instead.

    Returns ``(chains used, frames forwarded, their bytes, why it stopped, where, GSO frames, frames
    dropped, frames queued)``, in that order in the round (forwarded, queued, dropped): ``where``
    the live port the first frame not taken is for when it stopped for being for another port
    (:data:`ELSEWHERE`), else -1; GSO frames counted wherever they went. ``chains used`` is -2 when
    a free was refused (a bug: the caller raises)."""
    chains = 0
    frames = 0
    nbytes = 0
    gsos = 0
    dropped = 0
    queued = 0
    # The receiver's chains are taken several at a time (one take per chain cost 0.5 us a chain,
    # against 0.08 in a take of many) and used in order: chain g (of the call) sits at heads[g],
    # descs[g] and lens[g], its segments at first[g - stock] of the take that walked it. Those taken
    # and not used when the call ends are given back untouched (their avail slots not consumed).
    taken = 0
    stock = 0
    single = False  # a take of several was declined: one at a time from then on, as before
    per_chain = 1024  # the writable bytes a chain is expected to hold (the last one's, once seen)
    why = DONE
    where = -1
    for j in range(a_lo, a_hi):
        if chains >= k and bl_offsets.shape[0] == 0:
            why = NO_BUFFER
            break
        lo = a_first[j]
        hi = lo + a_counts[j]
        n = int(a_lens[j])
        if n < ETH_HLEN:
            why = HEADER
            break
        # The header and the frame's first bytes (the take made the chain's readable bytes a_hdr + n).
        _gather(a_datas, a_s_len, a_s_writable, a_s_region, a_s_offset, lo, hi, 0, a_hdr + min(n, PREFIX),
                head, 0)  # fmt: skip
        flags = 0
        gso = GSO_NONE
        if carried:
            flags = int(head[0]) & F_NEEDS_CSUM  # DATA_VALID from a guest is dropped, as the switch does
            gso = int(head[1])
            code = _reason_code(int(head[0]), gso, int(head[2]) | int(head[3]) << 8,
                                int(head[4]) | int(head[5]) << 8, int(head[6]) | int(head[7]) << 8,
                                int(head[8]) | int(head[9]) << 8, n, allow & ALLOW_CSUM != 0,
                                allow & ALLOW_TSO4 != 0, allow & ALLOW_TSO6 != 0)  # fmt: skip
            if code != OK:
                why = HEADER
                break
            if flags != 0 and takes & ALLOW_CSUM == 0:  # the switch completes the checksum
                why = OFFLOAD
                break
            if gso != GSO_NONE:
                if not ((gso == GSO_TCPV4 and takes & ALLOW_TSO4 != 0)
                        or (gso == GSO_TCPV6 and takes & ALLOW_TSO6 != 0)):  # fmt: skip
                    why = OFFLOAD  # it segments them
                    break
                if not _tcp_ok(head, a_hdr, n, gso):
                    why = HEADER
                    break
        dst = _mac(head, a_hdr)
        src = _mac(head, a_hdr + 6)
        if dst & _GROUP_BIT or src & _GROUP_BIT:
            why = GROUP
            break
        i = _find(f_keys, src)
        if i < 0 or f_ports[i] != ingress:
            why = UNLEARNED
            break
        d = _find(f_keys, dst)
        if d < 0 or not now - f_seen[d] < ageing:
            why = ELSEWHERE  # unknown: flooded
            break
        if f_ports[d] != dest:
            why = ELSEWHERE
            where = int(f_ports[d])
            break
        if n > (limit if gso == GSO_NONE else MAX_FRAME):
            why = TOO_BIG
            break
        # The receiver's header at head[OUT:]: the sender's fields when they travel to a receiver
        # that reads them (GUEST_CSUM; the flags but NEEDS_CSUM dropped), else zeros (§5.1.6.4.1).
        for b in range(hdr):
            head[OUT + b] = 0
        if carried and takes & ALLOW_CSUM != 0:
            head[OUT] = flags
            for b in range(1, HDR_FIELDS):
                head[OUT + b] = head[b]
        total = hdr + n
        smallest = 1 if mergeable else total  # the writable bytes a chain must have
        at = 0  # bytes of header and frame written
        c = 0  # chains used for this frame: chains .. chains + c - 1
        spots[_SPOT_LO] = -1
        while at < total:
            g = chains + c
            m = 0
            if g >= taken:
                # Enough for the frames left (and this one's bytes left), at most what is posted.
                want = min(k - taken, 1 if single else (a_hi - j) + (total - at) // per_chain)
                m = -1
                while want > 0:
                    m, _ = _take_split(avail_ring, d_addr, d_len, d_flags, d_next, starts, sizes, datas,
                                       start + taken, want, indirect, False, 1, U32_MAX, 0,
                                       p_used + taken - chains, p_capacity, p_state, p_ever, p_stack,
                                       p_queue, p_head, p_addr, p_length, p_reserved, queue, heads[taken:],
                                       descs[taken:], lens[taken:], first, counts, rlen, wlen, s_chain,
                                       s_desc, s_addr, s_len, s_writable, s_region, s_offset)  # fmt: skip
                    if m >= 0 or want == 1:
                        break
                    single = True  # a chain in it the walk declines, or too few descriptors: one by one
                    want = 1
                if m >= 0:
                    stock = taken
                    taken += want
            if m < 0 or wlen[g - stock] < smallest:
                # No (big enough) buffer for the rest: the chains used for it are given back untouched
                # with the rest of those taken, when the call ends.
                if m < 0 and c == 0 and taken >= k and chains >= k:
                    break  # no buffer is left: the frame waits in the backlog, or is dropped
                why = NO_BUFFER
                break
            put = min(int(wlen[g - stock]), total - at)
            per_chain = max(int(wlen[g - stock]), 256)
            _copy_range(datas, s_len, s_writable, s_region, s_offset, first[g - stock], head, hdr,
                        a_datas, a_s_len, a_s_writable, a_s_region, a_s_offset, lo, hi, a_hdr, at, put,
                        spots)  # fmt: skip
            lens[g] = put
            at += put
            c += 1
        if why != DONE:
            break
        if at < total:
            # As ``RxPath.push_views`` queues a frame for which no buffer is left: the header as the
            # switch passes it (num_buffers 0) and the frame, in the backlog's next slot; with every
            # slot taken, dropped. A backlog that would need compacting first is the general path's.
            rec = n + (hdr if carried else 0)
            if bl_state[1] >= bl_offsets.shape[0] or rec > bl_data.shape[0]:
                dropped += 1
            elif bl_state[0] + bl_state[1] >= bl_offsets.shape[0] or bl_state[2] + rec > bl_data.shape[0]:
                why = NO_BUFFER
                break
            else:
                _queue_frame(bl_data, int(bl_state[2]), head, hdr if carried else 0, flags, a_datas, a_s_len,
                             a_s_writable, a_s_region, a_s_offset, lo, hi, a_hdr, n)  # fmt: skip
                slot = bl_state[0] + bl_state[1]
                bl_offsets[slot] = bl_state[2]
                bl_lengths[slot] = rec
                bl_state[1] += 1
                bl_state[2] += rec
                queued += 1
            f_seen[i] = now
            if gso != GSO_NONE:
                gsos += 1
            continue
        if hdr >= HDR_LEN_V1 and spots[_SPOT_LO] >= 0:  # num_buffers: the chains the frame took
            datas[spots[_SPOT_LO]][spots[_SPOT_LO + 1]] = c & 0xFF
            datas[spots[_SPOT_HI]][spots[_SPOT_HI + 1]] = c >> 8
        if _return_chunk(used_ring, used_head, used_start, chains, chains + c, heads, lens, descs,
                         p_used + taken - chains, p_capacity, p_state, p_stack) < 0:  # fmt: skip
            return -2, 0, 0, 0, -1, 0, 0, 0
        f_seen[i] = now  # the source seen again, as learning it does
        chains += c
        frames += 1
        nbytes += n
        if gso != GSO_NONE:
            gsos += 1
    if taken > chains and _free_normal(descs[chains:taken], p_state, p_stack, p_used + taken - chains,
                                       p_capacity) < 0:  # fmt: skip
        return -2, 0, 0, 0, -1, 0, 0, 0
    return chains, frames, nbytes, why, where, gsos, dropped, queued


def _queue_frame(
    data: _Arr, at: int, head: _Arr, hdr: int, flags: int, a_datas: Any, a_s_len: _Arr, a_s_writable: _Arr,
    a_s_region: _Arr, a_s_offset: _Arr, lo: int, hi: int, a_hdr: int, n: int,
) -> None:  # pragma: no cover - compiled by numba
    """Write a backlog entry at ``data[at:]``: a ``hdr``-byte header (0: none), the sender's fields
    with ``flags`` for its first byte and num_buffers 0, then the frame's ``n`` bytes (the sender's
    readable segments ``lo:hi`` after its ``a_hdr``-byte header)."""
    if hdr:
        data[at] = flags
        for b in range(1, hdr):
            data[at + b] = head[b] if b < HDR_FIELDS else 0
    _gather(a_datas, a_s_len, a_s_writable, a_s_region, a_s_offset, lo, hi, a_hdr, n, data, at + hdr)


def _gather(
    a_datas: Any, a_s_len: _Arr, a_s_writable: _Arr, a_s_region: _Arr, a_s_offset: _Arr, lo: int, hi: int,
    skip: int, n: int, out: _Arr, at: int,
) -> None:  # pragma: no cover - compiled by numba
    """Copy ``n`` bytes of the sender's readable segments ``lo:hi``, from byte ``skip`` on, into
    ``out[at:]`` (an element loop over two views per segment)."""
    for s in range(lo, hi):
        if n <= 0 or a_s_writable[s]:
            break
        seg = int(a_s_len[s])
        if skip >= seg:
            skip -= seg
            continue
        src = a_datas[a_s_region[s]]
        start = int(a_s_offset[s]) + skip
        chunk = min(seg - skip, n)
        # Views, then an element loop, which numba compiles to a memcpy; a slice assignment copies
        # byte by byte (measured: 22.7 -> 1.5 us for 64 KB, 500 -> 19 ns for 1514 bytes).
        # (The walks checked both segments against their regions; the views' own lengths bound the
        # loop all the same.)
        dst, part = out[at : at + chunk], src[start : start + chunk]
        for b in range(min(dst.shape[0], part.shape[0])):
            dst[b] = part[b]
        skip = 0
        at += chunk
        n -= chunk


def _copy_range(
    datas: Any, s_len: _Arr, s_writable: _Arr, s_region: _Arr, s_offset: _Arr, seg: int, head: _Arr,
    hdr: int, a_datas: Any, a_s_len: _Arr, a_s_writable: _Arr, a_s_region: _Arr, a_s_offset: _Arr, lo: int,
    hi: int, a_hdr: int, at: int, put: int, spots: _Arr,
) -> None:  # pragma: no cover - compiled by numba
    """Write bytes ``at:at + put`` of what the receiver gets (the header ``head[OUT:OUT + hdr]``, then
    the frame: the sender's readable segments ``lo:hi`` after its ``a_hdr``-byte header) into a
    receiver's chain the take walked, whose segments start at ``seg`` (the writable ones take ``put``
    bytes at least). Where header bytes ``NUM_BUFFERS_OFFSET`` and the next land is kept in ``spots``."""
    d = seg  # the receiver's segment and the offset in it
    dat = 0
    pos = at
    end = at + put
    while pos < end:
        while not s_writable[d] or dat >= s_len[d]:
            d += 1
            dat = 0
        region = s_region[d]
        off = int(s_offset[d]) + dat
        if pos < hdr:
            datas[region][off] = head[OUT + pos]
            if pos == NUM_BUFFERS_OFFSET:
                spots[_SPOT_LO] = region
                spots[_SPOT_LO + 1] = off
            elif pos == NUM_BUFFERS_OFFSET + 1:
                spots[_SPOT_HI] = region
                spots[_SPOT_HI + 1] = off
            dat += 1
            pos += 1
            continue
        chunk = min(end - pos, int(s_len[d]) - dat)
        _gather(a_datas, a_s_len, a_s_writable, a_s_region, a_s_offset, lo, hi, a_hdr + pos - hdr, chunk,
                datas[region], off)  # fmt: skip
        dat += chunk
        pos += chunk


def kernel() -> Callable[..., tuple[int, int, int, int, int, int, int, int]] | None:
    """The compiled forward, while ``rings``' kernels are on (``kernels.disable`` turns it off too)."""
    return forward_split if kernels.enabled() else None


def enable() -> bool:
    """``rings.kernels.enable()``, then :func:`_forward_split_py` compiled (or loaded from numba's
    cache) and linked to them. Returns what ``rings.kernels.enable`` does. Idempotent."""
    if not kernels.enable():
        return False
    _compile_forward()
    return True


def _compile_forward() -> None:
    global forward_split
    if forward_split is not None:
        return
    take, give_back, free = kernels.take_split, kernels.return_chunk, kernels.free_normal
    if take is None or give_back is None or free is None:
        return
    try:
        import numba

        jit = numba.njit(cache=True, boundscheck=False)
        gather = jit(_gather)
        copy_range = jit(kernels.link(_copy_range, _gather=gather))
        queue_frame = jit(kernels.link(_queue_frame, _gather=gather))
        forward = jit(kernels.link(_forward_split_py, _take_split=take, _return_chunk=give_back,
                                   _free_normal=free, _reason_code=jit(_reason_code), _mac=jit(_mac),
                                   _find=jit(_find), _tcp_ok=jit(_tcp_ok), _gather=gather,
                                   _copy_range=copy_range, _queue_frame=queue_frame))  # fmt: skip
        _compile_now(forward)
    except Exception:  # numba's own error classes: the switch's general path forwards, as without it
        return
    forward_split = forward


def _compile_now(forward: Callable[..., Any]) -> None:
    """Compile for the argument types a switch passes (one and two guest memory regions each side),
    now rather than in the first round; a round of 0 frames changes nothing."""
    from rings.layout import DESC_DTYPE
    from rings.pool_layout import descriptor_dtype
    from rings.round_kernels import RoundArea

    table = np.zeros(2, DESC_DTYPE)
    ring = (table["addr"], table["len"], table["flags"], table["next"])
    bounds = (np.zeros(1, np.uint64), np.ones(1, np.uint64))
    record = np.zeros(2, descriptor_dtype(0))
    pool = (record["state"], record["ever"], np.arange(2, dtype=np.intp), record["queue"], record["head"],
            record["addr"], record["length"], record["reserved"])  # fmt: skip
    area, sender = RoundArea(2), RoundArea(2)
    avail = np.zeros(5, np.uint16)[2:4]
    used = np.zeros(4, np.uint32).reshape(2, 2)
    a_round = (sender.first, sender.counts, sender.lens, sender.s_len, sender.s_writable, sender.s_region,
               sender.s_offset)  # fmt: skip
    table_args = (np.zeros(1, np.uint64), np.zeros(1, np.int32), np.zeros(1, np.float64), 0.0, 300.0, 0, 1)
    for regions in (1, 2):
        datas = tuple(np.zeros(8, np.uint8) for _ in range(regions))
        for a_regions in (1, 2):
            a_datas = tuple(np.zeros(8, np.uint8) for _ in range(a_regions))
            forward(avail, *ring, *bounds, datas, 0, 0, True, 0, 0, 0, 0, 2, *pool, 0, *area.outputs, used, 0,
                    area.zeros, np.zeros(2, np.uint16), a_datas, *a_round, 12, 0, 0, 0, True, 0,
                    *table_args, np.zeros(HEAD_BYTES, np.uint8), np.zeros(4, np.int64), np.zeros(8, np.uint8),
                    np.zeros(2, np.int64), np.zeros(2, np.int64), np.zeros(3, np.int64))  # fmt: skip
