"""The ``nicsim`` backend: ``python -m nicsim serve`` as a subprocess, the guest's vhost-user backend.

Written against the serve contract: ``--socket SOCK`` (nicsim listens, QEMU connects once the file
exists), ``--port sink`` for guest TX cells, ``--port generator,size=N`` for guest RX cells (UDP
frames of N bytes, FCS excluded, to the guest's MAC as fast as the guest takes them), and
``--stats-file FILE``: a JSON snapshot rewritten every second and at exit, whose ``pool.high_water``
is the table's pool column and whose per-queue counters go into the run's JSON. SIGINT ends it
cleanly. TCP cells need a ``tap`` port nicsim does not have yet, so they are "n/a" for now.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

from qemu.testvm import VhostUserNic

from .backend import Backend, BenchError, ChildProcess, RunContext, Session, pinned
from .matrix import Cell, Direction
from .tap import python_env

_counter = itertools.count()


def serve_port(cell: Cell) -> str:
    """The ``--port`` argument for a cell: a sink for guest TX, a sized generator for guest RX."""
    if cell.direction is Direction.TX:
        return "sink"
    if cell.direction is Direction.RX:
        return f"generator,size={cell.frame_len}"
    raise ValueError(f"no nicsim port for {cell.direction.value} yet")


def high_water(stats: dict[str, Any]) -> int | None:
    pool = stats.get("pool")
    value = pool.get("high_water") if isinstance(pool, dict) else None
    return value if isinstance(value, int) else None


class NicsimBackend(Backend):
    name = "nicsim"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("nicsim.cmd_serve") is None:
            return "nicsim: the 'nicsim serve' command is not built yet (nicsim/cmd_serve.py)"
        return None

    def unsupported(self, cell: Cell) -> str | None:
        if cell.direction.is_tcp:
            return "needs nicsim's tap port, which does not exist yet"
        return None

    @contextlib.asynccontextmanager
    async def session(self, cell: Cell, ctx: RunContext) -> AsyncIterator[Session]:
        n = next(_counter)
        sock = ctx.workdir / f"nicsim-{n}.sock"
        stats_file = ctx.workdir / f"nicsim-{n}.stats.json"
        argv = pinned([
            sys.executable, "-m", "nicsim", "serve", "--socket", str(sock), "--port", serve_port(cell),
            "--stats-file", str(stats_file),
        ], ctx.backend_cpu)  # fmt: skip
        proc = ChildProcess(argv, ctx.workdir / f"nicsim-{n}.log", env=python_env())
        sess = Session(nic=VhostUserNic(mac=ctx.guest_mac, socket=sock))
        try:
            await proc.start()
            sess.pid = proc.pid
            await proc.wait_for_path(sock, ctx.start_timeout)
            yield sess
            status = await proc.stop()
            if status != 0:
                raise BenchError(f"nicsim serve exited with status {status}:\n{proc.output()}")
            try:
                stats = json.loads(stats_file.read_text())
            except (OSError, ValueError) as err:
                raise BenchError(f"nicsim serve left no readable stats file {stats_file}: {err}") from err
            sess.pool_high_water = high_water(stats)
            sess.extra["nicsim"] = stats
        finally:
            await proc.stop()
            sock.unlink(missing_ok=True)
