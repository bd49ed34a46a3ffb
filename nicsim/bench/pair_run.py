"""The two-guest mode's runs: the wire between guests A and B, the pair's boots and the three rows.

One run is one setup (``nicsim`` or ``linux-bridge``) and one repetition: the wire is made, guest B
boots (an iperf3 server, then ``rx-watch``: eth0's receive counters on its console every 0.2 s),
then guest A, which finds B up and runs the rows one after the other in one boot: a first-contact
ping (ARP and the switch's or bridge's learning, outside every row), iperf3 to B (``tcp``), a
one-second gap, pktgen to B's MAC and address (``pps64``), another gap, and a ping to B every 10 ms
(``ping``). The host opens and closes each row's CPU window (both QEMUs and nicsim, from /proc) on
A's result lines, and reads B's counters at the two gaps, which bracket A's pktgen and nothing else.
At the end B's counters (received + dropped) are checked against the wire's own count of frames
handed to B (:func:`nicsim.bench.pair.check_b_count`). The wires: ``nicsim`` is one ``nicsim serve
--port switch`` with a socket per guest (its default options, plus ``--nicsim-args``); ``linux-bridge``
is a namespace this run creates and deletes, holding bridge ``br0`` with TAPs ``tapa`` and ``tapb``
and no address, both QEMUs inside it on QEMU's tap netdev with ``vhost=off``, as the ``qemu-tap``
peer (there is no /dev/vhost-net on these machines).

Placement is the same for both setups: each QEMU and nicsim may run on every core (``taskset -c`` over
all of them; ``--no-pin``: no taskset at all). A fixed split cannot be like for like: the bridge
setup has two busy processes (each QEMU's vCPU and main loop, the bridge working in the sender's
kernel context), nicsim's has three (nicsim besides both QEMUs), and on two cores any pinning that
gives nicsim a core of its own takes it from the guests, which the bridge setup would not pay.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.testvm import Netns, NetnsError, Nic, TapNic, TestVM, TestVMError, VhostUserNic, Workload

from .backend import BenchError, ChildProcess, RunContext, python_env
from .latency import ping_params, rtt_measures
from .matrix import Cell, Direction, Plan
from .ndr_vm import WATCH_LINE
from .pair import BRIDGE, NICSIM, PairBoot, check_b_count, setup_cells
from .procstat import CpuWindow
from .runner import CellResult, Sample, conclude
from .serve import nicsim_carried
from .tap import NETNS_PREFIX, tap_carried, tap_stats
from .vm import BOOT_TIMEOUT, RESULT_MARGIN, measure, qemu_wrapper

A_MAC, B_MAC = "52:54:00:00:02:01", "52:54:00:00:02:02"
A_IP, B_IP = "10.0.4.1", "10.0.4.2"
WATCH_INTERVAL = 0.2
# QEMU names its vCPU threads ("CPU 0/TCG"), so each row's CPU splits into vCPU and the rest of QEMU.
VCPU_NAMES = ("-name", "debug-threads=on")
GAP = 1  # seconds A sleeps between rows: B's counter lines in it bracket the pktgen row alone
_counter = itertools.count()


@dataclass(kw_only=True)
class Wire:
    """What joins A and B for one run: their NICs, the namespace QEMU runs in (bridge), the backend's
    pid (nicsim), and once the wire is gone its count of frames handed to B and taken from A."""

    nics: tuple[Nic, Nic]
    netns: str | None = None
    backend_pid: int | None = None
    handed_b: int | None = None
    taken_a: int | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def placed(argv: list[str], cores: str | None) -> list[str]:
    return argv if cores is None else ["taskset", "-c", cores, *argv]


@contextlib.asynccontextmanager
async def nicsim_wire(ctx: RunContext, cores: str | None) -> AsyncIterator[Wire]:
    """``nicsim serve`` with a socket per guest and ``--port switch``, stopped (SIGINT) on the way out."""
    n = next(_counter)
    socks = (ctx.workdir / f"pair-{n}-a.sock", ctx.workdir / f"pair-{n}-b.sock")
    stats_file = ctx.workdir / f"pair-{n}.stats.json"
    argv = [sys.executable, "-m", "nicsim", "serve", "--socket", str(socks[0]), "--socket", str(socks[1]),
            "--port", "switch", "--stats-file", str(stats_file), *ctx.nicsim_args]  # fmt: skip
    proc = ChildProcess(placed(argv, cores), ctx.workdir / f"nicsim-pair-{n}.log", env=python_env())
    try:
        await proc.start()
        for sock in socks:
            await proc.wait_for_path(sock, ctx.start_timeout)
        wire = Wire(nics=(VhostUserNic(mac=A_MAC, socket=socks[0]), VhostUserNic(mac=B_MAC, socket=socks[1])),
                    backend_pid=proc.pid, source="nicsim's receive-queue counters for B")  # fmt: skip
        yield wire
        status = await proc.stop()
        if status != 0:
            raise BenchError(f"nicsim serve exited with status {status}:\n{proc.output()}")
        try:
            stats = json.loads(stats_file.read_text())
        except (OSError, ValueError) as err:
            raise BenchError(f"nicsim serve left no readable stats file {stats_file}: {err}") from err
        entries = {e.get("path"): e for e in stats.get("sockets", []) if isinstance(e, dict)}
        if str(socks[1]) in entries:
            wire.handed_b = nicsim_carried(entries[str(socks[1])]).rx_packets
        if str(socks[0]) in entries:
            wire.taken_a = nicsim_carried(entries[str(socks[0])]).tx_packets
        wire.extra["nicsim"] = {"switch": stats.get("switch"), "sockets": stats.get("sockets")}
    finally:
        await proc.stop()
        for sock in socks:
            sock.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def bridge_wire(ctx: RunContext, cores: str | None) -> AsyncIterator[Wire]:
    """A namespace with ``br0`` and its ports ``tapa``, ``tapb`` (no address), deleted on the way out."""
    with Netns.create(NETNS_PREFIX) as ns:
        try:
            ns.add_bridge("br0")
        except NetnsError as err:
            raise BenchError(f"linux-bridge: cannot create a bridge in a namespace ({err}); load the "
                             "bridge module ('modprobe bridge') or leave it out: --backends nicsim") from err
        for tap in ("tapa", "tapb"):
            ns.add_tap(tap, None, master="br0")
        wire = Wire(nics=(TapNic(mac=A_MAC, ifname="tapa"), TapNic(mac=B_MAC, ifname="tapb")),
                    netns=ns.name, source="tapb's tx counter (the bridge port to B)")  # fmt: skip
        yield wire
        stats = tap_stats(ns, "tapb")  # both guests have gone: nothing crosses the bridge any more
        wire.handed_b = tap_carried(stats).rx_packets
        wire.taken_a = tap_carried(tap_stats(ns, "tapa")).tx_packets
        wire.extra["tapb"] = stats


WIRES = {NICSIM: nicsim_wire, BRIDGE: bridge_wire}


def a_workloads(duration: float) -> list[Workload]:
    return [
        Workload("ping", target=B_IP, count=3, interval=0.2),  # first contact, outside every row
        Workload("iperf3-client", server=B_IP, time=max(round(duration), 1), proto="tcp"),
        Workload("sleep", seconds=GAP),
        Workload("pktgen-tx", size=60, duration=duration, dst=B_IP, dst_mac=B_MAC),
        Workload("sleep", seconds=GAP),
        Workload("ping", target=B_IP, **ping_params(Direction.PING, duration)),
    ]


def b_workloads() -> list[Workload]:
    return [Workload("iperf3-server"), Workload("rx-watch", interval=WATCH_INTERVAL, duration=3600)]


def last_watch(text: str) -> tuple[int, int]:
    """B's last whole rx-watch line in ``text``: (rx_packets, rx_dropped)."""
    found = list(re.finditer(WATCH_LINE, text))
    if not found:
        raise BenchError("guest B printed no rx-watch line (its iperf3 server may not have ended)")
    return int(found[-1].group(2)), int(found[-1].group(3))


