"""The request lane's call, laid out: why it returned, and what its ``state``, ``counts`` and
``params`` arrays hold at each index (:mod:`nicsim.ports.lane_kernel` is the call,
:mod:`nicsim.virtio.lane` fills and reads the arrays)."""

from nicsim.virtio.policy import AHEAD_GAPS

# Why the lane returned: ``state[ST_WHY]``.
WHY_STOP = 0  # the stop flag (ST_STOP) or eventfd: the event loop wants the rings back
WHY_IDLE = 1  # no request for idle_ns
WHY_BURST = 2  # a round of more than burst_chains chains, or a full RX round: traffic
WHY_DECLINED = 3  # the send round declined (a GSO frame, a bad chain, no pool descriptors)
WHY_TX_FAILED = 4  # a frame was not written: its code is in the send scratch
WHY_RX_PENDING = 5  # a frame no posted buffer takes whole is in the port's buffer (ST_PENDING: its length)
WHY_RX_ERROR = 6  # a read failed (ST_ERRNO)
WHY_NO_BUFFER = 7  # the TAP has a frame and the guest has posted no buffer
WHY_RING_ERROR = 8  # avail.idx is more than the ring's size ahead: the general path breaks the ring
WHY_POLL_ERROR = 9  # ppoll(2) failed (ST_ERRNO)
WHY_BUG = 10  # a free was refused after a take (the pool's records are corrupt)
WHY_NAMES = ("stop", "idle", "burst", "declined", "tx_failed", "rx_pending", "rx_error", "no_buffer",
             "ring_error", "poll_error", "bug")  # fmt: skip

# ``state``: each ring's indices (in and out), then what the return says.
ST_TX_LAST, ST_TX_USED, ST_TX_SIGNALLED, ST_TX_IRQ_USED = 0, 1, 2, 3
ST_RX_LAST, ST_RX_USED, ST_RX_SIGNALLED, ST_RX_IRQ_USED = 4, 5, 6, 7
ST_WHY, ST_PENDING, ST_ERRNO, ST_TX_CHAINS, ST_RX_STATUS = 8, 9, 10, 11, 12
ST_STOP = 13  # set (then the stop eventfd written) by the event loop: return now
STATE_LEN = 14

# ``counts``: what one call did.
C_KICKS, C_SLEEPS, C_SPIN_HITS = 0, 1, 2
C_TX_ROUNDS, C_TX_CHAINS, C_TX_FRAME_BYTES, C_TX_FRAMES, C_TX_BYTES, C_TX_IRQS = 3, 4, 5, 6, 7, 8
C_RX_ROUNDS, C_RX_FRAMES, C_RX_BYTES, C_RX_IRQS = 9, 10, 11, 12
C_DROP_RUNT, C_DROP_TOO_BIG, C_MOST, C_WARM, C_AHEAD, C_AHEAD_HITS = 13, 14, 15, 16, 17, 18
C_TX_RECHECKS, C_RX_RECHECKS = 19, 20  # interrupts a quiet ring was owed and got (see P_STALL_NS)
COUNTS_LEN = 21
COUNT_NAMES = ("kicks", "sleeps", "spin_hits", "tx_rounds", "tx_chains", "tx_frame_bytes", "tx_frames",
               "tx_bytes", "tx_irqs", "rx_rounds", "rx_frames", "rx_bytes", "rx_irqs", "drop_runt",
               "drop_too_big", "most", "warm_wakeups", "ahead", "ahead_hits", "tx_rechecks",
               "rx_rechecks")  # fmt: skip

# ``scratch`` (int64[SCRATCH_LEN]), the call's own: a timespec for clock_gettime, the 8 bytes read
# from the kick eventfd, the last gaps between requests (how many, then up to AHEAD_GAPS), the same
# sorted, the window the next request is due in, ppoll's timeout.
S_CLOCK, S_EVENTFD, S_GAPS_N, S_GAPS = 0, 2, 3, 4
S_SORTED = S_GAPS + AHEAD_GAPS
S_WINDOW = S_SORTED + AHEAD_GAPS
S_TIMEOUT = S_WINDOW + 2
SCRATCH_LEN = S_TIMEOUT + 2

# ``params``: the call's settings.
(P_TX_SIZE, P_RX_SIZE, P_EVENT_IDX, P_ON_IDLE, P_COALESCE, P_INDIRECT, P_HDR, P_TX_MIN, P_TX_MAX,
 P_RX_MIN, P_RX_LIMIT, P_BURST_CHAINS, P_IDLE_NS, P_SPIN_NS, P_WARM_NS, P_P_USED, P_P_CAPACITY,
 P_TX_QUEUE, P_RX_QUEUE, P_ALLOW, P_TRIES, P_KICK_FD, P_TAP_FD, P_STOP_FD, P_TX_CALL, P_RX_CALL,
 P_LAST_REQUEST_NS, P_AHEAD_NS, P_PACED_MAX_NS, P_STALL_NS) = range(30)  # fmt: skip
PARAMS_LEN = 30
