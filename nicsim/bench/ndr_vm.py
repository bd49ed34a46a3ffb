"""``nicsim bench --ndr``: NDR and PDR for guest RX, every trial of a cell's search in one guest.

For each guest-RX cell that measured a maximum rate (MRR: the generator as fast as the guest takes
frames), the search of :mod:`nicsim.bench.ndr` runs between ``MIN_FRACTION`` and ``MAX_FRACTION`` of
that MRR. One guest is booted per cell and takes all its trials. Its ``rx-watch`` workload prints
eth0's ``rx_packets`` on the console every ``WATCH_INTERVAL`` s. nicsim serve runs the generator as
an offered load (``offered=on,hold=on``): it sends nothing until the bench signals SIGUSR1, then sends
the burst ``--burst-file`` describes (``count`` frames at ``rate_pps``). A frame that falls due while
the guest has no buffer posted is dropped and counted, so once the burst has finished every one of
its ``count`` frames was either written to the guest's ring or dropped: the offered count is exact.

One trial:

1. wait for a counter line printed after the previous burst finished: ``before``;
2. write the burst file, signal SIGUSR1;
3. wait until the stats file (rewritten every ``STATS_INTERVAL`` s) says this burst has finished;
4. wait for the second counter line after that (the guest has drained what is on its ring): ``after``.

Loss is ``count - (after - before)``: frames the generator dropped at a full ring plus frames the
guest lost after the ring (both are loss to RFC 2544). Nothing else sends to the guest on the
generator's port, so the counter moves only with the burst. The trial's duration is ``count / rate``;
``QUICK_PHASES`` and ``FULL_PHASES`` say which durations were used (short first, long last).

nicsim and the qemu-tap peer are searched. nicsim's generator paces itself; for qemu-tap,
:mod:`nicsim.bench.paced` in the peer's namespace sends each burst (exactly ``count`` frames on a
clock schedule; a send that fails is an offered frame lost) and reports the rate it achieved, and a
trial where it fell below 97 % of the rate asked is marked ``sender_bound``. It writes the frame every
other backend sends the guest (198.18.0.2, UDP checksum 0) raw onto the TAP, as the blaster does.
DPDK testpmd's txonly has no simple rate control: its rows say so.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nicsim.virtio.policy import NotifyPolicy
from qemu.testvm import NetnsError, TestVM, TestVMError, Workload

from .backend import BenchError, RunContext
from .matrix import Cell, Direction
from .ndr import Phase, SearchResult, Trial, search
from .runner import CellResult
from .serve import NicsimBackend
from .tap import QemuTapBackend, TapRun
from .vm import BOOT_TIMEOUT, qemu_wrapper

QUICK_PHASES = (Phase(duration=0.5, precision=0.25), Phase(duration=1.0, precision=0.1))
FULL_PHASES = (Phase(duration=1.0, precision=0.2), Phase(duration=5.0, precision=0.02))
MAX_FRACTION = 1.25  # of the MRR: the search's highest offered rate
MIN_FRACTION = 0.01  # of the MRR: its lowest
MAX_TRIALS = 24
WATCH_INTERVAL = 0.2
STATS_INTERVAL = 0.1
FINISH_MARGIN = 10.0  # a failure deadline beyond the burst's own duration, not a performance figure
WATCH_LINE = r"rx-watch (\d+) (\d+) (\d+)\r?\n"
PACED = ("nicsim", "qemu-tap")
NOT_PACED = {"dpdk": "testpmd's txonly has no simple rate control"}


def ndr_estimate_seconds(*, quick: bool) -> float:
    """One cell's search, boot included: a planning figure for the estimate, not a promise (about
    12 trials of the quick phases took 20-33 s on a 2-core TCG host)."""
    return 30.0 if quick else 100.0


class NdrBackend(NicsimBackend):
    """nicsim serve with the generator as an offered load that waits for SIGUSR1 and a burst file.

    Its FIFO (``burst``) holds as many frames as nicsim's RX backlog holds for a push-style port
    (the tap) while the guest has no buffer posted (``NotifyPolicy.rx_backlog``, 256), so a frame is
    lost exactly where one arriving from the tap would be. NDR depends on that depth: with 32 it came
    out about half as high on this 2-core TCG host, with 1024 about twice as high (a few ms of stall,
    the guest's or the backend's, is what loses frames)."""

    generator_options = f"offered=on,hold=on,rate_pps=1000,burst={NotifyPolicy().rx_backlog}"

    def extra_serve_args(self, ctx: RunContext, n: int) -> list[str]:
        self.burst_file = ctx.workdir / f"nicsim-{n}.burst.json"
        return ["--burst-file", str(self.burst_file), "--stats-interval", str(STATS_INTERVAL), "--quiet"]


@dataclass(kw_only=True)
class NdrCell:
    """One cell's NDR/PDR (or why there is none), the MRR it started from and every trial."""

    cell: Cell
    mrr_pps: float | None
    result: SearchResult | None = None
    error: str | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)
    phases: Sequence[Phase] = ()
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "backend": self.cell.backend, "direction": self.cell.direction.value, "size": self.cell.size,
            "mrr_pps": self.mrr_pps, "error": self.error,
            "ndr": None if r is None else r.ndr.to_json(), "pdr": None if r is None else r.pdr.to_json(),
            "phases": [{"duration": p.duration, "precision": p.precision} for p in self.phases],
            "trials": self.trials, "seconds": self.seconds,
        }  # fmt: skip


