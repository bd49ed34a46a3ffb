"""The request lane (``nicsim.ports.lane_kernel``, its arguments and books in ``nicsim.virtio.lane``):
one compiled call, in a thread of its own, serves a queue pair's requests through a real TAP in a
throwaway namespace. The guest is the driver model in ``rings``; it kicks the TX ring's eventfd as a
guest would when ``should_kick`` says so, and each test waits on the call eventfds with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nicsim.ports import lane_kernel
from nicsim.ports.tap import TapConfig, TapPort
from nicsim.server import lane as server_lane
from nicsim.virtio import lane_layout as lay
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.lane import LaneCall, LaneSettings
from nicsim.virtio.policy import NotifyPolicy
from qemu.testvm import Netns
from rings import kernels
from rings.driver import DriverQueue
from tests.test_tap_port import EVT, IND, V1, start
from tests.test_tap_send_irq import echo_request, is_echo_reply, quiet_tapns  # noqa: F401  (the fixture)
from tests.test_tx_irq_hold import rig as session_rig

RX, TX = 0, 1
HDR_LEN = 12
WAIT_S = 5.0


@pytest.fixture
def compiled() -> Iterator[None]:
    assert lane_kernel.enable(), kernels.engine()
    assert lane_kernel.kernel() is not None
    yield
    kernels.disable()


class Rig:
    """A device on a TAP with the driver model's rings, and the lane's eventfds."""

    def __init__(self, ns: Netns, features: int, policy: NotifyPolicy | None = None) -> None:
        self.port = TapPort(TapConfig(netns=ns.name, ifname="tap0", offload=False))
        self.dev = VirtioNetDevice(port=self.port, policy=policy or NotifyPolicy())
        self.rx, self.tx = start(self.dev, features)
        self.rx.post_rx(count=16)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.stop = os.eventfd(0, os.EFD_NONBLOCK)
        self.tx_call = os.eventfd(0, os.EFD_NONBLOCK)
        self.rx_call = os.eventfd(0, os.EFD_NONBLOCK)
        self.thread: threading.Thread | None = None
        self.call: LaneCall | None = None

    def settings(self, **kw: Any) -> LaneSettings:
        values: dict[str, Any] = dict(kick_fd=self.kick, stop_fd=self.stop, tx_call=self.tx_call,
                                      rx_call=self.rx_call, spin_ns=0, idle_ns=int(WAIT_S * 1e9), warm_ns=0,
                                      burst_chains=8, last_request_ns=time.monotonic_ns())  # fmt: skip
        values.update(kw)
        return LaneSettings(**values)

    def run(self, **kw: Any) -> LaneCall:
        call = self.dev.lane_call(0, self.settings(**kw))
        assert call is not None
        self.call = call
        self.thread = threading.Thread(target=call.run)
        self.thread.start()
        return call

    def join(self) -> LaneCall:
        assert self.thread is not None and self.call is not None
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the lane did not return"
        self.dev.lane_settle(self.call)
        return self.call

    def end(self) -> LaneCall:
        """Ask the lane to return, as ``nicsim.server.lane.RequestLane.stop`` does."""
        assert self.call is not None
        self.call.state[lay.ST_STOP] = 1
        os.eventfd_write(self.stop, 1)
        return self.join()

    def send(self, q: DriverQueue, frame: bytes) -> None:
        q.post_tx(frame, header=bytes(HDR_LEN))
        if q.should_kick():
            os.eventfd_write(self.kick, 1)

    def close(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.end()
        for fd in (self.kick, self.stop, self.tx_call, self.rx_call):
            os.close(fd)
        self.dev.shutdown()
        self.port.close()


@pytest.fixture
def rig(quiet_tapns: Netns, compiled: None) -> Iterator[Callable[..., Rig]]:  # noqa: F811
    made: list[Rig] = []

    def make(features: int = V1 | EVT | IND, policy: NotifyPolicy | None = None) -> Rig:
        r = Rig(quiet_tapns, features, policy)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def wait_signalled(fd: int) -> int:
    """Wait (at most WAIT_S) for the eventfd ``fd`` to be written; returns its count, read."""
    ready, _, _ = select.select([fd], [], [], WAIT_S)
    assert ready, "no interrupt came"
    return os.eventfd_read(fd)


def replies(q: DriverQueue, want: int) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < want and time.monotonic() < deadline:
        got += [c.data for c in q.reap() if c.data is not None]
        if len(got) < want:
            time.sleep(0.002)
    return got


@pytest.mark.parametrize("features", [V1 | EVT | IND, V1 | IND], ids=["event_idx", "flags"])
def test_the_lane_answers_each_kicked_request_with_the_reply_and_both_interrupts(
    rig: Callable[..., Rig], features: int
) -> None:
    r = rig(features)
    r.run()
    for seq in range(1, 6):
        r.send(r.tx, echo_request(seq))
        assert wait_signalled(r.rx_call) >= 1
        got = replies(r.rx, 1)
        assert len(got) == 1 and is_echo_reply(got[0], seq)
        assert len(r.tx.reap()) == 1  # the request's chain came back
    call = r.end()
    assert call.why == lay.WHY_STOP
    c = call.counts
    assert (c[lay.C_TX_CHAINS], c[lay.C_TX_FRAMES], c[lay.C_RX_FRAMES]) == (5, 5, 5)
    assert c[lay.C_KICKS] >= 1 and c[lay.C_RX_IRQS] == 5
    snap = r.dev.snapshot()
    assert snap["port"]["tx_frames"] == 5 and snap["port"]["rx_frames"] == 5
    queues = snap["queues"]
    assert queues[TX]["packets"] == 5 and queues[RX]["packets"] == 5
    assert queues[RX]["interrupts"] == 5
    assert r.dev.pool.usage == 0  # every descriptor a round took is back
    # The device's rings carry on where the lane left them: the general path serves the next one.
    r.send(r.tx, echo_request(9))
    r.dev.process_tx(TX)
    deadline = time.monotonic() + WAIT_S
    after: list[bytes] = []
    while not after and time.monotonic() < deadline:
        r.dev.poll_rx(0)
        after = [c.data for c in r.rx.reap() if c.data is not None]
    assert after and is_echo_reply(after[0], 9)


def test_the_lane_returns_when_no_request_comes(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.run(idle_ns=50_000_000)
    call = r.join()
    assert call.why == lay.WHY_IDLE
    assert call.counts[lay.C_TX_CHAINS] == 0


def test_a_burst_goes_back_to_the_pumps_untouched(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.run(burst_chains=2)
    for seq in range(3):
        r.tx.post_tx(echo_request(seq), header=bytes(HDR_LEN))
    os.eventfd_write(r.kick, 1)
    call = r.join()
    assert call.why == lay.WHY_BURST
    assert call.counts[lay.C_TX_CHAINS] == 0
    assert r.dev.process_tx(TX).processed == 3  # still in the ring, for the general path


def test_a_frame_the_send_round_declines_is_left_for_the_general_path(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.run()
    r.send(r.tx, b"\x01" * 8)  # shorter than an Ethernet header: a runt the general path drops
    call = r.join()
    assert call.why == lay.WHY_DECLINED
    assert call.counts[lay.C_TX_CHAINS] == 0
    assert r.dev.process_tx(TX).dropped == 1
    assert r.dev.pool.usage == 0


def test_a_reply_with_no_buffer_posted_ends_the_lane_and_waits_in_the_tap(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.run()
    for seq in range(16):  # the 16 posted buffers take 16 replies
        r.send(r.tx, echo_request(seq))
        wait_signalled(r.rx_call)
        assert len(replies(r.rx, 1)) == 1  # (reaped: the driver's used_event asks for the next one)
    r.send(r.tx, echo_request(99))
    call = r.join()
    assert call.why == lay.WHY_NO_BUFFER
    assert (call.counts[lay.C_TX_CHAINS], call.counts[lay.C_RX_FRAMES]) == (17, 16)
    r.rx.post_rx(count=4)  # the general path delivers the 17th reply from the TAP
    r.dev.poll_rx(0)
    got = replies(r.rx, 1)
    assert len(got) == 1 and is_echo_reply(got[0], 99)


def test_a_lane_polling_for_the_next_request_returns_at_once_when_asked(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.run(spin_ns=60_000_000_000)  # requests close together: it polls for a minute after each
    for seq in range(2):
        r.send(r.tx, echo_request(seq))
        wait_signalled(r.rx_call)
        assert len(replies(r.rx, 1)) == 1
    time.sleep(0.05)
    began = time.monotonic()
    call = r.end()
    assert call.why == lay.WHY_STOP and time.monotonic() - began < 1.0
    assert call.counts[lay.C_SLEEPS] <= 1  # (it polled, not slept, after the second request)


@pytest.mark.parametrize("features", [V1 | EVT | IND, V1 | IND], ids=["event_idx", "flags"])
def test_a_quiet_ring_owed_an_interrupt_gets_it_at_a_warm_wakeup(
    rig: Callable[..., Rig], features: int
) -> None:
    """The pumps' watchdog is off while the lane holds the rings: the lane re-checks a ring that has
    been quiet for ``stall_recheck_ms`` at its warm wakeups, and sends the interrupt it is owed. The
    driver here loses one on purpose: it re-enables interrupts after the reply was published and
    waits without looking (a real driver's race, which the re-check is there for)."""
    r = rig(features)
    r.run(warm_ns=1_000_000)
    r.rx.disable_interrupts()
    r.send(r.tx, echo_request(1))
    wait_signalled(r.tx_call)
    deadline = time.monotonic() + WAIT_S
    while r.rx.used_pending() == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert r.rx.used_pending() == 1
    assert r.rx.enable_interrupts()  # the reply is there: a driver that waits now waits for good...
    assert wait_signalled(r.rx_call) == 1  # ...unless the device re-checks
    call = r.end()
    assert call.counts[lay.C_RX_RECHECKS] == 1 and call.counts[lay.C_TX_RECHECKS] == 0
    assert r.dev.snapshot()["queues"][RX]["stall_rechecks"] == 1
    got = replies(r.rx, 1)
    assert len(got) == 1 and is_echo_reply(got[0], 1)


def test_requests_at_a_steady_pace_are_polled_for_and_need_no_kick(rig: Callable[..., Rig]) -> None:
    """Requests 20 ms apart: from the third on, the lane polls for the next one from ``ahead_ns``
    before it is due (as the pump's poll-ahead does), so the guest is told not to kick for it."""
    r = rig()
    r.run(spin_ns=1_000_000, ahead_ns=4_000_000, paced_max_ns=1_000_000_000)
    kicked = []
    for seq in range(8):
        r.tx.post_tx(echo_request(seq), header=bytes(HDR_LEN))
        kicked.append(r.tx.should_kick())
        if kicked[-1]:
            os.eventfd_write(r.kick, 1)
        wait_signalled(r.rx_call)
        assert len(replies(r.rx, 1)) == 1
        time.sleep(0.02)
    call = r.end()
    c = call.counts
    assert c[lay.C_TX_CHAINS] == 8
    assert c[lay.C_AHEAD] >= 1 and c[lay.C_AHEAD_HITS] >= 1
    assert not all(kicked[3:]), kicked  # a request posted inside a window: kicks were off
    assert kicked[0]  # (the first: nothing to go by, the lane slept on the kick)


# -- the event loop's side: a session hands a pair to its lane and takes it back ------------------------


def tap_port(ns: Netns) -> Callable[[], TapPort]:
    return lambda: TapPort(TapConfig(netns=ns.name, ifname="tap0", offload=False))


async def test_a_session_serves_requests_in_its_lane_and_takes_the_rings_back_for_a_message(
    tmp_path: Path, quiet_tapns: Netns, compiled: None  # noqa: F811
) -> None:
    async with session_rig(tmp_path, tap_port(quiet_tapns), lane_idle_ms=5000) as (fe, sess):
        fe.post_rx(16)
        lane = sess.lanes[0]
        for seq in range(6):
            fe.transmit([echo_request(seq)])
            got = await fe.wait_used(RX, 1, timeout=WAIT_S)
            assert got[0].data is not None and is_echo_reply(got[0].data, seq)
            assert len(await fe.wait_used(TX, 1, timeout=WAIT_S)) == 1
        assert lane.running and sess.pumps[TX].parked and sess.pumps[RX].parked
        await fe.get_features()  # any message: the loop owns the rings while it is handled
        assert not lane.running and not sess.pumps[TX].parked
        counters = lane.snapshot()
        assert counters["lane_runs"] >= 1 and counters["lane_end_stop"] >= 1
        # The first request went through the pumps (it offered the lane the pair); the rest through it.
        assert counters["lane_tx_chains"] == 5 and counters["lane_rx_frames"] == 5
        fe.transmit([echo_request(7)])  # the pumps serve it, and offer the lane the pair again
        got = await fe.wait_used(RX, 1, timeout=WAIT_S)
        assert got[0].data is not None and is_echo_reply(got[0].data, 7)
        snap = sess.snapshot()
        assert snap["port"]["tx_frames"] == 7 and snap["port"]["rx_frames"] == 7
        assert snap["queues"][TX]["packets"] == 7 and snap["queues"][RX]["packets"] == 7
        assert await fe.stop_ring(TX) == 7  # GET_VRING_BASE: the lane's last_avail_idx came back
        assert sess.device.pool.usage == 0


async def test_with_lane_idle_ms_0_the_pumps_serve_every_request(
    tmp_path: Path, quiet_tapns: Netns, compiled: None  # noqa: F811
) -> None:
    async with session_rig(tmp_path, tap_port(quiet_tapns), lane_idle_ms=0) as (fe, sess):
        fe.post_rx(8)
        for seq in range(3):
            fe.transmit([echo_request(seq)])
            await fe.wait_used(RX, 1, timeout=WAIT_S)
        assert sess.lanes[0].snapshot()["lane_runs"] == 0


@pytest.mark.parametrize("backoff_s", [60.0, 0.0])
async def test_after_traffic_takes_the_pair_back_the_lane_waits_before_taking_it_again(
    tmp_path: Path, quiet_tapns: Netns, compiled: None, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    backoff_s: float,
) -> None:
    """A frame the lane does not take (here a runt, which the general path drops and counts) gives
    the pair back to the pumps, and the next requests stay with them for the backoff: a TCP
    sender's small rounds between its GSO frames would otherwise hand the pair over again and again."""
    monkeypatch.setattr(server_lane, "_BACKOFF_S", backoff_s)
    async with session_rig(tmp_path, tap_port(quiet_tapns), lane_idle_ms=5000) as (fe, sess):
        fe.post_rx(16)
        lane = sess.lanes[0]
        for seq in range(2):
            fe.transmit([echo_request(seq)])
            await fe.wait_used(RX, 1, timeout=WAIT_S)
        assert lane.running
        fe.transmit([b"\x01" * 8])
        await fe.wait_used(TX, 3, timeout=WAIT_S)
        async with asyncio.timeout(WAIT_S):
            while not lane.snapshot()["lane_end_declined"]:
                await asyncio.sleep(0.001)
        runs = lane.snapshot()["lane_runs"]
        for seq in range(2, 4):
            fe.transmit([echo_request(seq)])
            await fe.wait_used(RX, 1, timeout=WAIT_S)
        # Without the backoff the pumps' round of the runt, or the next request's, handed the pair over again.
        assert lane.running == (not backoff_s)
        if backoff_s:
            assert lane.snapshot()["lane_runs"] == runs
        assert sess.snapshot()["queues"][TX]["drops"] == {"runt": 1}
