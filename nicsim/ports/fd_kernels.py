"""The tap's rounds in one compiled call each: a TX round written to its file descriptor, an RX round
read from it.

A TAP takes each frame, virtio-net header first, in one ``writev``, and gives one per ``readv``.
Through the device's general path a request's round of one frame costs about a hundred Python calls
between the kick and the interrupt (the chains taken, a batch object, the port's header check, the
``writev``, the used entries, the pool descriptors), and its reply's round as many again (the read,
the backlog, the placement). Here each is one call:

- :func:`_send_split_py`: :func:`rings.round_kernels._take_split_py` pops, walks, checks and tracks
  ``k`` chains (each held by a pool descriptor, as everywhere); each frame's header is checked as
  :func:`nicsim.ports.vnet_hdr.check_one` checks it (:func:`~nicsim.ports.vnet_hdr.reason_code`,
  compiled) and a good frame's readable segments are copied into a staging buffer; then
  :func:`rings.round_kernels._return_chunk_py` frees the descriptors, writes the used entries and
  publishes ``used.idx``; then, if the caller lets it, the ring's interrupt is decided and its call
  eventfd written (:func:`_irq_py`); only then does each good frame go to ``fd`` in one ``writev``,
  tried ``tries`` times while the kernel says EAGAIN or EINTR. A TAP's kernel answers a request
  inside that ``writev``, and what the guest waits for ends, mostly, with the request's interrupt:
  written before the writes, it took 20 us off a ping flood's p50 (0.214 -> 0.194 ms, 59 of 60
  blocks of pings faster, measured within one run). What happened to each frame comes back in
  ``codes`` (and ``errnos``), for the port's counters and drop reasons.
- :func:`_recv_split_py`: one ``readv`` per frame into the port's buffer, each frame placed in the
  next posted chain that takes it whole (taken, written, returned and published the same way); a
  frame no single buffer takes (mergeable buffers for a GSO frame) ends the round and goes the general
  way, through the port.

Nothing is lost unseen. The sources are plain Python over arrays, calling libc through ctypes;
:func:`enable` compiles them with numba, linked to ``rings``' compiled kernels and to libc's symbols.
They live here, not in ``rings``, because they do I/O.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.ports.vnet_hdr import HDR_FIELDS, OK, Offloads
from nicsim.ports.vnet_hdr import reason_code as _reason_code
from nicsim.virtio.port import HDR_LEN_V1, NUM_BUFFERS_OFFSET
from nicsim.virtio.queues import IRQ_FAILED, IRQ_LATER, IRQ_NONE, IRQ_SENT, IRQ_SUPPRESSED, NOT_RUN
from rings import kernels
from rings.barrier import full_fence as _full_fence
from rings.pool_kernels import _free_normal_py as _free_normal
from rings.round_kernels import U32_MAX
from rings.round_kernels import _return_chunk_py as _return_chunk
from rings.round_kernels import _take_split_py as _take_split
from rings.round_kernels import _wants_interrupt_py as _wants_interrupt

__all__ = [
    "RECV_BUDGET", "RECV_DRAINED", "RECV_ERROR", "RECV_PENDING", "WOULD_BLOCK", "WRITE_ERROR", "allowed",
    "enable", "kernel", "recv_kernel",
]  # fmt: skip

_Arr = npt.NDArray[Any]

# What a driver may ask of the other side (``allowed``): bits of the ``allow`` argument.
ALLOW_CSUM, ALLOW_TSO4, ALLOW_TSO6 = 1, 2, 4
# Codes past vnet_hdr's REASONS: the header was good, the write was not.
WOULD_BLOCK = 100  # EAGAIN (or EINTR) every try: the kernel's queue is full
WRITE_ERROR = 101  # another errno, in ``errnos``
_EAGAIN, _EINTR = errno.EAGAIN, errno.EINTR

# libc's writev and errno for the Python source, through ctypes (the iovec array's address as a
# plain integer, as ``ndarray.ctypes.data`` is one). The compiled kernel calls the same symbols as
# numba external functions instead (:func:`enable`): a ctypes pointer would keep numba from caching it.
_libc = ctypes.CDLL(None)
_writev = _libc.writev
_writev.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
_writev.restype = ctypes.c_ssize_t
_readv = _libc.readv
_readv.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
_readv.restype = ctypes.c_ssize_t
_write = _libc.write
_write.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t]
_write.restype = ctypes.c_ssize_t
_errno_location = _libc.__errno_location
_errno_location.argtypes = []
_errno_location.restype = ctypes.POINTER(ctypes.c_int)

send_split: Callable[..., tuple[int, int, int, int, int]] | None = None
"""The compiled :func:`_send_split_py` once :func:`enable` ran with the ``rings`` kernels on, else None."""
recv_split: Callable[..., tuple[int, int, int, int, int]] | None = None
"""The compiled :func:`_recv_split_py`, likewise."""
irq_split: Callable[..., int] | None = None
"""The compiled :func:`_irq_py`, likewise (the request lane, :mod:`nicsim.ports.lane_kernel`, calls it)."""


def allowed(offloads: Offloads) -> int:
    """``offloads`` (what the driver may ask on TX) as the kernel's ``allow`` bits."""
    return (ALLOW_CSUM if offloads.csum else 0) | (ALLOW_TSO4 if offloads.tso4 else 0) | (
        ALLOW_TSO6 if offloads.tso6 else 0)  # fmt: skip


