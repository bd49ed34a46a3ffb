"""The notification policy: when to interrupt the guest, when to keep polling, when to sleep and on what.

Under TCG every kick (a trapped doorbell write) and every interrupt (injected by QEMU's main thread)
costs the guest far more than moving a packet, so these few decisions set guest throughput, and the
backend's own CPU use. This module owns them as one small frozen dataclass of knobs plus pure
functions; the device applies the interrupt decision (it knows the rings), the asyncio pump
(:mod:`nicsim.server.pump`) applies the polling decision (it owns time and the eventfds).

The ring has the last word on interrupts: with VIRTIO_F_EVENT_IDX the guest says which used index it
wants to hear about (virtio 1.2 §2.7.10) and that is the contract: we signal as soon as ``used.idx``
passes ``used_event``, never later (Linux already batches through it: NAPI keeps callbacks off while it
polls, TX asks at 3/4 of its outstanding buffers). Without EVENT_IDX only VIRTQ_AVAIL_F_NO_INTERRUPT
exists (§2.7.7), and then ``irq_coalesce`` spaces interrupts while work flows.

Kicks go the other way. While traffic flows the pump does not busy-poll by default: with EVENT_IDX it
writes ``avail_event`` ``kick_batch`` entries ahead, so the guest's own doorbell wakes the backend once
a batch is ready (no CPU spent waiting, one kick per batch), with a ``batch_wait_us`` timer for a guest
that stops short of the batch. When a wakeup finds little work (sparse traffic) it re-arms for the very
first entry, so an idle guest's single packet is served at once. A flood's trickle (the few frames the
guest posts while a round runs) waits for the next batch too, rather than being chased in rounds of a
few (:func:`chase_tx`, ``min_round``). ``poll_us`` / ``poll_rounds`` add
classic busy-polling with kicks suppressed before sleeping, for hosts where a wakeup is dearer than a
core. Only a ring whose last round moved a whole batch (the other side keeps up with the backend) is
polled by default, for ``full_poll_us``, before it sleeps.

A request/response guest (a ping, an RPC) has its request's TX completion signalled at once, as its
round ends, and its reply's RX interrupt follows from the same callback (``reply_poll``). Holding the
TX interrupt for the RX one (:func:`defer_tx_interrupt`, ``tx_irq_wait_us``) would cost the guest one
interrupt instead of two, and it used to pay when the reply came ~0.2 ms later (ping every 10 ms:
p50 1.4 -> 0.8 ms, then). Now the reply comes within tens of microseconds, and holding is slower:
the guest, still awake after sending, handles the completion while the reply is on its way, and
when both come together it handles them one after the other. Measured with the hold off (alternated,
quiet host): ping every 10 ms p50 0.42 -> 0.35-0.36 ms, back to back 0.19-0.24 -> 0.16-0.17 ms, UDP
request/response 0.14 -> 0.10-0.11 ms (7.0k -> 8.9-9.2k transactions/s); host->guest TCP, whose
ACKs are such sparse rounds, 5.03-5.15 against 5.08-5.20 Gbit/s, the same. So the hold is off by
default; ``tx_irq_wait_us`` turns it on.
For the same traffic, a TX ring whose one-request rounds come within ``rr_poll_us`` of each other (a
ping flood, an RPC loop) is polled for that long with kicks off instead of put to sleep
(:func:`request_response`): the guest skips the doorbell, the backend its wakeup. A sparse guest (a
request every 10 ms) is never polled for; one sending 500 requests a second or more is, and then the
backend's core is busy while it does (DPDK's is, all the time). A guest whose requests come at a
steady pace slower than that (a ping every 10 ms, a heartbeat) is polled for around each one's
expected time only (:func:`poll_ahead`, ``poll_ahead_us``), so the request finds the backend's core
awake and its code warm, as a busy-polled core would, for a few percent of a core.

Notifications can still be lost (a guest that reads an old ``avail_event``, a driver that re-enabled
interrupts just as we decided against one, or anything else that leaves both sides waiting), so no
ring may depend on them alone: a sleeping ring that has work pending, and whose indices did not move
for ``stall_recheck_ms``, is re-checked (:func:`is_stalled` decides; the pump runs a round and sends
the interrupt the ring wants, and the device counts it as ``stall_rechecks``).
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class NotifyPolicy:
    """Knobs, with defaults chosen for a Linux guest under TCG (fewest notifications, little CPU)."""

    use_event_idx: bool = True   # offer VIRTIO_F_EVENT_IDX (interrupts by used_event, batched kicks)
    tx_batch: int = 256          # chains taken off a TX avail ring per round
    rx_batch: int = 256          # RX buffers filled per round
    irq_coalesce: int = 64       # without EVENT_IDX: while work flows, interrupt once per this many used
    irq_on_idle: bool = True     # without EVENT_IDX: when a queue runs dry, signal what is unsignalled
    kick_batch: int = 128        # EVENT_IDX, TX flowing: sleep until this many are posted (<= ring/2)
    rx_kick_batch: int = 64      # the same for RX buffers a pull-style port (the generator) fills
    # ...but look at the ring after this long anyway. A TCP stream's ACKs or a few GSO frames per
    # wakeup count as flowing yet never fill a batch: at 1 ms its throughput fell by a fifth (TCP
    # guest->host 5.8 -> 4.6 Gbit/s, issue 15's notes). A lone timer waits >= 1 ms in asyncio's epoll;
    # a busy loop fires it on time.
    batch_wait_us: float = 200.0
    flow_batch: int = 8          # a wakeup that moved at least this many buffers means "traffic flows"
    # EVENT_IDX, TX flowing: fewer chains than this left after a round wait for the batch's kick (or
    # batch_wait_us) instead of being chased: a guest posting at about the rate rounds drain its ring
    # kept the backend in rounds of ~25 chains, never asleep (64 B at the guest's ceiling: 56 % of a
    # core with a reading sink). GSO rounds (TCP) and packed rings are always chased.
    min_round: int = 32
    rounds_per_call: int = 4     # rounds run back to back in one event-loop callback while work is left
    poll_rounds: int = 0         # busy-poll: empty rounds with kicks suppressed before sleeping...
    poll_us: float = 0.0         # ...for at most this long since the last work (both 0: sleep at once)
    # After a full round (tx_batch or rx_batch buffers: the other side keeps up with the backend) poll
    # this long before re-arming kicks: a frontend that refills the ring as fast as the backend
    # empties it would otherwise be re-armed, kicked and woken once per round (DPDK's virtio-user,
    # without EVENT_IDX: backend-only TX 10.1 -> 12.1 M pps at 64 B, 7.0 -> 8.4 M at 1500 B).
    full_poll_us: float = 50.0
    # A round done in one compiled call (the sink's TX, the generator's RX) publishes used.idx after
    # every this many chains, not once at its end: the other side takes its buffers back while the
    # round goes on (DPDK's virtio-user refills a TX ring of 256 that a round would otherwise hold
    # whole: backend-only TX 15.8-16.1 -> 17.3-17.5 M pps at 64 B; 32 was slower, 16.5 M). 0: once.
    publish_every: int = 64
    # ...and runs up to this many rounds back to back while at least min_round entries are pending
    # and the driver wants no interrupt (DPDK's virtio-user, which keeps up: backend-only TX at 64 B
    # 15.5 M pps with 1, 23 M with 4, 29.5 M with 8, 33 M with 16). A guest under TCG rarely has
    # min_round pending after a round. It bounds how long one call keeps the event loop (16 rounds
    # of 256 chains: about 0.3 ms at 1500 B).
    fused_rounds: int = 16
    rx_backlog: int = 256        # frames a port may queue while the guest has no RX buffer
    stall_recheck_ms: float = 10.0  # a sleeping ring with work pending and no progress this long: re-check
    tx_irq_wait_us: float = 0.0  # a sparse TX round's interrupt waits this long for the RX one (0: never)
    # TX, request/response: poll this long for the next request (0: never). It sets which traffic
    # counts as request/response (requests at least 1e6/rr_poll_us per second), not the CPU it costs:
    # such a ring is polled between its requests, whatever their gap. At 400 us a ping flood on a
    # slow spell of this host (RTT 0.4-0.5 ms) fell out of it and slept: p50 0.41-0.66 ms, polled
    # 0.31-0.45 ms (1500-2000 us; five alternated pairs, four faster, one equal).
    rr_poll_us: float = 2000.0
    reply_poll: int = 1          # after a sparse TX round, run the pair's RX round at once (0: never)
    # TX, sparse requests (rounds of a few frames, no GSO frame): for warm_for_ms after the last one,
    # wake the backend's core every warm_tick_us (0: never), so that it never sleeps long between
    # requests. An idle core wakes slower the longer it slept (this host: an eventfd woke a process
    # on a core idle for 10 ms in 80-101 us p50, in 40-52 us with a 1 ms timer beside it; on hardware
    # the idle governor picks a deeper C-state when no timer is near), and the request's round then
    # runs on a colder core. Measured within one run, the tick on and off in blocks of 20 pings every
    # 10 ms, each block's median against its neighbour's: p50 -30 to -47 us (29-35 of 50, 43-49 of
    # 75 pairs faster); a prototype at 0.5 ms bought about as much as at 1 ms, at 2 ms less. The tick
    # does no work: a loop turn, about 2.5 % of a core while requests come (at 1 ms).
    warm_tick_us: float = 1000.0
    warm_for_ms: float = 1000.0
    # TX, requests at a steady pace (the gaps between the last few, more than 2 * poll_ahead_us and
    # rr_poll_us each and within warm_for_ms, within 4 * poll_ahead_us of each other: a ping every
    # 10 ms, a heartbeat): poll for the next one, kicks off, from this long before the shortest of
    # those gaps after the last request until this long after the longest (0: never); see
    # poll_ahead. Linux's hybrid block polling does the same with an I/O's expected completion. The
    # request then finds the core awake and the round's code and data warm, as a busy-polled core
    # would. Measured within one run, on and off in blocks of 20 pings every 10 ms (3000 pings),
    # each block's median against its neighbour's: p50 -106.5 us (65 of 75 pairs faster; 0.855
    # against 0.958 ms, p99 1.321 against 1.405); 1441 of 1458 windows found their request. Busy-
    # polling all the time was 28 us faster still (16 of 50 pairs slower). Cost: 0.2-0.7 s more CPU
    # over 2000 pings (1-3 % of a core while they come).
    poll_ahead_us: float = 300.0
    # Through a TAP (one queue pair, split rings), while requests come: serve the pair with the
    # request lane (one compiled call in a thread of its own that waits on the kick and the TAP
    # itself, nicsim.server.lane; it polls as rr_poll_us and poll_ahead_us say and wakes every
    # warm_tick_us) until this long passes with no request (0: never; the event loop's pumps serve
    # every request). Measured within one bench run against the lane off (p50 ms): ping 0.743
    # against 0.890, ping flood 0.114 against 0.158, udp-rr 0.073 against 0.109 (13.4k against
    # 8.69k trans/s); TCP through the TAP unchanged (a stream keeps the pumps' batches).
    lane_idle_ms: float = 1000.0

    def __post_init__(self) -> None:
        for name in ("tx_batch", "rx_batch", "irq_coalesce", "rx_backlog", "rounds_per_call", "fused_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"NotifyPolicy.{name} must be >= 1")
        for name in ("kick_batch", "rx_kick_batch", "flow_batch", "min_round", "poll_rounds", "poll_us",
                     "publish_every", "full_poll_us", "batch_wait_us", "stall_recheck_ms", "tx_irq_wait_us",
                     "rr_poll_us", "reply_poll", "warm_tick_us", "warm_for_ms", "poll_ahead_us",
                     "lane_idle_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"NotifyPolicy.{name} must be >= 0")

    def kick_target(self, *, queue_size: int, moved: int, tx: bool, nbytes: int = 0) -> int:
        """How many pending entries to sleep through before wanting a kick (0: the first one), after a
        wakeup that moved ``moved`` buffers. Capped at half the ring so a guest that stops its queue
        when the ring is nearly full (Linux: fewer than MAX_SKB_FRAGS + 2 free) still kicks first.
        Linux refills RX buffers once per NAPI poll (up to its budget, 64), so an RX batch of 64 means
        "every second refill"; the guest still holds the other half of the ring, filled, meanwhile.
        A TX wakeup whose frames (``nbytes`` in all) average more than a plain frame carried a TCP
        stream's GSO frames: TCP small queues stop that socket after a few of them until they
        complete, so a batch would never come and each wait would last ``batch_wait_us`` (two
        guests on a switch, guest->guest TCP: 1.93-2.03 -> 2.12-2.28 Gbit/s kicked at once)."""
        batch = self.kick_batch if tx else self.rx_kick_batch
        if batch == 0 or moved < max(self.flow_batch, 1) or (tx and nbytes > moved * PLAIN_FRAME):
            return 0
        return min(batch, queue_size // 2)


# The knobs ``nicsim serve`` exposes (``--poll-us``, ``--irq-coalesce``...): name -> (type, help).
POLICY_OPTIONS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "kick_batch": (int, "EVENT_IDX: while traffic flows, wake only when this many buffers are posted "
                        "(0: on every first buffer; capped at half the ring)"),
    "rx_kick_batch": (int, "EVENT_IDX: the same for the RX buffers the generator fills"),
    "batch_wait_us": (float, "look at a ring waiting for a batch after this many microseconds anyway"),
    "flow_batch": (int, "buffers a wakeup must move to count as flowing traffic"),
    "min_round": (int, "EVENT_IDX, TX traffic flowing: fewer chains than this left after a round wait "
                       "for the next batch (--kick-batch, or --batch-wait-us) instead of being chased "
                       "in small rounds; rounds of GSO frames are always chased (0: always chase)"),
    "poll_us": (float, "busy-poll this long after the last work before sleeping (0: do not busy-poll; an RX "
                         "ring whose port wakes it, a TAP's, sleeps while the port has nothing)"),
    "poll_rounds": (int, "...and at most this many empty rounds"),
    "full_poll_us": (float, "after a round that moved a whole --tx-batch/--rx-batch (the other side keeps "
                            "up), poll this long before sleeping on the kick (0: sleep at once)"),
    "rounds_per_call": (int, "rounds run back to back per event-loop callback while work is left"),
    "publish_every": (int, "a round done in one compiled call (sink TX, generator RX) publishes its used "
                           "entries every this many chains, so the other side refills meanwhile "
                           "(0: once, at the round's end)"),
    "fused_rounds": (int, "such a compiled call runs up to this many rounds back to back while --min-round "
                          "entries are pending and the driver wants no interrupt (1: one round per call)"),
    "irq_coalesce": (int, "without EVENT_IDX: interrupt once per this many used entries while work flows"),
    "tx_batch": (int, "chains taken off the TX ring per round"),
    "rx_batch": (int, "RX buffers filled per round"),
    "stall_recheck_ms": (float, "re-check a sleeping ring that has work pending and made no progress for "
                                "this many milliseconds: run a round, send a wanted interrupt (0: never)"),
    "tx_irq_wait_us": (float, "hold the TX-completion interrupt of a round that moved fewer than "
                              "--flow-batch frames (and under 16 KB: no GSO frame) until the pair's "
                              "next RX interrupt, or for this many "
                              "microseconds: a request and its reply cost one interrupt (0: never)"),
    "rr_poll_us": (float, "TX: when sparse requests come within this many microseconds of the last work "
                          "(request/response traffic), poll this long for the next one with kicks off "
                          "instead of sleeping (0: never)"),
    "warm_tick_us": (float, "TX: while sparse requests come (a few frames a round, no GSO frame), wake "
                            "the backend's core this often, so that a lone request does not find it "
                            "deep asleep (0: never)"),
    "warm_for_ms": (float, "...for this long after the last request"),
    "poll_ahead_us": (float, "TX: when requests come at a steady pace (a ping every 10 ms: the last "
                             "gaps between them within 4x this many microseconds of each other), poll "
                             "for the next one, kicks off, from this long before it is due until this "
                             "long after (0: never)"),
    "lane_idle_ms": (float, "through a TAP (one queue pair, split rings): while requests come, serve them "
                            "in a compiled lane of their own, outside the event loop, until this many "
                            "milliseconds pass with none (0: never)"),
    "reply_poll": (int, "after a TX round of a few frames (a request), run the pair's RX round at once, "
                        "in the same loop turn, to deliver a reply the port already has (a TAP's "
                        "kernel answers a ping within the write) with the held TX interrupt (0: never)"),
}


def policy_from_options(values: Mapping[str, object]) -> NotifyPolicy:
    """A policy from ``POLICY_OPTIONS`` values (``None`` keeps the default); ValueError if out of range
    or unknown."""
    unknown = set(values) - set(POLICY_OPTIONS)
    if unknown:
        raise ValueError(f"unknown policy option(s): {', '.join(sorted(unknown))}")
    given: dict[str, Any] = {k: POLICY_OPTIONS[k][0](v) for k, v in values.items() if v is not None}
    return NotifyPolicy(**given)


class PollAction(enum.Enum):
    PROCESS = "process"   # there is work: run another round now
    POLL = "poll"         # nothing now, but traffic was flowing: yield once and look again, kicks still off
    REARM = "rearm"       # enable kicks (possibly for a batch), re-check avail, then sleep


def should_interrupt(
    policy: NotifyPolicy, *, unsignalled: int, idle: bool, ring_wants: bool, event_idx: bool = False
) -> bool:
    """Whether to signal the call eventfd now.

    ``unsignalled`` is the number of used entries added since the last interrupt, ``idle`` whether the
    queue has no more work this round, ``ring_wants`` the ring's own answer (EVENT_IDX or flags),
    ``event_idx`` whether that answer came from ``used_event`` (then it is followed as is).
    """
    if unsignalled <= 0 or not ring_wants:
        return False
    if event_idx:
        return True
    if idle:
        return policy.irq_on_idle
    return unsignalled >= policy.irq_coalesce


def request_response(policy: NotifyPolicy, *, gap_us: float, last_batch: int, last_bytes: int = 0) -> bool:
    """Whether a TX ring carries request/response traffic, worth polling for (``rr_poll_us``): the
    last round that found work moved a few chains (``last_batch`` < ``flow_batch``: one request, not
    a stream) of few bytes (``last_bytes`` < ``FLOW_BYTES``: not a TCP stream's GSO frame or two) and
    came ``gap_us`` after the work before it, within the polling window. A guest that
    sends a request every 10 ms is not polled for (that would burn the core for nothing); a ping flood
    or an RPC loop is, and it then skips the kick and the backend's wakeup: measured, UDP
    request/response (sockperf) 0.22 -> 0.16 ms."""
    return 0 < gap_us < policy.rr_poll_us and _sparse(policy, last_batch, last_bytes)


def poll_action(
    policy: NotifyPolicy, *, more: bool, empty_rounds: int, idle_us: float, rr: bool = False,
    full: bool = False, pollable: bool = True, ahead: bool = False,
) -> PollAction:
    """What the pump does after a round: ``more`` if the round left work, ``empty_rounds`` how many
    consecutive rounds found nothing, ``idle_us`` microseconds since the last round that found work,
    ``rr`` whether the ring carries request/response traffic (:func:`request_response`), ``full``
    whether that last round moved a whole batch (``full_poll_us``). ``pollable`` False: busy-polling
    (``poll_us``) would find nothing the ring is not woken for anyway (an RX ring whose port has
    nothing to give: a TAP or a socket with nothing to read, which wakes the ring when it has).
    ``ahead``: the ring is inside a window in which its next request is due (:func:`poll_ahead`)."""
    if more:
        return PollAction.PROCESS
    if pollable and empty_rounds < policy.poll_rounds and idle_us < policy.poll_us:
        return PollAction.POLL
    if full and idle_us < policy.full_poll_us:
        return PollAction.POLL
    if rr and idle_us < policy.rr_poll_us:
        return PollAction.POLL
    if ahead:
        return PollAction.POLL
    return PollAction.REARM


def chase_tx(policy: NotifyPolicy, *, pending: int, moved: int, processed: int, nbytes: int) -> bool:
    """Whether a TX ring runs another round now for the ``pending`` chains a round left (else it
    sleeps for a batch: :meth:`NotifyPolicy.kick_target`). ``moved``: chains this wakeup moved so far;
    ``processed`` and ``nbytes``: the last round's chains and frame bytes. Only a packet flood
    waits (this wakeup moved a whole ``kick_batch``, ``min_round`` is on, and the round's frames
    average at most an MTU-sized one): its guest keeps posting, so the next batch's kick comes soon,
    and each wakeup then serves ~``kick_batch`` chains in one round instead of one round per few
    chains. A TCP stream (a few GSO frames, or a few MTU-sized ones, per wakeup) never waits for a
    batch it would not fill: TCP small queues hold the socket until its frames complete (measured
    with the wakeup's threshold at ``flow_batch``: guest->host TCP lost 6 %)."""
    if pending <= 0:
        return False
    if pending >= policy.min_round or policy.kick_batch == 0 or moved < policy.kick_batch:
        return True
    return nbytes > processed * PLAIN_FRAME


PLAIN_FRAME = 1536
"""Bytes a frame without GSO has at most (an MTU of 1500 and its Ethernet header, with room): a round
averaging more carried GSO frames."""

FLOW_BYTES = 16 * 1024
"""A TX round that moved this many bytes is a stream's, however few frames: one 64 KB GSO frame."""


def defer_tx_interrupt(policy: NotifyPolicy, *, processed: int, nbytes: int = 0) -> bool:
    """Whether a TX round's due interrupt may wait for the pair's RX interrupt (at most
    ``tx_irq_wait_us``; 0, the default: never, see the module's docstring). Only sparse rounds
    (request/response traffic: a ping, an RPC) wait: their reply usually follows within a round trip
    of the port, and one interrupt for both costs the guest one exit and one handler run instead of
    two. A round that moved a batch (traffic flows) is
    signalled at once: a guest whose TX ring fills waits for those completions. So is a round that
    moved ``FLOW_BYTES`` (``nbytes``: its frames' bytes), a TCP stream's GSO frames: Linux lets a
    socket have only a few of them unfreed (TCP small queues), and holding their completion for the
    peer's ACK would pace the stream by the round trip."""
    return policy.tx_irq_wait_us > 0 and _sparse(policy, processed, nbytes)


def keep_warm(policy: NotifyPolicy, *, processed: int, nbytes: int) -> bool:
    """Whether a TX round that moved ``processed`` frames (``nbytes`` in all) starts the pump's warm
    tick (``warm_tick_us``): a request, as :func:`poll_for_reply` sees it."""
    return policy.warm_tick_us > 0 and _sparse(policy, processed, nbytes)


AHEAD_GAPS = 4
"""How many of a TX ring's last gaps between requests :func:`poll_ahead` reads."""


def poll_ahead(policy: NotifyPolicy, gaps_us: Sequence[float]) -> tuple[float, float] | None:
    """When to poll for a TX ring's next request (``poll_ahead_us``), in microseconds after the request
    just served, from the gaps between its last requests (``gaps_us``, at least two; of three or more
    the one farthest from their median is left out: a late request moves no window). Requests at a
    steady pace (the gaps within ``4 * poll_ahead_us`` of each other, all too long for
    :func:`request_response` polling and for a window that would start at once, and within
    ``warm_for_ms``) give ``(start, end)``: from ``poll_ahead_us`` before the shortest gap to as long
    after the longest, so a pace that jitters is polled for across its jitter; anything else None (no
    polling: the kick serves it)."""
    ahead = policy.poll_ahead_us
    if ahead <= 0 or len(gaps_us) < 2:
        return None
    ordered = sorted(gaps_us)
    if len(ordered) > 2:
        median = ordered[len(ordered) // 2]
        del ordered[0 if median - ordered[0] > ordered[-1] - median else -1]
    shortest, longest = ordered[0], ordered[-1]
    if longest - shortest > 4 * ahead:
        return None
    if not (paced_gap(policy, shortest) and paced_gap(policy, longest)) or shortest < 2 * ahead:
        return None  # (a window that would start at once: polling between them is rr_poll_us's)
    return shortest - ahead, longest + ahead


def paced_gap(policy: NotifyPolicy, gap_us: float) -> bool:
    """Whether a gap between two requests can set a pace for :func:`poll_ahead`: not so short that
    ``rr_poll_us`` polls between them anyway, not past ``warm_for_ms`` (the first in a long while)."""
    return policy.rr_poll_us <= gap_us <= policy.warm_for_ms * 1e3


def poll_for_reply(policy: NotifyPolicy, *, processed: int, nbytes: int = 0) -> bool:
    """Whether a TX round's pair RX round runs at once, in the same loop turn (``reply_poll``): after
    a sparse round (a request, as :func:`defer_tx_interrupt` sees it) the reply is often there
    already: a TAP's kernel answers a ping inside the write, a reflecting or switched port queues it
    during the round. Delivering it then saves the loop turns (and, for a TAP, the epoll wakeup and
    its re-registration) between the request and the reply, and the reply's interrupt carries the
    held TX one. Under TCG on an idle backend core each loop turn costs tens of microseconds. A
    stream's rounds (a batch, or a GSO frame) leave RX to its own wakeups, as before."""
    return policy.reply_poll > 0 and _sparse(policy, processed, nbytes)


STREAM_WINDOW_US = 1000.0
"""How recent a ring's last busy round must be for the ring to count as carrying a stream."""


def streaming(policy: NotifyPolicy, *, last_batch: int, last_bytes: int, idle_us: float) -> bool:
    """Whether a ring carries a stream: its last round that found work, ``idle_us`` ago, moved a
    batch or a GSO frame's bytes (``last_batch``, ``last_bytes``). A TX ring's sparse rounds next to
    a streaming RX ring are a TCP receiver's ACKs, not requests: neither :func:`poll_for_reply` nor
    :func:`request_response` polling applies to them (measured, host->guest TCP through the tap:
    4.5 -> 5.1 Gbit/s without them; the RX ring's own wakeups bring its batches whole)."""
    return idle_us < STREAM_WINDOW_US and not _sparse(policy, last_batch, last_bytes)


def is_request(policy: NotifyPolicy, *, processed: int, nbytes: int) -> bool:
    """Whether a TX round that moved ``processed`` frames (``nbytes`` in all) looks like a request: a
    few frames (under ``flow_batch``) and no GSO frame's bytes."""
    return _sparse(policy, processed, nbytes)


def _sparse(policy: NotifyPolicy, processed: int, nbytes: int) -> bool:
    return processed < max(policy.flow_batch, 1) and nbytes < FLOW_BYTES


def is_stalled(*, pending: bool, progress: tuple[int, ...], previous: tuple[int, ...] | None) -> bool:
    """Whether a sleeping ring is stalled, at one watchdog tick (every ``stall_recheck_ms``).

    ``pending``: the ring has work now (avail entries not taken, RX frames waiting with buffers
    posted, or used entries past the last interrupt that the ring says the driver wants to hear
    about). ``progress``: the device's indices now (``last_avail_idx``, ``used_idx``); ``previous``:
    what they were at the last tick if the ring had work then too, else None. Stalled means work was
    pending for a whole tick and nothing moved: a lost kick or a lost interrupt. (Work that arrived
    during the tick, a kick still on its way, or a ring moving slowly, is not a stall.)
    """
    return pending and previous is not None and progress == previous


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """``--kick-batch``, ``--poll-us``, ``--irq-coalesce``... one option per ``POLICY_OPTIONS`` knob,
    default ``None`` (the policy's own default); read them back with :func:`policy_from_args`."""
    group = parser.add_argument_group("notification policy (defaults suit a Linux guest under TCG)")
    defaults = NotifyPolicy()
    for name, (kind, text) in POLICY_OPTIONS.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, metavar="N",
                           help=f"{text} (default: {getattr(defaults, name)})")  # fmt: skip


def policy_from_args(args: argparse.Namespace) -> NotifyPolicy:
    """The policy the options of :func:`add_policy_arguments` describe; ValueError if out of range."""
    return policy_from_options({name: getattr(args, name, None) for name in POLICY_OPTIONS})
