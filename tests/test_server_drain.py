"""``wait_drained``, the asyncio side of the pool's drained callback: a graceful shutdown awaits it until
every descriptor is back, from the loop's thread or with a locked pool freed on another thread.

A waiter that must still wait is checked after a *marker* completed: a second pool, drained at the
same moment through the same callback and hand-over to the loop, whose waiter therefore finishes no
earlier than a wrongly woken one would. Every wait that must finish has a deadline and an assertion,
so a drain that never completes fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from nicsim.server.drain import Drainable, wait_drained
from rings.errors import PoolClosedError
from rings.locked_pool import LockedPacketPool
from rings.pool import PacketPool


async def test_drained_completes_at_once_when_nothing_is_outstanding() -> None:
    pool = PacketPool(4)
    await wait_drained(pool)
    pool.free(pool.allocate())
    await wait_drained(pool)


async def test_drained_waits_for_the_last_free() -> None:
    pool = PacketPool(4)
    got = pool.allocate_batch(3)
    control = PacketPool(1)
    mark = control.allocate()
    waiter = asyncio.create_task(_await_drained(pool))
    marker = asyncio.create_task(_await_drained(control))
    await asyncio.sleep(0)  # both tasks run to their wait
    assert len(pool._drain_callbacks) == 1 and len(control._drain_callbacks) == 1
    pool.free_batch(got[:2])
    control.free(mark)
    async with asyncio.timeout(10):
        assert await marker == "drained"
    assert not waiter.done()  # one descriptor is still out
    pool.free(int(got[2]))
    async with asyncio.timeout(10):
        assert await waiter == "drained"
    assert pool.usage == 0
    pool.close()


async def test_several_waiters_and_gather_all_complete() -> None:
    pool = PacketPool(4)
    i = pool.allocate()
    control = PacketPool(1)
    mark = control.allocate()
    tasks = [asyncio.create_task(_await_drained(pool)) for _ in range(3)]
    gathered = asyncio.gather(wait_drained(pool), wait_drained(pool))
    marker = asyncio.create_task(_await_drained(control))
    await asyncio.sleep(0)  # every waiter runs to its wait
    assert len(pool._drain_callbacks) == 5
    control.free(mark)
    async with asyncio.timeout(10):
        assert await marker == "drained"
    assert not any(t.done() for t in tasks) and not gathered.done()
    pool.free(i)
    async with asyncio.timeout(10):
        assert await asyncio.gather(*tasks) == ["drained"] * 3
        assert list(await gathered) == [None, None]


async def test_cancelling_a_waiter_cancels_the_task_and_unregisters_it() -> None:
    pool = PacketPool(4)
    i = pool.allocate()
    waiter = asyncio.create_task(_await_drained(pool))
    await asyncio.sleep(0)
    assert len(pool._drain_callbacks) == 1  # registered, so the check below sees it unregistered
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert waiter.cancelled()
    fired: list[str] = []
    pool.on_drained(lambda: fired.append("callback"))
    assert len(pool._drain_callbacks) == 1  # the cancelled waiter is gone, only this callback remains
    pool.free(i)
    assert fired == ["callback"]
    pool.close()


async def test_drained_through_the_locked_pool_wakes_when_another_thread_frees() -> None:
    pool = PacketPool(16)
    locked = LockedPacketPool(pool)
    got = locked.allocate_batch(10).tolist()
    control = LockedPacketPool(PacketPool(1))
    mark = control.allocate()
    go, last = threading.Event(), threading.Event()

    def worker() -> None:
        go.wait(10)
        for i in got[:-1]:
            locked.free(i)
        control.free(mark)  # the marker drains on this thread too, after the nine frees
        last.wait(10)
        locked.free(got[-1])

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        waiter = asyncio.create_task(_await_drained(locked))
        marker = asyncio.create_task(_await_drained(control))
        await asyncio.sleep(0)  # both run to their wait
        go.set()
        async with asyncio.timeout(10):
            assert await marker == "drained"
        assert not waiter.done()  # nine of ten are back
        last.set()
        async with asyncio.timeout(10):
            assert await waiter == "drained"
    finally:
        go.set()
        last.set()
        thread.join(10)
    assert not thread.is_alive()
    assert locked.usage == 0


def test_drained_awaited_outside_asyncio_is_refused_clearly() -> None:
    pool = PacketPool(2)
    pool.allocate()
    awaiting = wait_drained(pool)
    with pytest.raises(RuntimeError):
        awaiting.send(None)  # asyncio's own "no running event loop"


async def _await_drained(pool: Drainable) -> str:
    await wait_drained(pool)
    return "drained"


async def test_waiting_on_a_closed_pool_raises_pool_closed() -> None:
    pool = PacketPool(4)
    pool.close()
    with pytest.raises(PoolClosedError):
        await wait_drained(pool)
    with pytest.raises(PoolClosedError):
        await wait_drained(LockedPacketPool(pool))