def _header_code_py(
    datas: Any, s_region: _Arr, s_offset: _Arr, s_len: _Arr, lo: int, hi: int, length: int, allow: int,
    hbuf: _Arr,
) -> int:  # pragma: no cover - compiled by numba; the tests compare it with check_one through the port
    """:func:`nicsim.ports.vnet_hdr.check_one` for the chain whose readable segments are ``lo:hi``
    (the header's first :data:`HDR_FIELDS` bytes gathered into ``hbuf`` across them), ``length`` the
    frame's bytes after the header."""
    got = 0
    for s in range(lo, hi):
        if got >= HDR_FIELDS:
            break
        data = datas[s_region[s]]
        off = int(s_offset[s])
        n = min(int(s_len[s]), HDR_FIELDS - got)
        for b in range(n):
            hbuf[got + b] = data[off + b]
        got += n
    return _reason_code(int(hbuf[0]), int(hbuf[1]), int(hbuf[2]) | int(hbuf[3]) << 8,
                        int(hbuf[4]) | int(hbuf[5]) << 8, int(hbuf[6]) | int(hbuf[7]) << 8,
                        int(hbuf[8]) | int(hbuf[9]) << 8, length, allow & ALLOW_CSUM != 0,
                        allow & ALLOW_TSO4 != 0, allow & ALLOW_TSO6 != 0)  # fmt: skip


