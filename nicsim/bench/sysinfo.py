"""What a benchmark result must carry to be comparable later: versions and the machine it ran on.

Versions of QEMU, the host and guest kernels, DPDK, nicsim, Python and numpy; the machine's CPU model,
core count and memory. Anything that cannot be found is ``None``, never a guess.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

import nicsim

from .testpmd import dpdk_version


def _first_line(argv: list[str]) -> str | None:
    with contextlib.suppress(OSError):
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    return None


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def versions(*, qemu: str | None, guest_kernel: str | None = None) -> dict[str, Any]:
    """The versions a result carries; with ``qemu=None`` (the backend-only mode, where neither QEMU
    nor a guest takes part) there is no ``qemu`` and no ``guest_kernel`` entry."""
    found: dict[str, Any] = {
        "nicsim": nicsim.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    if qemu is not None:
        found["qemu"] = _first_line([qemu, "--version"])
    found["host_kernel"] = platform.release()
    if qemu is not None:
        found["guest_kernel"] = guest_kernel
    found["dpdk"] = dpdk_version()
    return found


def machine() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "arch": platform.machine(),
    }
