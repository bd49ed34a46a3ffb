"""Mapping the frontend's memory regions: one ``mmap`` per region fd, numpy views over it, unmapping last.

This module owns the only mmaps of guest RAM in the backend. ``MappedRegion.map`` checks the fd
before trusting it (a regular or memfd file, large enough for ``mmap_offset + size``), maps it
``MAP_SHARED`` and, when the frontend's pid is known, checks in ``/proc/PID/maps`` that the frontend
maps the same memory *shared* as well: QEMU started without ``share=on`` writes guest RAM into a
private copy, so the backend would see memory that never changes. ``MappedMemory`` is a table of
mapped regions behind one :class:`rings.memory.GuestMemory`; replacing the table releases the old
``GuestMemory`` (every view it made) before the old mmaps are closed, as numpy's ``memmap`` and
astropy's ``io.fits`` do. The region fd is closed as soon as it is mapped: the mapping keeps the memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from nicsim.errors import RemoteError
from rings.memory import GuestMemory, MemoryRegion

PAGE = mmap.ALLOCATIONGRANULARITY
SHARE_HINT = (
    "the guest's RAM must be shared with the backend: start QEMU with "
    "'-object memory-backend-memfd,id=mem,size=...,share=on' and '-numa node,memdev=mem' "
    "(or '-machine memory-backend=mem')"
)


class MemoryMapError(RemoteError):
    """A region the backend cannot map or cannot see; the message says why (and names share=on)."""


def frontend_mapping_shared(pid: int, user_addr: int) -> bool | None:
    """Whether process ``pid`` maps ``user_addr`` shared (``rw-s``); None if its maps are unreadable
    or no mapping contains the address (then nothing can be concluded)."""
    try:
        with open(f"/proc/{pid}/maps") as fh:
            for line in fh:
                span, perms = line.split(maxsplit=2)[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= user_addr < hi:
                    return perms[3:4] == "s"
    except (OSError, ValueError):
        return None
    return None


@dataclass(eq=False)
class MappedRegion:
    """One mapped region: the mmap (from a page-aligned offset) and the region's place in it."""

    guest_phys_addr: int
    size: int
    user_addr: int
    mm: mmap.mmap | None
    start: int  # offset of the region's first byte inside ``mm``

    @classmethod
    def map(
        cls, *, fd: int, guest_phys_addr: int, size: int, user_addr: int, mmap_offset: int,
        peer_pid: int | None = None,
    ) -> MappedRegion:
        """Map ``size`` bytes of ``fd`` at ``mmap_offset``. Does not close ``fd`` (the caller does)."""
        where = f"memory region at guest address {guest_phys_addr:#x} (size {size:#x})"
        try:
            st = os.fstat(fd)
        except OSError as err:
            raise MemoryMapError(f"{where}: its fd is not usable ({err}); {SHARE_HINT}") from err
        if not stat.S_ISREG(st.st_mode):
            raise MemoryMapError(
                f"{where}: its fd is not a shareable file (mode {stat.filemode(st.st_mode)}); {SHARE_HINT}"
            )
        if size <= 0 or mmap_offset < 0 or st.st_size < mmap_offset + size:
            raise MemoryMapError(
                f"{where}: mmap_offset {mmap_offset:#x} + size {size:#x} exceeds the fd's "
                f"{st.st_size:#x} bytes; {SHARE_HINT}"
            )
        if peer_pid is not None and frontend_mapping_shared(peer_pid, user_addr) is False:
            raise MemoryMapError(
                f"{where}: the frontend (pid {peer_pid}) maps this memory privately, so the backend "
                f"would never see the guest's writes; {SHARE_HINT}"
            )
        base = mmap_offset - mmap_offset % PAGE
        start = mmap_offset - base
        try:
            mm = mmap.mmap(fd, start + size, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)  # fmt: skip
        except (OSError, ValueError, OverflowError) as err:
            raise MemoryMapError(f"{where}: mmap failed ({err}); {SHARE_HINT}") from err
        return cls(guest_phys_addr=guest_phys_addr, size=size, user_addr=user_addr, mm=mm, start=start)

    def ring_region(self) -> MemoryRegion:
        assert self.mm is not None
        data = np.frombuffer(self.mm, dtype=np.uint8, count=self.size, offset=self.start)
        return MemoryRegion(guest_phys_addr=self.guest_phys_addr, size=self.size,
                            user_addr=self.user_addr, data=data)  # fmt: skip

    @property
    def key(self) -> tuple[int, int, int]:
        """How REM_MEM_REG names a region: guest address, user address, size."""
        return (self.guest_phys_addr, self.user_addr, self.size)

    def close(self) -> bool:
        """Unmap; False if a view of it is still alive somewhere (it is then unmapped when that dies)."""
        mm, self.mm = self.mm, None
        if mm is None:
            return True
        try:
            mm.close()
        except BufferError:
            return False
        return True


class MappedMemory:
    """The current memory table: mapped regions and the ``GuestMemory`` over them (None when empty)."""

    def __init__(self) -> None:
        self.regions: list[MappedRegion] = []
        self.memory: GuestMemory | None = None
        self.leaked_views = 0  # regions whose unmapping had to wait for a view we did not own

    def replace(self, regions: Iterable[MappedRegion]) -> GuestMemory | None:
        """Install a new table (SET_MEM_TABLE). The caller has already pointed the device away from
        the old ``GuestMemory`` (it is released here, then the old regions are unmapped)."""
        new = list(regions)
        memory = GuestMemory([r.ring_region() for r in new]) if new else None
        old_regions = self.regions
        self._drop_memory()
        self.regions, self.memory = new, memory
        self._unmap(old_regions)
        return memory

    def add(self, region: MappedRegion) -> GuestMemory:
        """ADD_MEM_REG: a table with one more region. Raises ValueError (and leaves the table as it
        was) if the new region overlaps an old one."""
        new = [*self.regions, region]
        memory = GuestMemory([r.ring_region() for r in new])
        self._drop_memory()
        self.regions, self.memory = new, memory
        return memory

    def remove(self, key: tuple[int, int, int]) -> GuestMemory | None:
        """REM_MEM_REG: the table without the region named by ``key`` (absent keys change nothing)."""
        gone = [r for r in self.regions if r.key == key][:1]
        keep = [r for r in self.regions if r not in gone]
        return self.replace_keeping(keep, gone)

    def replace_keeping(self, keep: list[MappedRegion], gone: list[MappedRegion]) -> GuestMemory | None:
        memory = GuestMemory([r.ring_region() for r in keep]) if keep else None
        self._drop_memory()
        self.regions, self.memory = keep, memory
        self._unmap(gone)
        return memory

    def close(self) -> None:
        """Release and unmap everything; idempotent."""
        self.replace_keeping([], self.regions)

    def _drop_memory(self) -> None:
        if self.memory is not None:
            self.memory.release()
            self.memory = None

    def _unmap(self, regions: Iterable[MappedRegion]) -> None:
        for r in regions:
            if not r.close():
                self.leaked_views += 1


def close_fds(fds: Iterable[int]) -> None:
    """Close each fd once, ignoring fds already gone (cleanup must not raise)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
