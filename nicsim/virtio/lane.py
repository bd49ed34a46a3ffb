"""What a request lane needs of one queue pair, and what it did settled into the device's books.

A request lane (:mod:`nicsim.ports.lane_kernel`, run by :mod:`nicsim.server.lane`) serves a queue
pair's requests in one compiled call outside the event loop. This module is its I/O-free half:
:func:`prepare` says whether the pair can be served so (a port that offers a lane, one queue pair,
split rings, both running and enabled, nothing on the frames' way: no capture or steering hook, no
inflight region, no dirty log, no chains left by a previous backend, no frames queued for the
guest) and gathers the call's arguments, with each ring's indices in ``state``; :func:`settle` puts
the indices back and books what the call did as the device's own rounds would have: the rings'
packets, bytes, rounds and interrupts, the pool's high-water mark, and the port's counters and drop
reasons (``DevicePort.wrote`` / ``received``, which also pushes a frame no posted buffer took whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.virtio import lane_layout as lk
from nicsim.virtio.policy import PLAIN_FRAME
from nicsim.virtio.port import ETH_HLEN, DevicePort, LaneTarget
from nicsim.virtio.queues import QueueSet
from nicsim.virtio.rx import RxPath
from nicsim.virtio.tx import TxPath
from rings.round_kernels import RoundArea
from rings.split import RingViews, SplitQueue, region_bytes

__all__ = ["LaneCall", "LaneSettings", "call_args", "prepare", "settle"]

MAX_REGIONS = 2  # the lane is compiled ahead for guest memory of one or two regions (QEMU's usual)


@dataclass(frozen=True, kw_only=True)
class LaneSettings:
    """The lane's file descriptors and times: the TX ring's kick eventfd, a stop eventfd, each ring's
    call eventfd (-1: none), and (nanoseconds) how long it polls after a request that came within
    that long of the one before (``spin_ns``), how long it serves with no request (``idle_ns``), how
    often it wakes while it waits (``warm_ns``, 0: never), when the last request came
    (``last_request_ns``, CLOCK_MONOTONIC), how long before a request due at a steady pace it polls
    for it (``ahead_ns``, 0: never; gaps up to ``paced_max_ns`` set a pace); a round of more than
    ``burst_chains`` chains ends it."""

    kick_fd: int
    stop_fd: int
    tx_call: int
    rx_call: int
    spin_ns: int
    idle_ns: int
    warm_ns: int
    burst_chains: int
    last_request_ns: int
    ahead_ns: int = 0
    paced_max_ns: int = 0


@dataclass(eq=False)
class LaneCall:
    """One call's arguments (``args``, in the kernel's order) and the arrays it reads and writes."""

    kernel: Any
    args: tuple[Any, ...]
    params: npt.NDArray[np.int64]
    state: npt.NDArray[np.int64]
    counts: npt.NDArray[np.int64]
    pair: int
    in_use: int
    codes: npt.NDArray[np.uint8]
    errnos: npt.NDArray[np.int32]

    def run(self) -> None:
        """The call itself (in the lane's thread: the kernel runs without the GIL)."""
        self.kernel(*self.args)

    @property
    def why(self) -> int:
        return int(self.state[lk.ST_WHY])


def prepare(
    qs: QueueSet, tx: TxPath, rx: RxPath, port: DevicePort, pair: int, settings: LaneSettings,
    areas: dict[int, RoundArea],
) -> LaneCall | None:
    """The call that serves ``pair``, or None when the pair cannot be served so (see the module's
    docstring). ``areas``: the lane's own work arrays per queue, kept by the caller between calls."""
    if qs.num_queues != 2 or pair != 0 or qs.inflight is not None or qs.logging or tx.on_sent is not None:
        return None
    target: LaneTarget | None = port.lane_target(pair)
    if target is None or qs.mem is None or qs.closed or rx.rx_backlog(pair):
        return None
    rxq, txq = 2 * pair, 2 * pair + 1
    st_rx, st_tx = qs.states[rxq], qs.states[txq]
    if st_rx is None or st_tx is None or not (qs.enabled[rxq] and qs.enabled[txq]):
        return None
    q_rx, q_tx = st_rx.q, st_tx.q
    if (not isinstance(q_rx, SplitQueue) or not isinstance(q_tx, SplitQueue) or st_rx.broken is not None
            or st_tx.broken is not None or st_rx.resubmit_count or st_tx.resubmit_count):  # fmt: skip
        return None
    mem, pool, policy = qs.mem, qs.pool, qs.policy
    if len(region_bytes(mem)) > MAX_REGIONS:
        return None  # a call for more regions would compile in the lane's first call, holding the GIL
    v_rx, v_tx = q_rx.ring_views(mem), q_tx.ring_views(mem)
    area_rx = _area(areas, rxq, q_rx.size)
    area_tx = _area(areas, txq, q_tx.size)
    scratch = tx.send_scratch(q_tx.size)
    in_use, capacity, *pool_arrays = pool.round_state()
    hdr = qs.hdr_len
    params = np.zeros(lk.PARAMS_LEN, np.int64)
    params[lk.P_TX_SIZE], params[lk.P_RX_SIZE] = q_tx.size, q_rx.size
    params[lk.P_EVENT_IDX] = qs.event_idx
    params[lk.P_ON_IDLE] = policy.irq_on_idle
    params[lk.P_COALESCE] = policy.irq_coalesce
    params[lk.P_INDIRECT] = qs.indirect
    params[lk.P_HDR] = hdr
    # The send round's bounds as TxPath's (and no GSO frame: a TCP stream keeps the pumps' batches).
    params[lk.P_TX_MIN] = hdr + ETH_HLEN
    params[lk.P_TX_MAX] = hdr + min(qs.frame_limit, PLAIN_FRAME)
    params[lk.P_RX_MIN] = hdr + ETH_HLEN
    params[lk.P_RX_LIMIT] = qs.frame_limit + hdr
    params[lk.P_BURST_CHAINS] = settings.burst_chains
    params[lk.P_IDLE_NS], params[lk.P_SPIN_NS], params[lk.P_WARM_NS] = (settings.idle_ns, settings.spin_ns,
                                                                          settings.warm_ns)  # fmt: skip
    params[lk.P_P_USED], params[lk.P_P_CAPACITY] = in_use, capacity
    params[lk.P_TX_QUEUE], params[lk.P_RX_QUEUE] = txq, rxq
    params[lk.P_ALLOW], params[lk.P_TRIES] = target.allow, target.tries
    params[lk.P_KICK_FD], params[lk.P_TAP_FD] = settings.kick_fd, target.fd
    params[lk.P_STOP_FD] = settings.stop_fd
    params[lk.P_TX_CALL], params[lk.P_RX_CALL] = settings.tx_call, settings.rx_call
    params[lk.P_LAST_REQUEST_NS] = settings.last_request_ns
    params[lk.P_AHEAD_NS], params[lk.P_PACED_MAX_NS] = settings.ahead_ns, settings.paced_max_ns
    params[lk.P_STALL_NS] = int(policy.stall_recheck_ms * 1e6)
    state = np.zeros(lk.STATE_LEN, np.int64)
    state[lk.ST_TX_LAST], state[lk.ST_TX_USED] = q_tx.last_avail_idx, q_tx.used_idx
    state[lk.ST_TX_SIGNALLED], state[lk.ST_TX_IRQ_USED] = st_tx.signalled_used, st_tx.irq_used
    state[lk.ST_RX_LAST], state[lk.ST_RX_USED] = q_rx.last_avail_idx, q_rx.used_idx
    state[lk.ST_RX_SIGNALLED], state[lk.ST_RX_IRQ_USED] = st_rx.signalled_used, st_rx.irq_used
    counts = np.zeros(lk.COUNTS_LEN, np.int64)
    recv_extra = (target.buf, np.zeros((1, 2), np.uint64), target.burst, qs.guest_csum, np.zeros(2, np.int64))
    args = call_args(v_tx, v_rx, area_tx, area_rx, region_bytes(mem), tuple(pool_arrays), scratch, recv_extra,
                     params, state, counts)  # fmt: skip
    return LaneCall(kernel=target.kernel, args=args, params=params, state=state, counts=counts, pair=pair,
                    in_use=in_use, codes=scratch[2], errnos=scratch[3])  # fmt: skip


def call_args(
    v_tx: RingViews, v_rx: RingViews, area_tx: RoundArea, area_rx: RoundArea, datas: tuple[Any, ...],
    pool_arrays: tuple[Any, ...], send_scratch: tuple[Any, ...], recv_extra: tuple[Any, ...],
    params: npt.NDArray[np.int64], state: npt.NDArray[np.int64], counts: npt.NDArray[np.int64],
) -> tuple[Any, ...]:
    """The lane kernel's arguments in its order (``nicsim.ports.lane_kernel._lane_py``), from each
    ring's views and work arrays: the one place that order is written, for :func:`prepare` and for
    the kernel's compilation ahead of its first call."""
    return (v_tx.take_ring, v_tx.avail, (v_tx.used_ring, v_tx.used_head, v_tx.used_tail, area_tx.zeros),
            area_tx.outputs, v_rx.take_ring, v_rx.avail, (v_rx.used_ring, v_rx.used_head, area_rx.zeros),
            area_rx.outputs, datas, pool_arrays, send_scratch, recv_extra, params, state, counts,
            np.zeros((3, 2), np.int32), np.zeros(lk.SCRATCH_LEN, np.int64))  # fmt: skip


def _area(areas: dict[int, RoundArea], index: int, size: int) -> RoundArea:
    area = areas.get(index)
    if area is None or area.size != size:
        area = areas[index] = RoundArea(size)
    return area


def settle(qs: QueueSet, port: DevicePort, call: LaneCall) -> None:
    """Put the rings' indices back from ``call.state`` and book what the call did (module docstring).
    A ring stopped meanwhile is left alone (the call ran before it stopped: a stop waits for it)."""
    state, c = call.state, call.counts
    rxq, txq = 2 * call.pair, 2 * call.pair + 1
    stats = qs.stats
    for index, at in ((txq, lk.ST_TX_LAST), (rxq, lk.ST_RX_LAST)):
        st = qs.states[index]
        if st is None:
            continue
        q = st.q
        assert isinstance(q, SplitQueue)
        q.last_avail_idx, q.used_idx = int(state[at]), int(state[at + 1])
        st.signalled_used, st.irq_used = int(state[at + 2]), int(state[at + 3])
    most = int(c[lk.C_MOST])
    if most and not qs.closed:
        qs.pool.round_allocated(call.in_use + most)  # the high-water mark: a round held them
        qs.pool.round_freed(call.in_use)
    hdr = qs.hdr_len
    for index, rounds, frames, nbytes, irqs in (
        (txq, c[lk.C_TX_ROUNDS], c[lk.C_TX_CHAINS], c[lk.C_TX_FRAME_BYTES], c[lk.C_TX_IRQS]),
        (rxq, c[lk.C_RX_ROUNDS], c[lk.C_RX_FRAMES], c[lk.C_RX_BYTES] - c[lk.C_RX_FRAMES] * hdr,
         c[lk.C_RX_IRQS]),
    ):  # fmt: skip
        if frames:
            stats.held_briefly(index, most)
            stats.packets[index] += int(frames)
            stats.bytes[index] += int(nbytes)
            stats.batches[index] += int(rounds)
        stats.interrupts[index] += int(irqs)
    stats.kicks[txq] += int(c[lk.C_KICKS])
    stats.stall_rechecks[txq] += int(c[lk.C_TX_RECHECKS])
    stats.stall_rechecks[rxq] += int(c[lk.C_RX_RECHECKS])
    failed: list[tuple[int, int]] = []
    if call.why == lk.WHY_TX_FAILED:
        chains = int(state[lk.ST_TX_CHAINS])
        bad = np.flatnonzero(call.codes[:chains]).tolist()
        failed = [(int(call.codes[j]), int(call.errnos[j])) for j in bad]
    if c[lk.C_TX_CHAINS]:
        port.wrote(int(c[lk.C_TX_FRAMES]), int(c[lk.C_TX_BYTES]), failed)
    pending = int(state[lk.ST_PENDING]) if call.why == lk.WHY_RX_PENDING else 0
    drops = np.array([c[lk.C_DROP_RUNT], c[lk.C_DROP_TOO_BIG]], np.int64)
    if c[lk.C_RX_ROUNDS] or pending:
        port.received(call.pair, int(c[lk.C_RX_FRAMES]), int(c[lk.C_RX_BYTES]), pending,
                      int(state[lk.ST_RX_STATUS]), int(state[lk.ST_ERRNO]), drops)  # fmt: skip
