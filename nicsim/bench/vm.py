"""The VM mode of ``nicsim bench``: one fresh guest per repetition of each cell, sampled and summarised.

For each run ``VmRunner`` opens the backend's run (``BenchRun``), boots the guest on its NIC (QEMU
pinned to its own core through a ``taskset`` wrapper, so the pid QEMU reports is QEMU's), waits for
the guest to be up, opens the measured window (CPU time of QEMU and of the backend process, sampled
from /proc) and closes it when the guest prints its result. The window opens at ``NICSIM-READY`` —
for guest RX at the rx-count workload's "counting" line, so the guest's boot is never in the CPU
figures; it closes at the workload's result line. Throughput is the guest's own count (pktgen for
TX, eth0's counters for RX, iperf3 for TCP; for latency cells, ping's replies, whose RTTs the host
turns into percentiles, or sockperf's replies and percentiles: :mod:`nicsim.bench.latency`), checked
against the backend's own count once the run has ended (:mod:`nicsim.bench.counts`). After the
measured workload the guest runs ``link``, whose feature bits are the negotiated virtio features
recorded with the sample. A run that fails is recorded with its reason, and the run goes on with the
next one (the loop over the plan is :func:`nicsim.bench.runner.run_cells`, shared with the
backend-only mode).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.testvm import NetnsError, TestVM, TestVMError, Workload, WorkloadResult

from .backend import Backend, BenchError, RunContext
from .counts import Carried, check_counts, guest_features
from .latency import ping_params, rr_measures, rr_params, rtt_measures
from .matrix import Cell, Direction, Plan
from .procstat import CpuWindow
from .runner import CellResult, Sample, run_cells

BOOT_TIMEOUT = 120.0  # a failure deadline for a loaded TCG host, not a performance figure
RESULT_MARGIN = 60.0
LINK_MARGIN = 30.0  # the link workload after the measured one: sysfs reads, a failure deadline


def workload_for(cell: Cell, ctx: RunContext) -> Workload:
    """The guest workload that measures ``cell``."""
    secs = ctx.duration
    if cell.direction is Direction.UDP_RR:
        return Workload("sockperf-ping-pong", server=ctx.host_ip, **rr_params(secs))
    if cell.direction.is_latency:
        return Workload("ping", target=ctx.host_ip, **ping_params(cell.direction, secs))
    if cell.direction is Direction.TX:
        # Broadcast destination MAC: every backend accepts it, no neighbour lookup in the guest.
        return Workload("pktgen-tx", size=cell.frame_len, duration=secs, dst=ctx.host_ip)
    if cell.direction is Direction.RX:
        return Workload("rx-count", duration=secs)
    reverse = cell.direction is Direction.TCP_RX
    return Workload("iperf3-client", server=ctx.host_ip, time=secs, proto="tcp", reverse=reverse)


def measure(cell: Cell, guest: dict[str, Any]) -> dict[str, Any]:
    """pps / Gbit/s / packets / bytes / seconds from the guest's result line (RTT percentiles, replies
    and loss for a latency cell; with the transaction rate for udp-rr)."""
    if cell.direction is Direction.UDP_RR:
        return rr_measures(guest)
    if cell.direction.is_latency:
        return rtt_measures(guest)
    if cell.direction.is_tcp:
        bps = guest.get("received_bps")
        nbytes = guest.get("received_bytes")
        return {"gbps": None if bps is None else bps / 1e9, "bytes": nbytes, "seconds": guest.get("seconds")}
    pps, nbytes, secs = guest.get("pps"), guest.get("bytes"), guest.get("seconds")
    gbps = nbytes * 8 / secs / 1e9 if nbytes is not None and secs else None
    return {"pps": pps, "gbps": gbps, "packets": guest.get("packets"), "bytes": nbytes, "seconds": secs}


def guest_count(cell: Cell, sample: Sample) -> int | None:
    """What the guest counted, in the unit the backend count check compares: bytes for TCP (iperf3's
    payload), frames otherwise."""
    value = sample.bytes if cell.direction.is_tcp else sample.packets
    return None if value is None else int(value)


def link_features(results: Sequence[WorkloadResult]) -> dict[str, Any]:
    """The negotiated features from the ``link`` result after the measured one, or why there are none."""
    link = next((r for r in results if r.workload == "link"), None)
    found = guest_features(link.data) if link is not None and link.ok else None
    if found is not None:
        return found
    why = "no link result" if link is None else (link.error or "no feature bits in the link result")
    return {"source": "guest (link)", "error": why}


def check_sample(cell: Cell, sample: Sample, carried: Carried | None) -> None:
    """Check a measured ``sample`` against the backend's own count; a check that fails fails it."""
    # pktgen counts every frame the guest sent, so guest TX spans the backend's whole run, and so do
    # sockperf's replies (warm-up included: the only traffic of the boot but a few ARP and IPv6
    # frames); rx-count and iperf3 count a window (or payload) of it, ping the replies to its requests.
    spans_run = cell.direction in (Direction.TX, Direction.UDP_RR)
    sample.counts = check_counts(cell, counted=guest_count(cell, sample), carried=carried,
                                 spans_run=spans_run)  # fmt: skip
    if sample.miscounted:
        sample.ok = False
        sample.error = f"backend count check: {sample.counts['reason']}"


