"""The one small interface every benchmarked backend implements, and the process plumbing they share.

A ``Backend`` says whether it can run at all on this machine (``unavailable``), whether it has a
meaning for a given cell (``unsupported``: the row is shown as "n/a" with the reason), and opens a
``BenchRun`` for one run of one cell (``open_run``): the handle gives the guest's NIC (and the
network namespace QEMU must run in, if any), the pid of the process that does the backend's work
(for CPU accounting), a hook called once the guest is up, and what the backend reported when it
ended: the nicsim pool's high-water mark, and its own count of the traffic (``carried``, which
the run checks the guest's count against: :mod:`nicsim.bench.counts`). ``ChildProcess`` starts
helpers with their output in a log file and ends them by pid only: a signal, a grace period, then
SIGKILL.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nicsim.errors import LocalError
from qemu.testvm import DEFAULT_MAC, Nic

from .counts import Carried
from .matrix import Cell

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.2"
PREFIX_LEN = 24


class BenchError(LocalError):
    """A run of a cell failed; the message says why (and usually what to do about it)."""


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """What every run of one ``nicsim bench`` command shares."""

    workdir: Path
    duration: float
    qemu_cpu: int | str | None = 0  # a core, or a taskset list ("0,1": QEMU free on both)
    backend_cpu: int | None = 1
    guest_mac: str = DEFAULT_MAC
    guest_ip: str = GUEST_IP
    host_ip: str = HOST_IP
    start_timeout: float = 15.0
    #: extra options for ``nicsim serve`` (``--nicsim-args``: notification policy knobs, say)
    nicsim_args: tuple[str, ...] = ()
    #: the nicsim backend's guest NIC uses packed virtqueues (``--packed``: QEMU's ``packed=on``)
    packed: bool = False


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """``argv`` under ``taskset -c CPU`` (taskset execs, so the pid stays the program's own)."""
    return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]


def python_env() -> dict[str, str]:
    """The environment for ``python -m nicsim...`` children, importable even when not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class BenchRun:
    """One run's view of a backend; ``pid`` may appear only in ``ready()`` (e.g. a sender)."""

    nic: Nic
    netns: str | None = None
    pid: int | None = None
    pool_high_water: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    carried: Carried | None = None  # set once the run has ended, from the backend's own counters
    #: a traffic helper outside QEMU and the backend (qemu-tap's RX sender, a TCP cell's iperf3
    #: server): its CPU share is the "CPU sender" column and counts in the cell's total core use
    sender_pid: int | None = None

    async def ready(self) -> None:
        """Called once the guest printed NICSIM-READY, before the measured window opens."""


class Backend(abc.ABC):
    """A vhost-user or QEMU-internal backend under test; nicsim is just another one."""

    name: ClassVar[str]

    def unavailable(self) -> str | None:
        """Why this backend cannot run here (a message saying what to install), or ``None``."""
        return None

    def unsupported(self, cell: Cell) -> str | None:
        """Why ``cell`` has no meaning for this backend (shown as "n/a"), or ``None``."""
        return None

    @abc.abstractmethod
    def open_run(self, cell: Cell, ctx: RunContext) -> AbstractAsyncContextManager[BenchRun]:
        """Set the backend up for one run of ``cell``; leaving the context tears everything down."""


class ChildProcess:
    """A helper process with stdout+stderr in ``log``; ended by pid, never by name."""

    def __init__(self, argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        self._env = env
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("wb") as out:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    env=self._env, start_new_session=True,
                )  # fmt: skip
            except OSError as err:
                raise BenchError(f"cannot start {self.argv[0]}: {err}") from err

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise BenchError(f"{self.argv[0]} was not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def output(self, limit: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""

    async def wait(self, timeout: float) -> int | None:
        if self._proc is None:
            return None
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self._proc.wait(), timeout)
        return None

    async def stop(self, sig: signal.Signals = signal.SIGINT, grace: float = 5.0) -> int | None:
        """Send ``sig``, wait ``grace`` seconds, then SIGKILL; returns the exit status."""
        proc = self._proc
        if proc is None:
            return None
        for s, wait in ((sig, grace), (signal.SIGKILL, 5.0)):
            if proc.returncode is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, s)
            await self.wait(wait)
        return proc.returncode

    async def wait_for_path(self, path: Path, timeout: float) -> None:
        """Wait until ``path`` exists (a socket being created); fail early if the process dies."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not path.exists():
            if self.returncode is not None:
                raise BenchError(
                    f"{self.argv[0]} exited with status {self.returncode} before creating {path.name}:\n"
                    f"{self.output()}"
                )
            if loop.time() > deadline:
                raise BenchError(f"{self.argv[0]} did not create {path.name} within {timeout:g} s:\n"
                                 f"{self.output()}")  # fmt: skip
            await asyncio.sleep(0.05)
