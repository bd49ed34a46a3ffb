"""``LockedPacketPool``: the interlocked variant of the packet pool, safe from any thread.

NDIS splits ``NdisAllocatePacket`` (takes the pool's spin lock) from ``NdisDprAllocatePacket[NonInterlocked]``
(the caller already serialises). ``PacketPool`` is the single-threaded fast path used on the event loop;
``LockedPacketPool(pool)`` wraps it behind one lock, for ports or tools that run on other threads. This
module owns that lock and the rule that drained callbacks run outside it; the pool does not know it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt

from rings.drain import fire_callbacks, noop
from rings.pool import PacketPool

__all__ = ["LockedPacketPool"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _under_lock(
    method: Callable[Concatenate[PacketPool, _P], _R],
) -> Callable[Concatenate[LockedPacketPool, _P], _R]:
    """``method`` of the wrapped pool, called while holding the wrapper's lock (same signature)."""

    @functools.wraps(method)
    def locked(self: LockedPacketPool, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self._pool, *args, **kwargs)

    return locked


class LockedPacketPool:
    """The pool behind a ``threading.Lock``: safe from any thread (NdisAllocatePacket, interlocked).

    Make one wrapper per pool and share it: two wrappers of one pool would be two locks. Once threads
    use it, every user of the pool must go through it. Drained callbacks run after the lock is
    released, so a callback may use the pool again.
    """

    def __init__(self, pool: PacketPool) -> None:
        self._pool = pool
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<LockedPacketPool of {self._pool!r}>"

    @property
    def pool(self) -> PacketPool:
        """The unlocked pool (do not use it while other threads use this wrapper)."""
        return self._pool

    # The hot calls are written out: no argument forwarding on the way to the lock.

    def allocate(self) -> int:
        with self._lock:
            return self._pool.allocate()

    def allocate_batch(self, n: int, *, partial: bool = False) -> npt.NDArray[np.int32]:
        with self._lock:
            return self._pool.allocate_batch(n, partial=partial)

    def free(self, index: int) -> None:
        with self._lock:
            due = self._pool._free_one(index)
        fire_callbacks(due)

    def free_batch(self, indices: npt.ArrayLike) -> None:
        with self._lock:
            due = self._pool._free_many(indices)
        fire_callbacks(due)

    track = _under_lock(PacketPool.track)
    outstanding = _under_lock(PacketPool.outstanding)
    holders = _under_lock(PacketPool.holders)
    free_indices = _under_lock(PacketPool.free_indices)
    reset_high_water = _under_lock(PacketPool.reset_high_water)
    close = _under_lock(PacketPool.close)

    @property
    def usage(self) -> int:
        with self._lock:
            return self._pool.usage

    @property
    def available(self) -> int:
        with self._lock:
            return self._pool.available

    @property
    def overflow_usage(self) -> int:
        with self._lock:
            return self._pool.overflow_usage

    @property
    def high_water(self) -> int:
        with self._lock:
            return self._pool.high_water

    @property
    def capacity(self) -> int:
        return self._pool.capacity

    @property
    def overflow(self) -> int:
        return self._pool.overflow

    @property
    def descriptor_size(self) -> int:
        return self._pool.descriptor_size

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def on_drained(self, callback: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            unregister = self._pool._register_drained(callback)
        if unregister is None:
            callback()
            return noop
        registered = unregister

        def locked_unregister() -> None:
            with self._lock:
                registered()

        return locked_unregister
