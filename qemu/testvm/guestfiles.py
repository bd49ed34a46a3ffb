"""The user's own guest files: checking a kernel, an initrd or a disk image before QEMU is started.

This module owns the questions QEMU would otherwise answer late and tersely ("could not open kernel
file"): does the file exist, is it a regular file, can this user read it, is it empty; and which
format a disk image is in (qcow2 by its magic, else raw), so QEMU neither guesses nor restricts
writes to a raw image's first sector. Each error is an ``InvalidOptionError`` that names the option
as the caller spells it (``--kernel`` on the command line, ``kernel=`` for ``TestVM``) and says what
to do. The disk image itself is never written: ``cmdline`` attaches it with ``snapshot=on``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidOptionError

QCOW2_MAGIC = b"QFI\xfb"
DISK_FORMATS = ("raw", "qcow2")


def check_file(path: str | Path, option: str, hint: str) -> Path:
    """``path`` if it is a non-empty regular file this user can read; else an InvalidOptionError
    that names ``option`` and ends with ``hint`` (what to give instead)."""
    p = Path(path)
    if not p.exists():
        raise InvalidOptionError(f"{option} {p}: no such file; {hint}")
    if not p.is_file():
        raise InvalidOptionError(f"{option} {p}: not a regular file (a directory?); {hint}")
    if not os.access(p, os.R_OK):
        raise InvalidOptionError(
            f"{option} {p}: not readable by this user (uid {os.geteuid()}); "
            f"make it readable ('chmod a+r {p}') or run as a user who can read it"
        )
    if p.stat().st_size == 0:
        raise InvalidOptionError(f"{option} {p}: the file is empty; {hint}")
    return p


def disk_format(path: str | Path, requested: str = "auto") -> str:
    """The format to open a disk image with: ``requested`` unless ``auto``, which reads the magic."""
    if requested in DISK_FORMATS:
        return requested
    if requested != "auto":
        raise InvalidOptionError(f"disk format {requested!r}: choose 'auto', 'raw' or 'qcow2'")
    with Path(path).open("rb") as f:
        return "qcow2" if f.read(len(QCOW2_MAGIC)) == QCOW2_MAGIC else "raw"
