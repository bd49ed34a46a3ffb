"""The tap's request lane: a request's whole way through nicsim, from the guest's kick to the reply's
interrupt, in one compiled call that waits on the file descriptors itself, in a thread of its own.

Through the event loop a request costs Python at every step between the kick and the reply's
interrupt: the loop's turn, the pump, the device, the round's arguments gathered, and the same again
for the reply (stamped in the process: about 40 of the 60 us from the request to its interrupt).
While a queue pair carries requests, :func:`_lane_py` does that work instead, with the event loop's
pumps for the pair parked (:mod:`nicsim.server.lane`): it waits in ``ppoll(2)`` on the TX ring's
kick eventfd, the TAP and a stop eventfd; takes each request with the tap's compiled send round
(:func:`nicsim.ports.fd_kernels._send_split_py`: chains held by pool descriptors, headers checked, the
TX interrupt decided and written, then the frame written to the TAP); then reads what the TAP has
with the compiled receive round into the RX ring's posted buffers and decides and writes the RX
interrupt (:func:`nicsim.ports.fd_kernels._irq_py`). It polls the rings with kicks off, as the pumps
do, for ``spin_ns`` after a request that came within that long of the one before (``--rr-poll-us``)
and in the window a request at a steady pace is due in (``--poll-ahead-us``, :func:`_window`); else
it enables kicks, fences, looks once more and sleeps in ``ppoll``, waking every ``warm_ns``
(``--warm-tick-us``) so that its core does not sleep deeply between requests.

It returns to the event loop, having changed only what it counted, on anything that is not a
request's plain way: a stop asked for, no request for ``idle_ns``, a round of more than
``burst_chains`` chains (traffic: the pumps' batches serve it), a round the send kernel declines
(a GSO frame, a bad chain, a pool short of descriptors: the general path takes it and counts any
drop), a frame not written, a frame no posted buffer takes whole, no posted buffer at all, a failed
read, a ring index the driver corrupted. ``state`` carries each ring's indices in and out;
``counts`` what it did. The sources are plain Python over arrays; :func:`enable` compiles them with
numba (``nogil``: the event loop runs while the lane waits or works), linked to the tap's rounds and
to libc's ``ppoll``, ``read`` and ``clock_gettime``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.ports import fd_kernels
from nicsim.ports.fd_kernels import RECV_BUDGET, RECV_ERROR, RECV_PENDING
from nicsim.virtio.lane_layout import (
    C_AHEAD,
    C_AHEAD_HITS,
    C_DROP_RUNT,
    C_DROP_TOO_BIG,
    C_KICKS,
    C_MOST,
    C_RX_BYTES,
    C_RX_FRAMES,
    C_RX_IRQS,
    C_RX_RECHECKS,
    C_RX_ROUNDS,
    C_SLEEPS,
    C_SPIN_HITS,
    C_TX_BYTES,
    C_TX_CHAINS,
    C_TX_FRAME_BYTES,
    C_TX_FRAMES,
    C_TX_IRQS,
    C_TX_RECHECKS,
    C_TX_ROUNDS,
    C_WARM,
    P_AHEAD_NS,
    P_ALLOW,
    P_BURST_CHAINS,
    P_COALESCE,
    P_EVENT_IDX,
    P_HDR,
    P_IDLE_NS,
    P_INDIRECT,
    P_KICK_FD,
    P_LAST_REQUEST_NS,
    P_ON_IDLE,
    P_P_CAPACITY,
    P_P_USED,
    P_PACED_MAX_NS,
    P_RX_CALL,
    P_RX_LIMIT,
    P_RX_MIN,
    P_RX_QUEUE,
    P_RX_SIZE,
    P_SPIN_NS,
    P_STALL_NS,
    P_STOP_FD,
    P_TAP_FD,
    P_TRIES,
    P_TX_CALL,
    P_TX_MAX,
    P_TX_MIN,
    P_TX_QUEUE,
    P_TX_SIZE,
    P_WARM_NS,
    S_EVENTFD,
    S_GAPS,
    S_GAPS_N,
    S_SORTED,
    S_TIMEOUT,
    S_WINDOW,
    ST_ERRNO,
    ST_PENDING,
    ST_RX_LAST,
    ST_RX_SIGNALLED,
    ST_RX_STATUS,
    ST_RX_USED,
    ST_STOP,
    ST_TX_CHAINS,
    ST_TX_LAST,
    ST_TX_SIGNALLED,
    ST_TX_USED,
    ST_WHY,
    WHY_BUG,
    WHY_BURST,
    WHY_DECLINED,
    WHY_IDLE,
    WHY_NO_BUFFER,
    WHY_POLL_ERROR,
    WHY_RING_ERROR,
    WHY_RX_ERROR,
    WHY_RX_PENDING,
    WHY_STOP,
    WHY_TX_FAILED,
)
from nicsim.virtio.policy import AHEAD_GAPS
from nicsim.virtio.queues import IRQ_FAILED, IRQ_SENT, IRQ_SUPPRESSED
from rings import kernels
from rings.barrier import full_fence as _full_fence

__all__ = ["enable", "kernel"]

_Arr = npt.NDArray[Any]

_POLLIN = 0x001
_EINTR = 4
_CLOCK_MONOTONIC = 1
_NO_NOTIFY = 1  # VIRTQ_USED_F_NO_NOTIFY (§2.7.7)

# Bound by enable(): the compiled tap rounds and libc's functions.
_send: Any = None
_recv: Any = None
_irq: Any = None
_ppoll: Any = None
_read: Any = None
_clock_gettime: Any = None
_errno_location: Any = None

lane: Callable[..., None] | None = None
"""The compiled :func:`_lane_py` once :func:`enable` ran with the kernels on, else None."""


def _now_ns(ts: _Arr) -> int:  # pragma: no cover - compiled by numba
    _clock_gettime(_CLOCK_MONOTONIC, ts.ctypes.data)
    return int(ts[0]) * 1_000_000_000 + int(ts[1])


def _kicks(
    used_head: _Arr, used_tail: _Arr, last: int, on: bool, event_idx: bool,
) -> None:  # pragma: no cover - compiled by numba
    """Enable or suppress the TX ring's kicks as ``SplitQueue.suppress_kicks`` does."""
    if event_idx:
        used_tail[0] = (last - (0 if on else 1)) & 0xFFFF
    elif on:
        used_head[0] = used_head[0] & ~_NO_NOTIFY
    else:
        used_head[0] = used_head[0] | _NO_NOTIFY
    if on:
        _full_fence()  # the store before the re-check's load of avail.idx (§2.7.10)


