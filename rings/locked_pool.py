"""``LockedPacketPool``: the interlocked variant of the packet pool, safe from any thread.

NDIS splits ``NdisAllocatePacket`` (takes the pool's spin lock) from ``NdisDprAllocatePacket[NonInterlocked]``
(the caller already serialises). ``PacketPool`` is the single-threaded fast path used on the event loop;
this wrapper is the locked one, for ports or tools that run on other threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from rings.drain import fire_callbacks, noop

if TYPE_CHECKING:
    from rings.pool import PacketPool

__all__ = ["LockedPacketPool"]


class LockedPacketPool:
    """The pool behind a ``threading.Lock``: safe from any thread (NdisAllocatePacket, interlocked).

    Drained callbacks run after the lock is released, so a callback may use the pool again.
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

    def track(
        self,
        indices: npt.ArrayLike,
        *,
        queue: int,
        heads: npt.ArrayLike,
        addrs: npt.ArrayLike,
        lengths: npt.ArrayLike,
    ) -> None:
        with self._lock:
            self._pool.track(indices, queue=queue, heads=heads, addrs=addrs, lengths=lengths)

    def outstanding(self, queue: int | None = None) -> npt.NDArray[np.int32]:
        with self._lock:
            return self._pool.outstanding(queue)

    def holders(self) -> dict[int, int]:
        with self._lock:
            return self._pool.holders()

    def free_indices(self) -> npt.NDArray[np.int32]:
        with self._lock:
            return self._pool.free_indices()

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

    def reset_high_water(self) -> int:
        with self._lock:
            return self._pool.reset_high_water()

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

    def close(self) -> None:
        with self._lock:
            self._pool.close()

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