def _burst(stats_file: Path) -> dict[str, Any] | None:
    try:
        stats = json.loads(stats_file.read_text())
    except (OSError, ValueError):
        return None
    port = stats.get("port") if isinstance(stats, dict) else None
    if not isinstance(port, dict):
        return None
    return {"bursts": port.get("bursts"), **(port.get("burst") or {})}


async def _counter_line(vm: TestVM, since: int, timeout: float) -> tuple[int, int]:
    """The first whole rx-watch line after console offset ``since``: (its end, rx_packets)."""
    found = await vm.wait_for(WATCH_LINE, timeout, since=since)
    return found.end(), int(found.group(2))


# Starts a burst of ``count`` frames at ``rate`` (trial ``number``, ``duration`` s), returns once every
# frame was offered, with what the sender reported; BenchError when the burst did not go as asked.
Fire = Callable[[float, int, int, float], Awaitable[dict[str, Any]]]


def nicsim_fire(backend: NdrBackend, pid: int) -> Fire:
    async def fire(rate: float, count: int, number: int, duration: float) -> dict[str, Any]:
        backend.burst_file.write_text(json.dumps({"rate_pps": rate, "count": count}))
        started = time.monotonic()
        os.kill(pid, signal.SIGUSR1)
        await asyncio.sleep(duration)
        assert backend.stats_file is not None
        burst = None
        while time.monotonic() - started < duration + FINISH_MARGIN:
            burst = _burst(backend.stats_file)
            if burst is not None and burst.get("bursts") == number and burst.get("finished"):
                break
            await asyncio.sleep(STATS_INTERVAL)
        else:
            raise BenchError(f"burst {number} ({count} frames at {rate:.0f} pps) did not finish: {burst}")
        if burst.get("offered") != count:
            raise BenchError(f"burst {number}: the generator offered {burst.get('offered')} of {count}")
        return {"dropped_at_ring": burst.get("dropped")}

    return fire


