"""The full fence (rings.barrier) and where the split ring puts it: between the device's store and
its load of what the driver stores, at both points virtio's notification suppression needs one
(used.idx then used_event or the flags; avail_event or the flags then avail.idx), once per batch.

Ordering itself cannot be observed from one thread; what these tests pin down is that the fence is a
real atomic operation on a lock, and that each point stores *before* the fence and loads *after* it.
A probe stands in for the fence and, at that instant, plays the driver: it checks that the device's
store is already in guest memory, then writes the driver's side, which the device must then see."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import rings.barrier
import rings.split
from nicsim.ports import SinkPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from nicsim.virtio.policy import NotifyPolicy
from rings.barrier import full_fence
from rings.driver import DriverQueue, GuestDriver

FRAME = bytes(60)


def test_the_fence_is_an_acquire_and_release_of_a_real_lock() -> None:
    full_fence()
    assert not rings.barrier._LOCK.locked()  # released again: the next fence does not block
    # While someone else holds the lock the fence cannot complete: it really performs the atomic
    # read-modify-write on the lock word (a no-op would return at once).
    done = threading.Event()
    rings.barrier._LOCK.acquire()
    try:
        t = threading.Thread(target=lambda: (full_fence(), done.set()))
        t.start()
        assert not done.wait(0.05)
    finally:
        rings.barrier._LOCK.release()
    assert done.wait(5.0)
    t.join()


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Callable[[], None]]]:
    """Wrap the ring's fence: after the real fence, the next callback appended to the returned list
    runs (one per fence, in order)."""
    actions: list[Callable[[], None]] = []

    def fence() -> None:
        full_fence()
        if actions:
            actions.pop(0)()

    monkeypatch.setattr(rings.split, "full_fence", fence)
    yield actions
    assert actions == []  # every probe ran: the fence was reached


def _device(event_idx: bool, policy: NotifyPolicy | None = None) -> tuple[DriverQueue, VirtioNetDevice]:
    drv = GuestDriver()
    rx = drv.add_queue(0, 256, event_idx=event_idx)
    tx = drv.add_queue(1, 256, event_idx=event_idx)
    dev = VirtioNetDevice(port=SinkPort(), policy=policy)
    dev.set_features((1 << VIRTIO_F_VERSION_1) | ((1 << VIRTIO_F_EVENT_IDX) if event_idx else 0))
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return tx, dev


@pytest.mark.parametrize("event_idx", [True, False])
def test_used_idx_is_stored_before_the_fence_and_used_event_loaded_after(
    probe: list[Callable[[], None]], event_idx: bool
) -> None:
    tx, dev = _device(event_idx)
    for _ in range(4):
        tx.post_tx(FRAME)
    tx.disable_interrupts()  # the decision would be "no interrupt"...
    seen: list[int] = []

    def driver_reenables() -> None:
        seen.append(tx.used_pending())  # the device's used.idx is already visible here
        tx.enable_interrupts()  # ...but the driver re-enables between the fence and the load

    probe.append(driver_reenables)
    res = dev.process_tx(1)
    assert seen == [4]
    assert res.interrupt  # the load came after the fence: the driver's new request was honoured
    assert int(dev.stats.interrupts[1]) == 1


@pytest.mark.parametrize("event_idx", [True, False])
@pytest.mark.parametrize("after", [0, 8])
def test_kicks_are_enabled_before_the_fence_and_avail_idx_reloaded_after(
    probe: list[Callable[[], None]], event_idx: bool, after: int
) -> None:
    tx, dev = _device(event_idx)
    dev.suppress_kicks(1)
    seen: list[bool] = []

    def driver_publishes() -> None:
        # The store that enables kicks is visible: a driver publishing now would kick (once past
        # the batch, with EVENT_IDX)...
        for _ in range(after + 1 if event_idx else 1):
            tx.post_tx(FRAME)
        seen.append(tx.should_kick())

    probe.append(driver_publishes)
    quiet = dev.rearm_kicks(1, after=after)
    assert seen == [True]
    # ...and the re-check loaded avail.idx after the fence, so it saw the entries: no sleeping on them.
    assert not quiet


def test_one_fence_per_batch_not_per_packet(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    def counting_fence() -> None:
        nonlocal calls
        calls += 1
        full_fence()

    monkeypatch.setattr(rings.split, "full_fence", counting_fence)
    counts = []
    for n in (1, 200):
        tx, dev = _device(True, NotifyPolicy(tx_batch=256))
        for _ in range(n):
            tx.post_tx(FRAME)
        calls = 0
        res = dev.process_tx(1)
        assert res.processed == n and res.interrupt
        dev.rearm_kicks(1)
        counts.append(calls)
    assert counts == [2, 2]  # one after used.idx, one after re-enabling kicks, whatever the batch


def test_split_queue_fences_only_when_enabling_kicks(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(rings.split, "full_fence", lambda: calls.append("fence"))
    g = GuestDriver()
    q = g.add_queue(0, 16, event_idx=True)
    dq = q.device_queue()
    dq.suppress_kicks(g.memory, True, event_idx=True)
    assert calls == []  # suppressing: a late store costs one extra kick, no fence needed
    dq.suppress_kicks(g.memory, False, event_idx=True)
    dq.kick_after(g.memory, 4)
    assert calls == ["fence", "fence"]
    # No used entry published: nothing to decide, nothing stored, no fence.
    assert not dq.needs_interrupt(g.memory, old_used_idx=0, event_idx=True)
    assert calls == ["fence", "fence"]
    q.post_tx(FRAME)
    heads = dq.pop_avail(g.memory, 1)
    dq.push_used(g.memory, heads, np.zeros(1, np.uint32))
    dq.needs_interrupt(g.memory, old_used_idx=0, event_idx=True)
    assert calls == ["fence"] * 3
