"""The inflight buffer of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: the memfd, its mapping, and the device hooks.

This module owns the I/O half of inflight tracking (the layouts and the recovery rules are
:mod:`rings.inflight`'s for split rings and :mod:`rings.inflight_packed`'s for packed ones,
VIRTIO_F_RING_PACKED).
``InflightStore.create`` makes the buffer GET_INFLIGHT_FD hands out (a sealed-size memfd of
``inflight_size`` or ``packed_inflight_size(num_queues, queue_size)`` zero bytes, mapped shared);
``InflightStore.adopt`` maps the fd SET_INFLIGHT_FD brings back (after checking the fd really holds
``mmap_offset + mmap_size`` bytes, CVE-2020-10722's lesson: never trust a size/offset pair the frontend
sends). Which layout a buffer has follows the features negotiated before it was asked for (QEMU sends
SET_FEATURES before GET_INFLIGHT_FD for that reason). ``InflightStore`` implements the backend core's
``InflightStorage``, which includes the device's ``InflightHooks``: chains popped from a TX ring are
marked in flight (on a packed ring with their descriptors, and so are RX chains right before they are
published, since ``push_used`` overwrites them in the ring); every batch returned on a used ring is
recorded before and committed after ``push_used`` (vhost-user spec, "Inflight I/O tracking").
A store is closed exactly once: views are dropped before the mmap is closed, the memfd last.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat

import numpy as np
import numpy.typing as npt

from nicsim.vhost.actions import InflightError
from nicsim.virtio.inflight import TrackedQueue
from rings.inflight import InflightRegion, Recovery, inflight_size
from rings.inflight_packed import InflightPackedRegion, PackedRecovery, packed_inflight_size
from rings.memory import GuestMemory
from rings.packed import PackedQueue

MAX_INFLIGHT_QUEUES = 256  # vhost-user ring indices are 8 bits (SET_VRING_KICK's u64, bits 0-7)


class InflightStore:
    """One inflight buffer: the mapping, the ``InflightRegion`` over it, and (if we made it) the memfd."""

    def __init__(
        self, mm: mmap.mmap, fd: int | None, *, num_queues: int, queue_size: int, size: int,
        packed: bool = False,
    ) -> None:  # fmt: skip
        self._mm: mmap.mmap | None = mm
        self.fd = fd  # the memfd we created and send with GET_INFLIGHT_FD's reply; None when adopted
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.mmap_size = size
        self.packed = packed  # the QueueRegionPacked layout (else QueueRegionSplit)
        self.region: InflightRegion | None = None
        self.packed_region: InflightPackedRegion | None = None
        if packed:
            self.packed_region = InflightPackedRegion(mm, num_queues=num_queues, queue_size=queue_size)
        else:
            self.region = InflightRegion(mm, num_queues=num_queues, queue_size=queue_size)

    @staticmethod
    def _check(num_queues: int, queue_size: int, packed: bool = False) -> int:
        if not 1 <= num_queues <= MAX_INFLIGHT_QUEUES:
            raise InflightError(
                f"inflight buffer for {num_queues} queues: not in 1..{MAX_INFLIGHT_QUEUES}",
                reason="queues", num_queues=num_queues, queue_size=queue_size,
            )  # fmt: skip
        try:
            size = packed_inflight_size if packed else inflight_size
            return size(num_queues, queue_size)
        except ValueError as err:
            raise InflightError(
                str(err), reason="size", num_queues=num_queues, queue_size=queue_size
            ) from err

    @classmethod
    def create(cls, *, num_queues: int, queue_size: int, packed: bool = False) -> InflightStore:
        """A zeroed buffer for GET_INFLIGHT_FD (the fd stays ours: it is sent, then closed by ``close``),
        in the packed layout when ``packed``."""
        size = cls._check(num_queues, queue_size, packed)
        fd = os.memfd_create("nicsim-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Neither side may shrink the file under the other's mapping (SIGBUS otherwise).
            fcntl_seal(fd)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(mm, fd, num_queues=num_queues, queue_size=queue_size, size=size, packed=packed)

    @classmethod
    def adopt(
        cls, fd: int, *, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int,
        packed: bool = False,
    ) -> InflightStore:
        """Map the buffer SET_INFLIGHT_FD brought (in the packed layout when ``packed``). Does not close
        ``fd`` (the caller does; the mapping keeps the memory). Raises InflightError when the fd is not
        a file that holds the whole range."""
        need = cls._check(num_queues, queue_size, packed)

        def fail(message: str, reason: str) -> InflightError:
            return InflightError(message, reason=reason, num_queues=num_queues, queue_size=queue_size)

        if mmap_size < need:
            raise fail(f"inflight mmap_size {mmap_size:#x} is below the {need:#x} bytes "
                       f"{num_queues} queues of {queue_size} need", "size")  # fmt: skip
        try:
            st = os.fstat(fd)
        except OSError as err:
            raise fail(f"inflight fd not usable: {err}", "fd") from err
        # CVE-2020-10722: offset + size is checked against the file without overflow (Python ints).
        if not stat.S_ISREG(st.st_mode) or st.st_size < mmap_offset + mmap_size:
            raise fail(
                f"inflight fd ({stat.filemode(st.st_mode)}, {st.st_size:#x} bytes) does not hold "
                f"mmap_offset {mmap_offset:#x} + mmap_size {mmap_size:#x}", "fd",
            )  # fmt: skip
        if mmap_offset % mmap.ALLOCATIONGRANULARITY:
            raise fail(f"inflight mmap_offset {mmap_offset:#x} is not page aligned", "mmap")
        try:
            mm = mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=mmap_offset)  # fmt: skip
        except (OSError, ValueError, OverflowError) as err:
            raise fail(f"inflight mmap failed: {err}", "mmap") from err
        return cls(mm, None, num_queues=num_queues, queue_size=queue_size, size=mmap_size, packed=packed)

    # -- recovery ---------------------------------------------------------------------------------

    def tracks(self, index: int, queue_size: int) -> bool:
        return (self.region is not None or self.packed_region is not None) and index < self.num_queues \
            and queue_size == self.queue_size

    def recover(self, index: int, ring_used_idx: int) -> Recovery:
        """rings.inflight's reconciliation for queue ``index`` (InflightRegionError if the region is bad)."""
        assert self.region is not None
        return self.region.queue(index).recover(ring_used_idx)

    def recover_packed(
        self, index: int, mem: GuestMemory, desc_addr: int, *, used_pos: int, used_wrap: int
    ) -> PackedRecovery:
        """rings.inflight_packed's reconciliation for packed queue ``index`` with its descriptor ring
        (InflightRegionError if the region is bad, GuestMemoryError if the ring is not in memory)."""
        assert self.packed_region is not None
        return self.packed_region.queue(index).recover(mem, desc_addr, used_pos=used_pos, used_wrap=used_wrap)

    # -- InflightHooks ----------------------------------------------------------------------------
    # A packed queue's region does nothing until recover_packed ran for it (its ``ready``): a queue
    # the buffer does not track (another size) is never recovered.

    def popped(self, index: int, q: TrackedQueue, mem: GuestMemory, heads: npt.NDArray[np.uint16]) -> None:
        if index >= self.num_queues:
            return
        if self.packed_region is not None:
            if isinstance(q, PackedQueue):
                self.packed_region.queue(index).mark_popped(*q.popped_descriptors(mem))
        elif self.region is not None:
            self.region.queue(index).mark_popped(heads)

    def filling(self, index: int, q: TrackedQueue, mem: GuestMemory, heads: npt.NDArray[np.uint16]) -> None:
        if self.packed_region is None or index >= self.num_queues or not isinstance(q, PackedQueue):
            return  # split: RX chains are read again from the avail ring after a crash
        descs, ndesc = q.popped_descriptors(mem)
        k = int(heads.shape[0])
        if k < ndesc.shape[0]:
            descs, ndesc = descs[: int(ndesc[:k].sum())], ndesc[:k]
        self.packed_region.queue(index).mark_popped(descs, ndesc)

    def before_used(self, index: int, q: TrackedQueue, heads: npt.NDArray[np.uint16]) -> None:
        if index >= self.num_queues:
            return
        if self.packed_region is not None:
            if isinstance(q, PackedQueue):
                self.packed_region.queue(index).pre_put(heads, q.used_after(heads))
        elif self.region is not None:
            self.region.queue(index).pre_put(heads)

    def after_used(self, index: int, q: TrackedQueue, heads: npt.NDArray[np.uint16]) -> None:
        if index >= self.num_queues:
            return
        if self.packed_region is not None:
            if isinstance(q, PackedQueue):
                self.packed_region.queue(index).post_put(heads)
        elif self.region is not None:
            self.region.queue(index).post_put(heads, q.used_idx)

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the views, unmap, close the memfd (if ours). Idempotent."""
        if self.region is not None:
            self.region.release()
            self.region = None
        if self.packed_region is not None:
            self.packed_region.release()
            self.packed_region = None
        mm, self._mm = self._mm, None
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def fcntl_seal(fd: int) -> None:
    """Seal the memfd's size against shrinking (best effort: sealing is a memfd feature)."""
    import fcntl

    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)

