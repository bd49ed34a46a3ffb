"""No ring stalls for good: RingPump on a real event loop with real eventfds, the driver model on the
other side, and a notification lost the way the missing fence (or anything else) would lose it.

A lost kick: the pump sleeps with kicks armed and the guest publishes without kicking (it read the
old avail_event or flags). A lost interrupt: the device decided against an interrupt on an old
used_event, moved signalled_used past it, and the guest, which re-enabled interrupts at that moment
and read the old used.idx, waits for one. Each case runs twice: with the watchdog off
(``stall_recheck_ms=0``) the ring stays stuck, which shows the test reproduces a real stall; with it
on (and ``kick_batch=0``: no batch timer to rescue the ring) it recovers within a few ticks, and the
device counts it in its per-queue stats (``stall_rechecks``, part of the stats-file snapshot)."""

from __future__ import annotations

import asyncio
import os
import select
import time

import pytest

from nicsim.ports import Port, SinkPort
from nicsim.server.pump import RingPump
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from nicsim.virtio.policy import NotifyPolicy, is_stalled, policy_from_options
from rings.driver import DriverQueue, GuestDriver

FRAME = bytes(60)
TICK_MS = 10.0
STUCK_S = 0.1  # ten ticks: with the watchdog off, nothing moves in this long
DEADLINE_S = 5.0  # with it on, recovery takes two or three ticks; this is only a ceiling for a busy host


class Rig:
    """A device with one queue pair on the driver model, and a pump for ring ``index``."""

    def __init__(self, index: int, *, event_idx: bool = True, stall_ms: float = TICK_MS,
                 port: Port | None = None) -> None:  # fmt: skip
        drv = GuestDriver()
        self.rx = drv.add_queue(0, 256, event_idx=event_idx)
        self.tx = drv.add_queue(1, 256, event_idx=event_idx)
        policy = NotifyPolicy(kick_batch=0, rx_kick_batch=0, stall_recheck_ms=stall_ms)
        self.dev = VirtioNetDevice(port=port or SinkPort(), policy=policy)
        self.dev.set_features((1 << VIRTIO_F_VERSION_1) | ((1 << VIRTIO_F_EVENT_IDX) if event_idx else 0))
        self.dev.set_memory(drv.memory)
        self.dev.start_queue(0, self.rx.device_queue())
        self.dev.start_queue(1, self.tx.device_queue())
        self.index = index
        self.pump = RingPump(asyncio.get_running_loop(), self.dev, index)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.pump.set_kick(os.dup(self.kick))
        self.pump.set_call(os.dup(self.call))

    @property
    def q(self) -> DriverQueue:
        return self.tx if self.index == 1 else self.rx

    def kick_if_asked(self) -> None:
        if self.q.should_kick():
            os.eventfd_write(self.kick, 1)

    def interrupted(self) -> bool:
        if not select.select([self.call], [], [], 0)[0]:
            return False
        os.eventfd_read(self.call)
        return True

    def packets(self) -> int:
        return int(self.dev.stats.packets[self.index])

    def rechecks(self) -> int:
        return int(self.dev.stats.stall_rechecks[self.index])

    def close(self) -> None:
        self.pump.close()
        self.dev.shutdown()
        os.close(self.kick)
        os.close(self.call)


async def asleep(rig: Rig) -> None:
    """Run the loop until the pump has gone to sleep (kicks armed, no round scheduled)."""
    for _ in range(2000):
        await asyncio.sleep(0)
        if not rig.pump._busy:
            return
    raise AssertionError(f"the pump never went to sleep: {rig.pump.snapshot()}")


async def wait_for(cond: object, timeout: float) -> bool:
    """Poll ``cond()`` every millisecond of loop time until it holds (True) or ``timeout`` passes."""
    assert callable(cond)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        await asyncio.sleep(0.001)
    return bool(cond())


WATCHDOG = pytest.mark.parametrize("watchdog", [False, True], ids=["off-stays-stuck", "on-recovers"])


