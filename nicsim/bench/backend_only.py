"""``nicsim bench --backend-only``: backend throughput with no VM, DPDK's virtio-user as the frontend.

Each run starts one backend and one frontend, each pinned to its own core, with nothing in between:

* the backend is ``nicsim serve`` (``--port sink,read=on``, which reads every frame byte as DPDK's
  vhost does when it copies each frame into an mbuf, or ``--port generator,size=N``) or DPDK's own
  ``dpdk-testpmd --vdev net_vhost0`` (``rxonly`` or ``txonly --txpkts=N``);
* the frontend is ``dpdk-testpmd --vdev net_virtio_user0,path=SOCK``, a vhost-user frontend that
  drives the backend's rings from its own memory (``txonly`` or ``rxonly``), started once the
  backend's socket file exists.

Directions keep the VM benchmark's meaning with the frontend in the guest's place: ``tx`` is frontend
``txonly`` -> backend receives (nicsim sink / vhost ``rxonly``), ``rx`` is backend sends -> frontend
``rxonly`` (nicsim generator / vhost ``txonly``). Throughput is counted on the receiving side, over
whole stats intervals (about 1 s each) once traffic flows, the first (partial) interval skipped:
nicsim's stats file (rewritten every second; its ``uptime`` dates each snapshot) or testpmd's
``--stats-period 1`` blocks (cumulative ``RX-packets`` and its own ``Rx-pps``). The CPU share of each
process is sampled from /proc over the same intervals. The frontend gets a small memory (``-m 256``):
a vhost-user backend maps all of it, and DPDK's vhost backend populates every page at SET_MEM_TABLE,
which for the usual 1 GiB kept it (and the frontend waiting for its reply) busy for seconds here.
Both testpmd processes get their own ``--file-prefix``; their runtime directories are deleted.

Once both have stopped, the frontend's final port counters (it sent, for ``tx``; it received, for
``rx``) are checked against the backend's own (nicsim's queue counters, or the vhost testpmd's):
both span the whole run, so they may differ by one ring at most (:mod:`nicsim.bench.counts`). The
frontend runs with ``--no-flush-rx``: testpmd otherwise drains its receive queue, uncounted, before
forwarding starts, which showed here as two to three rings' worth missing from its count; when it
receives it is allowed two rings, not one (its device start discards a ring uncounted: see
:mod:`nicsim.bench.counts`). Its virtio init log (``pmd.net.virtio.init:debug``) gives the
negotiated features and the ring size.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .backend import BenchError, ChildProcess, RunContext, pinned, python_env
from .counts import RING_SIZE, Carried, check_counts, features_record, virtio_user_features, virtio_user_ring
from .matrix import Cell, Direction, Plan
from .procstat import CpuWindow
from .runner import CellResult, Sample, run_cells
from .serve import high_water, nicsim_carried, serve_port
from .testpmd import RUNTIME_DIR, TESTPMD, build_testpmd_argv, parse_counters, testpmd_carried

BACKEND_ONLY_NAMES = ("nicsim", "dpdk")
FRONTEND = "dpdk-testpmd net_virtio_user (no hugepages)"
RUN_OVERHEAD = 4.0  # starting both processes and waiting for traffic, per run; a planning figure
FRONTEND_MEMORY_MB = 256
STATS_PERIOD = 1.0  # seconds between testpmd's stats blocks and nicsim's stats-file rewrites
POLL_INTERVAL = 0.05
WINDOW_MARGIN = 10.0  # a failure deadline for the measured intervals, not a performance figure
DEFAULT_DURATION = 3.0
QUICK_DURATION = 2.0
DEFAULT_SIZES = (64, 1500)
_counter = itertools.count()


# -- command lines (pure) ---------------------------------------------------------------------------


def frontend_mode(direction: Direction) -> str:
    """testpmd's forwarding mode on the virtio-user side: it sends for ``tx``, receives for ``rx``."""
    if direction is Direction.TX:
        return "txonly"
    if direction is Direction.RX:
        return "rxonly"
    raise ValueError(f"--backend-only measures frames, not {direction.value}")