def cpu_fields(window: CpuWindow) -> dict[str, Any]:
    """The row's CPU columns, and ``cpu_threads``: each guest's vCPU and the rest of its QEMU (the main
    loop: QEMU's tap netdev and the bridge in its kernel context, or the interrupts nicsim asks for)
    and nicsim, in % of one core; a part that could not be read is left out."""
    qa, qb, be = (window.percent(k) for k in ("qemu_a", "qemu_b", "backend"))
    qemu = None if qa is None or qb is None else qa + qb
    total = None if qemu is None else qemu + (be or 0.0)
    threads: dict[str, float] = {}
    for guest, whole in (("a", qa), ("b", qb)):
        vcpu = window.percent(f"qemu_{guest}{CpuWindow.VCPU}")
        if whole is not None and vcpu is not None:
            threads[f"{guest}_vcpu"], threads[f"{guest}_rest"] = vcpu, max(whole - vcpu, 0.0)
    if be is not None:
        threads["nicsim"] = be
    return {"cpu_qemu_pct": qemu, "cpu_backend_pct": be, "cpu_total_pct": total,
            "cpu_threads": threads or None}


def a_dropped(pps: Sample, taken_a: int | None) -> int | None:
    """How many of pktgen's frames at least never left A: pktgen counts a frame the driver dropped on a
    full transmit ring as sent, and the wire's count of frames taken from A (the whole run, so every
    pktgen frame that left A is in it) cannot be smaller than pktgen's unless A dropped some."""
    sent = pps.guest.get("sent_packets")
    if taken_a is None or not isinstance(sent, int):
        return None
    return max(sent - taken_a, 0) or None


