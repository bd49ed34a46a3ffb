"""The dirty log QEMU shares for a live migration (SET_LOG_BASE), mapped: :class:`MappedDirtyLog`.

QEMU creates the log in a memfd, one bit per 4 KiB page of guest memory, and sends its fd, size and
offset; the backend maps it shared and writable, and the device sets bits in it while
VHOST_F_LOG_ALL is on (:class:`rings.dirty_log.DirtyLog`). QEMU may replace the log when guest
memory grows; the old one is unmapped once the device has let go of it.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np

from nicsim.server.guestmem import PAGE
from rings.dirty_log import DirtyLog

__all__ = ["MappedDirtyLog"]


class MappedDirtyLog:
    """``size`` bytes of ``fd`` from ``offset``, mapped shared, as a :class:`DirtyLog`."""

    def __init__(self, mm: mmap.mmap, start: int, size: int) -> None:
        self._mm: mmap.mmap | None = mm
        self.log = DirtyLog(np.frombuffer(mm, dtype=np.uint8, count=size, offset=start))

    @classmethod
    def map(cls, fd: int, size: int, offset: int) -> MappedDirtyLog:
        """Map the log; does not close ``fd`` (the caller does). OSError/ValueError if it cannot."""
        st = os.fstat(fd)
        if st.st_size < offset + size:
            raise ValueError(f"the log fd holds {st.st_size} bytes, not offset {offset} + size {size}")
        base = offset - offset % PAGE
        mm = mmap.mmap(
            fd,
            offset - base + size,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=base,
        )
        return cls(mm, offset - base, size)

    def close(self) -> None:
        if self._mm is None:
            return
        # The bitmap is a view of the mapping: drop it first, or the mapping cannot close.
        self.log.bitmap = np.zeros(0, np.uint8)
        self.log.pages = 0
        with contextlib.suppress(BufferError):  # a view still held elsewhere: the GC unmaps it later
            self._mm.close()
        self._mm = None