def tap_fire(run: TapRun, cell: Cell, ctx: RunContext) -> Fire:
    async def fire(rate: float, count: int, number: int, duration: float) -> dict[str, Any]:
        child = await run.spawn(f"paced-{number}", [
            sys.executable, "-m", "nicsim.bench.paced", "--ifname", "tap0", "--dst-mac", ctx.guest_mac,
            "--frame", str(cell.frame_len), "--pps", f"{rate:.3f}", "--count", str(count),
        ])  # fmt: skip
        status = await child.wait(duration + FINISH_MARGIN)
        if status != 0:
            await child.stop()
            raise BenchError(f"paced sender, trial {number}: exit status {status}: {child.output(300)}")
        try:
            sender = json.loads(child.output(500).strip().splitlines()[-1])
        except (ValueError, IndexError) as err:
            raise BenchError(f"paced sender, trial {number}: no result line ({err})") from err
        if sender.get("offered") != count:
            raise BenchError(f"paced sender, trial {number}: offered {sender.get('offered')} of {count}")
        # The sender set the pace only if it kept up: below 97 % of the rate asked, say so.
        sender["sender_bound"] = sender.get("achieved_pps", 0) < 0.97 * rate
        return {"sender": sender}

    return fire


async def one_trial(
    vm: TestVM, fire: Fire, rate: float, duration: float, number: int
) -> tuple[Trial, dict[str, Any]]:
    count = max(round(rate * duration), 1)
    timeout = duration + FINISH_MARGIN
    _, before = await _counter_line(vm, len(vm.console_text), timeout)
    extra = await fire(rate, count, number, duration)
    end, _ = await _counter_line(vm, len(vm.console_text), timeout)
    _, after = await _counter_line(vm, end, timeout)
    received = after - before
    trial = Trial(rate=rate, duration=duration, offered=count, received=received)
    record = {"rate_pps": rate, "duration": duration, "offered": count, "received": received,
              "loss_ratio": round(trial.loss_ratio, 6), **extra}  # fmt: skip
    return trial, record


async def ndr_cell(
    cell: Cell, mrr_pps: float, *, kernel: Path, initrd: Path, ctx: RunContext, accel: str, qemu: str,
    phases: Sequence[Phase], progress: Callable[[str], None] | None = None,
) -> NdrCell:  # fmt: skip
    """The search for ``cell`` in one guest, between ``MIN_FRACTION`` and ``MAX_FRACTION`` of ``mrr_pps``."""
    out = NdrCell(cell=cell, mrr_pps=mrr_pps, phases=phases)
    backend: NdrBackend | QemuTapBackend = NdrBackend() if cell.backend == "nicsim" else QemuTapBackend()
    started = time.monotonic()
    gen = search(max_rate=mrr_pps * MAX_FRACTION, min_rate=mrr_pps * MIN_FRACTION, phases=phases,
                 max_trials=MAX_TRIALS)  # fmt: skip
    watch = Workload("rx-watch", interval=WATCH_INTERVAL, duration=3600)
    try:
        async with backend.open_run(cell, ctx) as run, TestVM(
            kernel=kernel, initrd=initrd, nic=run.nic, netns=run.netns, workloads=[watch],
            guest_ip=f"{ctx.guest_ip}/24", accel=accel,
            qemu=qemu_wrapper(ctx.workdir, ctx.qemu_cpu, qemu),
            name=f"bench-ndr-{backend.name}", launch_timeout=ctx.start_timeout + BOOT_TIMEOUT,
        ) as vm:  # fmt: skip
            await vm.wait_for("(?m)^NICSIM-READY", BOOT_TIMEOUT)
            if isinstance(backend, NdrBackend):
                await run.ready()
                assert run.pid is not None
                fire = nicsim_fire(backend, run.pid)
            else:  # qemu-tap: not run.ready(), which would start the unpaced blaster
                assert isinstance(run, TapRun)
                fire = tap_fire(run, cell, ctx)
            await vm.wait_for(WATCH_LINE, BOOT_TIMEOUT)
            try:
                rate, duration = next(gen)
                number = 0
                while True:
                    number += 1
                    trial, record = await one_trial(vm, fire, rate, duration, number)
                    out.trials.append(record)
                    if progress is not None:
                        progress(f"ndr {cell.label()}: trial {number} {rate:.0f} pps x {duration:g} s, "
                                 f"loss {trial.loss_ratio:.4%}")  # fmt: skip
                    rate, duration = gen.send(trial)
            except StopIteration as stop:
                out.result = stop.value
    except (BenchError, TestVMError, NetnsError, OSError) as err:
        out.error = f"{type(err).__name__}: {err}"
    out.seconds = round(time.monotonic() - started, 2)
    return out