def _settled(
    code: int, state: _Arr, at: int, used: int, counts: _Arr, counter: int,
) -> None:  # pragma: no cover - compiled by numba
    """``QueueSet.decided_interrupt`` for a ring whose indices sit at ``state[at:at + 4]``."""
    if code == IRQ_SUPPRESSED:
        state[at + 2] = used
    elif code in (IRQ_SENT, IRQ_FAILED):
        state[at + 2] = used
        state[at + 3] = used
        counts[counter] += 1


def _receive(
    rx: Any, datas: Any, pool: Any, rx_area: Any, rx_used: Any, recv_extra: Any, rx_avail: _Arr,
    params: _Arr, state: _Arr, counts: _Arr, one: _Arr, readable: bool,
) -> bool:  # pragma: no cover - compiled by numba
    """One receive round into the RX ring; True when the lane must return (``state[ST_WHY]`` says
    why)."""
    why = _receive_round(rx, datas, pool, rx_area, rx_used, recv_extra, rx_avail, params, state, counts, one,
                         readable)  # fmt: skip
    if why < 0:
        return False
    state[ST_WHY] = why
    return True


def _receive_round(
    rx: Any, datas: Any, pool: Any, rx_area: Any, rx_used: Any, recv_extra: Any, rx_avail: _Arr,
    params: _Arr, state: _Arr, counts: _Arr, one: _Arr, readable: bool,
) -> int:  # pragma: no cover - compiled by numba
    """One receive round into the RX ring; returns -1 to go on, or a ``WHY_*`` to return with."""
    size = params[P_RX_SIZE]
    last = state[ST_RX_LAST]
    posted = (int(rx_avail[1]) - last) & 0xFFFF
    if posted > size:
        return WHY_RING_ERROR
    if posted == 0:
        return WHY_NO_BUFFER if readable else -1
    used_ring, used_head, zeros = rx_used
    placed, nbytes, pending, why, err = _recv(
        *rx, datas, last, posted, params[P_INDIRECT] != 0, params[P_RX_MIN], params[P_RX_LIMIT],
        params[P_HDR], params[P_P_USED], params[P_P_CAPACITY], *pool, params[P_RX_QUEUE], *rx_area,
        used_ring, state[ST_RX_USED], zeros, used_head, params[P_TAP_FD], *recv_extra)  # fmt: skip
    if placed < 0:
        return WHY_BUG
    counts[C_RX_ROUNDS] += 1
    drops = recv_extra[4]
    counts[C_DROP_RUNT] += drops[0]
    counts[C_DROP_TOO_BIG] += drops[1]
    drops[0] = 0
    drops[1] = 0
    if placed > 0:
        state[ST_RX_LAST] = (last + placed) & 0xFFFF
        used = (state[ST_RX_USED] + placed) & 0xFFFF
        state[ST_RX_USED] = used
        counts[C_RX_FRAMES] += placed
        counts[C_RX_BYTES] += nbytes
        counts[C_MOST] = max(counts[C_MOST], placed)
        code = _irq(rx_avail, size, used, state[ST_RX_SIGNALLED], params[P_EVENT_IDX] != 0,
                    params[P_ON_IDLE] != 0, params[P_COALESCE], True, params[P_RX_CALL], one)  # fmt: skip
        _settled(code, state, ST_RX_LAST, used, counts, C_RX_IRQS)
    state[ST_RX_STATUS] = why
    if why == RECV_PENDING:
        state[ST_PENDING] = pending
        return WHY_RX_PENDING
    if why == RECV_ERROR:
        state[ST_ERRNO] = err
        return WHY_RX_ERROR
    if (why == RECV_BUDGET and placed < posted) or placed > params[P_BURST_CHAINS]:
        return WHY_BURST  # a burst's bytes, or more frames than requests have: traffic, not a reply
    return -1  # (every posted buffer filled: the next poll says whether the TAP holds more)


