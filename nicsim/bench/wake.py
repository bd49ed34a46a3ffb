"""Holding the host's CPU wakeup latency for a run (``nicsim bench --wake-latency-us N``).

On a virtual machine, or any host whose idle cores sleep deeply, a lone request's round trip is
mostly the time it takes to wake an idle core: once for the backend, once for QEMU. Which backend
pays how many of those wakeups differs (DPDK's testpmd polls its core and pays none), so a latency
row measures the host's idle states as much as the data path. Linux's PM QoS interface lets a
process ask that no core enter an idle state slower to leave than N microseconds: write N (a native
32-bit int) to ``/dev/cpu_dma_latency`` and keep the file open. The request is machine-wide, applies
to every backend of the run alike, and the kernel drops it when the file is closed, so a bench that
dies leaves the host as it was (unlike sysfs knobs, which stay until someone writes them back).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

PM_QOS = Path("/dev/cpu_dma_latency")
_VALUE = struct.Struct("=i")  # the kernel reads a native int (or its text form)


class WakeLatencyError(OSError):
    """The request could not be made; the message is the one line to print."""


def current(path: Path = PM_QOS) -> int:
    """The machine-wide wakeup latency now in force, in microseconds (the lowest request held)."""
    return int(_VALUE.unpack(path.read_bytes()[: _VALUE.size])[0])


@contextlib.contextmanager
def held(us: int, path: Path = PM_QOS) -> Iterator[None]:
    """Hold the machine's wakeup latency at ``us`` microseconds or less until the block ends."""
    if not 0 <= us < 2**31:
        raise WakeLatencyError(f"--wake-latency-us {us}: give 0 or more microseconds")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as err:
        hint = "run as root" if err.errno in (1, 13) else "this kernel has no PM QoS device"
        raise WakeLatencyError(f"--wake-latency-us: cannot open {path} ({err.strerror}): {hint}, "
                               "or leave the option out") from err  # fmt: skip
    try:
        os.write(fd, _VALUE.pack(us))
        yield
    finally:
        os.close(fd)  # the kernel drops the request with the file
