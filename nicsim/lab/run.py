"""Run a planned lab once: start its switches, boot its guests, collect their results, stop everything.

``run_lab`` starts one ``nicsim serve --port switch`` per switch (a child process, ended by pid),
boots every guest at once (a vhost-user NIC on each of its switches, its forwarding and routes), and
waits until each has printed the results of every workload before its final sleep
(:class:`~nicsim.lab.plan.GuestPlan` ``expect``), within the topology's ``timeout``.
Then it stops the guests and the switches (whose captures are complete only then), counts the frames
each capture check asks about with Debian's ``tcpdump``, and evaluates the checks. Whatever happens,
nothing it started is left running; the lab's directory keeps each switch's log and stats and each
guest's console log for a person to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from nicsim.errors import LocalError
from qemu.testvm import TestVM, VhostUserNic
from qemu.testvm.workload import WorkloadResult, parse_results

from .checks import Outcome, evaluate
from .plan import GuestPlan, LabPlan, SwitchPlan

SOCKET_TIMEOUT = 30.0


class LabError(LocalError):
    """A lab that could not be brought up (a switch that would not start, a guest that would not boot)."""


@dataclass(kw_only=True)
class LabReport:
    plan: LabPlan
    outcomes: list[Outcome]
    results: dict[str, list[WorkloadResult]]
    switch_stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # what went wrong beside the checks (a boot, a timeout)

    @property
    def passed(self) -> bool:
        return not self.errors and all(o.passed for o in self.outcomes)


def _say(stream: TextIO | None) -> Callable[[str], None]:
    def say(text: str) -> None:
        if stream is not None:
            print(f"nicsim lab: {text}", file=stream, flush=True)

    return say


class RunningLab:
    """A lab's switches and guests, up from ``async with`` to its end (everything stopped, by pid).

    ``echo(guest, text)`` sees every guest's console output as it comes (``nicsim lab up``'s consoles).
    """

    def __init__(self, lab: LabPlan, *, image: Any = None, say: Callable[[str], None] = lambda _: None,
                 echo: Callable[[str, str], None] | None = None) -> None:  # fmt: skip
        self.plan = lab
        self.say = say
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.vms = {n: _vm(lab, g, image, echo) for n, g in lab.guests.items()}
        self._stack = contextlib.AsyncExitStack()
        self.t0 = time.monotonic()

    async def __aenter__(self) -> RunningLab:
        self.plan.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for sw in self.plan.switches.values():
                self.say(f"switch {sw.name}: starting ({len(sw.sockets)} guests)")
                self.servers[sw.name] = await _start_switch(sw, self.plan.run_dir)
            self.say(f"booting {', '.join(self.vms)}")
            for vm in self.vms.values():
                await self._stack.enter_async_context(vm)
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop the guests, then the switches (whose captures are complete only then)."""
        try:
            if self.vms:
                self.say("stopping the guests")
            await self._stack.aclose()
        finally:
            for name, proc in self.servers.items():
                _stop(proc)
                self.say(f"switch {name}: stopped")
            self.servers.clear()

    async def collect(self) -> tuple[dict[str, list[WorkloadResult]], list[str]]:
        """Every guest's results up to its final sleep, within the topology's timeout, and what failed."""
        deadline = self.t0 + self.plan.topology.timeout
        got = await asyncio.gather(
            *(_collect(n, self.vms[n], g, deadline, self.say) for n, g in self.plan.guests.items()),
            return_exceptions=True,
        )
        results: dict[str, list[WorkloadResult]] = {}
        errors: list[str] = []
        for (n, vm), r in zip(self.vms.items(), got, strict=True):
            if isinstance(r, BaseException):
                errors.append(f"{n}: {r}")
                results[n] = parse_results(vm.console_text)
            else:
                results[n] = r
        return results, errors

    def pids(self) -> dict[str, int]:
        """Every process the lab started: ``switch:NAME`` and ``guest:NAME`` -> pid."""
        out = {f"switch:{n}": p.pid for n, p in self.servers.items()}
        out.update({f"guest:{n}": vm.pid for n, vm in self.vms.items()})
        return out