def _transmit(
    tx: Any, datas: Any, pool: Any, tx_area: Any, tx_used: Any, send_extra: Any, tx_avail: _Arr,
    params: _Arr, state: _Arr, counts: _Arr, one: _Arr,
) -> int:  # pragma: no cover - compiled by numba
    """A send round of what the TX ring has; returns 0 when there was nothing, 1 when it sent a
    round, or ``100 + WHY_*`` to return with."""
    size = params[P_TX_SIZE]
    last = state[ST_TX_LAST]
    pending = (int(tx_avail[1]) - last) & 0xFFFF
    if pending > size:
        return 100 + WHY_RING_ERROR
    if pending == 0:
        return 0
    if pending > params[P_BURST_CHAINS]:
        return 100 + WHY_BURST
    used_ring, used_head, _, zeros = tx_used
    irq = (True, tx_avail, size, state[ST_TX_SIGNALLED], params[P_EVENT_IDX] != 0, params[P_ON_IDLE] != 0,
           params[P_COALESCE], params[P_TX_CALL], one)  # fmt: skip
    chains, frame_bytes, frames, nbytes, decided = _send(
        *tx, datas, last, pending, params[P_INDIRECT] != 0, params[P_TX_MIN], params[P_TX_MAX],
        params[P_HDR], params[P_P_USED], params[P_P_CAPACITY], *pool, params[P_TX_QUEUE], *tx_area,
        used_ring, state[ST_TX_USED], zeros, used_head, params[P_TAP_FD], params[P_ALLOW], params[P_TRIES],
        *send_extra, irq)  # fmt: skip
    if chains == -1:
        return 100 + WHY_DECLINED
    if chains < 0:
        return 100 + WHY_BUG
    state[ST_TX_LAST] = (last + chains) & 0xFFFF
    used = (state[ST_TX_USED] + chains) & 0xFFFF
    state[ST_TX_USED] = used
    counts[C_TX_ROUNDS] += 1
    counts[C_TX_CHAINS] += chains
    counts[C_TX_FRAME_BYTES] += frame_bytes
    counts[C_TX_FRAMES] += frames
    counts[C_TX_BYTES] += nbytes
    counts[C_MOST] = max(counts[C_MOST], chains)
    _settled(decided, state, ST_TX_LAST, used, counts, C_TX_IRQS)
    if frames < chains:
        state[ST_TX_CHAINS] = chains
        return 100 + WHY_TX_FAILED
    return 1