@WATCHDOG
@pytest.mark.parametrize("event_idx", [True, False])
async def test_a_lost_tx_kick_is_recovered_by_the_stall_recheck_and_counted(
    event_idx: bool, watchdog: bool
) -> None:
    rig = Rig(1, event_idx=event_idx, stall_ms=TICK_MS if watchdog else 0.0)
    try:
        rig.pump.activate()
        await asleep(rig)
        # The guest publishes three chains and reads an old avail_event / NO_NOTIFY: no kick.
        for _ in range(3):
            rig.tx.post_tx(FRAME)
        if not watchdog:
            assert not await wait_for(lambda: rig.packets() > 0, STUCK_S)  # stuck for good
            assert rig.rechecks() == 0
            return
        assert await wait_for(lambda: rig.packets() == 3, DEADLINE_S)
        snap = rig.pump.snapshot()
        assert rig.rechecks() == 1 and snap["wakeups_stall"] == 1 and snap["wakeups_kick"] == 0
        assert rig.dev.snapshot()["queues"][1]["stall_rechecks"] == 1  # what --stats-file shows
        # The round that recovered it interrupts as usual (a fresh driver wants every entry), and
        # the ring is healthy afterwards: the next chain is served by its kick.
        assert await wait_for(rig.interrupted, DEADLINE_S)
        assert len(rig.tx.reap()) == 3
        await asleep(rig)
        rig.tx.post_tx(FRAME)
        rig.kick_if_asked()
        assert await wait_for(lambda: rig.packets() == 4, DEADLINE_S)
        assert rig.pump.snapshot()["wakeups_kick"] == 1 and rig.rechecks() == 1
    finally:
        rig.close()


@WATCHDOG
@pytest.mark.parametrize("event_idx", [True, False])
async def test_a_lost_interrupt_after_signalled_used_moved_past_it_is_sent_and_counted(
    event_idx: bool, watchdog: bool
) -> None:
    rig = Rig(1, event_idx=event_idx, stall_ms=TICK_MS if watchdog else 0.0)
    try:
        rig.pump.activate()
        await asleep(rig)
        # The guest polls with interrupts off, posts and kicks; the device completes the chains
        # and, reading used_event / NO_INTERRUPT as "off", sends nothing and moves signalled_used on.
        rig.tx.disable_interrupts()
        for _ in range(4):
            rig.tx.post_tx(FRAME)
        rig.kick_if_asked()
        assert await wait_for(lambda: rig.packets() == 4, DEADLINE_S)
        await asleep(rig)
        assert not rig.interrupted()
        # It re-enables interrupts and, reading the old used.idx, goes to sleep waiting for one
        # (enable_interrupts says entries are pending; this guest missed it: that is the race).
        assert rig.tx.enable_interrupts()
        if not watchdog:
            assert not await wait_for(rig.interrupted, STUCK_S)  # nobody will ever signal it
            return
        assert await wait_for(rig.interrupted, DEADLINE_S)
        assert rig.rechecks() == 1 and int(rig.dev.stats.interrupts[1]) == 1
        assert len(rig.tx.reap()) == 4
        # Owed once, sent once: the watchdog does not keep interrupting a ring that is fine.
        assert not await wait_for(rig.interrupted, 5 * TICK_MS / 1e3)
        assert rig.rechecks() == 1
    finally:
        rig.close()


@WATCHDOG
async def test_rx_frames_waiting_for_buffers_posted_without_a_kick_are_delivered(watchdog: bool) -> None:
    rig = Rig(0, stall_ms=TICK_MS if watchdog else 0.0)
    try:
        rig.pump.activate()
        await asleep(rig)
        for _ in range(5):
            assert rig.dev.push(FRAME)  # no RX buffer: the frames wait in the backlog
        rig.pump.wake()
        await asleep(rig)  # asleep, kicks armed, waiting for buffers
        assert rig.dev.rx_backlog() == 5
        rig.rx.post_rx(count=8)  # posted, but the kick is lost
        if not watchdog:
            assert not await wait_for(lambda: rig.packets() > 0, STUCK_S)
            return
        assert await wait_for(lambda: rig.packets() == 5, DEADLINE_S)
        assert rig.rechecks() == 1 and rig.dev.rx_backlog() == 0
        assert [len(c.data or b"") for c in rig.rx.reap()] == [12 + len(FRAME)] * 5
    finally:
        rig.close()


