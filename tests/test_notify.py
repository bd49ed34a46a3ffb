"""RingPump on a real event loop with real eventfds and the driver model on the other side: a kick
wakes it, it interrupts only when the guest asked, it sleeps on the kick eventfd (no rounds while
idle), and while traffic flows it asks for the kick only once a batch is posted, with a timer for a
guest that stops short."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from nicsim.ports import GeneratorConfig, GeneratorPort, Port, SinkPort
from nicsim.ports.base import TxFrames
from nicsim.server.pump import RingPump
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from nicsim.virtio.policy import NotifyPolicy
from rings.driver import DriverQueue, GuestDriver, GuestRam
from rings.driver_packed import PackedDriverQueue
from tests.hardening import until

FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX)
FRAME = bytes(60)


class Rig:
    def __init__(self, port: Port, policy: NotifyPolicy, index: int, *, packed: bool = False) -> None:
        self.rx: DriverQueue | PackedDriverQueue
        self.tx: DriverQueue | PackedDriverQueue
        if packed:
            ram = GuestRam()
            self.rx = PackedDriverQueue(ram, index=0, size=256, event_idx=True)
            self.tx = PackedDriverQueue(ram, index=1, size=256, event_idx=True)
            memory = ram.memory
        else:
            drv = GuestDriver()
            self.rx, self.tx = drv.add_queue(0, 256, event_idx=True), drv.add_queue(1, 256, event_idx=True)
            memory = drv.memory
        self.dev = VirtioNetDevice(port=port, policy=policy)
        self.dev.set_features(FEATURES | (1 << VIRTIO_F_RING_PACKED if packed else 0))
        self.dev.set_memory(memory)
        self.dev.start_queue(0, self.rx.device_queue())
        self.dev.start_queue(1, self.tx.device_queue())
        self.pump = RingPump(asyncio.get_running_loop(), self.dev, index)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.pump.set_kick(os.dup(self.kick))
        self.pump.set_call(os.dup(self.call))

    @property
    def q(self) -> DriverQueue | PackedDriverQueue:
        return self.tx if self.pump.index == 1 else self.rx

    def post(self, n: int) -> bool:
        """Post ``n`` buffers the way Linux does: publish, then kick if the device asked for it.
        Returns whether it kicked."""
        for _ in range(n):
            if self.pump.index == 1:
                self.tx.post_tx(FRAME)
            else:
                self.rx.post_rx(count=1)
        if self.q.should_kick():
            os.eventfd_write(self.kick, 1)
            return True
        return False

    def kick_pending(self) -> bool:
        return bool(select.select([self.kick], [], [], 0)[0])

    def asleep(self, *, timer_beyond: float | None = None) -> bool:
        """The pump sleeps: no round is scheduled and no kick is pending, so no round can run until the
        guest kicks, the port wakes the ring or a timer fires. ``timer_beyond``: a timer must be set,
        at least that many seconds away (the batch timer); otherwise there must be none. A state, not
        a time: what the pump would do later is decided by what it has scheduled now."""
        handle = self.pump._handle
        if self.pump._busy or self.kick_pending():
            return False
        if timer_beyond is None:
            return handle is None
        loop = asyncio.get_running_loop()
        return isinstance(handle, asyncio.TimerHandle) and handle.when() - loop.time() > timer_beyond

    def interrupted(self) -> bool:
        if not select.select([self.call], [], [], 0)[0]:
            return False
        os.eventfd_read(self.call)
        return True

    def close(self) -> None:
        self.pump.close()
        self.dev.shutdown()
        os.close(self.kick)
        os.close(self.call)


@contextlib.asynccontextmanager
async def active(rig: Rig) -> AsyncIterator[Rig]:
    """The rig's pump activated and settled (its first look at the ring done); closed at the end."""
    try:
        rig.pump.activate()
        await settle(rig)
        yield rig
    finally:
        rig.close()