def _lane_py(
    tx: Any, tx_avail: _Arr, tx_used: Any, tx_area: Any, rx: Any, rx_avail: _Arr, rx_used: Any,
    rx_area: Any, datas: Any, pool: Any, send_extra: Any, recv_extra: Any, params: _Arr, state: _Arr,
    counts: _Arr, pfd: _Arr, scratch: _Arr,
) -> None:  # pragma: no cover - compiled by numba
    """Serve one queue pair's requests until something that is not one comes (see the module's
    docstring). ``tx``/``rx``: each ring's take arguments (``take_ring``); ``tx_avail``/``rx_avail``:
    each avail ring as u16[size + 3]; ``tx_used``: (used ring, used head, used tail, zeros);
    ``rx_used``: (used ring, used head, zeros); ``*_area``: each ring's ``RoundArea.outputs``;
    ``pool``: the pool's arrays (``PacketPool.round_state()[2:]``); ``send_extra``: the send round's
    scratch (iov, hbuf, codes, errnos, stage, spans); ``recv_extra``: (buf, iov, burst, keep_flags,
    drops); ``pfd``: int32[3, 2], three ``struct pollfd`` for ``ppoll(2)``; ``scratch``:
    int64[SCRATCH_LEN], laid out in :mod:`nicsim.virtio.lane_layout`."""
    one = np.ones(1, np.uint64)
    event_idx = params[P_EVENT_IDX] != 0
    tx_head, tx_tail = tx_used[1], tx_used[2]
    kick_fd, tap_fd, stop_fd = params[P_KICK_FD], params[P_TAP_FD], params[P_STOP_FD]
    spin_ns, ahead_ns = params[P_SPIN_NS], params[P_AHEAD_NS]
    pfd[0, 0] = kick_fd
    pfd[1, 0] = tap_fd
    pfd[2, 0] = stop_fd
    scratch[S_GAPS_N] = 0
    last_request = params[P_LAST_REQUEST_NS]
    gap = spin_ns + 1  # spin after a request only once requests came that close together
    spin_until = 0
    ahead_start = ahead_end = 0  # the window the next request is due in (0: none)
    kicks_on = False  # the pump that handed the ring over had kicks off
    now = _now_ns(scratch)
    last_work = now
    while True:
        if state[ST_STOP]:
            state[ST_WHY] = WHY_STOP
            return
        sent = _transmit(tx, datas, pool, tx_area, tx_used, send_extra, tx_avail, params, state, counts, one)
        if sent >= 100:
            state[ST_WHY] = sent - 100
            return
        if sent == 1:
            now = _now_ns(scratch)
            if spin_until and now < spin_until:
                counts[C_SPIN_HITS] += 1
            if ahead_start and ahead_start <= now <= ahead_end:
                counts[C_AHEAD_HITS] += 1
            if not (ahead_start and now < ahead_start):
                # (A frame before the window, an IPv6 router solicitation between pings, leaves the
                # window where it was, as the pump's poll-ahead does.)
                gap = now - last_request
                last_request = now
                if spin_ns <= gap <= params[P_PACED_MAX_NS]:
                    n = scratch[S_GAPS_N]
                    if n == AHEAD_GAPS:
                        for i in range(AHEAD_GAPS - 1):
                            scratch[S_GAPS + i] = scratch[S_GAPS + i + 1]
                        n -= 1
                    scratch[S_GAPS + n] = gap
                    scratch[S_GAPS_N] = n + 1
                else:
                    scratch[S_GAPS_N] = 0
                ahead_start = ahead_end = 0
                if _window(scratch, ahead_ns, spin_ns, params[P_PACED_MAX_NS]):
                    ahead_start, ahead_end = now + scratch[S_WINDOW], now + scratch[S_WINDOW + 1]
            last_work = now
            if _receive(rx, datas, pool, rx_area, rx_used, recv_extra, rx_avail, params, state, counts, one,
                        False):  # fmt: skip
                return
            spin_until = now + spin_ns if gap <= spin_ns else 0
            continue
        now = _now_ns(scratch)
        if ahead_end and now > ahead_end:
            ahead_start = ahead_end = 0  # the window passed with no request: the kick serves it
        if now < spin_until or (ahead_start and now >= ahead_start):
            # Polling for the next request (kicks off) and for the reply: after a request that came
            # within spin_ns of the one before (as --rr-poll-us does), or in the window the next one
            # is due in (as --poll-ahead-us does).
            if kicks_on:
                _kicks(tx_head, tx_tail, state[ST_TX_LAST], False, event_idx)
                kicks_on = False
            if _receive(rx, datas, pool, rx_area, rx_used, recv_extra, rx_avail, params, state, counts, one,
                        False):  # fmt: skip
                return
            continue
        spin_until = 0
        if not kicks_on:
            _kicks(tx_head, tx_tail, state[ST_TX_LAST], True, event_idx)
            kicks_on = True
            if (int(tx_avail[1]) - state[ST_TX_LAST]) & 0xFFFF:
                continue  # published while kicks were off
        idle_left = params[P_IDLE_NS] - (now - last_work)
        if idle_left <= 0:
            state[ST_WHY] = WHY_IDLE
            return
        wait_ns = min(idle_left, params[P_WARM_NS]) if params[P_WARM_NS] > 0 else idle_left
        woke_for_window = False
        if ahead_start and ahead_start - now <= wait_ns:
            wait_ns = ahead_start - now
            woke_for_window = True
        pfd[0, 1] = _POLLIN
        pfd[1, 1] = _POLLIN
        pfd[2, 1] = _POLLIN
        scratch[S_TIMEOUT] = wait_ns // 1_000_000_000
        scratch[S_TIMEOUT + 1] = wait_ns % 1_000_000_000
        counts[C_SLEEPS] += 1
        r = _ppoll(pfd.ctypes.data, 3, scratch.ctypes.data + 8 * S_TIMEOUT, 0)
        if r < 0:
            err = _errno_location()[0]
            if err == _EINTR:
                continue
            state[ST_ERRNO] = err
            state[ST_WHY] = WHY_POLL_ERROR
            return
        if r == 0:
            if woke_for_window:
                counts[C_AHEAD] += 1
            else:
                counts[C_WARM] += 1  # a warm wakeup: the core does not sleep deeply between requests
                if params[P_STALL_NS] and now - last_work >= params[P_STALL_NS]:
                    _recheck(tx_avail, params[P_TX_SIZE], state, ST_TX_LAST, params, params[P_TX_CALL],
                             counts, C_TX_IRQS, C_TX_RECHECKS, one)  # fmt: skip
                    _recheck(rx_avail, params[P_RX_SIZE], state, ST_RX_LAST, params, params[P_RX_CALL],
                             counts, C_RX_IRQS, C_RX_RECHECKS, one)  # fmt: skip
            continue
        if (pfd[2, 1] >> 16) & 0xFFFF:
            state[ST_WHY] = WHY_STOP
            return
        if (pfd[0, 1] >> 16) & 0xFFFF:
            counts[C_KICKS] += 1
            _read(kick_fd, scratch.ctypes.data + 8 * S_EVENTFD, 8)  # (EAGAIN: nothing to do)
        _kicks(tx_head, tx_tail, state[ST_TX_LAST], False, event_idx)
        kicks_on = False
        if (pfd[1, 1] >> 16) & 0xFFFF:
            if _receive(rx, datas, pool, rx_area, rx_used, recv_extra, rx_avail, params, state, counts, one,
                        True):  # fmt: skip
                return
            last_work = _now_ns(scratch)


