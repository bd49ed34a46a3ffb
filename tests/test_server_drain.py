"""``wait_drained``, the asyncio side of the pool's drained callback: a graceful shutdown awaits it until
every descriptor is back, from the loop's thread or with a locked pool freed on another thread."""

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
    waiter = asyncio.create_task(_await_drained(pool))
    await asyncio.sleep(0)
    pool.free_batch(got[:2])
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not waiter.done()
    pool.free(int(got[2]))
    await asyncio.wait_for(waiter, timeout=30)  # a hang guard only; completion is what is checked
    assert waiter.result() == "drained"
    pool.close()


async def test_several_waiters_and_gather_all_complete() -> None:
    pool = PacketPool(4)
    i = pool.allocate()
    tasks = [asyncio.create_task(_await_drained(pool)) for _ in range(3)]
    gathered = asyncio.gather(wait_drained(pool), wait_drained(pool))
    await asyncio.sleep(0)
    assert not any(t.done() for t in tasks)
    pool.free(i)
    assert await asyncio.wait_for(asyncio.gather(*tasks), timeout=30) == ["drained"] * 3
    assert list(await asyncio.wait_for(gathered, timeout=30)) == [None, None]


async def test_cancelling_a_waiter_cancels_the_task_and_unregisters_it() -> None:
    pool = PacketPool(4)
    i = pool.allocate()
    waiter = asyncio.create_task(_await_drained(pool))
    await asyncio.sleep(0)
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
    got = locked.allocate_batch(10)
    go = threading.Event()

    def worker() -> None:
        go.wait()
        for i in got.tolist():
            locked.free(i)

    thread = threading.Thread(target=worker)
    thread.start()
    waiter = asyncio.create_task(_await_drained(locked))
    await asyncio.sleep(0)
    assert not waiter.done()
    go.set()
    await asyncio.wait_for(waiter, timeout=30)
    thread.join()
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