async def run_lab(lab: LabPlan, *, image: Any = None, progress: TextIO | None = sys.stderr) -> LabReport:
    """Run ``lab`` once; ``image``: the built-in guest image, for guests without a kernel of their own."""
    running = RunningLab(lab, image=image, say=_say(progress))
    async with running:
        results, errors = await running.collect()
    captures = {
        i: _count_frames(_capture_of(lab, c.get("switch"), c.get("link")), c.get("filter", ""))
        for i, c in enumerate(lab.topology.checks)
        if c.kind == "capture"
    }
    return LabReport(
        plan=lab,
        outcomes=evaluate(lab, results, captures),
        results=results,
        switch_stats={s.name: _read_json(s.stats_file) for s in lab.switches.values()},
        seconds=time.monotonic() - running.t0,
        errors=errors,
    )


def _vm(lab: LabPlan, g: GuestPlan, image: Any, echo: Callable[[str, str], None] | None) -> TestVM:
    kernel = g.spec.kernel or (image.kernel if image is not None else None)
    initrd = g.spec.initrd if g.spec.initrd is not None else (image.initrd if g.spec.kernel is None else None)
    if kernel is None:
        raise LabError(f"guest {g.name}: no kernel (give one, or let the lab use the built-in image)")
    return TestVM(
        kernel=kernel,
        initrd=initrd,
        nics=[VhostUserNic(socket=nic.socket, mac=nic.mac, guest_ip=nic.ip) for nic in g.nics],
        forward=g.spec.forward,
        routes=g.routes,
        guest_ip=g.ip,
        workloads=g.workloads,
        memory_mb=g.spec.memory,
        cpus=g.spec.cpus,
        accel="auto",
        extra_append=g.spec.append,
        disk=g.spec.disk,
        log_dir=lab.run_dir / g.name,
        name=f"{lab.topology.name}-{g.name}",
        echo=None if echo is None else functools.partial(echo, g.name),
    )


async def _collect(
    name: str, vm: TestVM, g: GuestPlan, deadline: float, say: Callable[[str], None]
) -> list[WorkloadResult]:
    results = await vm.wait_results(g.expect, max(1.0, deadline - time.monotonic()))
    failed = sum(not r.ok for r in results)
    count = f"{len(results)} workload" + ("" if len(results) == 1 else "s")
    say(f"{name}: {count} done" + (f", {failed} failed" if failed else ""))
    return results


async def _start_switch(sw: SwitchPlan, run_dir: Path) -> subprocess.Popen[bytes]:
    log = (run_dir / f"switch-{sw.name}.log").open("wb")
    proc = subprocess.Popen(sw.argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    t_end = time.monotonic() + SOCKET_TIMEOUT
    while not all(p.exists() for p in sw.sockets.values()):
        if proc.poll() is not None:
            tail = (run_dir / f"switch-{sw.name}.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise LabError(
                f"switch {sw.name}: nicsim serve exited with {proc.returncode}: {' / '.join(tail)}"
            )
        if time.monotonic() > t_end:
            _stop(proc)
            raise LabError(f"switch {sw.name}: its sockets did not appear within {SOCKET_TIMEOUT:g} s")
        await asyncio.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # a graceful stop writes the final stats and closes the capture
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _capture_of(lab: LabPlan, switch: str | None, link: str | None) -> Path | None:
    """The capture file of ``switch``, or of the link of guest ``link``."""
    if switch is not None:
        return lab.switches[switch].capture
    spec = next((ln.capture for ln in lab.topology.links.values() if ln.guest == link and ln.capture), None)
    return None if spec is None else lab.run_dir / spec


def _count_frames(path: Path | None, bpf: str) -> int | str:
    """Frames of the capture ``path`` that match the tcpdump filter ``bpf``; a string says why not."""
    tcpdump = shutil.which("tcpdump") or next(
        (p for p in ("/usr/sbin/tcpdump", "/usr/bin/tcpdump") if Path(p).exists()), None
    )
    if path is None or tcpdump is None:
        return "no capture file" if path is None else "tcpdump is not installed (apt install tcpdump)"
    done = subprocess.run(
        [tcpdump, "-r", str(path), "-nn", *bpf.split()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        return f"tcpdump: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return len([ln for ln in done.stdout.splitlines() if ln.strip()])


def guests_results_json(results: Mapping[str, Sequence[WorkloadResult]]) -> dict[str, list[dict[str, Any]]]:
    return {
        n: [{"workload": r.workload, "ok": r.ok, "error": r.error, **dict(r.data)} for r in rs]
        for n, rs in results.items()
    }
