"""The inflight buffer of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: the memfd, its mapping, and the device hooks.

This module owns the I/O half of inflight tracking (the layout and the recovery rules are
:mod:`rings.inflight`'s). ``InflightStore.create`` makes the buffer GET_INFLIGHT_FD hands out (a sealed-size
memfd of ``inflight_size(num_queues, queue_size)`` zero bytes, mapped shared); ``InflightStore.adopt`` maps
the fd SET_INFLIGHT_FD brings back (after checking the fd really holds ``mmap_offset + mmap_size`` bytes,
CVE-2020-10722's lesson: never trust a size/offset pair the frontend sends). ``InflightStore`` implements
the backend core's ``InflightStorage``, which includes the device's ``InflightHooks``: heads popped from
a TX avail ring are marked in flight; every batch returned on a used ring is linked before and cleared
after ``push_used`` (vhost-user spec, "Inflight I/O tracking").
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
from rings.inflight import InflightRegion, Recovery, inflight_size

MAX_INFLIGHT_QUEUES = 256  # vhost-user ring indices are 8 bits (SET_VRING_KICK's u64, bits 0-7)


class InflightStore:
    """One inflight buffer: the mapping, the ``InflightRegion`` over it, and (if we made it) the memfd."""

    def __init__(self, mm: mmap.mmap, fd: int | None, *, num_queues: int, queue_size: int, size: int) -> None:
        self._mm: mmap.mmap | None = mm
        self.fd = fd  # the memfd we created and send with GET_INFLIGHT_FD's reply; None when adopted
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.mmap_size = size
        self.region: InflightRegion | None = InflightRegion(mm, num_queues=num_queues, queue_size=queue_size)

    @staticmethod
    def _check(num_queues: int, queue_size: int) -> int:
        if not 1 <= num_queues <= MAX_INFLIGHT_QUEUES:
            raise InflightError(
                f"inflight buffer for {num_queues} queues: not in 1..{MAX_INFLIGHT_QUEUES}",
                reason="queues", num_queues=num_queues, queue_size=queue_size,
            )  # fmt: skip
        try:
            return inflight_size(num_queues, queue_size)
        except ValueError as err:
            raise InflightError(
                str(err), reason="size", num_queues=num_queues, queue_size=queue_size
            ) from err

    @classmethod
    def create(cls, *, num_queues: int, queue_size: int) -> InflightStore:
        """A zeroed buffer for GET_INFLIGHT_FD (the fd stays ours: it is sent, then closed by ``close``)."""
        size = cls._check(num_queues, queue_size)
        fd = os.memfd_create("nicsim-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Neither side may shrink the file under the other's mapping (SIGBUS otherwise).
            fcntl_seal(fd)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(mm, fd, num_queues=num_queues, queue_size=queue_size, size=size)

    @classmethod
    def adopt(
        cls, fd: int, *, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> InflightStore:
        """Map the buffer SET_INFLIGHT_FD brought. Does not close ``fd`` (the caller does; the mapping
        keeps the memory). Raises InflightError when the fd is not a file that holds the whole range."""
        need = cls._check(num_queues, queue_size)

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
        return cls(mm, None, num_queues=num_queues, queue_size=queue_size, size=mmap_size)

    # -- recovery ---------------------------------------------------------------------------------

    def tracks(self, index: int, queue_size: int) -> bool:
        return self.region is not None and index < self.num_queues and queue_size == self.queue_size

    def recover(self, index: int, ring_used_idx: int) -> Recovery:
        """rings.inflight's reconciliation for queue ``index`` (InflightRegionError if the region is bad)."""
        assert self.region is not None
        return self.region.queue(index).recover(ring_used_idx)

    # -- InflightHooks ----------------------------------------------------------------------------

    def popped(self, index: int, heads: npt.NDArray[np.uint16]) -> None:
        if self.region is not None and index < self.num_queues:
            self.region.queue(index).mark_popped(heads)

    def before_used(self, index: int, heads: npt.NDArray[np.uint16]) -> None:
        if self.region is not None and index < self.num_queues:
            self.region.queue(index).pre_put(heads)

    def after_used(self, index: int, heads: npt.NDArray[np.uint16], used_idx: int) -> None:
        if self.region is not None and index < self.num_queues:
            self.region.queue(index).post_put(heads, used_idx)

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the views, unmap, close the memfd (if ours). Idempotent."""
        if self.region is not None:
            self.region.release()
            self.region = None
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