def _recheck(
    avail: _Arr, size: int, state: _Arr, at: int, params: _Arr, fd: int, counts: _Arr, irqs: int,
    rechecks: int, one: _Arr,
) -> None:  # pragma: no cover - compiled by numba
    """A quiet ring's stall re-check, as the pumps' watchdog does (``QueueSet.recheck_interrupt``):
    signal now if the ring wants an interrupt for used entries published since the last one sent
    (a decision may have read a ``used_event`` or flags the driver was replacing)."""
    used = state[at + 1]
    if used == state[at + 3]:
        return
    code = _irq(avail, size, used, state[at + 3], params[P_EVENT_IDX] != 0, params[P_ON_IDLE] != 0,
                params[P_COALESCE], True, fd, one)  # fmt: skip
    if code in (IRQ_SENT, IRQ_FAILED):
        state[at + 2] = used
        state[at + 3] = used
        counts[irqs] += 1
        counts[rechecks] += 1


def _window(scratch: _Arr, ahead: int, lo: int, hi: int) -> bool:  # pragma: no cover - compiled by numba
    """:func:`nicsim.virtio.policy.poll_ahead` over the gaps in ``scratch`` (nanoseconds): True with
    the window's start and end after the last request in ``scratch[S_WINDOW:S_WINDOW + 2]``, False
    for none. ``lo``/``hi``: the gaps that can set a pace (``paced_gap``)."""
    n = scratch[S_GAPS_N]
    if ahead <= 0 or n < 2:
        return False
    for i in range(n):  # an insertion sort into S_SORTED (at most four gaps: no allocation)
        v = scratch[S_GAPS + i]
        j = i
        while j > 0 and scratch[S_SORTED + j - 1] > v:
            scratch[S_SORTED + j] = scratch[S_SORTED + j - 1]
            j -= 1
        scratch[S_SORTED + j] = v
    first, last = S_SORTED, S_SORTED + n - 1
    if n > 2:
        median = scratch[S_SORTED + n // 2]
        if median - scratch[first] > scratch[last] - median:
            first += 1
        else:
            last -= 1
    shortest, longest = scratch[first], scratch[last]
    if longest - shortest > 4 * ahead or shortest < 2 * ahead:
        return False
    if not (lo <= shortest <= hi and lo <= longest <= hi):
        return False
    scratch[S_WINDOW] = shortest - ahead
    scratch[S_WINDOW + 1] = longest + ahead
    return True


def kernel() -> Callable[..., None] | None:
    """The compiled lane, while ``rings``' kernels are on."""
    return lane if kernels.enabled() else None


def enable() -> bool:
    """:func:`nicsim.ports.fd_kernels.enable`, then :func:`_lane_py` compiled (or loaded from
    numba's cache) and linked to the tap's rounds. False without them. Idempotent."""
    if not fd_kernels.enable():
        return False
    _compile()
    return lane is not None


def _compile() -> None:
    global lane
    if lane is not None:
        return
    send, recv, irq = fd_kernels.send_split, fd_kernels.recv_split, fd_kernels.irq_split
    if send is None or recv is None or irq is None:
        return
    try:
        import numba

        jit = numba.njit(cache=True, boundscheck=False)
        types = numba.types
        int_ptr = types.CPointer(types.int32)  # type: ignore[no-untyped-call]  # (numba has no stubs)
        ppoll = types.ExternalFunction("ppoll", types.int32(types.uintp, types.uint64, types.uintp,
                                                            types.uintp))  # fmt: skip
        read = types.ExternalFunction("read", types.intp(types.int32, types.uintp, types.uintp))
        clock = types.ExternalFunction("clock_gettime", types.int32(types.int32, types.uintp))
        errno_location = types.ExternalFunction("__errno_location", int_ptr())
        fence = kernels.compiled_fence(numba, "seq_cst")
        now = jit(kernels.link(_now_ns, _clock_gettime=clock))
        kicks = jit(kernels.link(_kicks, _full_fence=fence))
        settled = jit(_settled)
        receive_round = jit(kernels.link(_receive_round, _recv=recv, _irq=irq, _settled=settled))
        receive = jit(kernels.link(_receive, _receive_round=receive_round))
        transmit = jit(kernels.link(_transmit, _send=send, _settled=settled))
        compiled = numba.njit(cache=True, boundscheck=False, nogil=True)(
            kernels.link(_lane_py, _transmit=transmit, _receive=receive, _kicks=kicks, _now_ns=now,
                         _window=jit(_window), _recheck=jit(kernels.link(_recheck, _irq=irq)),
                         _ppoll=ppoll, _read=read,
                         _errno_location=errno_location))  # fmt: skip
        _compile_now(compiled)
    except Exception:  # numba's own error classes: the event loop's pumps serve requests, as without
        return
    lane = compiled


def _compile_now(compiled: Callable[..., None]) -> None:
    """Compile for the argument types :func:`nicsim.virtio.lane.prepare` passes (guest memory of one
    and of two regions: the driver model's rings give the same views), now rather than in a lane's
    first call. Each call returns at once: its stop eventfd is already set."""
    import os

    from nicsim.virtio import lane_layout as lay
    from nicsim.virtio.lane import call_args
    from rings.driver import GuestDriver
    from rings.pool import PacketPool
    from rings.round_kernels import RoundArea
    from rings.split import region_bytes

    pool = PacketPool(4, name="lane-compile")
    stop = os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        for regions in (1, 2):
            drv = GuestDriver(region_sizes=(1 << 16,) * regions)
            mem = drv.memory
            v_rx, v_tx = (drv.add_queue(i, 4).device_queue().ring_views(mem) for i in range(2))
            a_rx, a_tx = RoundArea(4), RoundArea(4)
            scratch = (np.zeros((4, 2), np.uint64), np.zeros(16, np.uint8), np.zeros(4, np.uint8),
                       np.zeros(4, np.int32), np.zeros(8, np.uint8), np.zeros((4, 2), np.int64))  # fmt: skip
            recv_extra = (np.zeros(8, np.uint8), np.zeros((1, 2), np.uint64), 0, False, np.zeros(2, np.int64))
            params = np.zeros(lay.PARAMS_LEN, np.int64)
            params[lay.P_KICK_FD] = params[lay.P_TAP_FD] = params[lay.P_TX_CALL] = params[lay.P_RX_CALL] = -1
            params[lay.P_STOP_FD] = stop
            params[lay.P_IDLE_NS] = 1_000_000_000
            compiled(*call_args(v_tx, v_rx, a_tx, a_rx, region_bytes(mem), tuple(pool.round_state()[2:]),
                                scratch, recv_extra, params, np.zeros(lay.STATE_LEN, np.int64),
                                np.zeros(lay.COUNTS_LEN, np.int64)))  # fmt: skip
            drv.ram.release()
    finally:
        os.close(stop)
        pool.close()
