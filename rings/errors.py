"""The exception tree of ``rings``, in one place.

::

    RingsError                      base of everything raised by rings/
    ├── GuestError                  the guest (driver) broke the virtio rules; carries queue/descriptor
    │   ├── GuestMemoryError        an (address, length) range not inside one guest memory region
    │   ├── AvailIndexError         avail.idx moved by more than the queue size (virtio 1.2 §2.7.6)
    │   └── ChainError              a malformed descriptor chain; the chain is still returned to the used ring
    │       ├── DescriptorIndexError    head or next index >= queue size (§2.7.5.2)
    │       ├── DescriptorLoopError     the walk visited more descriptors than the queue holds (§2.7.5.2)
    │       ├── NestedIndirectError     INDIRECT inside an indirect table (§2.7.5.3.1)
    │       ├── IndirectLengthError     indirect table length 0 or not a multiple of 16 (§2.7.5.3.1)
    │       ├── ChainTooLongError       total chain length above 2^32 - 1
    │       └── DescriptorOrderError    a read-only descriptor after a write-only one (§2.7.4.2)
    ├── MemoryReleasedError         a GuestMemory used after release() (our side kept a stale table)
    ├── QueueConfigError            a queue size or ring address the rings cannot use
    ├── DeviceError                 the device broke the rules, as seen by the driver model (rings.driver)
    └── PoolError                   misuse of a PacketPool by its owner (our side, not the guest)
        ├── PoolExhaustedError      no free descriptor (NDIS_STATUS_RESOURCES); nothing changed
        ├── PoolIndexError          an index the caller does not hold; nothing changed
        │   ├── DescriptorRangeError        not an index of this pool (foreign)
        │   └── DescriptorNotAllocatedError not allocated now (never, or already returned)
        ├── DoubleFreeError         freeing a descriptor that is already free; nothing changed
        ├── PoolBusyError           close() while descriptors are outstanding (says how many, held by whom)
        └── PoolClosedError         any call after close(): the handle is no longer valid

Exceptions carry structured fields (``queue``, ``descriptor``, ``address``...) so callers can count
and log without parsing messages.
"""

from __future__ import annotations


class RingsError(Exception):
    """Base class of every error raised by ``rings``."""


class GuestError(RingsError):
    """The guest broke the virtio rules. ``queue`` and ``descriptor`` are None when unknown."""

    def __init__(self, message: str, *, queue: int | None = None, descriptor: int | None = None) -> None:
        where = []
        if queue is not None:
            where.append(f"queue {queue}")
        if descriptor is not None:
            where.append(f"descriptor {descriptor}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.queue = queue
        self.descriptor = descriptor


class GuestMemoryError(GuestError):
    """``[address, address + length)`` does not lie inside a single guest memory region."""

    def __init__(
        self,
        address: int,
        length: int,
        *,
        queue: int | None = None,
        descriptor: int | None = None,
        reason: str = "not inside one guest memory region",
    ) -> None:
        super().__init__(
            f"guest range 0x{address:x}+{length} is {reason}", queue=queue, descriptor=descriptor
        )
        self.address = address
        self.length = length


class AvailIndexError(GuestError):
    """The avail index moved by more than the queue size since we last looked."""


class ChainError(GuestError):
    """A malformed descriptor chain. The head is still returned on the used ring (with length 0)."""


class DescriptorIndexError(ChainError):
    pass


class DescriptorLoopError(ChainError):
    pass


class NestedIndirectError(ChainError):
    pass


class IndirectLengthError(ChainError):
    pass


class ChainTooLongError(ChainError):
    pass


class DescriptorOrderError(ChainError):
    pass


class PoolError(RingsError):
    """Misuse of a PacketPool by its owner."""


class PoolExhaustedError(PoolError):
    """``requested`` descriptors asked of pool ``pool`` while only ``available`` were free
    (NDIS_STATUS_RESOURCES); nothing changed."""

    def __init__(self, message: str, *, pool: str, requested: int, available: int) -> None:
        super().__init__(message)
        self.pool = pool
        self.requested = requested
        self.available = available


class PoolIndexError(PoolError, IndexError):
    """An index that does not name a descriptor the caller holds (see the two subclasses)."""


class DoubleFreeError(PoolError):
    """``descriptor`` freed while already free, or (``in_batch``) listed twice in one batch."""

    def __init__(self, message: str, *, pool: str, descriptor: int, in_batch: bool) -> None:
        super().__init__(message)
        self.pool = pool
        self.descriptor = descriptor
        self.in_batch = in_batch


class PoolBusyError(PoolError):
    """close() refused: ``outstanding`` descriptors, ``holders`` maps queue -> count."""

    def __init__(self, message: str, *, outstanding: int, holders: dict[int, int]) -> None:
        super().__init__(message)
        self.outstanding = outstanding
        self.holders = holders


class PoolClosedError(PoolError):
    """``operation`` was attempted on pool ``pool`` after its ``close()``: the handle is invalid."""

    def __init__(self, message: str, *, pool: str, operation: str) -> None:
        super().__init__(message)
        self.pool = pool
        self.operation = operation


class MemoryReleasedError(RingsError):
    """A GuestMemory was used after ``release()`` (our side: a stale memory table was kept)."""


class QueueConfigError(RingsError, ValueError):
    """A queue was configured with a size or address the rings cannot use (e.g. size not a power of 2)."""

    def __init__(self, message: str, *, queue: int | None = None) -> None:
        super().__init__(f"{message} (queue {queue})" if queue is not None else message)
        self.queue = queue





class DescriptorRangeError(PoolIndexError):
    """``descriptor`` is not an index of pool ``pool`` (valid: ``0 <= descriptor < size``): foreign."""

    def __init__(self, message: str, *, pool: str, descriptor: int, size: int) -> None:
        super().__init__(message)
        self.pool = pool
        self.descriptor = descriptor
        self.size = size


class DescriptorNotAllocatedError(PoolIndexError):
    """``descriptor`` is not allocated now; ``ever_allocated`` is False if it was never handed out."""

    def __init__(self, message: str, *, pool: str, descriptor: int, ever_allocated: bool) -> None:
        super().__init__(message)
        self.pool = pool
        self.descriptor = descriptor
        self.ever_allocated = ever_allocated




class DeviceError(RingsError):
    """The device broke the virtio rules, as seen by the driver model in ``rings.driver`` (e.g. a used
    id that was never posted or is returned twice). ``queue`` and ``descriptor`` as in GuestError."""

    def __init__(self, message: str, *, queue: int | None = None, descriptor: int | None = None) -> None:
        super().__init__(message)
        self.queue = queue
        self.descriptor = descriptor