async def test_an_idle_ring_posted_rx_buffers_and_kicked_traffic_are_not_stalls() -> None:
    rig = Rig(1)
    try:
        rig.pump.activate()
        await asleep(rig)
        rounds = rig.pump.snapshot()["rounds"]
        await asyncio.sleep(6 * TICK_MS / 1e3)
        # Idle: ticks only look at the ring, they run no round and count nothing.
        assert rig.pump.snapshot()["rounds"] == rounds and rig.rechecks() == 0
        # RX buffers posted with nothing to deliver are not work either.
        rig.rx.post_rx(count=4)
        await asyncio.sleep(6 * TICK_MS / 1e3)
        assert rig.rechecks() == 0
        # Traffic with its kicks delivered: served by the kicks, nothing to re-check.
        for _ in range(20):
            rig.tx.post_tx(FRAME)
            rig.kick_if_asked()
            await asyncio.sleep(0.002)
            rig.tx.reap()
        assert await wait_for(lambda: rig.packets() == 20, DEADLINE_S)
        await asyncio.sleep(6 * TICK_MS / 1e3)
        assert rig.rechecks() == 0
    finally:
        rig.close()


def test_is_stalled_needs_work_pending_for_a_whole_tick_with_nothing_moved() -> None:
    assert is_stalled(pending=True, progress=(3, 1), previous=(3, 1))
    assert not is_stalled(pending=True, progress=(3, 1), previous=None)  # work just appeared
    assert not is_stalled(pending=True, progress=(4, 1), previous=(3, 1))  # the device moved
    assert not is_stalled(pending=True, progress=(3, 2), previous=(3, 1))
    assert not is_stalled(pending=False, progress=(3, 1), previous=(3, 1))  # nothing to do


def test_the_recheck_period_is_a_knob_and_zero_turns_it_off() -> None:
    assert NotifyPolicy().stall_recheck_ms == 10.0
    assert policy_from_options({"stall_recheck_ms": "25"}).stall_recheck_ms == 25.0
    assert policy_from_options({"stall_recheck_ms": 0}).stall_recheck_ms == 0.0
    with pytest.raises(ValueError, match="stall_recheck_ms"):
        NotifyPolicy(stall_recheck_ms=-1)


async def test_a_round_that_raises_does_not_wedge_the_ring() -> None:
    """A bug in what a round calls back (here the pair's after_tx hook, once) is logged and counted,
    and the ring goes on: the frames already posted and those after are all taken."""
    rig = Rig(1)
    failures = [RuntimeError("a bug in a callback")]

    def after_tx(pair: int) -> None:
        if failures:
            raise failures.pop()

    rig.pump.after_tx = after_tx
    try:
        rig.pump.activate()
        await asleep(rig)
        rig.tx.post_tx(FRAME)
        rig.kick_if_asked()
        assert await wait_for(lambda: rig.packets() == 1, DEADLINE_S)
        assert await wait_for(lambda: not rig.pump.busy, DEADLINE_S)
        assert rig.pump.snapshot()["round_errors"] == 1
        rig.tx.post_tx(FRAME)
        rig.kick_if_asked()
        assert await wait_for(lambda: rig.packets() == 2, DEADLINE_S)
    finally:
        rig.close()


async def test_a_pump_left_busy_with_nothing_scheduled_is_restarted_by_the_watchdog() -> None:
    """Whatever bug might leave the pump so (rounds due, none scheduled: kicks are ignored while busy),
    the watchdog restarts it and counts it, and the chains posted meanwhile are taken."""
    rig = Rig(1)
    try:
        rig.pump.activate()
        await asleep(rig)
        rig.pump._busy = True  # the state such a bug leaves behind: busy, no handle
        rig.tx.post_tx(FRAME)
        rig.kick_if_asked()
        assert await wait_for(lambda: rig.packets() == 1, DEADLINE_S)
        assert rig.pump.snapshot()["wedges"] == 1
    finally:
        rig.close()
