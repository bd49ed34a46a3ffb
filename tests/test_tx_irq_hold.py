"""Request/response traffic: a sparse TX round's interrupt waits for the pair's RX interrupt
(``tx_irq_wait_us``), so a request and its reply cost the guest one interrupt; it is never lost: the RX
signal, the deadline, a batch round or the ring stopping sends it. And a TX ring whose sparse requests
come back within ``rr_poll_us`` is polled for, with kicks off, instead of put to sleep.

The backend is the real server in the test's loop and the frontend sleeps on the call eventfds, so an
interrupt that never came fails the wait. What the pump did is read from its counters: ``irqs_held``
(a TX interrupt waited), ``irqs_merged`` (the RX ring's signal sent it); whether the frontend had to
kick is what the ring told it (NO_NOTIFY / avail_event).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from nicsim.frontend import CompletionTimeout, VhostUserFrontend
from nicsim.ports import Port, ReflectPort, SinkPort
from nicsim.server import Server, Session
from nicsim.server.pump import RingPump
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.policy import (
    FLOW_BYTES,
    NotifyPolicy,
    PollAction,
    defer_tx_interrupt,
    poll_action,
    request_response,
)
from tests.hardening import frame

RX, TX = 0, 1
LONG_WAIT_US = 30e6  # a deadline no test reaches: only the RX signal can send the held interrupt
DEADLINE_US = 20e3


@asynccontextmanager
async def rig(
    tmp_path: Path, port: Callable[[], Port], **policy: float
) -> AsyncIterator[tuple[VhostUserFrontend, Session]]:
    make = lambda: VirtioNetDevice(port=port(), policy=NotifyPolicy(**policy))  # noqa: E731
    async with Server([tmp_path / "s.sock"], make) as server:
        fe = await VhostUserFrontend.connect(tmp_path / "s.sock")
        try:
            await fe.handshake(event_idx=True)
            await fe.start()
            sess = await asyncio.wait_for(server.endpoints[0].wait_session(), 10)
            yield fe, sess
        finally:
            await fe.close()


def tx_pump(sess: Session) -> RingPump:
    return sess.pumps[TX]


def test_only_sparse_rounds_wait() -> None:
    policy = NotifyPolicy(flow_batch=8, tx_irq_wait_us=1000)
    assert defer_tx_interrupt(policy, processed=1)
    assert defer_tx_interrupt(policy, processed=7)
    assert not defer_tx_interrupt(policy, processed=8)
    assert not defer_tx_interrupt(NotifyPolicy(tx_irq_wait_us=0), processed=1)
    # One 64 KB GSO frame is a stream's round, not a request: its completion goes at once.
    assert defer_tx_interrupt(policy, processed=1, nbytes=1514)
    assert not defer_tx_interrupt(policy, processed=1, nbytes=65000)


@pytest.mark.parametrize(("policy", "held"), [({"tx_irq_wait_us": LONG_WAIT_US}, 1), ({}, 0)],
                         ids=["held", "default"])
async def test_a_request_and_its_reply_share_one_interrupt_only_when_held(
    tmp_path: Path, policy: dict[str, float], held: int
) -> None:
    """Held, the request's TX interrupt goes with its reply's; by default (nothing held) it goes as its
    round ends, and the reply's RX interrupt follows on its own (measured faster for the guest)."""
    async with rig(tmp_path, ReflectPort, **policy) as (fe, sess):
        fe.post_rx(4)
        fe.transmit([frame(0)])
        # Both waits finish long before any deadline: held, the reply's RX interrupt sent the TX one.
        assert len(await fe.wait_used(TX, 1, timeout=5)) == 1
        assert len(await fe.wait_used(RX, 1, timeout=5)) == 1
        counters = tx_pump(sess).counters
        assert counters["irqs_held"] == held and counters["irqs_merged"] == held
        assert fe.interrupts[TX] >= 1 and fe.interrupts[RX] >= 1


async def test_a_held_interrupt_with_no_reply_goes_out_at_its_deadline(tmp_path: Path) -> None:
    async with rig(tmp_path, SinkPort, tx_irq_wait_us=DEADLINE_US) as (fe, sess):
        fe.post_rx(4)  # the RX ring is live, so the TX interrupt waits for it; no reply ever comes
        fe.transmit([frame(0)])
        assert len(await fe.wait_used(TX, 1, timeout=5)) == 1
        counters = tx_pump(sess).counters
        assert counters["irqs_held"] == 1 and counters["irqs_merged"] == 0
        assert fe.interrupts[TX] == 1 and fe.interrupts[RX] == 0


async def test_without_the_deadline_a_held_interrupt_would_be_missed(tmp_path: Path) -> None:
    """The control for the test above: with a deadline past the wait, the wait fails (so it is the
    deadline, not some other signal, that delivered the interrupt there)."""
    async with rig(tmp_path, SinkPort, tx_irq_wait_us=LONG_WAIT_US) as (fe, sess):
        fe.post_rx(4)
        fe.transmit([frame(0)])
        with pytest.raises(CompletionTimeout, match="missing interrupt"):
            await fe.wait_used(TX, 1, timeout=0.5)
        assert tx_pump(sess).counters["irqs_held"] == 1
        # Stopping the ring sends what it held: the used entry is announced, not dropped.
        sess.pumps[TX].deactivate()
        assert fe.interrupts[TX] == 0
        await asyncio.sleep(0)
        assert len(await fe.wait_used(TX, 1, timeout=5)) == 1