def failed(cell: Cell, why: str, data: dict[str, Any] | None = None) -> Sample:
    return Sample(ok=False, error=f"{cell.direction.value}: {why}", guest=dict(data or {}))


@dataclass(kw_only=True)
class PairRunner:
    """Runs the two-guest plan; ``cores`` is where every QEMU and nicsim may run (None: anywhere)."""

    kernel: Path
    initrd: Path
    ctx: RunContext
    cores: str | None
    accel: str = "tcg"
    qemu: str = "qemu-system-x86_64"
    on_run: Callable[[Cell, int], None] | None = None
    on_cell: Callable[[CellResult], None] | None = None

    def vm(self, wire: Wire, which: int, workloads: list[Workload], setup: str) -> TestVM:
        ip = (A_IP, B_IP)[which]
        return TestVM(kernel=self.kernel, initrd=self.initrd, nic=wire.nics[which], netns=wire.netns,
                      workloads=workloads, guest_ip=f"{ip}/24", accel=self.accel,
                      qemu=qemu_wrapper(self.ctx.workdir, self.cores, self.qemu),
                      extra_args=VCPU_NAMES,
                      name=f"bench-{setup}-{'ab'[which]}",
                      launch_timeout=self.ctx.start_timeout + BOOT_TIMEOUT)  # fmt: skip

    async def run_pair(self, setup: str, cells: list[Cell]) -> dict[Direction, Sample]:
        """One boot of the pair on ``setup``'s wire: a sample per row (failed ones say why)."""
        by_dir = {c.direction: c for c in cells}
        try:
            return await self._run_pair(setup, by_dir)
        except (BenchError, TestVMError, NetnsError, OSError) as err:
            return {d: Sample(ok=False, error=f"{type(err).__name__}: {err}") for d in by_dir}

    async def _run_pair(self, setup: str, cells: dict[Direction, Cell]) -> dict[Direction, Sample]:
        ctx, wait = self.ctx, self.ctx.duration + RESULT_MARGIN
        windows: dict[Direction, CpuWindow] = {}
        async with WIRES[setup](ctx, self.cores) as wire, contextlib.AsyncExitStack() as stack:
            b = await stack.enter_async_context(self.vm(wire, 1, b_workloads(), setup))
            await b.wait_for("(?m)^NICSIM-READY", BOOT_TIMEOUT)
            a = await stack.enter_async_context(self.vm(wire, 0, a_workloads(ctx.duration), setup))
            await a.wait_for("(?m)^NICSIM-READY", BOOT_TIMEOUT)
            pids = {"qemu_a": a.pid, "qemu_b": b.pid, "backend": wire.backend_pid}

            async def row(direction: Direction, upto: int) -> None:
                windows[direction] = window = CpuWindow(dict(pids), vcpus={"qemu_a": a.pid, "qemu_b": b.pid})
                window.start()
                await a.wait_results(upto, wait)
                window.stop()

            await a.wait_results(1, BOOT_TIMEOUT)
            await row(Direction.TCP_TX, 2)
            await a.wait_results(3, wait)
            before = last_watch(b.console_text)
            await row(Direction.TX, 4)
            await a.wait_results(5, wait)
            after = last_watch(b.console_text)
            await row(Direction.PING, 6)
            results = await a.wait_results(6, wait)
            mark = len(b.console_text)
            end = await b.wait_for(WATCH_LINE, wait, since=mark)  # B's count once A's traffic is over
            seen_b = int(end.group(2)) + int(end.group(3))
            await b.quit()
            await a.wait_exit(wait)
        data = [dict(r.data) for r in results]
        errors = [None if r.ok else (r.error or "failed") for r in results]
        samples = {
            Direction.TCP_TX: self.tcp(cells[Direction.TCP_TX], data[1], errors[1]),
            Direction.TX: self.pps(cells[Direction.TX], data[3], errors[3], before, after),
            Direction.PING: self.ping(cells[Direction.PING], data[5], errors[5]),
        }
        for direction, sample in samples.items():
            for key, value in cpu_fields(windows[direction]).items():
                setattr(sample, key, value)
        pps = samples[Direction.TX]
        pps.counts = check_b_count(seen_b, wire.handed_b, wire.source)
        pps.backend = dict(wire.extra)
        if pps.ok and pps.miscounted:
            pps.ok, pps.error = False, f"count check: {pps.counts['reason']}"
        lost_in_a = a_dropped(pps, wire.taken_a)
        if pps.ok and lost_in_a:
            pps.ok, pps.error = False, (
                f"A's pktgen counted {pps.guest['sent_packets']} frames sent, but the wire took only "
                f"{wire.taken_a} from A in the whole run: A's driver dropped at least {lost_in_a} (its "
                "transmit ring stayed full: the wire stopped taking A's frames)")
        contact = results[0]
        if not contact.ok:
            for sample in samples.values():
                sample.guest.setdefault("first_contact", contact.error)
        return samples

    @staticmethod
    def tcp(cell: Cell, data: dict[str, Any], error: str | None) -> Sample:
        if error is not None:
            return failed(cell, f"iperf3 client failed: {error}", data)
        sample = Sample(ok=True, guest=dict(data), **measure(cell, data))
        if not sample.gbps:
            sample.ok, sample.error = False, "tcp: iperf3 counted no traffic"
        return sample

    @staticmethod
    def pps(cell: Cell, data: dict[str, Any], error: str | None, before: tuple[int, int],
            after: tuple[int, int]) -> Sample:  # fmt: skip
        if error is not None:
            return failed(cell, f"pktgen failed: {error}", data)
        secs, sent = data.get("seconds"), data.get("packets")
        received, dropped = after[0] - before[0], after[1] - before[1]
        if not isinstance(secs, int | float) or secs <= 0 or not received:
            return failed(cell, f"B received {received} frames in {secs} s of pktgen", data)
        guest = {"a": dict(data), "b": {"rx_packets": received, "rx_dropped": dropped},
                 "sent_packets": sent, "sent_pps": data.get("pps")}  # fmt: skip
        return Sample(ok=True, pps=received / secs, packets=received, bytes=received * cell.frame_len,
                      gbps=received * cell.frame_len * 8 / secs / 1e9, seconds=secs, guest=guest)  # fmt: skip

    @staticmethod
    def ping(cell: Cell, data: dict[str, Any], error: str | None) -> Sample:
        if error is not None:
            return failed(cell, f"ping failed: {error}", data)
        sample = Sample(ok=True, guest=dict(data), **rtt_measures(data))
        if sample.rtt_p50_ms is None:
            sample.ok, sample.error = False, "ping: no reply from B"
        return sample

    async def run_plan(self, plan: Plan) -> list[CellResult]:
        """Every repetition of every setup of ``plan``, the setups taking turns (nicsim, bridge, nicsim,
        ...) so that a busy spell of the host falls on both rather than on one setup's runs; each
        cell's result once its last repetition is done."""
        setups = list(dict.fromkeys(c.backend for c in plan.cells))
        cells = {setup: setup_cells(plan, setup) for setup in setups}
        results = {c.key: CellResult(cell=c) for c in plan.cells}
        for rep in range(plan.repetitions):
            for setup in setups:
                if self.on_run is not None:
                    self.on_run(PairBoot(backend=setup, direction=cells[setup][0].direction), rep)
                samples = await self.run_pair(setup, cells[setup])
                for cell in cells[setup]:
                    results[cell.key].samples.append(samples[cell.direction])
        out = [results[c.key] for c in plan.cells]
        for result in out:
            conclude(result)
            if self.on_cell is not None:
                self.on_cell(result)
        return out