def _send_split_py(
    avail_ring: _Arr, d_addr: _Arr, d_len: _Arr, d_flags: _Arr, d_next: _Arr, starts: _Arr, sizes: _Arr,
    datas: Any, start: int, k: int, indirect: bool, min_len: int, max_len: int, hdr: int,
    p_used: int, p_capacity: int, p_state: _Arr, p_ever: _Arr, p_stack: _Arr, p_queue: _Arr, p_head: _Arr,
    p_addr: _Arr, p_length: _Arr, p_reserved: _Arr, queue: int,
    heads: _Arr, descs: _Arr, lens: _Arr, first: _Arr, counts: _Arr, rlen: _Arr, wlen: _Arr, s_chain: _Arr,
    s_desc: _Arr, s_addr: _Arr, s_len: _Arr, s_writable: _Arr, s_region: _Arr, s_offset: _Arr,
    used_ring: _Arr, used_start: int, zeros: _Arr, used_head: _Arr,
    fd: int, allow: int, tries: int, iov: _Arr, hbuf: _Arr, codes: _Arr, errnos: _Arr, stage: _Arr,
    spans: _Arr, irq: Any,
) -> tuple[int, int, int, int, int]:  # pragma: no cover - compiled by numba
    """Take ``k`` TX chains from avail slot ``start`` (as ``_take_split_py``, readable length in
    ``[min_len, max_len]``), check each frame's header against ``allow`` and copy each good one,
    header included, into ``stage`` (``spans[j]``: its offset and length there); then give the round
    back (descriptors freed, used entries of length 0 from used slot ``used_start``, ``used.idx``
    published) and, if ``irq`` asks (its first item true), decide the ring's interrupt and write its
    call eventfd (:func:`_irq_py`); only then write the frames to ``fd``, one ``writev`` each, tried
    ``tries`` times while the kernel says EAGAIN or EINTR. A TAP's kernel answers a request inside
    that ``writev`` (a ping: 109 us on a core that slept, timed); the guest, already told, takes the
    request's completion meanwhile. ``codes[j]``: ``OK``, a vnet_hdr reason code, or
    :data:`WOULD_BLOCK` / :data:`WRITE_ERROR` (``errnos[j]`` the errno). Returns ``(chains, frame
    bytes of them all, frames written, their bytes, interrupt decision)`` (``NOT_RUN`` when ``irq``
    did not ask); ``(-1, ...)`` with nothing changed when the take declines, ``(-2, ...)`` when the
    free declined after it (a bug: the caller raises)."""
    m, total = _take_split(avail_ring, d_addr, d_len, d_flags, d_next, starts, sizes, datas, start, k,
                           indirect, True, min_len, max_len, hdr, p_used, p_capacity, p_state, p_ever,
                           p_stack, p_queue, p_head, p_addr, p_length, p_reserved, queue, heads, descs, lens,
                           first, counts, rlen, wlen, s_chain, s_desc, s_addr, s_len, s_writable, s_region,
                           s_offset)  # fmt: skip
    if m < 0:
        return -1, 0, 0, 0, NOT_RUN
    at = 0
    for j in range(k):
        lo = first[j]
        hi = lo + counts[j]
        errnos[j] = 0
        code = _header_code(datas, s_region, s_offset, s_len, lo, hi, lens[j], allow, hbuf)
        spans[j, 0] = at
        if code == OK:
            for s in range(lo, hi):
                if s_writable[s]:
                    break  # §2.7.4.2: writable descriptors follow the readable ones; they carry no frame
                size = np.intp(s_len[s])
                off = np.intp(s_offset[s])
                # Views, then an element loop over them: numba compiles it to a memcpy.
                src, dst = datas[s_region[s]][off : off + size], stage[at : at + size]
                for b in range(min(src.shape[0], dst.shape[0])):
                    dst[b] = src[b]
                at += int(size)
        spans[j, 1] = at - spans[j, 0]
        codes[j] = code
    left = _return_chunk(used_ring, used_head, used_start, 0, k, heads, zeros, descs, p_used + k, p_capacity,
                         p_state, p_stack)  # fmt: skip
    if left < 0:
        return -2, 0, 0, 0, NOT_RUN
    decided = NOT_RUN
    ask, avail, size, signalled, event_idx, on_idle, coalesce, call_fd, one = irq
    if ask:
        idle = ((int(avail[1]) - start - k) & 0xFFFF) == 0
        decided = _irq(avail, size, (used_start + k) & 0xFFFF, signalled, event_idx, on_idle, coalesce, idle,
                       call_fd, one)  # fmt: skip
    frames = 0
    sent = 0
    for j in range(k):
        if codes[j] != OK:
            continue
        iov[0, 0] = stage.ctypes.data + spans[j, 0]
        iov[0, 1] = spans[j, 1]
        code = WOULD_BLOCK
        for _ in range(tries):
            if _writev(fd, iov.ctypes.data, 1) >= 0:
                code = OK
                break
            err = _errno_location()[0]
            if err != _EAGAIN and err != _EINTR:
                code = WRITE_ERROR
                errnos[j] = err
                break
        if code == OK:
            frames += 1
            sent += lens[j]
        codes[j] = code
    return k, total, frames, sent, decided


