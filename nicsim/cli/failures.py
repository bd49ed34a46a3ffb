"""Expected failures of the command line, each turned into one line that says what to do next.

An expected failure is one the user can fix: a missing program, no root for a network namespace or a
TAP, an image build that could not download, QEMU refusing an option. ``explain`` recognises them and
returns the line the CLI prints (no traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from images.apt import ImageBuildError
from qemu.testvm import TestVMError

# program -> the Debian package that ships it
PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "ip": "iproute2",
    "iperf3": "iperf3",
    "dpdk-testpmd": "dpdk-dev",
    "taskset": "util-linux",
    "depmod": "kmod",
    "cpio": "cpio",
    "busybox": "busybox-static",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
}
ROOT_HINT = "network namespaces and TAP devices need root (CAP_NET_ADMIN): run as root"


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def missing_program(err: FileNotFoundError) -> str | None:
    program = os.path.basename(str(err.filename or ""))
    if program in PACKAGES:
        return f"{program} not found: install it with 'apt-get install {PACKAGES[program]}'"
    return None


def failed_command(err: subprocess.CalledProcessError) -> str:
    argv = [str(a) for a in err.cmd] if isinstance(err.cmd, list | tuple) else shlex.split(str(err.cmd))
    stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
    said = first_line(stderr)
    line = f"'{shlex.join(argv)}' failed (exit {err.returncode})" + (f": {said}" if said else "")
    if argv and os.path.basename(argv[0]) == "ip" and os.geteuid() != 0:
        line += f"; {ROOT_HINT}"
    return line


def explain(err: BaseException) -> str | None:
    """The one line to print for an expected failure, or None for a bug."""
    if isinstance(err, ImageBuildError):
        return f"the guest image could not be built: {first_line(str(err))} (-vv shows everything)"
    if isinstance(err, TestVMError):
        return f"{first_line(str(err))} (-vv shows QEMU's command line and log)"
    if isinstance(err, subprocess.CalledProcessError):
        return failed_command(err)
    if isinstance(err, FileNotFoundError):
        return missing_program(err) or f"{err.strerror}: {err.filename}"
    if isinstance(err, PermissionError):
        hint = f"; {ROOT_HINT}" if os.geteuid() != 0 else ""
        return f"permission denied: {err.filename or first_line(str(err))}{hint}"
    if isinstance(err, OSError):
        return first_line(str(err))
    return None