def ndr_candidates(results: Sequence[CellResult]) -> list[tuple[Cell, float | None, str | None]]:
    """Guest-RX cells with their MRR (median pps), or why no search runs for them."""
    out: list[tuple[Cell, float | None, str | None]] = []
    for r in results:
        cell = r.cell
        if cell.direction is not Direction.RX:
            continue
        if cell.backend not in PACED:
            out.append((cell, None, NOT_PACED.get(cell.backend, "no paced sender for this backend")))
            continue
        pps = r.summary("pps")
        if r.status != "ok" or pps is None or pps.median <= 0:
            out.append((cell, None, f"no MRR to start from ({r.status}: {r.reason})"))
            continue
        out.append((cell, pps.median, None))
    return out


def _k(pps: float | None) -> str:
    return "-" if pps is None else f"{pps / 1e3:.1f}k"


def render_ndr(cells: Sequence[NdrCell]) -> str:
    """The NDR/PDR table: rates in kpps, MRR beside, the trial durations used."""
    head = f"{'cell':<22} {'MRR':>9} {'NDR':>9} {'PDR':>9} {'NDR/MRR':>8} {'trials':>6}  note"
    lines = ["RFC 2544 throughput, guest RX (NDR: zero loss, PDR: at most 0.5 % loss)", head]
    for c in cells:
        r = c.result
        if r is None:
            lines.append(f"{c.cell.label():<22} {_k(c.mrr_pps):>9} {'-':>9} {'-':>9} {'-':>8} {'-':>6}  "
                         f"{c.error}")  # fmt: skip
            continue
        share = f"{r.ndr.rate / c.mrr_pps:.0%}" if c.mrr_pps else "-"
        notes = [f"{b.name} {'below the lowest rate tried' if b.below_min else 'at the highest rate tried'}"
                 for b in (r.ndr, r.pdr) if b.below_min or b.at_max]  # fmt: skip
        notes += [f"{b.name}: {b.ignored_passes} pass(es) above a failure ignored (noise)"
                  for b in (r.ndr, r.pdr) if b.ignored_passes]  # fmt: skip
        if c.mrr_pps and r.ndr.rate > c.mrr_pps:
            notes.append("NDR above MRR: the MRR row's sender, not the guest, set that rate")
        lines.append(f"{c.cell.label():<22} {_k(c.mrr_pps):>9} {_k(r.ndr.rate):>9} {_k(r.pdr.rate):>9} "
                     f"{share:>8} {len(r.trials):>6}  {'; '.join(notes)}")  # fmt: skip
    phases = next((c.phases for c in cells if c.phases), ())
    if phases:
        lines.append("trials: " + ", then ".join(f"{p.duration:g} s to {p.precision:.0%}" for p in phases)
                     + "; one guest per cell takes all its trials")  # fmt: skip
    return "\n".join(lines)


async def run_ndr(
    results: Sequence[CellResult], *, kernel: Path, initrd: Path, ctx: RunContext, accel: str, qemu: str,
    quick: bool, progress: Callable[[str], None] | None = None,
    on_result: Callable[[NdrCell], None] | None = None,
) -> list[NdrCell]:  # fmt: skip
    """NDR/PDR for every guest-RX cell of ``results`` that can have one; the others say why not.
    ``on_result`` hears each cell as soon as it is known."""
    phases = QUICK_PHASES if quick else FULL_PHASES
    out: list[NdrCell] = []
    for cell, mrr, why in ndr_candidates(results):
        if mrr is None:
            found = NdrCell(cell=cell, mrr_pps=None, error=why)
        else:
            found = await ndr_cell(cell, mrr, kernel=kernel, initrd=initrd, ctx=ctx, accel=accel, qemu=qemu,
                                   phases=phases, progress=progress)  # fmt: skip
        out.append(found)
        if on_result is not None:
            on_result(found)
    return out
