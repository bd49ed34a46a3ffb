"""The process that keeps a lab up (``nicsim lab up`` starts it in its own session and returns).

It brings the lab up (:class:`~nicsim.lab.run.RunningLab`), waits for every guest's workloads, writes
the verdict of the checks it can judge while the lab runs (a capture is complete only once its
switch stops, so capture checks wait for ``nicsim lab run``), and then serves each guest's console on
a Unix socket in the lab's directory (:class:`ConsoleRelay`) until SIGTERM or SIGINT
(``nicsim lab down``), when it stops everything it started. Every step is in ``state.json``
(:mod:`nicsim.lab.state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from typing import Any

from qemu.testvm import TestVM

from .checks import evaluate
from .plan import LabPlan
from .run import RunningLab
from .state import console_socket, write_state

BACKLOG_CHARS = 4000  # console output a client sees on attaching: the prompt and what led to it


class ConsoleRelay:
    """Each guest's console on ``console-GUEST.sock``: output to every attached client (and the last
    ``BACKLOG_CHARS`` to a new one), what a client types to the guest."""

    def __init__(self, lab: LabPlan) -> None:
        self.lab = lab
        self.backlog: dict[str, str] = {n: "" for n in lab.guests}
        self.clients: dict[str, set[asyncio.StreamWriter]] = {n: set() for n in lab.guests}
        self.servers: list[asyncio.AbstractServer] = []

    def feed(self, guest: str, text: str) -> None:
        self.backlog[guest] = (self.backlog[guest] + text)[-BACKLOG_CHARS:]
        for w in list(self.clients[guest]):
            if w.is_closing():
                self.clients[guest].discard(w)
            else:
                w.write(text.encode())

    async def start(self, vms: dict[str, TestVM]) -> None:
        for name, vm in vms.items():
            path = console_socket(self.lab.run_dir, name)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

            async def attach(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, name: str = name, vm: TestVM = vm
            ) -> None:
                self.clients[name].add(w)
                w.write(self.backlog[name].encode())
                try:
                    while data := await r.read(4096):
                        await vm.send_console(data)
                except (OSError, ConnectionError):
                    pass
                finally:
                    self.clients[name].discard(w)
                    w.close()

            self.servers.append(await asyncio.start_unix_server(attach, path=str(path)))

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for ws in self.clients.values():
            for w in ws:
                w.close()
        for name in self.lab.guests:
            with contextlib.suppress(FileNotFoundError):
                console_socket(self.lab.run_dir, name).unlink()


async def supervise(lab: LabPlan, *, image: Any = None) -> int:
    """Bring ``lab`` up and keep it up until SIGTERM/SIGINT; 0 if it came up and its checks passed."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state: dict[str, Any] = {
        "lab": lab.topology.name,
        "source": lab.topology.source,
        "pid": os.getpid(),
        "state": "starting",
        "started": time.time(),
        "run_dir": str(lab.run_dir),
        "pids": {},
        "guests": {
            n: {**g.as_json(), "console": str(console_socket(lab.run_dir, n))} for n, g in lab.guests.items()
        },
    }
    write_state(lab.run_dir, state)
    relay = ConsoleRelay(lab)
    code = 1
    try:
        running = RunningLab(lab, image=image, say=_log, echo=relay.feed)
        async with running:
            state["pids"] = running.pids()
            write_state(lab.run_dir, state)
            await relay.start(running.vms)
            results, errors = await running.collect()
            outcomes = [o for o in evaluate(lab, results) if o.kind != "capture"]
            state.update(state="up", errors=errors, checks=[o.as_json() for o in outcomes])
            write_state(lab.run_dir, state)
            code = 0 if not errors and all(o.passed for o in outcomes) else 1
            _log(
                f"up: {sum(o.passed for o in outcomes)}/{len(outcomes)} checks passed"
                + (f"; errors: {errors}" if errors else "")
            )
            await stop.wait()
            state["state"] = "stopping"
            write_state(lab.run_dir, state)
    except Exception as err:
        state.update(state="failed", error=str(err))
        write_state(lab.run_dir, state)
        _log(f"failed: {err}")
        return 1
    finally:
        await relay.close()
    state.update(state="down", pids={})
    write_state(lab.run_dir, state)
    return code


def _log(text: str) -> None:
    print(f"nicsim lab: {text}", file=sys.stderr, flush=True)