def total_cpu(sample: Sample) -> float | None:
    """QEMU + backend + sender, each counted once (a process the run did not have adds nothing);
    ``None`` when QEMU itself was not measured."""
    if sample.cpu_qemu_pct is None:
        return None
    parts = (sample.cpu_qemu_pct, sample.cpu_backend_pct, sample.cpu_sender_pct)
    return sum(p for p in parts if p is not None)


def qemu_wrapper(workdir: Path, cpu: int | str | None, qemu: str) -> str:
    """A tiny executable that runs QEMU under ``taskset`` (one core, or a list such as ``0,1``);
    ``exec`` keeps QEMU's pid the one TestVM sees."""
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
    """Runs cells on the guest ``kernel``/``initrd``; ``on_run`` is told before each run starts,
    ``on_cell`` each cell's result once it is finished."""

    kernel: Path
    initrd: Path
    ctx: RunContext
    accel: str = "tcg"
    qemu: str = "qemu-system-x86_64"
    on_run: Callable[[Cell, int], None] | None = None
    on_cell: Callable[[CellResult], None] | None = None

    async def run_once(self, backend: Backend, cell: Cell) -> Sample:
        ctx = self.ctx
        wl = workload_for(cell, ctx)
        link = Workload("link")
        marker = r"rx-count: counting" if cell.direction is Direction.RX else "NICSIM-READY"
        try:
            async with backend.open_run(cell, ctx) as run:
                async with TestVM(
                    kernel=self.kernel, initrd=self.initrd, nic=run.nic, netns=run.netns,
                    workloads=[wl, link], guest_ip=f"{ctx.guest_ip}/24", accel=self.accel,
                    qemu=qemu_wrapper(ctx.workdir, ctx.qemu_cpu, self.qemu), name=f"bench-{backend.name}",
                    launch_timeout=ctx.start_timeout + BOOT_TIMEOUT,
                ) as vm:  # fmt: skip
                    await vm.wait_for("(?m)^NICSIM-READY", BOOT_TIMEOUT)
                    await run.ready()
                    if marker != "NICSIM-READY":
                        await vm.wait_for(marker, BOOT_TIMEOUT)
                    window = CpuWindow({"qemu": vm.pid, "backend": run.pid, "sender": run.sender_pid})
                    window.start()
                    await vm.wait_for("(?m)^NICSIM-RESULT ", ctx.duration + RESULT_MARGIN)
                    window.stop()
                    results = await vm.results(LINK_MARGIN)
                sample = Sample(ok=True, cpu_qemu_pct=window.percent("qemu"),
                                cpu_backend_pct=window.percent("backend"),
                                cpu_sender_pct=window.percent("sender"))  # fmt: skip
                sample.cpu_total_pct = total_cpu(sample)
            # The backend's final report (pool high-water) exists only once its run has ended.
            sample.pool_high_water = run.pool_high_water
            sample.backend = dict(run.extra)
        except (BenchError, TestVMError, NetnsError, OSError) as err:
            return Sample(ok=False, error=f"{type(err).__name__}: {err}")
        if not results or results[0].workload != wl.name or not results[0].ok:
            why = results[0].error if results else "no result line"
            return Sample(ok=False, error=f"guest workload {wl.name} failed: {why}",
                          guest=dict(results[0].data) if results else {})  # fmt: skip
        sample.guest = dict(results[0].data)
        sample.features = link_features(results[1:])
        for key, value in measure(cell, sample.guest).items():
            setattr(sample, key, value)
        if cell.direction is Direction.UDP_RR:
            counted = bool(sample.tps) and sample.rtt_p50_ms is not None
        elif cell.direction.is_latency:
            counted = sample.rtt_p50_ms is not None
        else:
            counted = bool(sample.gbps if cell.direction.is_tcp else sample.pps)
        if not counted:
            sample.ok = False
            sample.error = "the guest counted no traffic"
            return sample
        check_sample(cell, sample, run.carried)
        return sample

    async def run_plan(self, plan: Plan, backends: Sequence[Backend]) -> list[CellResult]:
        by_name = {b.name: b for b in backends}

        async def timed(cell: Cell) -> Sample:
            started = time.monotonic()
            sample = await self.run_once(by_name[cell.backend], cell)
            sample.backend.setdefault("run_seconds", round(time.monotonic() - started, 2))
            return sample

        return await run_cells(plan, timed, on_run=self.on_run, on_cell=self.on_cell,
                               not_run=lambda cell: not_run(by_name[cell.backend], cell))  # fmt: skip


def skip_runs(plan: Plan, backends: Sequence[Backend]) -> int:
    """How many runs of ``plan`` will not boot a guest (n/a cells, unavailable backends)."""
    by_name = {b.name: b for b in backends}
    return sum(plan.repetitions for cell in plan.cells if not_run(by_name[cell.backend], cell) is not None)