def vhost_mode(direction: Direction) -> str:
    """testpmd's forwarding mode on the net_vhost side: the mirror of the frontend's."""
    return "rxonly" if frontend_mode(direction) == "txonly" else "txonly"


def build_frontend_argv(
    *,
    socket: Path,
    mode: str,
    frame_len: int,
    prefix: str,
    cpu: int | None,
    binary: str = TESTPMD,
    memory_mb: int = FRONTEND_MEMORY_MB,
) -> list[str]:
    """``dpdk-testpmd`` as a vhost-user frontend (``net_virtio_user``) on ``socket``, no hugepages."""
    lcores = f"0@{cpu},1@{cpu}" if cpu is not None else "0,1"
    argv = [
        binary,
        "--lcores",
        lcores,
        "--no-huge",
        "-m",
        str(memory_mb),
        "--no-pci",
        f"--file-prefix={prefix}",
        "--log-level=pmd.net.virtio.init:debug",  # the negotiated features and ring size, once
        "--vdev",
        f"net_virtio_user0,path={socket},queues=1",
        "--",
        f"--forward-mode={mode}",
        "--stats-period",
        "1",
        "--nb-cores=1",
        "--total-num-mbufs=16384",
        "--no-flush-rx",  # every frame it receives is counted (see the module docstring)
    ]
    if mode == "txonly":
        argv.append(f"--txpkts={frame_len}")
    return pinned(argv, cpu)


def build_vhost_argv(
    *,
    socket: Path,
    mode: str,
    frame_len: int,
    prefix: str,
    cpu: int | None,
    mac: str,
    binary: str = TESTPMD,
) -> list[str]:
    """DPDK's own vhost-user backend (``net_vhost``), as in the VM benchmark, under ``taskset``."""
    argv = build_testpmd_argv(
        socket=socket, mode=mode, frame_len=frame_len, prefix=prefix, cpu=cpu, peer_mac=mac, binary=binary
    )
    return pinned(argv, cpu)


def build_serve_argv(
    *, socket: Path, cell: Cell, stats_file: Path, cpu: int | None, extra: Sequence[str] = ()
) -> list[str]:
    """``nicsim serve`` with the cell's port (a sink that reads every byte for ``tx``, a sized
    generator for ``rx``), and ``extra`` (``nicsim bench --nicsim-args``)."""
    return pinned(
        [
            sys.executable,
            "-m",
            "nicsim",
            "serve",
            "--socket",
            str(socket),
            "--port",
            serve_port(cell, read=True),
            "--stats-file",
            str(stats_file),
            "--quiet",
            *extra,
        ],
        cpu,
    )


# -- the receiving side's counters (pure parsing) --------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Packets the receiving side counted over one stats interval of ``seconds``."""

    packets: int
    seconds: float

    @property
    def pps(self) -> float:
        return self.packets / self.seconds if self.seconds > 0 else 0.0


_BLOCK_RE = re.compile(r"NIC statistics for port (\d+)\s*#+\s*\n(.*?)\n\s*#{20,}", re.DOTALL)
_RX_PACKETS_RE = re.compile(r"RX-packets:\s*(\d+)")
_RX_PPS_RE = re.compile(r"Rx-pps:\s*(\d+)")


def testpmd_blocks(output: str, port: int = 0) -> list[tuple[int, int]]:
    """``(cumulative RX-packets, Rx-pps)`` of each complete ``--stats-period`` block for ``port``."""
    out: list[tuple[int, int]] = []
    for m in _BLOCK_RE.finditer(output):
        if int(m.group(1)) != port:
            continue
        packets, pps = _RX_PACKETS_RE.search(m.group(2)), _RX_PPS_RE.search(m.group(2))
        if packets is not None and pps is not None:
            out.append((int(packets.group(1)), int(pps.group(1))))
    return out


def testpmd_intervals(blocks: Sequence[tuple[int, int]], period: float = STATS_PERIOD) -> list[Interval]:
    """One interval per block after the first: the packets since the previous block, over the time
    testpmd measured for them (packets ÷ its Rx-pps; the nominal period when nothing arrived)."""
    out: list[Interval] = []
    for (prev, _), (cur, pps) in itertools.pairwise(blocks):
        packets = max(cur - prev, 0)
        out.append(Interval(packets, packets / pps if pps > 0 and packets > 0 else period))
    return out


