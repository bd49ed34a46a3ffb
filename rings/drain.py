"""The drained-callback helpers shared by ``PacketPool`` and ``LockedPacketPool``.

A pool calls back once its usage reaches 0 (``pool.on_drained(callback)``, which returns an unregister
function); that is all rings offers for graceful shutdown, because rings is pure and knows no event
loop. Awaiting the drain is the asyncio layer's job (``nicsim.server.drain.wait_drained``). This module
owns how the due callbacks run, after the pool is consistent and outside any lock.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["fire_callbacks", "noop"]


def fire_callbacks(callbacks: list[Callable[[], None]]) -> None:
    """Run drained callbacks after the pool is consistent; one raising does not starve the others."""
    first: BaseException | None = None
    for callback in callbacks:
        try:
            callback()
        except Exception as err:  # re-raised below, after every callback had its turn
            first = first or err
    if first is not None:
        raise first


def noop() -> None:
    """The unregister function of a callback that already ran (the pool was drained at once)."""
    return None