async def test_a_batch_round_is_signalled_at_once(tmp_path: Path) -> None:
    async with rig(tmp_path, SinkPort, tx_irq_wait_us=LONG_WAIT_US, flow_batch=8) as (fe, sess):
        fe.post_rx(4)
        fe.transmit([frame(i) for i in range(16)])
        assert len(await fe.wait_used(TX, 16, timeout=5)) == 16
        assert tx_pump(sess).counters["irqs_held"] == 0


async def test_with_the_wait_off_every_interrupt_goes_at_once(tmp_path: Path) -> None:
    async with rig(tmp_path, SinkPort, tx_irq_wait_us=0) as (fe, sess):
        fe.post_rx(4)
        for i in range(3):
            fe.transmit([frame(i)])
            assert len(await fe.wait_used(TX, 1, timeout=5)) == 1
        assert tx_pump(sess).counters["irqs_held"] == 0


async def test_a_tx_ring_without_a_live_rx_ring_does_not_hold(tmp_path: Path) -> None:
    """Nothing would send a held interrupt early when the pair's RX ring is not running."""
    async with rig(tmp_path, SinkPort, tx_irq_wait_us=LONG_WAIT_US) as (fe, sess):
        sess.pumps[RX].deactivate()
        fe.transmit([frame(0)])
        assert len(await fe.wait_used(TX, 1, timeout=5)) == 1
        assert tx_pump(sess).counters["irqs_held"] == 0


# -- request/response polling (rr_poll_us) --------------------------------------------------------


def test_request_response_is_sparse_work_that_comes_back_soon() -> None:
    policy = NotifyPolicy(rr_poll_us=400, flow_batch=8)
    assert request_response(policy, gap_us=150, last_batch=1)
    assert not request_response(policy, gap_us=10_000, last_batch=1)  # a ping every 10 ms: sleep
    assert not request_response(policy, gap_us=150, last_batch=64)  # a stream: the batching policy
    assert not request_response(policy, gap_us=150, last_batch=1, last_bytes=FLOW_BYTES)  # a GSO frame
    assert not request_response(policy, gap_us=0, last_batch=1)  # the first request: nothing to go by
    assert not request_response(NotifyPolicy(rr_poll_us=0), gap_us=150, last_batch=1)
    assert poll_action(policy, more=False, empty_rounds=5, idle_us=100, rr=True) is PollAction.POLL
    assert poll_action(policy, more=False, empty_rounds=5, idle_us=500, rr=True) is PollAction.REARM
    assert poll_action(policy, more=False, empty_rounds=0, idle_us=100, rr=False) is PollAction.REARM


async def _exchange(fe: VhostUserFrontend, n: int) -> list[bool]:
    """``n`` requests, one outstanding, each sent as soon as its reply is in; whether each kicked."""
    kicked = []
    for i in range(n):
        q = fe.queues[TX]
        q.post_tx(frame(i))
        kicked.append(fe.kick(TX))
        assert len(await fe.wait_used(RX, 1, timeout=5)) == 1
        fe.post_rx(1)
    return kicked


async def test_back_to_back_requests_are_polled_for_without_kicks(tmp_path: Path) -> None:
    # A window far above a loop turn, so the test does not depend on this machine's speed.
    async with rig(tmp_path, ReflectPort, rr_poll_us=2e6, tx_irq_wait_us=0) as (fe, sess):
        fe.post_rx(4)
        kicked = await _exchange(fe, 6)
        # The first two requests wake the backend; from the second on it sees request/response
        # traffic and keeps polling with kicks off, so the guest never needs to kick again.
        assert kicked[:1] == [True] and not any(kicked[2:])
        assert int(sess.device.stats.kicks[TX]) <= 2


async def test_without_the_window_every_request_kicks(tmp_path: Path) -> None:
    async with rig(tmp_path, ReflectPort, rr_poll_us=0, tx_irq_wait_us=0, poll_ahead_us=0) as (fe, sess):
        assert sess.pumps[TX].active
        fe.post_rx(4)
        kicked = await _exchange(fe, 6)
        assert all(kicked)


async def test_after_polling_a_request_stream_the_ring_sleeps_wanting_the_next_kick_at_once(
    tmp_path: Path,
) -> None:
    """Polling served many requests one by one; the sleep after it must not ask for a batch of kicks
    (the guest would then wait ``batch_wait_us`` for its next reply)."""
    async with rig(tmp_path, ReflectPort, rr_poll_us=50e3, tx_irq_wait_us=0, flow_batch=8) as (fe, sess):
        fe.post_rx(4)
        await _exchange(fe, 12)  # more requests than flow_batch within one polling stretch
        pump = tx_pump(sess)
        assert pump.busy  # still polling for the next request
        slept = pump.counters["sleeps"]
        async with asyncio.timeout(5):
            while pump.counters["sleeps"] == slept:  # the window passes with no request: it sleeps
                await asyncio.sleep(0.01)
        assert pump.counters["batch_sleeps"] == 0
        assert await _exchange(fe, 1) == [True]  # the ring asks for the very next request's kick