async def settle(rig: Rig, *, until: int | None = None, limit: int = 2000) -> None:
    """Run the loop until the device has moved ``until`` packets (or until the pump sleeps, perhaps
    with a batch timer set)."""
    q = rig.pump.index
    for _ in range(limit):
        await asyncio.sleep(0)
        if until is None and not rig.pump._busy:
            return
        if until is not None and int(rig.dev.stats.packets[q]) >= until:
            return
    raise AssertionError(f"no progress: {rig.dev.stats.packets[q]} packets, pump {rig.pump.snapshot()}")


async def test_a_kick_wakes_the_pump_which_interrupts_once_and_sleeps() -> None:
    rig = Rig(SinkPort(), NotifyPolicy(), 1)
    try:
        rig.pump.activate()
        await settle(rig)
        rounds = rig.pump.snapshot()["rounds"]
        rig.post(3)  # sparse: kicks were armed for the first buffer
        await settle(rig, until=3)
        await settle(rig)
        assert rig.pump.snapshot()["wakeups_kick"] == 1
        assert rig.interrupted()  # a fresh driver wants every used entry (used_event 0)
        assert len(rig.tx.reap()) == 3
        assert rig.pump.snapshot()["rounds"] > rounds
        assert rig.asleep()  # on the kick eventfd, no polling: nothing runs until the next kick
    finally:
        rig.close()


async def test_flowing_tx_sleeps_through_a_batch_then_a_kick_serves_it() -> None:
    rig = Rig(SinkPort(), NotifyPolicy(kick_batch=32, flow_batch=8, batch_wait_us=60e6), 1)
    try:
        rig.pump.activate()
        await settle(rig)
        rig.post(20)  # first kick; 20 buffers moved: traffic flows, re-armed for a batch of 32
        await settle(rig, until=20)
        await settle(rig)
        assert rig.pump.snapshot()["batch_sleeps"] == 1
        rig.tx.reap()
        assert not rig.post(32)  # exactly the batch: no kick yet...
        assert rig.asleep(timer_beyond=30)  # ...and the pump waits for it (or its 60 s timer): nothing moves
        assert int(rig.dev.stats.packets[1]) == 20
        assert rig.post(1)  # the 33rd passes avail_event: kick
        await settle(rig, until=53)
        assert rig.pump.snapshot()["wakeups_kick"] == 2
    finally:
        rig.close()


class PostingSink(SinkPort):
    """A sink during whose first ``times`` transmits the guest posts ``n`` more frames: a guest that
    keeps posting while the backend runs its round."""

    def __init__(self, n: int, times: int) -> None:
        super().__init__()
        self.rig: Rig | None = None
        self.n, self.times = n, times

    def transmit(self, batch: TxFrames) -> bool:
        done = super().transmit(batch)
        if self.times and self.rig is not None:
            self.times -= 1
            for _ in range(self.n):
                self.rig.tx.post_tx(FRAME)
        return done


def _trickle_rig(min_round: int, *, packed: bool = False) -> tuple[Rig, PostingSink]:
    port = PostingSink(3, times=5)
    rig = Rig(port, NotifyPolicy(kick_batch=32, min_round=min_round, batch_wait_us=60e6), 1, packed=packed)
    port.rig = rig
    return rig, port


async def test_a_flood_leaves_its_trickle_for_the_next_batch_instead_of_chasing_it() -> None:
    rig, _ = _trickle_rig(min_round=8)
    async with active(rig):
        assert rig.post(40)  # a flood: the wakeup's first round moves a whole batch (32) and more...
        await settle(rig, until=40)
        await settle(rig)
        # ...and the 3 chains posted during it wait for the next batch's kick (or its 60 s timer).
        assert int(rig.dev.stats.packets[1]) == 40
        assert rig.asleep(timer_beyond=30)
        assert rig.pump.snapshot()["rounds"] == 2  # the activation's empty one and the flood's
        rig.tx.reap()
        assert rig.post(30)  # 33 pending passes avail_event: the kick serves them in one round
        await settle(rig, until=73)
        assert rig.pump.snapshot()["wakeups_kick"] == 2


