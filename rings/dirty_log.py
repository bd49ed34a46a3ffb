"""The dirty log of a live migration: one bit per 4 KiB page of guest-physical memory the device wrote.

vhost-user (``VHOST_F_LOG_ALL`` with ``VHOST_USER_PROTOCOL_F_LOG_SHMFD``): while the frontend migrates
the guest, it shares a bitmap (SET_LOG_BASE) in which the backend sets bit ``gpa // 4096`` for every
guest page it writes, so that QEMU copies that page again. Bit ``n`` is bit ``n % 8`` of byte
``n // 8`` (the vhost-kernel layout QEMU reads, ``VHOST_LOG_PAGE``). A missed bit is a page the
destination guest gets stale: silent corruption. A spurious one costs a page copy. So a range is
logged whole, page by page, and a write the log cannot cover (beyond its end) is counted, never
skipped quietly.

QEMU clears what it has read with an atomic exchange per word while the backend keeps writing; it
never sets bits. A plain read-modify-write here can therefore only bring back bits QEMU has just
cleared (a spurious copy), never lose one of ours: the bit is set after the data was written, and
QEMU's exchange either sees it or comes after it. Pure: no I/O; the caller owns the mapping.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class DirtyLog:
    """A bitmap over guest-physical pages, backed by ``bitmap`` (the mapped log, ``uint8``)."""

    def __init__(self, bitmap: npt.NDArray[np.uint8]) -> None:
        if bitmap.dtype != np.uint8 or bitmap.ndim != 1:
            raise ValueError("the dirty log is a 1-D uint8 array")
        self.bitmap = bitmap
        self.pages = int(bitmap.shape[0]) * 8
        self.marked = 0  # page bits set (counting repeats): how much the log saw
        self.beyond = 0  # pages written past the log's end (a log too small for the guest's memory)

    def mark(self, gpa: int, length: int) -> None:
        """Log a write of ``length`` bytes at ``gpa``."""
        if length <= 0:
            return
        first, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
        if last - first < 8:
            for page in range(first, last + 1):
                self._mark_page(page)
            return
        self.mark_ranges(np.array([gpa], np.uint64), np.array([length], np.uint64))

    def _mark_page(self, page: int) -> None:
        if page >= self.pages:
            self.beyond += 1
            return
        self.bitmap[page >> 3] |= np.uint8(1 << (page & 7))
        self.marked += 1

    def mark_ranges(self, gpas: npt.NDArray[np.integer], lengths: npt.NDArray[np.integer]) -> None:
        """Log writes ``[gpas[i], gpas[i] + lengths[i])`` (zero lengths are no write), in one pass."""
        lengths = lengths.astype(np.uint64)
        keep = lengths > 0
        if not keep.all():
            gpas, lengths = gpas[keep], lengths[keep]
        if gpas.shape[0] == 0:
            return
        starts = gpas.astype(np.uint64)
        first = (starts >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        last = ((starts + lengths - np.uint64(1)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        counts = last - first + 1
        # Every page of every range: each range's first page repeated, plus 0, 1, ... within it.
        pages = np.repeat(first, counts) + (
            np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        )
        inside = pages < self.pages
        if not inside.all():
            self.beyond += int(np.count_nonzero(~inside))
            pages = pages[inside]
        np.bitwise_or.at(self.bitmap, pages >> 3, (1 << (pages & 7)).astype(np.uint8))
        self.marked += int(pages.shape[0])

    def dirty_pages(self) -> npt.NDArray[np.int64]:
        """The page numbers whose bit is set (tests, and a person looking at a log)."""
        bits = np.unpackbits(self.bitmap, bitorder="little")
        return np.flatnonzero(bits)
