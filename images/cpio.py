"""A reproducible writer for the initramfs archive format (cpio "newc").

This module owns turning a list of entries (directories, files, symlinks, device nodes) into the
byte stream the kernel unpacks as its initial root filesystem. Writing the archive ourselves,
rather than calling ``cpio`` over a staged tree, means device nodes such as ``/dev/console`` need no
root privileges and every header field (owner, time stamps, inode numbers) is fixed, so the same
inputs always give the same bytes and therefore the same image hash.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO

_MAGIC = b"070701"


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One archive member. ``path`` is relative to the root, without a leading slash."""

    path: str
    mode: int  # full st_mode: type bits and permissions
    data: bytes = b""  # file contents, or the link target for a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path=path, mode=stat.S_IFDIR | perm)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path=path, mode=stat.S_IFREG | perm, data=data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path=path, mode=stat.S_IFLNK | 0o777, data=target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path=path, mode=stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(*, ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    return _MAGIC + b"".join(b"%08X" % f for f in fields)


def write_archive(out: BinaryIO, entries: list[Entry]) -> int:
    """Write ``entries`` (sorted by path, parents first) and the trailer; return the bytes written.

    Paths must be unique: the kernel would silently let a later member replace an earlier one,
    which would hide a bug in whoever assembled the list.
    """
    seen: set[str] = set()
    written = 0
    ordered = sorted(entries, key=lambda e: e.path)
    trailer = Entry(path="TRAILER!!!", mode=0)
    for ino, entry in enumerate([*ordered, trailer], start=1):
        if entry.path in seen or entry.path.startswith("/"):
            raise ValueError(f"bad or duplicate archive path: {entry.path!r}")
        seen.add(entry.path)
        name = entry.path.encode() + b"\0"
        is_trailer = entry is trailer
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        head = _header(
            ino=0 if is_trailer else ino,
            mode=entry.mode,
            nlink=0 if is_trailer else nlink,
            size=len(entry.data),
            rdev=entry.rdev,
            namesize=len(name),
        )
        chunk = head + name + _pad4(len(head) + len(name)) + entry.data + _pad4(len(entry.data))
        out.write(chunk)
        written += len(chunk)
    return written