def nicsim_received(stats: dict[str, Any]) -> int:
    """Packets nicsim took off the frontend's transmit rings (odd queues) in a stats-file snapshot."""
    queues = stats.get("queues")
    if not isinstance(queues, list):
        return 0
    return sum(int(q.get("packets", 0)) for q in queues if isinstance(q, dict) and int(q.get("index", 0)) % 2)


def nicsim_intervals(snapshots: Sequence[tuple[float, int]]) -> list[Interval]:
    """Intervals between consecutive ``(time, received packets)`` snapshots of the stats file."""
    return [Interval(max(b - a, 0), tb - ta) for (ta, a), (tb, b) in itertools.pairwise(snapshots) if tb > ta]


def window(intervals: Sequence[Interval], count: int) -> tuple[int, list[Interval]] | None:
    """The first ``count`` intervals after the first one that saw traffic (which is partial), and the
    index of that first one; ``None`` until there are enough."""
    first = next((i for i, iv in enumerate(intervals) if iv.packets > 0), None)
    if first is None or len(intervals) < first + 1 + count:
        return None
    return first, list(intervals[first + 1 : first + 1 + count])


def window_started(intervals: Sequence[Interval]) -> bool:
    return any(iv.packets > 0 for iv in intervals)


# -- receivers (I/O) ----------------------------------------------------------------------------------


class Receiver(Protocol):
    name: str

    def intervals(self) -> list[Interval]: ...


class TestpmdReceiver:
    """The receiving testpmd's log, read again on each call (it grows by ~500 bytes a second)."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log

    def intervals(self) -> list[Interval]:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return testpmd_intervals(testpmd_blocks(text))


class NicsimReceiver:
    """nicsim's stats file: one ``(time, packets)`` snapshot kept per rewrite."""

    name = "nicsim"

    def __init__(self, stats_file: Path) -> None:
        self.stats_file = stats_file
        self.snapshots: list[tuple[float, int]] = []
        self._seen: tuple[int, int] | None = None

    def intervals(self) -> list[Interval]:
        try:
            st = self.stats_file.stat()
            key = (st.st_mtime_ns, st.st_ino)  # a rewrite is a rename: a new inode
            if key != self._seen:
                stats = json.loads(self.stats_file.read_text())
                self._seen = key
                uptime = stats.get("uptime")
                when = float(uptime) if isinstance(uptime, int | float) else st.st_mtime_ns / 1e9
                self.snapshots.append((when, nicsim_received(stats)))
        except (FileNotFoundError, ValueError):
            pass  # not written yet
        return nicsim_intervals(self.snapshots)


# -- one run ----------------------------------------------------------------------------------------


@dataclass
class Pair:
    """A running backend + frontend, which of them counts what arrives, and, once both have
    stopped, the frontend's count, the backend's own, the ring size and the negotiated features."""

    backend: ChildProcess
    frontend: ChildProcess
    receiver: Receiver
    extra: dict[str, Any] = field(default_factory=dict)
    pool_high_water: int | None = None
    counted: int | None = None
    carried: Carried | None = None
    ring: int = RING_SIZE
    features: dict[str, Any] | None = None


def _runtime_dir(prefix: str) -> Path:
    return RUNTIME_DIR / prefix


