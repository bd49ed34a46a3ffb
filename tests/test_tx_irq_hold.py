"""A sparse TX round's interrupt waits for the pair's RX interrupt (``tx_irq_wait_us``), so a request
and its reply cost the guest one interrupt; it is never lost: the RX signal, the deadline, a batch
round or the ring stopping sends it.

The backend is the real server in the test's loop and the frontend sleeps on the call eventfds, so an
interrupt that never came fails the wait. What the pump did is read from its counters: ``irqs_held``
(a TX interrupt waited), ``irqs_merged`` (the RX ring's signal sent it).
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
from nicsim.virtio.policy import NotifyPolicy, defer_tx_interrupt
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
    policy = NotifyPolicy(flow_batch=8)
    assert defer_tx_interrupt(policy, processed=1)
    assert defer_tx_interrupt(policy, processed=7)
    assert not defer_tx_interrupt(policy, processed=8)
    assert not defer_tx_interrupt(NotifyPolicy(tx_irq_wait_us=0), processed=1)


async def test_a_request_and_its_reply_share_one_interrupt(tmp_path: Path) -> None:
    async with rig(tmp_path, ReflectPort, tx_irq_wait_us=LONG_WAIT_US) as (fe, sess):
        fe.post_rx(4)
        fe.transmit([frame(0)])
        # Both waits finish long before the deadline: the reply's RX interrupt sent the held TX one.
        assert len(await fe.wait_used(TX, 1, timeout=5)) == 1
        assert len(await fe.wait_used(RX, 1, timeout=5)) == 1
        counters = tx_pump(sess).counters
        assert counters["irqs_held"] == 1 and counters["irqs_merged"] == 1
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