@pytest.mark.parametrize(("min_round", "packed"), [(0, False), (8, True)], ids=["min_round_off", "packed"])
async def test_with_min_round_off_or_on_a_packed_ring_the_pump_chases_every_chain(min_round: int, packed: bool
                                                                                  ) -> None:  # fmt: skip
    # A packed ring always chases: waiting for the batch there cost guest TX a quarter of its frames.
    rig, port = _trickle_rig(min_round=min_round, packed=packed)
    async with active(rig):
        assert rig.post(40)
        await settle(rig, until=55)  # 40, then five rounds of the 3 posted during the one before
        await settle(rig)
        assert port.times == 0 and int(rig.dev.stats.packets[1]) == 55
        snap = rig.pump.snapshot()
        assert snap["wakeups_kick"] == 1 and snap["wakeups_timer"] == 0  # all within the first wakeup


async def test_after_a_full_round_the_pump_polls_and_serves_the_next_buffers_without_a_kick() -> None:
    async with active(Rig(SinkPort(), NotifyPolicy(tx_batch=16, kick_batch=0, full_poll_us=60e6), 1)) as rig:
        assert rig.post(16)  # one kick; its round moves a whole batch: the other side keeps up
        await settle(rig, until=16)
        assert rig.pump.busy  # polling, kicks still suppressed...
        assert not rig.post(5)  # ...so the guest does not kick, and the poll finds them
        await settle(rig, until=21)
        assert rig.pump.snapshot()["wakeups_kick"] == 1


async def test_after_a_round_short_of_a_batch_the_pump_sleeps_on_the_kick() -> None:
    async with active(Rig(SinkPort(), NotifyPolicy(tx_batch=16, kick_batch=0, full_poll_us=60e6), 1)) as rig:
        assert rig.post(15)
        await settle(rig, until=15)
        await settle(rig)
        assert rig.asleep()
        assert rig.post(5)  # asleep: the guest's next buffer kicks
        await settle(rig, until=20)
        assert rig.pump.snapshot()["wakeups_kick"] == 2


async def test_a_guest_that_stops_short_of_the_batch_is_served_by_the_timer() -> None:
    rig = Rig(SinkPort(), NotifyPolicy(kick_batch=64, flow_batch=8, batch_wait_us=1000.0), 1)
    try:
        rig.pump.activate()
        await settle(rig)
        rig.post(16)
        await settle(rig, until=16)
        await settle(rig)
        assert not rig.post(5)  # then the guest stops: no kick will come
        await until(lambda: int(rig.dev.stats.packets[1]) == 21, "the batch timer serving 5 buffers")
        snap = rig.pump.snapshot()
        assert snap["wakeups_timer"] == 1 and snap["wakeups_kick"] == 1
        # 5 buffers is sparse traffic: the next sleep wants the very first buffer again.
        await settle(rig)
        rig.tx.reap()
        rig.post(1)
        await settle(rig, until=22)
        assert rig.pump.snapshot()["wakeups_kick"] == 2
    finally:
        rig.close()


async def test_generator_fills_posted_rx_buffers_and_sleeps_without_buffers() -> None:
    rig = Rig(GeneratorPort(GeneratorConfig(size=60)), NotifyPolicy(rx_kick_batch=64, batch_wait_us=60e6), 0)
    try:
        rig.pump.activate()
        await settle(rig)
        assert rig.asleep()  # no buffers: asleep on the kick eventfd, not spinning
        rig.post(128)
        await settle(rig, until=128)
        await settle(rig)
        assert rig.interrupted()
        assert len(rig.rx.reap()) == 128
        assert rig.pump.snapshot()["batch_sleeps"] == 1  # a batch moved: wake for the next 64 buffers
        assert not rig.post(64)
        assert rig.asleep(timer_beyond=30)  # waiting for the 65th buffer's kick (or the 60 s timer)
        assert int(rig.dev.stats.packets[0]) == 128
        assert rig.post(1)
        await settle(rig, until=193)
    finally:
        rig.close()


