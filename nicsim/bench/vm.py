"""The VM mode of ``nicsim bench``: one fresh guest per repetition of each cell, sampled and summarised.

For each run ``VmRunner`` opens the backend's run (``BenchRun``), boots the guest on its NIC (QEMU
pinned to its own core through a ``taskset`` wrapper, so the pid QEMU reports is QEMU's), waits for
the guest to be up, opens the measured window (CPU time of QEMU and of the backend process, sampled
from /proc) and closes it when the guest prints its result. The window opens at ``NICSIM-READY`` —
for guest RX at the rx-count workload's "counting" line, so the guest's boot is never in the CPU
figures. Throughput is the guest's own count (pktgen for TX, eth0's counters for RX, iperf3 for
TCP). A run that fails is recorded with its reason, and the run goes on with the next one (the loop
over the plan is :func:`nicsim.bench.runner.run_cells`, shared with the backend-only mode).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.testvm import NetnsError, TestVM, TestVMError, Workload

from .backend import Backend, BenchError, RunContext
from .matrix import Cell, Direction, Plan
from .procstat import CpuWindow
from .runner import CellResult, Sample, run_cells

BOOT_TIMEOUT = 120.0  # a failure deadline for a loaded TCG host, not a performance figure
RESULT_MARGIN = 60.0


def workload_for(cell: Cell, ctx: RunContext) -> Workload:
    """The guest workload that measures ``cell``."""
    secs = ctx.duration
    if cell.direction is Direction.TX:
        # Broadcast destination MAC: every backend accepts it, no neighbour lookup in the guest.
        return Workload("pktgen-tx", size=cell.frame_len, duration=secs, dst=ctx.host_ip)
    if cell.direction is Direction.RX:
        return Workload("rx-count", duration=secs)
    reverse = cell.direction is Direction.TCP_RX
    return Workload("iperf3-client", server=ctx.host_ip, time=secs, proto="tcp", reverse=reverse)


def measure(cell: Cell, guest: dict[str, Any]) -> dict[str, Any]:
    """pps / Gbit/s / packets / bytes / seconds from the guest's result line."""
    if cell.direction.is_tcp:
        bps = guest.get("received_bps")
        nbytes = guest.get("received_bytes")
        return {"gbps": None if bps is None else bps / 1e9, "bytes": nbytes, "seconds": guest.get("seconds")}
    pps, nbytes, secs = guest.get("pps"), guest.get("bytes"), guest.get("seconds")
    gbps = nbytes * 8 / secs / 1e9 if nbytes is not None and secs else None
    return {"pps": pps, "gbps": gbps, "packets": guest.get("packets"), "bytes": nbytes, "seconds": secs}


def qemu_wrapper(workdir: Path, cpu: int | None, qemu: str) -> str:
    """A tiny executable that runs QEMU under ``taskset``; ``exec`` keeps QEMU's pid the one TestVM sees."""
    if cpu is None:
        return qemu
    path = workdir / "qemu-pinned"
    path.write_text(f'#!/bin/sh\nexec taskset -c {cpu} {shlex.quote(qemu)} "$@"\n')
    path.chmod(0o755)
    return str(path)


def not_run(backend: Backend, cell: Cell) -> tuple[str, str] | None:
    """``("skipped", why)`` when ``backend`` cannot run here, ``("n/a", why)`` when ``cell`` means
    nothing to it, else ``None``: such cells boot no guest."""
    why_not = backend.unavailable()
    if why_not is not None:
        return "skipped", why_not
    why_na = backend.unsupported(cell)
    if why_na is not None:
        return "n/a", why_na
    return None


@dataclass(kw_only=True)
class VmRunner:
    """Runs cells on the guest ``kernel``/``initrd``; ``on_run`` is told before each run starts."""

    kernel: Path
    initrd: Path
    ctx: RunContext
    accel: str = "tcg"
    qemu: str = "qemu-system-x86_64"
    on_run: Callable[[Cell, int], None] | None = None

    async def run_once(self, backend: Backend, cell: Cell) -> Sample:
        ctx = self.ctx
        wl = workload_for(cell, ctx)
        marker = r"rx-count: counting" if cell.direction is Direction.RX else "NICSIM-READY"
        try:
            async with backend.open_run(cell, ctx) as run:
                async with TestVM(
                    kernel=self.kernel, initrd=self.initrd, nic=run.nic, netns=run.netns,
                    workloads=[wl], guest_ip=f"{ctx.guest_ip}/24", accel=self.accel,
                    qemu=qemu_wrapper(ctx.workdir, ctx.qemu_cpu, self.qemu), name=f"bench-{backend.name}",
                    launch_timeout=ctx.start_timeout + BOOT_TIMEOUT,
                ) as vm:  # fmt: skip
                    await vm.wait_for("(?m)^NICSIM-READY", BOOT_TIMEOUT)
                    await run.ready()
                    if marker != "NICSIM-READY":
                        await vm.wait_for(marker, BOOT_TIMEOUT)
                    window = CpuWindow({"qemu": vm.pid, "backend": run.pid})
                    window.start()
                    results = await vm.results(ctx.duration + RESULT_MARGIN)
                    window.stop()
                sample = Sample(ok=True, cpu_qemu_pct=window.percent("qemu"),
                                cpu_backend_pct=window.percent("backend"))  # fmt: skip
            # The backend's final report (pool high-water) exists only once its run has ended.
            sample.pool_high_water = run.pool_high_water
            sample.backend = dict(run.extra)
        except (BenchError, TestVMError, NetnsError, OSError) as err:
            return Sample(ok=False, error=f"{type(err).__name__}: {err}")
        if len(results) != 1 or not results[0].ok:
            why = results[0].error if len(results) == 1 else f"{len(results)} result lines"
            return Sample(ok=False, error=f"guest workload {wl.name} failed: {why}",
                          guest=dict(results[0].data) if results else {})  # fmt: skip
        sample.guest = dict(results[0].data)
        for key, value in measure(cell, sample.guest).items():
            setattr(sample, key, value)
        if not (sample.gbps if cell.direction.is_tcp else sample.pps):
            sample.ok = False
            sample.error = "the guest counted no traffic"
        return sample

    async def run_plan(self, plan: Plan, backends: Sequence[Backend]) -> list[CellResult]:
        by_name = {b.name: b for b in backends}

        async def timed(cell: Cell) -> Sample:
            started = time.monotonic()
            sample = await self.run_once(by_name[cell.backend], cell)
            sample.backend.setdefault("run_seconds", round(time.monotonic() - started, 2))
            return sample

        return await run_cells(
            plan, timed, on_run=self.on_run, not_run=lambda cell: not_run(by_name[cell.backend], cell)
        )


def skip_runs(plan: Plan, backends: Sequence[Backend]) -> int:
    """How many runs of ``plan`` will not boot a guest (n/a cells, unavailable backends)."""
    by_name = {b.name: b for b in backends}
    return sum(plan.repetitions for cell in plan.cells if not_run(by_name[cell.backend], cell) is not None)