@dataclass(kw_only=True)
class BackendOnlyRunner:
    """Runs the backend-only plan; ``frontend_cpu``/``backend_cpu`` are ``None`` for no pinning."""

    ctx: RunContext
    frontend_cpu: int | None = 0
    testpmd: str = TESTPMD
    on_run: Callable[[Cell, int], None] | None = None
    on_cell: Callable[[CellResult], None] | None = None

    @property
    def intervals_per_run(self) -> int:
        return max(1, round(self.ctx.duration / STATS_PERIOD))

    @contextlib.asynccontextmanager
    async def pair(self, cell: Cell) -> AsyncIterator[Pair]:
        n = next(_counter)
        wd, cpu = self.ctx.workdir, self.ctx.backend_cpu
        sock = wd / f"bo-{n}.sock"
        fe_prefix = f"nicsim-bo-{os.getpid()}-{n}-fe"
        prefixes = [fe_prefix]
        stats_file = wd / f"bo-{n}-nicsim.stats.json"
        if cell.backend == "nicsim":
            backend = ChildProcess(
                build_serve_argv(socket=sock, cell=cell, stats_file=stats_file, cpu=cpu,
                                 extra=self.ctx.nicsim_args),
                wd / f"bo-{n}-nicsim.log",
                env=python_env(),
            )
        elif cell.backend == "dpdk":
            be_prefix = f"nicsim-bo-{os.getpid()}-{n}-be"
            prefixes.append(be_prefix)
            argv = build_vhost_argv(
                socket=sock,
                mode=vhost_mode(cell.direction),
                frame_len=cell.frame_len,
                prefix=be_prefix,
                cpu=cpu,
                mac=self.ctx.guest_mac,
                binary=self.testpmd,
            )
            backend = ChildProcess(argv, wd / f"bo-{n}-vhost.log")
        else:
            known = ", ".join(BACKEND_ONLY_NAMES)
            raise BenchError(f"--backend-only knows the backends {known}, not {cell.backend}")
        fe_argv = build_frontend_argv(
            socket=sock,
            mode=frontend_mode(cell.direction),
            frame_len=cell.frame_len,
            prefix=fe_prefix,
            cpu=self.frontend_cpu,
            binary=self.testpmd,
        )
        frontend = ChildProcess(fe_argv, wd / f"bo-{n}-virtio-user.log")
        receiver: Receiver
        if cell.direction is Direction.RX:
            receiver = TestpmdReceiver("testpmd virtio-user", frontend.log)
        elif cell.backend == "nicsim":
            receiver = NicsimReceiver(stats_file)
        else:
            receiver = TestpmdReceiver("testpmd vhost", backend.log)
        pair = Pair(backend=backend, frontend=frontend, receiver=receiver)
        try:
            await backend.start()
            await backend.wait_for_path(sock, self.ctx.start_timeout)
            await frontend.start()
            yield pair
            fe_status = await frontend.stop()
            be_status = await backend.stop()
            fe_counters = parse_counters(frontend.output(20000))
            pair.extra["frontend"] = {"mode": frontend_mode(cell.direction), "exit_status": fe_status,
                                      **fe_counters}  # fmt: skip
            pair.counted = fe_counters.get("TX-packets" if cell.direction is Direction.TX else "RX-packets")
            self._read_init_log(pair)
            if cell.backend == "nicsim":
                if be_status != 0:
                    raise BenchError(f"nicsim serve exited with status {be_status}:\n{backend.output()}")
                with contextlib.suppress(OSError, ValueError):
                    stats = json.loads(stats_file.read_text())
                    pair.pool_high_water = high_water(stats)
                    pair.carried = nicsim_carried(stats)
                    pair.extra["nicsim"] = {
                        k: stats.get(k) for k in ("queues", "drops_total", "pool", "port")
                    }
            else:
                be_counters = parse_counters(backend.output(20000))
                pair.carried = testpmd_carried(be_counters, "testpmd net_vhost port counters")
                pair.extra["testpmd"] = {"mode": vhost_mode(cell.direction), "exit_status": be_status,
                                         **be_counters}  # fmt: skip
        finally:
            await frontend.stop()
            await backend.stop()
            for prefix in prefixes:
                shutil.rmtree(_runtime_dir(prefix), ignore_errors=True)
            sock.unlink(missing_ok=True)

    @staticmethod
    def _read_init_log(pair: Pair) -> None:
        """The negotiated features and the ring size, from the head of the frontend's log."""
        try:
            text = pair.frontend.log.read_text(errors="replace")
        except OSError:
            return
        pair.ring = virtio_user_ring(text) or RING_SIZE
        mask = virtio_user_features(text)
        if mask is not None:
            pair.features = features_record(mask, "frontend (DPDK virtio-user init log)")

    async def _measure(self, pair: Pair) -> tuple[list[Interval], CpuWindow]:
        loop = asyncio.get_running_loop()
        count = self.intervals_per_run
        cpu = CpuWindow({"frontend": pair.frontend.pid, "backend": pair.backend.pid})
        deadline = loop.time() + self.ctx.start_timeout + count * STATS_PERIOD + WINDOW_MARGIN
        opened = False
        while True:
            for name, proc in (("frontend", pair.frontend), ("backend", pair.backend)):
                if proc.returncode is not None:
                    raise BenchError(
                        f"the {name} ({proc.argv[0]}) exited with status {proc.returncode}:\n{proc.output()}"
                    )
            intervals = pair.receiver.intervals()
            if not opened and window_started(intervals):
                cpu.start()  # the first interval with traffic just ended: the measured ones begin
                opened = True
            found = window(intervals, count)
            if found is not None:
                cpu.stop()
                return found[1], cpu
            if loop.time() > deadline:
                what = "counted no traffic" if not opened else "stopped reporting"
                raise BenchError(
                    f"{pair.receiver.name} {what} within the deadline:\n{pair.frontend.output()}"
                )
            await asyncio.sleep(POLL_INTERVAL)

    async def run_once(self, cell: Cell) -> Sample:
        try:
            async with self.pair(cell) as pair:
                intervals, cpu = await self._measure(pair)
            sample = Sample(
                ok=True, cpu_qemu_pct=cpu.percent("frontend"), cpu_backend_pct=cpu.percent("backend")
            )
        except (BenchError, OSError) as err:
            return Sample(ok=False, error=f"{type(err).__name__}: {err}")
        packets = sum(iv.packets for iv in intervals)
        seconds = sum(iv.seconds for iv in intervals)
        sample.packets, sample.seconds = packets, round(seconds, 6)
        sample.pps = packets / seconds if seconds > 0 else 0.0
        sample.bytes = packets * cell.frame_len
        sample.gbps = sample.pps * cell.frame_len * 8 / 1e9
        sample.pool_high_water = pair.pool_high_water
        sample.backend = {
            "receiver": pair.receiver.name,
            "intervals_pps": [round(iv.pps) for iv in intervals],
            **pair.extra,
        }
        sample.features = pair.features
        if not sample.pps:
            sample.ok, sample.error = False, f"{pair.receiver.name} counted no traffic"
            return sample
        rings = 2 if cell.direction is Direction.RX else 1  # the frontend receives: see counts
        sample.counts = check_counts(cell, counted=pair.counted, carried=pair.carried, spans_run=True,
                                     ring=pair.ring, rings=rings, who="the frontend")  # fmt: skip
        if sample.miscounted:
            sample.ok, sample.error = False, f"backend count check: {sample.counts['reason']}"
        return sample

    async def run_plan(self, plan: Plan) -> list[CellResult]:
        return await run_cells(plan, self.run_once, on_run=self.on_run, on_cell=self.on_cell)


def unavailable(testpmd: str = TESTPMD) -> str | None:
    """Why the backend-only benchmark cannot run here, or ``None``."""
    if shutil.which(testpmd) is None:
        return (
            f"{testpmd} not found: --backend-only drives the backends with DPDK's virtio-user "
            "frontend; install it with 'apt-get install dpdk-dev' (Debian)"
        )
    return None


NOTES = (
    "backend-only: no VM. tx = the frontend (DPDK testpmd, net_virtio_user, txonly) sends and the "
    "backend receives (nicsim --port sink,read=on, which reads every frame byte, as vhost's dequeue copies "
    "each frame into an mbuf / testpmd net_vhost rxonly); rx = the backend sends (nicsim "
    "--port generator,size=N / testpmd net_vhost txonly --txpkts=N) and the frontend receives (rxonly). "
    "pps is counted by the receiving side over whole ~1 s stats intervals; 'CPU frontend' is the "
    "virtio-user testpmd (it busy-polls: ~100% by design, as does testpmd's vhost backend)."
)