def _irq_py(
    avail: _Arr, size: int, used_idx: int, signalled: int, event_idx: bool, on_idle: bool, coalesce: int,
    idle: bool, fd: int, one: _Arr,
) -> int:  # pragma: no cover - compiled by numba
    """``QueueSet.decide_interrupt`` for a ring whose ``used.idx`` is ``used_idx`` (published) and
    whose last decision was at ``signalled`` (``avail``: the whole avail ring, u16[size + 3]): the
    driver's wish (used_event or the flags, loaded after a full fence), then ``should_interrupt``'s
    policy; ``fd`` written (``one``: an 8-byte 1; none when ``fd`` < 0) when the answer is yes.
    Returns an ``IRQ_*`` code for ``QueueSet.decided_interrupt``."""
    unsignalled = (used_idx - signalled) & 0xFFFF
    if unsignalled == 0:
        return IRQ_NONE
    _full_fence()  # used.idx stored before used_event (or the flags) is loaded (§2.7.10)
    if not _wants_interrupt(avail, size, used_idx, signalled, event_idx):
        return IRQ_SUPPRESSED
    if not event_idx and not (on_idle if idle else unsignalled >= coalesce):
        return IRQ_LATER
    if fd >= 0 and _write(fd, one.ctypes.data, 8) < 0 and _errno_location()[0] != _EAGAIN:
        return IRQ_FAILED
    return IRQ_SENT


# What ended a receive round (its fourth item).
RECV_BUDGET = 0  # it placed ``k`` frames, or read ``burst`` bytes: the fd may hold more
RECV_DRAINED = 1  # the fd said EAGAIN: nothing more to read
RECV_ERROR = 2  # the read failed with another errno (the fifth item)
RECV_PENDING = 3  # a frame was read that no single posted buffer takes whole (the third item: its length)
# Per-round counts of frames the read dropped (``drops``).
DROP_RUNT, DROP_TOO_BIG = 0, 1


