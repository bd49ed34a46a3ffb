"""``nicsim serve`` as a child process for tests: started on named sockets, read through its stats file.

This module owns :class:`ServerProcess`, the handle the pytest plugin's ``nicsim_server`` factory
gives out and that any other harness (a lab runner, a script) may use on its own. The sockets live
in a private short directory (a Unix socket path must fit in 108 bytes, which a deep ``tmp_path``
can exceed); each is named as asked, so ``--impair b:rx:loss=20%`` and the capture's interface names
use the same names the test does. What is worth keeping after the test (the stats file, rewritten
every ``stats_interval`` seconds; the capture; the server's own output) goes to ``out_dir``.
``stop`` sends SIGINT, waits, then SIGKILL, always by pid, and returns the exit code; it is harmless
to call twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from nicsim.errors import LocalError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STOP_TIMEOUT = 30.0


class ServerError(LocalError):
    """``nicsim serve`` did not come up, or the handle was used out of order; ``exitcode`` (None while it
    runs or before it started), ``argv`` and ``output`` say what happened (the message has them too)."""

    def __init__(
        self, message: str, *, exitcode: int | None = None, argv: Sequence[str] = (), output: str = ""
    ) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.argv = list(argv)
        self.output = output


class ServerProcess:
    """One ``nicsim serve`` child on ``names`` sockets; ``start`` returns once every socket exists."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        out_dir: Path,
        port: str | None = None,
        impair: Sequence[str] = (),
        pcap: bool | str = False,
        args: Sequence[str] = (),
        stats_interval: float = 0.2,
        python: str = sys.executable,
    ) -> None:
        if not names:
            raise ValueError("a nicsim server needs at least one socket name")
        for name in names:
            if not _NAME_RE.match(name):
                raise ValueError(f"socket name {name!r} must be letters, digits, '_', '.' or '-'")
        if len(set(names)) != len(names):
            raise ValueError(f"socket names repeat: {list(names)}")
        self.names = list(names)
        self.out_dir = Path(out_dir)
        self.stats_path = self.out_dir / "stats.json"
        self.log_path = self.out_dir / "serve.log"
        self.pcap: Path | None = None
        if pcap:
            self.pcap = self.out_dir / (pcap if isinstance(pcap, str) else "capture.pcapng")
        self._socket_dir: Path | None = None
        self._options = [*(["--port", port] if port is not None else []),
                         *(a for spec in impair for a in ("--impair", spec)),
                         *(["--pcap", str(self.pcap)] if self.pcap is not None else []),
                         "--stats-file", str(self.stats_path), "--stats-interval", str(stats_interval),
                         "--quiet", *args]  # fmt: skip
        self._python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def argv(self) -> list[str]:
        socks = [a for name in self.names for a in ("--socket", str(self.socket(name)))]
        return [self._python, "-m", "nicsim", "serve", *socks, *self._options]

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start the server and wait (blocking, polling) until all its sockets exist."""
        if self._proc is not None:
            raise ServerError("this server was started already")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._socket_dir = Path(tempfile.mkdtemp(prefix="nicsim-sock-"))
        self._log = self.log_path.open("wb")
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + timeout
        while not all(self.socket(n).exists() for n in self.names):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                code = self._proc.poll()
                self.stop()
                why = f"exited with code {code}" if code is not None else f"no sockets after {timeout:g} s"
                raise ServerError(f"nicsim serve {why}: {' '.join(self.argv)}\n{self.output()}",
                                  exitcode=code, argv=self.argv, output=self.output())  # fmt: skip
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGINT, then SIGKILL after ``timeout``, by pid; the exit code (None if never started)."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        return None if proc is None else proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ServerError("not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs (or before it started), else its exit code."""
        return None if self._proc is None else self._proc.poll()

    # ---- what a test reads ------------------------------------------------------------------------

    def socket(self, name: str) -> Path:
        """The path of socket ``name`` (for ``VhostUserNic(socket=...)``)."""
        if name not in self.names:
            raise KeyError(f"no socket {name!r}; this server has {self.names}")
        if self._socket_dir is None:
            raise ServerError("not started: the sockets have no directory yet")
        return self._socket_dir / name

    def output(self) -> str:
        """What the server printed so far (warnings, errors; it runs with --quiet)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> dict[str, Any] | None:
        """The latest stats snapshot, or None before the first one is written."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            doc: dict[str, Any] = json.loads(self.stats_path.read_text())
            return doc
        return None

    async def wait_stats(
        self, predicate: Callable[[dict[str, Any]], bool] = lambda s: True, timeout: float = 30.0
    ) -> dict[str, Any]:
        """The first snapshot for which ``predicate`` holds (TimeoutError after ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            while True:
                stats = self.stats()
                if stats is not None and predicate(stats):
                    return stats
                await asyncio.sleep(0.1)

    async def wait_disconnected(self, timeout: float = 30.0) -> dict[str, Any]:
        """The first snapshot in which no guest is connected any more (after the guests are gone)."""
        return await self.wait_stats(lambda s: not any(e["connected"] for e in s["sockets"]), timeout)

    def port_stats(self, stats: dict[str, Any], name: str) -> dict[str, Any]:
        """Switch port ``name``'s row in a snapshot (the switch keys its ports by socket path)."""
        row: dict[str, Any] = stats["switch"]["ports"][str(self.socket(name))]
        return row
