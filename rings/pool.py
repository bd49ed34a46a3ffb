"""The packet pool: every in-flight guest buffer is tracked by one descriptor of a ``PacketPool``.

The contract is the NDIS 5.x packet pool: ``NdisAllocatePacketPool[Ex]`` (descriptors, reserved
bytes, overflow descriptors) is ``PacketPool(capacity, reserved=, overflow=)``; ``NdisAllocatePacket``
is ``allocate`` / ``allocate_batch`` (exhaustion is an explicit outcome, never a wait);
``NdisFreePacket`` is ``free`` / ``free_batch`` (a double or foreign free is an error);
``NdisPacketPoolUsage`` is ``usage`` (with ``high_water``); ``NdisFreePacketPool`` is ``close``
(refused while descriptors are held, naming the queues that hold them); ``NdisPacketSize`` is
``descriptor_size``.
This module owns the descriptor table (one numpy structured array: state, holder queue and head, guest
buffer, reserved bytes), the LIFO free stacks of normal and overflow descriptors, the usage counters,
the close lifecycle and the "drained" callback registry for graceful shutdown (asyncio code awaits it
with ``nicsim.server.drain.wait_drained``). This is the single-threaded pool; the interlocked variant
for other threads wraps it (``rings.locked_pool.LockedPacketPool(pool)``). Batch operations are
vectorised; every failing call leaves the pool exactly as it was.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from rings import kernels
from rings.drain import fire_callbacks, noop
from rings.errors import (
    DescriptorNotAllocatedError,
    DescriptorRangeError,
    DoubleFreeError,
    PoolBusyError,
    PoolClosedError,
    PoolExhaustedError,
)
from rings.pool_layout import MAX_DESCRIPTORS, STATE_FREE, STATE_IN_USE, UNTRACKED, descriptor_dtype

__all__ = [
    "MAX_DESCRIPTORS",
    "STATE_FREE",
    "STATE_IN_USE",
    "UNTRACKED",
    "PacketPool",
    "descriptor_dtype",
]

IndexArray = npt.NDArray[np.intp]


class PacketPool:
    """``capacity`` descriptors plus ``overflow`` ones, each with ``reserved`` owner bytes.

    Single-threaded (the ``NdisDprAllocatePacketNonInterlocked`` fast path): use it from the event
    loop only. Threads go through one ``LockedPacketPool(pool)`` shared by all; once they do, every
    user must.
    """

    def __init__(self, capacity: int, *, overflow: int = 0, reserved: int = 0, name: str = "packets") -> None:
        capacity, overflow, reserved = (operator.index(v) for v in (capacity, overflow, reserved))
        if capacity < 1 or overflow < 0 or reserved < 0:
            raise ValueError(f"pool {name!r}: need capacity >= 1, overflow >= 0, reserved >= 0")
        if capacity + overflow > MAX_DESCRIPTORS:
            raise ValueError(
                f"pool {name!r}: capacity + overflow = {capacity + overflow} exceeds the NDIS limit "
                f"of {MAX_DESCRIPTORS} descriptors"
            )
        self._name = name
        self._capacity = capacity
        self._overflow = overflow
        self._reserved = reserved
        self._size = capacity + overflow
        dtype = descriptor_dtype(reserved)
        self._table = np.zeros(self._size, dtype)
        # Whole-record writes through a plain void view are several times faster than structured ones.
        self._rows = self._table.view(np.dtype((np.void, dtype.itemsize)))
        self._state: npt.NDArray[np.uint8] = self._table["state"]
        self._ever: npt.NDArray[np.uint8] = self._table["ever"]
        self._queue: npt.NDArray[np.int32] = self._table["queue"]
        self._head: npt.NDArray[np.uint16] = self._table["head"]
        self._addr: npt.NDArray[np.uint64] = self._table["addr"]
        self._length: npt.NDArray[np.uint32] = self._table["length"]
        fresh = np.zeros(1, dtype)
        fresh["state"], fresh["ever"], fresh["queue"] = STATE_IN_USE, 1, UNTRACKED
        self._fresh = fresh.view(self._rows.dtype)  # what allocate writes: reserved bytes zeroed
        # LIFO stacks so the most recently freed, cache-hot descriptor goes out first. They grow
        # downwards: ``stack[used:]`` is free and ``stack[used]`` goes out next, so a batch is one
        # slice already in the order single allocations would give (a free batch is written
        # reversed). ``used`` is also the number in use. Overflow descriptors have their own stack,
        # used only when the normal one is empty (NdisAllocatePacketPoolEx).
        self._stack: IndexArray = np.arange(capacity, dtype=np.intp)
        self._used = 0
        self._ostack: IndexArray = np.arange(capacity, self._size, dtype=np.intp)
        self._oused = 0
        self._high_water = 0
        self._round = (self._state, self._ever, self._stack, self._queue, self._head, self._addr,
                       self._length, self._table["reserved"])  # fmt: skip
        self._drain_callbacks: dict[int, Callable[[], None]] = {}
        self._next_token = 0
        self._closed = False

    def __repr__(self) -> str:
        if self._closed:
            return f"<PacketPool {self._name!r} closed>"
        return (
            f"<PacketPool {self._name!r} usage={self.usage}/{self._capacity}+{self._overflow} "
            f"high_water={self._high_water}>"
        )

    # -- sizes and counters -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def capacity(self) -> int:
        self._check_open("capacity")
        return self._capacity

    @property
    def overflow(self) -> int:
        self._check_open("overflow")
        return self._overflow

    @property
    def reserved(self) -> int:
        """ProtocolReservedLength: owner bytes per descriptor (``table["reserved"]``)."""
        self._check_open("reserved")
        return self._reserved

    @property
    def descriptor_size(self) -> int:
        """NdisPacketSize: bytes per descriptor record, reserved area included."""
        self._check_open("descriptor_size")
        return int(self._table.dtype.itemsize)

    @property
    def table(self) -> npt.NDArray[np.void]:
        """The descriptor table itself (read it; write only the ``reserved`` bytes you own)."""
        self._check_open("table")
        return self._table

    @property
    def usage(self) -> int:
        """NdisPacketPoolUsage: descriptors allocated now, overflow ones included."""
        self._check_open("usage")
        return self._used + self._oused

    @property
    def available(self) -> int:
        """Descriptors ``allocate`` can still hand out, overflow ones included."""
        self._check_open("available")
        return self._size - self._used - self._oused

    @property
    def overflow_usage(self) -> int:
        self._check_open("overflow_usage")
        return self._oused

    @property
    def high_water(self) -> int:
        """The largest ``usage`` seen since creation or the last ``reset_high_water()``."""
        self._check_open("high_water")
        return self._high_water

    def reset_high_water(self) -> int:
        """Start a new measurement window: returns the old mark, restarts from the current usage."""
        self._check_open("reset_high_water")
        old, self._high_water = self._high_water, self.usage
        return old

    # -- allocate -----------------------------------------------------------------------------------

    def allocate(self) -> int:
        """One descriptor (NdisAllocatePacket); PoolExhaustedError when none, never blocks."""
        self._check_open("allocate")
        if self._used < self._capacity:
            index = int(self._stack[self._used])
            self._used += 1
        elif self._oused < self._overflow:
            index = int(self._ostack[self._oused])
            self._oused += 1
        else:
            raise self._exhausted(1)
        self._rows[index] = self._fresh[0]
        self._note_high_water()
        return index

    def allocate_batch(self, n: int, *, partial: bool = False) -> npt.NDArray[np.int32]:
        """``n`` descriptors as int32 indices, in the order ``n`` calls of ``allocate()`` would give.

        All or nothing (PoolExhaustedError, nothing taken) unless ``partial``: then as many as there
        are, possibly none.
        """
        self._check_open("allocate_batch")
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"pool {self._name!r}: cannot allocate {n} descriptors")
        used = self._used
        if used + n <= self._capacity:  # the common case: one slice of the normal stack
            taken = self._stack[used : used + n]
            self._used = used + n
        else:
            free = self._size - used - self._oused
            if n > free:
                if not partial:
                    raise self._exhausted(n)
                n = free
            oused = self._oused
            extra = n - (self._capacity - used)
            taken = np.concatenate((self._stack[used:], self._ostack[oused : oused + extra]))
            self._used, self._oused = self._capacity, oused + extra
        self._rows.put(taken, self._fresh)
        self._note_high_water()
        return taken.astype(np.int32)

    # -- free ---------------------------------------------------------------------------------------

    def free(self, index: int) -> None:
        """NdisFreePacket. Foreign, never-allocated and already-free indices raise; nothing changes."""
        due = self._free_one(index)
        if due:
            fire_callbacks(due)

    def free_batch(self, indices: npt.ArrayLike) -> None:
        """Free every index, or (any invalid, already free or duplicated) none of them.

        Error precedence: out of range, then never allocated (both PoolIndexError), then already
        free, then listed twice (both DoubleFreeError); the descriptor named is the first in batch
        order of that kind.
        """
        due = self._free_many(indices)
        if due:
            fire_callbacks(due)

    def _free_one(self, index: int) -> list[Callable[[], None]]:
        self._check_open("free")
        i = operator.index(index)
        if not 0 <= i < self._size:
            raise self._range_error(i)
        if not self._state[i]:
            raise self._not_in_use_error(i, freeing=True)
        self._state[i] = STATE_FREE
        if i < self._capacity:
            self._used -= 1
            self._stack[self._used] = i
        else:
            self._oused -= 1
            self._ostack[self._oused] = i
        return self._due_callbacks()

    def _free_many(self, indices: npt.ArrayLike) -> list[Callable[[], None]]:
        self._check_open("free_batch")
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.dtype.kind != "i":  # int32 (ours) and intp take the fast path
            idx = self._as_indices(idx)
        n = idx.shape[0]
        if n == 0:
            return []
        if kernels.free_normal is not None:  # compiled: the common batch in one loop, else -1
            used = kernels.free_normal(idx, self._state, self._stack, self._used, self._capacity)
            if used >= 0:
                self._used = used
                return self._due_callbacks()
        # Validate the whole batch before touching anything. One sorted intp copy gives the range
        # check (its ends), the duplicate check (neighbours) and fast gathers, with no reductions.
        ordered = idx.astype(np.intp)
        ordered.sort()
        if ordered[0] < 0 or ordered[-1] >= self._size:
            raise self._range_error(int(idx[np.flatnonzero((idx < 0) | (idx >= self._size))[0]]))
        state = self._state
        if np.count_nonzero(state[ordered]) != n:
            raise self._batch_not_in_use_error(idx, freeing=True)
        if n > 1 and np.count_nonzero(ordered[1:] == ordered[:-1]):
            seen = np.ones(n, dtype=bool)
            seen[np.unique(idx, return_index=True)[1]] = False  # first occurrences are fine
            raise self._duplicate_error(int(idx[np.flatnonzero(seen)[0]]))
        state[ordered] = STATE_FREE
        # Pushed reversed, so the last index of the batch is the next out, as with single frees.
        used = self._used
        if ordered[-1] < self._capacity:  # no overflow descriptor in the batch: one slice write
            self._stack[used - n : used] = idx[::-1]
            self._used = used - n
        else:
            is_over = idx >= self._capacity
            normal, over = idx[~is_over], idx[is_over]
            self._used = used - normal.shape[0]
            self._stack[self._used : used] = normal[::-1]
            oused = self._oused
            self._oused = oused - over.shape[0]
            self._ostack[self._oused : oused] = over[::-1]
        return self._due_callbacks()

    # -- compiled rounds (rings.round_kernels) --------------------------------------------------------

    def round_state(self) -> tuple[Any, ...]:
        """What a compiled round works on, in the take kernel's argument order: the normal descriptors
        in use (the top of the normal stack, where a round takes or returns its descriptors), the
        capacity, then the arrays state, ever, stack, queue, head, addr, length, reserved. The
        kernels take normal descriptors only and write every field ``allocate_batch`` and ``track``
        would; the caller then reports what they did with :meth:`round_allocated` /
        :meth:`round_freed`. Refused (PoolClosedError) once the pool is closed."""
        self._check_open("round_state")
        return (self._used, self._capacity, *self._round)

    def round_allocated(self, used: int) -> None:
        """A compiled round took descriptors off the normal stack: ``used`` is the new top."""
        self._used = used
        self._note_high_water()

    def round_freed(self, used: int) -> None:
        """A compiled round pushed descriptors back: ``used`` is the new top; drain callbacks fire
        as ``free_batch``'s do."""
        self._used = used
        due = self._due_callbacks()
        if due:
            fire_callbacks(due)

    # -- what the descriptors hold ------------------------------------------------------------------

    def track(
        self,
        indices: npt.ArrayLike,
        *,
        queue: int,
        heads: npt.ArrayLike,
        addrs: npt.ArrayLike,
        lengths: npt.ArrayLike,
    ) -> None:
        """Record that allocated descriptors ``indices`` hold chains ``heads`` of ``queue``.

        ``heads``/``addrs``/``lengths`` are arrays of the same length or scalars. Nothing is written
        unless every index is allocated and every value fits its field.
        """
        self._check_open("track")
        queue = operator.index(queue)
        if not 0 <= queue <= 0xFFFF:  # a virtqueue index is 16 bits (virtio 1.2 §4.1.4.3)
            raise ValueError(f"pool {self._name!r}: queue index {queue} outside 0..65535")
        if (kernels.track is not None and self._kernel_can_track(indices, heads, addrs, lengths)
                and kernels.track(indices, self._state, self._queue, self._head, self._addr, self._length,
                                  queue, heads, addrs, lengths)):  # fmt: skip
            return  # compiled: checked and written in one loop (False: nothing written)
        idx = self._as_indices(indices)
        n = idx.shape[0]
        values = [
            self._field_values(heads, n, np.dtype(np.uint16), "heads"),
            self._field_values(addrs, n, np.dtype(np.uint64), "addrs"),
            self._field_values(lengths, n, np.dtype(np.uint32), "lengths"),
        ]
        if n == 0:
            return
        # One comparison finds both ends: a negative index seen as unsigned is far above the size.
        if np.count_nonzero(idx.view(np.uintp) >= self._size):
            raise self._range_error(int(idx[np.flatnonzero((idx < 0) | (idx >= self._size))[0]]))
        if np.count_nonzero(self._state[idx]) != n:
            raise self._batch_not_in_use_error(idx, freeing=False)
        self._queue[idx] = queue
        self._head[idx], self._addr[idx], self._length[idx] = values

    @staticmethod
    def _kernel_can_track(indices: Any, heads: Any, addrs: Any, lengths: Any) -> bool:
        """Whether ``track``'s arguments are the device's own arrays, which the kernel takes as they are
        (anything else goes through the numpy path's conversions and checks)."""
        if not (isinstance(indices, np.ndarray) and indices.ndim == 1 and indices.dtype.kind == "i"):
            return False
        n = indices.shape[0]
        return all(
            isinstance(a, np.ndarray) and a.dtype == dt and a.shape == (n,)
            for a, dt in ((heads, np.uint16), (addrs, np.uint64), (lengths, np.uint32))
        )

    def track_one(self, index: int, *, queue: int, head: int, addr: int, length: int) -> None:
        """``track`` for one descriptor, in plain ints (a round of a few chains): the same checks, the
        same fields written, and nothing written when a check fails."""
        self._check_open("track")
        i = operator.index(index)
        if not 0 <= i < self._size:
            raise self._range_error(i)
        if not self._state[i]:
            raise self._not_in_use_error(i, freeing=False)
        if not 0 <= queue <= 0xFFFF:  # a virtqueue index is 16 bits (virtio 1.2 §4.1.4.3)
            raise ValueError(f"pool {self._name!r}: queue index {queue} outside 0..65535")
        if not (0 <= head <= 0xFFFF and 0 <= addr < 1 << 64 and 0 <= length <= 0xFFFF_FFFF):
            raise ValueError(
                f"pool {self._name!r}: head {head}, addr {addr} or length {length} does not fit its field"
            )
        self._queue[i] = queue
        self._head[i] = head
        self._addr[i] = addr
        self._length[i] = length

    def outstanding(self, queue: int | None = None) -> npt.NDArray[np.int32]:
        """Indices allocated now (ascending); only those tracked on ``queue`` if given."""
        self._check_open("outstanding")
        in_use = self._state != STATE_FREE
        if queue is not None:
            in_use &= self._queue == queue
        return np.flatnonzero(in_use).astype(np.int32)

    def holders(self) -> dict[int, int]:
        """Who holds the outstanding descriptors: {queue: count}, ``UNTRACKED`` for not yet tracked."""
        self._check_open("holders")
        queues, counts = np.unique(self._queue[self._state != STATE_FREE], return_counts=True)
        return dict(zip(queues.tolist(), counts.tolist(), strict=True))

    def free_indices(self) -> npt.NDArray[np.int32]:
        """Free descriptors in the order ``allocate`` will hand them out (normal ones first)."""
        self._check_open("free_indices")
        return np.concatenate((self._stack[self._used :], self._ostack[self._oused :])).astype(np.int32)

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        """NdisFreePacketPool: refused while descriptors are outstanding; a second close is harmless."""
        if self._closed:
            return
        if self.usage:
            holders = self.holders()
            held = ", ".join(
                f"untracked: {c}" if q == UNTRACKED else f"queue {q}: {c}" for q, c in holders.items()
            )
            raise PoolBusyError(
                f"pool {self._name!r}: cannot close, {self.usage} descriptors outstanding ({held})",
                outstanding=self.usage,
                holders=holders,
            )
        self._closed = True
        # "The pool handle is no longer valid": drop the storage so nothing can reach it by mistake.
        empty = self._table[:0]
        self._table, self._rows = empty, self._rows[:0]
        self._state = self._ever = empty["state"]
        self._stack = self._ostack = self._stack[:0]

    def on_drained(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` once when usage reaches 0 (now, if it is 0). Returns an unregister function.

        The callback runs inside the ``free``/``free_batch`` that returned the last descriptor, after
        the pool is consistent, on that caller's thread.
        """
        unregister = self._register_drained(callback)
        if unregister is None:
            callback()
            return noop
        return unregister

    # -- internals ----------------------------------------------------------------------------------

    def _register_drained(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        self._check_open("on_drained")
        if self.usage == 0:
            return None
        token = self._next_token
        self._next_token += 1
        self._drain_callbacks[token] = callback

        def unregister() -> None:
            self._drain_callbacks.pop(token, None)

        return unregister

    def _due_callbacks(self) -> list[Callable[[], None]]:
        if not self._drain_callbacks or self._used + self._oused:
            return []
        due = list(self._drain_callbacks.values())
        self._drain_callbacks.clear()
        return due

    def _note_high_water(self) -> None:
        usage = self._used + self._oused
        if usage > self._high_water:
            self._high_water = usage

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise PoolClosedError(
                f"pool {self._name!r} is closed: {operation} on an invalid handle",
                pool=self._name,
                operation=operation,
            )

    def _as_indices(self, indices: npt.ArrayLike) -> IndexArray:
        arr = np.asarray(indices)
        if arr.dtype == np.intp:
            return arr.reshape(-1)
        if arr.size == 0:
            return np.empty(0, dtype=np.intp)
        if arr.dtype.kind not in "iu":  # a bool mask or floats are a caller bug, not indices
            raise TypeError(f"pool {self._name!r}: descriptor indices must be integers, not {arr.dtype}")
        arr = arr.reshape(-1)
        if arr.dtype.kind == "u" and arr.dtype.itemsize >= 8 and arr.max() >= self._size:
            # uint64 beyond intp would wrap negative and be reported under a wrong value
            raise self._range_error(int(arr[np.flatnonzero(arr >= self._size)[0]]))
        return arr.astype(np.intp)

    def _field_values(
        self, values: npt.ArrayLike, n: int, dtype: np.dtype[Any], what: str
    ) -> npt.NDArray[Any]:
        if isinstance(values, np.ndarray) and values.dtype == dtype and values.shape == (n,):
            return values  # the hot path: the device hands arrays of the field's own type
        arr = np.asarray(values)
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"pool {self._name!r}: {what} must be integers, not {arr.dtype}")
        if arr.size and not np.can_cast(arr.dtype, dtype):
            info = np.iinfo(dtype)
            if arr.min() < 0 or arr.max() > info.max:
                raise ValueError(f"pool {self._name!r}: {what} outside 0..{info.max}")
        try:
            return np.broadcast_to(arr, (n,)).astype(dtype, copy=False)
        except ValueError as err:
            raise ValueError(f"pool {self._name!r}: {what} has shape {arr.shape}, need ({n},)") from err

    def _exhausted(self, requested: int) -> PoolExhaustedError:
        available = self._size - self._used - self._oused
        return PoolExhaustedError(
            f"pool {self._name!r} exhausted: {requested} requested, {available} free "
            f"(capacity {self._capacity} + overflow {self._overflow})",
            pool=self._name,
            requested=requested,
            available=available,
        )

    def _range_error(self, index: int) -> DescriptorRangeError:
        return DescriptorRangeError(
            f"pool {self._name!r}: descriptor {index} is not in 0..{self._size - 1}",
            pool=self._name,
            descriptor=index,
            size=self._size,
        )

    def _not_in_use_error(
        self, index: int, *, freeing: bool
    ) -> DoubleFreeError | DescriptorNotAllocatedError:
        ever = bool(self._ever[index])
        if freeing and ever:
            return DoubleFreeError(
                f"pool {self._name!r}: descriptor {index} is already free",
                pool=self._name,
                descriptor=index,
                in_batch=False,
            )
        return DescriptorNotAllocatedError(
            f"pool {self._name!r}: descriptor {index} "
            + ("is not allocated" if ever else "was never allocated"),
            pool=self._name,
            descriptor=index,
            ever_allocated=ever,
        )

    def _batch_not_in_use_error(
        self, idx: npt.NDArray[Any], *, freeing: bool
    ) -> DoubleFreeError | DescriptorNotAllocatedError:
        # Precedence: an index never handed out (a foreign value) is reported before a double free,
        # whatever their order in the batch; within a class, the first in batch order.
        bad = idx[self._state[idx] == STATE_FREE]
        never = bad[self._ever[bad] == 0]
        return self._not_in_use_error(int(never[0] if never.size else bad[0]), freeing=freeing)

    def _duplicate_error(self, index: int) -> DoubleFreeError:
        return DoubleFreeError(
            f"pool {self._name!r}: descriptor {index} appears twice in one free_batch",
            pool=self._name,
            descriptor=index,
            in_batch=True,
        )