async def test_busy_polling_polls_tx_but_an_rx_ring_whose_port_has_nothing_sleeps_until_woken() -> None:
    """``--poll-us``: a TX ring is polled between kicks, but an RX ring whose port has nothing to give
    (here a VXLAN socket with nothing to read, as a TAP) sleeps, so its failed reads do not slow the TX
    ring's polls; a datagram wakes it through the port's fd watch and its frame is delivered."""
    from nicsim.ports import VxlanConfig, VxlanPort
    from nicsim.ports.frames import ETHERTYPE_IPV4, ethernet, mac_bytes
    from nicsim.ports.vxlan_wire import header
    from tests.test_vxlan_port import A_IP, B_IP, VNI, free_udp_port

    policy = NotifyPolicy(poll_us=60e6, poll_rounds=10**9)
    async with active(Rig(SinkPort(), policy, 1)) as tx:
        tx.post(1)
        await settle(tx, until=1)
        await asyncio.sleep(0.01)
        assert tx.pump.busy  # polling: kicks suppressed, the next request found without one
        assert not tx.post(1)
        await settle(tx, until=2)

    port = free_udp_port()
    rig = Rig(VxlanPort(VxlanConfig(remote=B_IP, local=A_IP, port=port, vni=VNI)), policy, 0)
    woken: list[int] = []
    rig.dev.on_wakeup = lambda index: (woken.append(index), rig.pump.wake(now=True))  # the session's wiring
    rig.dev.port.start_io(asyncio.get_running_loop())
    frames = [ethernet(mac_bytes("52:54:00:00:00:02"), mac_bytes("52:54:00:12:34:56"), ETHERTYPE_IPV4,
                       bytes(range(n, n + 86)), pad=False) for n in range(2)]  # fmt: skip
    async with active(rig):
        rig.post(8)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind((B_IP, 0))
            for n, frame in enumerate(frames, start=1):
                # The first frame is work just done: poll_us would have the ring poll its port for 60 s.
                wakeups = len(woken)
                peer.sendto(header(VNI) + frame, (A_IP, port))
                await until(lambda n=n: int(rig.dev.stats.packets[0]) == n, f"frame {n} delivered")
                assert woken[wakeups:] and set(woken[wakeups:]) == {0}  # the port's fd watch woke it
                await settle(rig)
                rounds = rig.pump.snapshot()["rounds"]
                await asyncio.sleep(0.02)
                assert rig.asleep() and rig.pump.snapshot()["rounds"] == rounds  # no failed reads in a loop
        assert [bytes(c.data[12:]) for c in rig.rx.reap()] == frames


async def test_a_request_wakes_the_loop_every_warm_tick_until_requests_stop_and_a_stream_does_not() -> None:
    """``warm_tick_us``: after a request's round (a few frames) the sleeping TX pump wakes the loop every
    tick, running no round, until ``warm_for_ms`` pass with no request; a stream's round starts none."""
    policy = NotifyPolicy(flow_batch=8, warm_tick_us=1000.0, warm_for_ms=40.0)
    async with active(Rig(SinkPort(), policy, 1)) as rig:
        assert rig.post(1)  # a request
        await settle(rig, until=1)
        await settle(rig)
        rounds = rig.pump.snapshot()["rounds"]
        await until(lambda: rig.pump.snapshot()["warm_ticks"] >= 5, "five warm ticks")
        assert rig.asleep() and rig.pump.snapshot()["rounds"] == rounds  # woken, no round run
        await until(lambda: rig.pump._warm is None, "the ticks ending 40 ms after the request")
        ticks = rig.pump.snapshot()["warm_ticks"]
        assert 5 <= ticks <= 45  # at most one a millisecond
        await asyncio.sleep(0.02)
        assert rig.pump.snapshot()["warm_ticks"] == ticks

    async with active(Rig(SinkPort(), policy, 1)) as rig:
        assert rig.post(16)  # a batch: traffic flows
        await settle(rig, until=16)
        await settle(rig)
        await asyncio.sleep(0.01)
        assert rig.pump.snapshot()["warm_ticks"] == 0 and rig.pump._warm is None

    async with active(Rig(SinkPort(), NotifyPolicy(warm_tick_us=0.0), 1)) as rig:
        assert rig.post(1)
        await settle(rig, until=1)
        await asyncio.sleep(0.01)
        assert rig.pump.snapshot()["warm_ticks"] == 0  # off


async def _steady_requests(rig: Rig, n: int = 3, *, pause: float = 0.02) -> None:
    """``n`` requests (one frame each, kicked) ``pause`` seconds apart, each served before the next."""
    for k in range(1, n + 1):
        if k > 1:
            await asyncio.sleep(pause)
        assert rig.post(1)
        await settle(rig, until=k)
        await settle(rig)