def _recv_split_py(
    avail_ring: _Arr, d_addr: _Arr, d_len: _Arr, d_flags: _Arr, d_next: _Arr, starts: _Arr, sizes: _Arr,
    datas: Any, start: int, k: int, indirect: bool, shortest: int, limit: int, hdr: int,
    p_used: int, p_capacity: int, p_state: _Arr, p_ever: _Arr, p_stack: _Arr, p_queue: _Arr, p_head: _Arr,
    p_addr: _Arr, p_length: _Arr, p_reserved: _Arr, queue: int,
    heads: _Arr, descs: _Arr, lens: _Arr, first: _Arr, counts: _Arr, rlen: _Arr, wlen: _Arr, s_chain: _Arr,
    s_desc: _Arr, s_addr: _Arr, s_len: _Arr, s_writable: _Arr, s_region: _Arr, s_offset: _Arr,
    used_ring: _Arr, used_start: int, zeros: _Arr, used_head: _Arr,
    fd: int, buf: _Arr, iov: _Arr, burst: int, keep_flags: bool, drops: _Arr,
) -> tuple[int, int, int, int, int]:  # pragma: no cover - compiled by numba
    """Read up to ``k`` frames from ``fd`` (each a virtio-net header of ``hdr`` bytes and a frame, as
    a TAP with that header size gives them), one ``readv`` into ``buf`` each, and place each into the
    next posted chain of avail slot ``start`` on: taken and tracked (``_take_split_py``, several at a
    time; those not used are given back untouched at the end; at least the frame's bytes writable),
    the header's flags and GSO fields zeroed unless ``keep_flags``
    (GUEST_CSUM: the kernel's checksum flags are the driver's to read), ``num_buffers`` 1, the bytes
    copied into the chain's buffers in order, then used with the frame's length and ``used.idx``
    published (``_return_chunk_py``), frame by frame. A read shorter than ``shortest`` or filling
    ``buf`` is dropped and counted in ``drops``; a frame over ``limit`` bytes, or one no posted chain
    takes whole (mergeable buffers, a small buffer, no pool descriptor), ends the round with its
    length, for the caller to queue as the general path does. Stops after ``burst`` bytes.
    Returns ``(frames placed, their bytes, pending length, how it ended, errno)``."""
    placed = 0
    nbytes = 0
    # The posted chains are taken several at a time, as frames come: one, then twice as many each
    # time (a lone reply takes one; a take per chain cost 0.5 us a chain, against 0.08 in a take of
    # many). Chain g sits at heads[g], descs[g] and lens[g], its segments at first[g - stock] of the
    # take that walked it; those taken and not used when the round ends go back untouched.
    taken = 0
    stock = 0
    grab = 1
    single = False  # a take of several was declined: one at a time from then on, as before
    why = RECV_BUDGET
    pending = 0
    err_no = 0
    iov[0, 0] = buf.ctypes.data
    iov[0, 1] = buf.shape[0]
    while placed < k and nbytes < burst:
        n = _readv(fd, iov.ctypes.data, 1)
        if n < 0:
            err = _errno_location()[0]
            if err == _EINTR:
                continue
            if err == _EAGAIN:
                why = RECV_DRAINED
            else:
                why = RECV_ERROR
                err_no = err
            break
        if n < shortest or n >= buf.shape[0]:
            drops[DROP_RUNT if n < shortest else DROP_TOO_BIG] += 1
            continue
        if n > limit:
            why = RECV_PENDING
            pending = n
            break
        if placed >= taken:
            want = min(k - taken, 1 if single else grab)
            m = -1
            while want > 0:
                m, _ = _take_split(avail_ring, d_addr, d_len, d_flags, d_next, starts, sizes, datas,
                                   start + taken, want, indirect, False, 1, U32_MAX, 0,
                                   p_used + taken - placed, p_capacity, p_state, p_ever, p_stack, p_queue,
                                   p_head, p_addr, p_length, p_reserved, queue, heads[taken:], descs[taken:],
                                   lens[taken:], first, counts, rlen, wlen, s_chain, s_desc, s_addr, s_len,
                                   s_writable, s_region, s_offset)  # fmt: skip
                if m >= 0 or want == 1:
                    break
                single = True  # a chain in it the walk declines, or too few descriptors: one by one
                want = 1
            if m < 0:
                why = RECV_PENDING
                pending = n
                break
            stock = taken
            taken += want
            grab *= 2
        c = placed - stock
        if wlen[c] < n:
            why = RECV_PENDING  # the next posted buffer does not take it whole
            pending = n
            break
        if not keep_flags:
            for b in range(min(hdr, NUM_BUFFERS_OFFSET)):
                buf[b] = 0  # flags 0, GSO_NONE (§5.1.6.4.1: without GUEST_CSUM the flags MUST be 0)
        if hdr >= HDR_LEN_V1:
            buf[NUM_BUFFERS_OFFSET] = 1
            buf[NUM_BUFFERS_OFFSET + 1] = 0
        at = 0
        for s in range(first[c], first[c] + counts[c]):
            if not s_writable[s] or at >= n:
                continue
            take = min(np.intp(s_len[s]), n - at)
            off = np.intp(s_offset[s])
            # Views, then an element loop over them, which numba compiles to a memcpy; indexing the
            # whole arrays at an offset compiles to a byte loop (1514 bytes: 1979 -> 19 ns).
            dst, part = datas[s_region[s]][off : off + take], buf[at : at + take]
            for b in range(min(dst.shape[0], part.shape[0])):
                dst[b] = part[b]
            at += take
        lens[placed] = n
        if _return_chunk(used_ring, used_head, used_start, placed, placed + 1, heads, lens, descs,
                         p_used + taken - placed, p_capacity, p_state, p_stack) < 0:  # fmt: skip
            return -2, 0, 0, 0, 0
        placed += 1
        nbytes += n
    if taken > placed and _free_normal(descs[placed:taken], p_state, p_stack, p_used + taken - placed,
                                       p_capacity) < 0:  # fmt: skip
        return -2, 0, 0, 0, 0
    return placed, nbytes, pending, why, err_no


_header_code = _header_code_py
_irq = _irq_py


def kernel() -> Callable[..., tuple[int, int, int, int, int]] | None:
    """The compiled send round, while ``rings``' kernels are on (``kernels.disable`` turns it off too)."""
    return send_split if kernels.enabled() else None


def recv_kernel() -> Callable[..., tuple[int, int, int, int, int]] | None:
    """The compiled receive round, while ``rings``' kernels are on."""
    return recv_split if kernels.enabled() else None


def enable() -> bool:
    """``rings.kernels.enable()``, then :func:`_send_split_py` and :func:`_recv_split_py` compiled
    (or loaded from numba's cache) and linked to them. Returns what ``rings.kernels.enable`` does:
    without these two the device's other paths send and receive. Idempotent."""
    if not kernels.enable():
        return False
    _compile_rounds()
    return True


