"""CPU time of a process from ``/proc/<pid>/stat``, and the CPU share it used over a window.

This module owns the accounting behind the table's "CPU% QEMU" and "CPU% backend" columns: utime +
stime (fields 14 and 15 of proc(5), in clock ticks) of every thread of the process, sampled at the
start and end of the measured window, divided by the wall time between the samples. 100 % is one
core busy for the whole window. A process that is gone when sampled reads as ``None`` rather than as
zero, so a crashed backend cannot pass for an idle one. A QEMU started with ``-name
debug-threads=on`` names its vCPU threads (``CPU 0/TCG``), so its share can also be split into what
the guest's vCPUs used and what the rest of QEMU used (its main loop, where QEMU's own devices and
the interrupts a backend asks for are handled).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: how QEMU names a vCPU thread with ``-name debug-threads=on``: "CPU <index>/<accelerator>"
VCPU_THREAD = "CPU "


def _ticks(text: str) -> int:
    # comm (field 2) is in parentheses and may hold spaces or ')': split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state), so utime (14) and stime (15) are fields[11] and fields[12].
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int, *, proc: Path = Path("/proc")) -> float | None:
    """utime + stime of ``pid`` in seconds, or ``None`` if there is no such process."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return _ticks(text) / CLK_TCK


def vcpu_seconds(pid: int, *, proc: Path = Path("/proc")) -> float | None:
    """utime + stime of ``pid``'s vCPU threads (named ``VCPU_THREAD``...) in seconds, or ``None`` if
    there is no such process or it has no thread so named (a QEMU without ``debug-threads=on``)."""
    task = proc / str(pid) / "task"
    try:
        tids = os.listdir(task)
    except (FileNotFoundError, ProcessLookupError):
        return None
    ticks, found = 0, False
    for tid in tids:
        try:
            text = (task / tid / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a helper thread that ended meanwhile
        if text[text.index("(") + 1 : text.rindex(")")].startswith(VCPU_THREAD):
            ticks, found = ticks + _ticks(text), True
    return ticks / CLK_TCK if found else None


@dataclass
class CpuWindow:
    """A measured window over some processes: ``start()``, then ``stop()``, then ``percent(name)``;
    for a name also in ``vcpus``, ``percent(name + VCPU)`` is its vCPU threads' share."""

    pids: dict[str, int | None]
    vcpus: dict[str, int | None] = field(default_factory=dict)
    _t0: float = 0.0
    _t1: float = 0.0
    _c0: dict[str, float | None] | None = None
    _c1: dict[str, float | None] | None = None

    VCPU = ".vcpu"

    def _sample(self) -> dict[str, float | None]:
        out = {name: None if pid is None else cpu_seconds(pid) for name, pid in self.pids.items()}
        for name, pid in self.vcpus.items():
            out[name + self.VCPU] = None if pid is None else vcpu_seconds(pid)
        return out

    def start(self) -> None:
        self._c0 = self._sample()
        self._t0 = time.monotonic()

    def stop(self) -> None:
        self._c1 = self._sample()
        self._t1 = time.monotonic()

    @property
    def wall(self) -> float:
        return self._t1 - self._t0

    def seconds(self, name: str) -> float | None:
        """CPU seconds ``name`` used inside the window (``None`` if not sampled at both ends)."""
        if self._c0 is None or self._c1 is None:
            return None
        a, b = self._c0.get(name), self._c1.get(name)
        return None if a is None or b is None else b - a

    def percent(self, name: str) -> float | None:
        used = self.seconds(name)
        if used is None or self.wall <= 0:
            return None
        return 100.0 * used / self.wall
