"""Choosing the accelerator: KVM only where a probe shows it really boots a guest, else TCG.

``/dev/kvm`` opening is not enough: under nested virtualisation a KVM guest can hang in the kernel
with the CPU at 100 %. So the probe boots the real kernel with no initrd under ``-accel kvm``; a
working KVM reaches the kernel's "no root" panic within a fraction of a second, and the probe waits a
few seconds for that marker, then kills its QEMU by pid whatever happened. The answer is cached for
the process per (QEMU binary, kernel), so a test session pays for the probe once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from .cmdline import DEFAULT_QEMU
from .errors import InvalidOptionError

PROBE_MARKER = b"Kernel panic"
PROBE_TIMEOUT = 6.0

_cache: dict[tuple[str, str], str] = {}


def kvm_usable() -> bool:
    """Whether /dev/kvm exists and we may open it read-write (the cheap half of the question)."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


async def probe_kvm(kernel: str | Path, *, qemu: str = DEFAULT_QEMU, timeout: float = PROBE_TIMEOUT) -> bool:
    """Boot ``kernel`` under KVM without an initrd; True if it panics for want of a root in time."""
    if not kvm_usable():
        return False
    argv = [
        qemu, "-accel", "kvm", "-cpu", "host", "-m", "128M", "-nodefaults", "-display", "none",
        "-no-reboot", "-serial", "stdio", "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
    ]  # fmt: skip
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    except OSError:
        return False
    assert proc.stdout is not None
    seen = b""
    try:
        async with asyncio.timeout(timeout):
            while PROBE_MARKER not in seen:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    return False  # QEMU exited (e.g. a KVM assertion) before the kernel got anywhere
                seen = seen[-64:] + chunk
        return True
    except TimeoutError:
        return False
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        # asyncio.shield: even if we are being cancelled, reap the child we just killed.
        await asyncio.shield(proc.wait())


async def choose_accel(requested: str, kernel: str | Path, *, qemu: str = DEFAULT_QEMU) -> str:
    """Resolve ``"tcg"``, ``"kvm"`` or ``"auto"`` to the accelerator to use (``auto`` probes once)."""
    if requested in ("tcg", "kvm"):
        return requested
    if requested != "auto":
        raise InvalidOptionError(f"accel={requested!r}: choose 'auto', 'kvm' or 'tcg'")
    key = (qemu, str(kernel))
    if key not in _cache:
        _cache[key] = "kvm" if await probe_kvm(kernel, qemu=qemu) else "tcg"
    return _cache[key]