def _compile_rounds() -> None:
    global send_split, recv_split, irq_split
    if send_split is not None:
        return
    take, give_back, free = kernels.take_split, kernels.return_chunk, kernels.free_normal
    if take is None or give_back is None or free is None:
        return
    try:
        import numba

        from rings.layout import vring_need_event

        jit = numba.njit(cache=True, boundscheck=False)
        types = numba.types
        writev = types.ExternalFunction("writev", types.intp(types.int32, types.uintp, types.int32))
        int_ptr = types.CPointer(types.int32)  # type: ignore[no-untyped-call]  # (numba has no stubs)
        errno_location = types.ExternalFunction("__errno_location", int_ptr())
        header = jit(kernels.link(_header_code_py, _reason_code=jit(_reason_code)))
        readv = types.ExternalFunction("readv", types.intp(types.int32, types.uintp, types.int32))
        write = types.ExternalFunction("write", types.intp(types.int32, types.uintp, types.uintp))
        wants = jit(kernels.link(_wants_interrupt, vring_need_event=jit(vring_need_event)))
        irq = jit(kernels.link(_irq_py, _full_fence=kernels.compiled_fence(numba, "seq_cst"),
                               _wants_interrupt=wants, _write=write,
                               _errno_location=errno_location))  # fmt: skip
        send = jit(kernels.link(_send_split_py, _take_split=take, _return_chunk=give_back,
                                _header_code=header, _writev=writev, _errno_location=errno_location,
                                _irq=irq))  # fmt: skip
        recv = jit(kernels.link(_recv_split_py, _take_split=take, _return_chunk=give_back, _free_normal=free,
                                _readv=readv, _errno_location=errno_location))  # fmt: skip
        _compile_now(send, recv)
    except Exception:  # numba's own error classes: the other paths send, as without the kernels
        return
    send_split, recv_split, irq_split = send, recv, irq


def _compile_now(send: Callable[..., Any], recv: Callable[..., Any]) -> None:
    """Compile for the argument types a split ring passes (one and two guest memory regions), now
    rather than in the first round; a round of 0 chains changes nothing."""
    from rings.layout import DESC_DTYPE
    from rings.pool_layout import descriptor_dtype
    from rings.round_kernels import RoundArea

    table = np.zeros(2, DESC_DTYPE)
    ring = (table["addr"], table["len"], table["flags"], table["next"])
    bounds = (np.zeros(1, np.uint64), np.ones(1, np.uint64))
    record = np.zeros(2, descriptor_dtype(0))
    pool = (record["state"], record["ever"], np.arange(2, dtype=np.intp), record["queue"], record["head"],
            record["addr"], record["length"], record["reserved"])  # fmt: skip
    area = RoundArea(2)
    avail = np.zeros(5, np.uint16)[2:4]
    used = np.zeros(4, np.uint32).reshape(2, 2)
    scratch = (np.zeros((2, 2), np.uint64), np.zeros(HDR_FIELDS, np.uint8), np.zeros(2, np.uint8),
               np.zeros(2, np.int32), np.zeros(8, np.uint8), np.zeros((2, 2), np.int64))  # fmt: skip
    irq = (False, np.zeros(5, np.uint16), 2, 0, True, True, 1, -1, np.ones(1, np.uint64))
    for regions in (1, 2):
        datas = tuple(np.zeros(8, np.uint8) for _ in range(regions))
        send(avail, *ring, *bounds, datas, 0, 0, True, 0, 0, 0, 0, 2, *pool, 0, *area.outputs, used, 0,
             area.zeros, np.zeros(2, np.uint16), -1, 0, 1, *scratch, irq)  # fmt: skip
        recv(avail, *ring, *bounds, datas, 0, 0, True, 0, 0, 0, 0, 2, *pool, 0, *area.outputs, used, 0,
             area.zeros, np.zeros(2, np.uint16), -1, np.zeros(8, np.uint8), scratch[0], 0, False,
             np.zeros(2, np.int64))  # fmt: skip