STEADY = NotifyPolicy(flow_batch=8, rr_poll_us=1000.0, poll_ahead_us=5000.0, warm_tick_us=0.0)


async def test_requests_at_a_steady_pace_are_polled_for_just_before_the_next_is_due() -> None:
    """``poll_ahead_us``: once two gaps in a row between requests agree, the sleeping TX pump starts
    polling (kicks off) shortly before the next request is due; a request posted then needs no kick
    and the poll serves it."""
    async with active(Rig(SinkPort(), STEADY, 1)) as rig:
        await _steady_requests(rig)  # 20 ms apart: the next is due 20 ms after the third
        assert rig.pump.snapshot()["wakeups_ahead"] == 0
        await until(lambda: rig.pump._poll_until > 0, "polling for the fourth request")
        assert rig.pump.busy
        assert not rig.post(1)  # the device has kicks off: the guest skips the doorbell
        await settle(rig, until=4)
        counters = rig.pump.snapshot()
        assert (counters["wakeups_ahead"], counters["ahead_hits"], counters["wakeups_kick"]) == (1, 1, 3)


async def test_a_frame_before_the_window_leaves_it_where_it_was() -> None:
    """Another frame between two paced requests (an IPv6 router solicitation between pings) is served
    by its kick and does not move the window planned for the next request."""
    async with active(Rig(SinkPort(), STEADY, 1)) as rig:
        await _steady_requests(rig)
        start = rig.pump._ahead_start
        await asyncio.sleep(0.004)  # the window opens 15 ms after the third request
        assert rig.post(1)
        await settle(rig, until=4)
        await settle(rig)
        assert rig.pump._ahead_start == start and rig.pump._ahead is not None and rig.pump._ahead.armed
        await until(lambda: rig.pump._poll_until > 0, "polling for the paced request")
        assert not rig.post(1)
        await settle(rig, until=5)
        assert rig.pump.snapshot()["ahead_hits"] == 1


async def test_a_window_with_no_request_ends_and_the_pump_sleeps_on_the_kick_again() -> None:
    async with active(Rig(SinkPort(), STEADY, 1)) as rig:
        await _steady_requests(rig)
        await until(lambda: rig.pump.snapshot()["wakeups_ahead"] == 1, "polling for a fourth request")
        await until(lambda: rig.asleep(), "the window ending with no request")
        assert rig.pump.snapshot()["ahead_hits"] == 0 and rig.pump._poll_until == 0
        assert rig.post(1)  # kicks are armed again
        await settle(rig, until=4)


async def test_requests_at_an_uneven_pace_or_with_poll_ahead_off_are_not_polled_for() -> None:
    """Gaps more than ``4 * poll_ahead_us`` apart (12 then 40 ms), or ``poll_ahead_us`` 0: no
    window is planned and the kick alone serves each request."""
    for policy, pauses in ((STEADY, (0.012, 0.04)), (replace(STEADY, poll_ahead_us=0.0), (0.02, 0.02))):
        async with active(Rig(SinkPort(), policy, 1)) as rig:
            for n, pause in enumerate((0.0, *pauses), start=1):
                await asyncio.sleep(pause)
                assert rig.post(1)
                await settle(rig, until=n)
                await settle(rig)
            assert rig.pump._ahead is None or not rig.pump._ahead.armed
            await asyncio.sleep(0.04)
            assert rig.pump.snapshot()["wakeups_ahead"] == 0 and rig.asleep()
            assert rig.post(1)
            await settle(rig, until=4)
            assert rig.pump.snapshot()["wakeups_kick"] == 4


async def test_closing_the_pump_closes_its_poll_ahead_timer() -> None:
    rig = Rig(SinkPort(), STEADY, 1)
    async with active(rig):
        await _steady_requests(rig)
        timer = rig.pump._ahead
        assert timer is not None and timer._fd is not None
        fd = timer._fd
        os.fstat(fd)
    assert rig.pump._ahead is None
    with pytest.raises(OSError):
        os.fstat(fd)
