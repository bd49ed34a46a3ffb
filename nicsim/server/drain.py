"""``await wait_drained(pool)``: graceful shutdown waits here until every packet descriptor is back.

rings is pure and offers only a drained *callback* (``pool.on_drained(callback)``, which returns an
unregister function). This module owns the awaitable built on it: a future of the running loop,
completed from that callback. The callback may run on another thread (a ``LockedPacketPool`` freed by
a worker), so it only hands over to the loop with ``call_soon_threadsafe``. A cancelled wait
unregisters its callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

__all__ = ["Drainable", "wait_drained"]


class Drainable(Protocol):
    """What ``wait_drained`` needs: a ``PacketPool`` or a ``LockedPacketPool``."""

    @property
    def usage(self) -> int: ...

    def on_drained(self, callback: Callable[[], None]) -> Callable[[], None]: ...


async def wait_drained(pool: Drainable) -> None:
    """Return once ``pool.usage`` is 0, at once if it already is (then no loop is needed).

    A closed pool raises ``PoolClosedError``, as its ``usage`` does.
    """
    if pool.usage == 0:
        return
    loop = asyncio.get_running_loop()
    drained: asyncio.Future[None] = loop.create_future()

    def signal() -> None:
        # On the thread that freed the last descriptor, possibly not the loop's.
        loop.call_soon_threadsafe(_settle, drained)

    unregister = pool.on_drained(signal)
    try:
        await drained
    finally:
        unregister()


def _settle(drained: asyncio.Future[None]) -> None:
    # The wait may have been cancelled between the callback and this turn of the loop.
    if not drained.done():
        drained.set_result(None)
