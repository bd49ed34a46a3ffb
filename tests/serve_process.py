"""``nicsim serve`` as a subprocess for end-to-end tests, as users run it, and waiting on its stats file.

``nicsim_serve`` starts it on a socket under ``tmp_path`` with a stats file rewritten every 0.2 s,
yields once the socket exists, and stops it with SIGINT (then SIGKILL, by pid) however the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.asynccontextmanager
async def nicsim_serve(
    tmp_path: Path, *args: str, more_sockets: Sequence[str] = ()
) -> AsyncIterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """``more_sockets``: further socket file names under ``tmp_path`` (a switch's other guests)."""
    sock, stats = tmp_path / "nicsim.sock", tmp_path / "stats.json"
    others = [tmp_path / name for name in more_sockets]
    argv = [sys.executable, "-m", "nicsim", "serve", "--socket", str(sock), "--stats-file", str(stats),
            "--stats-interval", "0.2", "--quiet", *(a for p in others for a in ("--socket", str(p))), *args]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(30):
            while not all(p.exists() for p in (sock, *others)):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                await asyncio.sleep(0.05)
        yield proc, sock, stats
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def read_stats(path: Path, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
    """The stats file once ``predicate(stats)`` holds (the server rewrites it every 0.2 s)."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(FileNotFoundError, ValueError):
                stats: dict[str, Any] = json.loads(path.read_text())
                if predicate(stats):
                    return stats
            await asyncio.sleep(0.1)
