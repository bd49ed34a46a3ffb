"""One ``nicsim bench`` invocation, either mode: from parsed options to the table, JSON and exit code.

``run_bench`` is the one path both modes take. It asks the mode for its plan (a usage error is one
line and exit 2), checks the options that go together, reads the ``--baseline`` (refused in one
line, exit 2, when it is not a ``--json`` document of the same mode), checks what both modes need
(the mode's programs, cores for ``--qemu-cpu`` and ``--backend-cpu``, matplotlib for ``--plot``),
lets the mode get ready and state how long it will take, runs the plan in one working directory
(``--log-dir``, kept, or a temporary one, removed) with live progress on stderr and each finished
cell on the ``--json-stream``, and prints the table, the comparison with the baseline, the JSON and
the plot. The exit status is 0, or 1 when a cell failed, none was measured, or a cell regressed by
more than ``--max-regress`` (each named on stderr). What differs lives in the ``Mode``
classes: ``VmMode`` (a guest per run: the image, the accelerator, backends it must skip),
``BackendOnlyMode`` (DPDK's virtio-user as the frontend, no VM) and ``TwoGuestMode`` (``--guests 2``:
two guests, nicsim's switch against a Linux bridge). The options themselves are defined
in :mod:`nicsim.cli.bench`.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import functools
import importlib.util
import os
import shlex
import shutil
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import BACKEND_CLASSES, LATENCY_PEERS, PEERS, speed, wake
from .backend import Backend, RunContext
from .backend_only import (
    BACKEND_ONLY_NAMES,
    DEFAULT_DURATION,
    DEFAULT_SIZES,
    FRONTEND,
    NOTES,
    QUICK_DURATION,
    RUN_OVERHEAD,
    BackendOnlyRunner,
    unavailable,
)
from .baseline import (
    Baseline,
    BaselineError,
    compare,
    comparison_json,
    load_baseline,
    regression_lines,
    render_comparison,
)
from .matrix import BOOT_OVERHEAD, Cell, Direction, Plan, build_plan
from .ndr_vm import PACED, NdrCell, ndr_estimate_seconds, render_ndr, run_ndr
from .pair import BRIDGE, PAIR_OVERHEAD, ROWS, SETUPS, goal_rows, pair_plan, render_pair_table
from .pair_run import PairRunner
from .progress import Progress, clock
from .report import MATPLOTLIB_HINT, emit, failed_cells, render_table, to_json
from .runner import CellResult, run_directory
from .stream import JsonStream, reference_for
from .sysinfo import machine, versions
from .vm import VmRunner, skip_runs

Document = Callable[[], dict[str, Any]]
OnCell = Callable[[CellResult], None] | None


def _err(message: str) -> None:
    print(f"nicsim bench: {message}", file=sys.stderr)


class Mode(abc.ABC):
    """What one mode of ``nicsim bench`` decides; ``run_bench`` does the rest, the same for both."""

    #: why ``--qemu-cpu`` and ``--backend-cpu`` must differ when pinned, or None when they may be equal
    same_core: str | None = None
    #: the mode's name in the JSON (``config.mode``), the stream and a baseline's check
    name: str

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pin = not args.no_pin
        #: told each NDR/PDR search once it is finished (``--json-stream``'s "ndr" lines)
        self.on_ndr: Callable[[NdrCell], None] | None = None

    @abc.abstractmethod
    def plan(self) -> Plan:
        """The plan from the options; ``ValueError`` says what is wrong with them."""

    @abc.abstractmethod
    def missing(self) -> str | None:
        """What is not installed that this mode cannot do without (and how to install it), or None."""

    @abc.abstractmethod
    async def prepare(self, plan: Plan) -> tuple[int, float]:
        """Get ready and say so on stderr; returns how many runs there will be and their estimated seconds."""

    @abc.abstractmethod
    async def run(
        self, plan: Plan, workdir: Path, on_run: Callable[[Cell, int], None], on_cell: OnCell = None
    ) -> list[CellResult]:
        """Every run of ``plan``, sockets and logs in ``workdir``; ``on_cell`` hears each finished cell."""

    @abc.abstractmethod
    def report(self, plan: Plan, results: list[CellResult]) -> tuple[str, Document]:
        """The table for a person, and the JSON document (built only when asked for)."""


class VmMode(Mode):
    """A fresh guest per run, on nicsim and its peers."""

    name = "vm"
    names: list[str]
    backends: list[Backend]
    kernel: Path
    initrd: Path
    guest_kernel: str | None
    accel: str
    ctx: RunContext

    def plan(self) -> Plan:
        args = self.args
        directions = None if args.directions is None else [Direction(d) for d in args.directions]
        latency_rows = getattr(args, "latency", False) or any(d.is_latency for d in directions or [])
        peers = list(PEERS) + (list(LATENCY_PEERS) if latency_rows else []) if args.peers else []
        names = list(dict.fromkeys((args.backends or ["nicsim"]) + peers))
        unknown = [n for n in names if n not in BACKEND_CLASSES]
        if unknown:
            known = ", ".join(BACKEND_CLASSES)
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose from {known}")
        self.names = names
        self.backends = [BACKEND_CLASSES[n]() for n in names]
        return build_plan(names, quick=args.quick, sizes=args.sizes, directions=directions,
                          repetitions=args.repetitions, duration=args.duration,
                          latency=getattr(args, "latency", False))  # fmt: skip

    def missing(self) -> str | None:
        qemu = self.args.qemu
        if shutil.which(qemu) is None:
            return f"{qemu} not found: install QEMU ('apt-get install qemu-system-x86' on Debian/Ubuntu)"
        return None

    async def prepare(self, plan: Plan) -> tuple[int, float]:
        from qemu.testvm import choose_accel

        args = self.args
        self.kernel, self.initrd, self.guest_kernel = guest_files(args)
        kernel = self.kernel
        for b in self.backends:
            why = b.unavailable()
            if why is not None:
                _err(f"skipping {why}")
        runs = plan.runs - skip_runs(plan, self.backends)
        self.accel = await choose_accel(args.accel, kernel, qemu=args.qemu)
        estimate = runs * (plan.duration + BOOT_OVERHEAD)
        if getattr(args, "ndr", False):
            searched = sum(1 for c in plan.cells if c.direction is Direction.RX and c.backend in PACED)
            estimate += searched * ndr_estimate_seconds(quick=args.quick)
        _err(f"{len(plan.cells)} cells x {plan.repetitions} repetition(s): {runs} guest boots, "
             f"about {clock(estimate)} (accelerator {self.accel})")  # fmt: skip
        return runs, estimate

    async def run(
        self, plan: Plan, workdir: Path, on_run: Callable[[Cell, int], None], on_cell: OnCell = None
    ) -> list[CellResult]:
        args = self.args
        self.ctx = RunContext(workdir=workdir, duration=plan.duration,
                              qemu_cpu=qemu_cores(args) if self.pin else None,
                              backend_cpu=args.backend_cpu if self.pin else None,
                              nicsim_args=nicsim_args(args),
                              packed=bool(getattr(args, "packed", False)))  # fmt: skip
        runner = VmRunner(kernel=self.kernel, initrd=self.initrd, ctx=self.ctx, accel=self.accel,
                          qemu=args.qemu, on_run=on_run, on_cell=on_cell)  # fmt: skip
        results = await runner.run_plan(plan, self.backends)
        self.ndr: list[NdrCell] | None = None
        if getattr(args, "ndr", False):
            self.ndr = await run_ndr(results, kernel=self.kernel, initrd=self.initrd, ctx=self.ctx,
                                     accel=self.accel, qemu=args.qemu, quick=args.quick,
                                     progress=_err, on_result=self.on_ndr)  # fmt: skip
        return results

    def report(self, plan: Plan, results: list[CellResult]) -> tuple[str, Document]:
        args, ctx = self.args, self.ctx
        config = {"mode": self.name, "backends": self.names, "quick": args.quick, "accel": self.accel,
                  "pinned": self.pin, "qemu_cpu": ctx.qemu_cpu, "backend_cpu": ctx.backend_cpu,
                  "nicsim_args": list(ctx.nicsim_args), "packed": ctx.packed}  # fmt: skip
        placement = [f"placement: QEMU on core(s) {ctx.qemu_cpu}, the backend and its helpers on core "
                     f"{ctx.backend_cpu}" if self.pin else "placement: not pinned (--no-pin)"]
        ndr = getattr(self, "ndr", None)
        table = render_table(results, footer=placement)
        if ndr is not None:
            table = f"{table}\n\n{render_ndr(ndr)}"

        def document() -> dict[str, Any]:
            doc = to_json(results, plan=plan, machine=machine(), config=config,
                          versions=versions(qemu=args.qemu, guest_kernel=self.guest_kernel))  # fmt: skip
            if ndr is not None:
                doc["ndr"] = [c.to_json() for c in ndr]
            return doc

        return table, document


def guest_files(args: argparse.Namespace) -> tuple[Path, Path, str | None]:
    """The guest kernel and initramfs (``--kernel``/``--initrd``, else the built image's, built or found
    in its cache now) and the kernel version when the image says it."""
    kernel, initrd, version = args.kernel, args.initrd, None
    if kernel is None or initrd is None:
        from images.build import build_image  # only when the guest image is not given

        image = build_image(progress=lambda line: print(f"image: {line}", file=sys.stderr))
        kernel, initrd = kernel or image.kernel, initrd or image.initrd
        version = image.manifest.get("kernel_version")
    return Path(kernel), Path(initrd), version


class TwoGuestMode(Mode):
    """``--guests 2``: guest A to guest B through nicsim's switch and through a Linux bridge
    (:mod:`nicsim.bench.pair`, :mod:`nicsim.bench.pair_run`, which says why placement is what it is)."""

    name = "two-guest"
    kernel: Path
    initrd: Path
    guest_kernel: str | None
    accel: str
    cores: str | None
    ctx: RunContext

    def plan(self) -> Plan:
        args = self.args
        fixed = {"--peers": args.peers, "--sizes": args.sizes is not None,
                 "--directions": args.directions is not None, "--latency": getattr(args, "latency", False),
                 "--ndr": getattr(args, "ndr", False), "--backend-only": args.backend_only,
                 "--qemu-cpus": getattr(args, "qemu_cpus", None) is not None}  # fmt: skip
        given = [flag for flag, on in fixed.items() if on]
        if given:
            raise ValueError(f"--guests 2 has fixed rows (tcp, pps64, ping), setups (nicsim, linux-bridge) "
                             f"and placement (every process on every core): drop {', '.join(given)}")
        return pair_plan(args.backends, quick=args.quick, repetitions=args.repetitions,
                         duration=args.duration)  # fmt: skip

    def missing(self) -> str | None:
        qemu = self.args.qemu
        if shutil.which(qemu) is None:
            return f"{qemu} not found: install QEMU ('apt-get install qemu-system-x86' on Debian/Ubuntu)"
        if BRIDGE in (self.args.backends or SETUPS):
            if os.geteuid() != 0:
                return ("linux-bridge creates a network namespace with a bridge and TAPs: run as root "
                        "(sudo), or compare nothing: --backends nicsim")  # fmt: skip
            if not Path("/dev/net/tun").exists():
                return "linux-bridge: /dev/net/tun is missing (load the tun module: 'modprobe tun')"
        return None

    async def prepare(self, plan: Plan) -> tuple[int, float]:
        from qemu.testvm import choose_accel

        args = self.args
        self.kernel, self.initrd, self.guest_kernel = guest_files(args)
        self.accel = await choose_accel(args.accel, self.kernel, qemu=args.qemu)
        runs = plan.runs // len(ROWS)  # one boot of the pair measures every row
        estimate = runs * (len(ROWS) * plan.duration + PAIR_OVERHEAD)
        setups = sorted({c.backend for c in plan.cells}, key=SETUPS.index)
        _err(f"two guests, {' and '.join(setups)} x {plan.repetitions} repetition(s): {runs} boots of the "
             f"pair, about {clock(estimate)} (accelerator {self.accel})")  # fmt: skip
        return runs, estimate

    async def run(
        self, plan: Plan, workdir: Path, on_run: Callable[[Cell, int], None], on_cell: OnCell = None
    ) -> list[CellResult]:
        args = self.args
        self.cores = ",".join(str(c) for c in range(os.cpu_count() or 1)) if self.pin else None
        self.ctx = RunContext(workdir=workdir, duration=plan.duration, qemu_cpu=self.cores, backend_cpu=None,
                              nicsim_args=nicsim_args(args))  # fmt: skip
        runner = PairRunner(kernel=self.kernel, initrd=self.initrd, ctx=self.ctx, cores=self.cores,
                            accel=self.accel, qemu=args.qemu, on_run=on_run, on_cell=on_cell)  # fmt: skip
        return await runner.run_plan(plan)

    def placement(self) -> str:
        if self.cores is None:
            return "placement: not pinned (--no-pin), the same for both setups"
        return (f"placement: both QEMUs and nicsim each free on cores {self.cores}, the same for both "
                "setups (nothing pinned apart: see nicsim.bench.pair_run)")

    def report(self, plan: Plan, results: list[CellResult]) -> tuple[str, Document]:
        args = self.args
        setups = sorted({c.backend for c in plan.cells}, key=SETUPS.index)
        config = {"mode": self.name, "guests": 2, "backends": setups, "quick": args.quick,
                  "accel": self.accel, "pinned": self.pin, "cores": self.cores, "placement": self.placement(),
                  "nicsim_args": list(self.ctx.nicsim_args),
                  "rows": {d.value: name for d, name in ROWS.items()}}  # fmt: skip
        ncores = len(self.cores.split(",")) if self.cores else os.cpu_count()
        table = render_pair_table(results, placement=self.placement(), ncores=ncores)

        def document() -> dict[str, Any]:
            doc = to_json(results, plan=plan, machine=machine(), config=config,
                          versions=versions(qemu=args.qemu, guest_kernel=self.guest_kernel))  # fmt: skip
            doc["goals"] = goal_rows(results)
            return doc

        return table, document


def backend_only_plan(args: argparse.Namespace) -> Plan:
    """The backend-only plan from the options; ``ValueError`` says what is wrong. Defaults: nicsim and
    dpdk, tx and rx, 64 and 1500 B, 3 repetitions of 3 s (``--quick``: 1 of 2 s)."""
    names = list(dict.fromkeys(args.backends or BACKEND_ONLY_NAMES))
    unknown = [n for n in names if n not in BACKEND_ONLY_NAMES]
    if unknown:
        known = " and ".join(BACKEND_ONLY_NAMES)
        raise ValueError(f"--backend-only compares {known}; not {', '.join(unknown)}")
    directions = [Direction.TX, Direction.RX]
    if args.directions is not None:
        directions = [Direction(d) for d in args.directions]
        if any(d.sizeless for d in directions):
            raise ValueError("--backend-only measures frames (tx, rx); TCP needs a guest, and so do the "
                             "latency rows")
    if getattr(args, "latency", False):
        raise ValueError("--backend-only measures frames (tx, rx); --latency needs a guest")
    duration = (
        args.duration if args.duration is not None else (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    )
    return build_plan(names, quick=args.quick, sizes=args.sizes or DEFAULT_SIZES, directions=directions,
                      repetitions=args.repetitions, duration=duration)  # fmt: skip


def nicsim_args(args: argparse.Namespace) -> tuple[str, ...]:
    """``--nicsim-args "--kick-batch 0"`` as argv words for ``nicsim serve`` (shell quoting rules)."""
    return tuple(shlex.split(getattr(args, "nicsim_args", None) or ""))


class BackendOnlyMode(Mode):
    """No VM: DPDK's virtio-user frontend on ``--qemu-cpu`` drives the backend on ``--backend-cpu``."""

    same_core = "the frontend (--qemu-cpu) and the backend (--backend-cpu) should be on different cores"
    name = "backend-only"
    ctx: RunContext
    runner: BackendOnlyRunner

    def plan(self) -> Plan:
        if self.args.peers:
            raise ValueError("--backend-only already runs DPDK's own backend beside nicsim; drop --peers")
        return backend_only_plan(self.args)

    def missing(self) -> str | None:
        return unavailable()

    async def prepare(self, plan: Plan) -> tuple[int, float]:
        estimate = plan.estimate_seconds(RUN_OVERHEAD)
        _err(f"backend-only, frontend {FRONTEND}: {len(plan.cells)} cells x {plan.repetitions} "
             f"repetition(s), about {clock(estimate)}")  # fmt: skip
        return plan.runs, estimate

    async def run(
        self, plan: Plan, workdir: Path, on_run: Callable[[Cell, int], None], on_cell: OnCell = None
    ) -> list[CellResult]:
        args = self.args
        self.ctx = RunContext(workdir=workdir, duration=plan.duration, qemu_cpu=None, start_timeout=30.0,
                              backend_cpu=args.backend_cpu if self.pin else None,
                              nicsim_args=nicsim_args(args))  # fmt: skip
        self.runner = BackendOnlyRunner(ctx=self.ctx, frontend_cpu=args.qemu_cpu if self.pin else None,
                                        on_run=on_run, on_cell=on_cell)  # fmt: skip
        return await self.runner.run_plan(plan)

    def report(self, plan: Plan, results: list[CellResult]) -> tuple[str, Document]:
        config = {
            "mode": self.name,
            "frontend": FRONTEND,
            "backends": sorted({c.backend for c in plan.cells}),
            "quick": self.args.quick,
            "pinned": self.pin,
            "frontend_cpu": self.runner.frontend_cpu,
            "backend_cpu": self.ctx.backend_cpu,
            "intervals_per_run": self.runner.intervals_per_run,
            "nicsim_args": list(self.ctx.nicsim_args),
            "cpu_qemu_pct": "the frontend's CPU share (no QEMU in this mode)",
        }
        table = render_table(results, first_cpu="frontend", footer=textwrap.wrap(NOTES, width=110))
        return table, lambda: to_json(results, plan=plan, versions=versions(qemu=None), machine=machine(),
                                      config=config)  # fmt: skip


def qemu_cores(args: argparse.Namespace) -> int | str:
    """Where QEMU may run: ``--qemu-cpus`` (a list, e.g. "0,1") when given, else ``--qemu-cpu``."""
    cores: str | None = getattr(args, "qemu_cpus", None)
    return cores if cores is not None else int(args.qemu_cpu)


def machine_problem(args: argparse.Namespace, mode: Mode) -> str | None:
    """What stops either mode on this machine with these options: cores, matplotlib; or None."""
    cpus = os.cpu_count() or 1
    if not args.no_pin:
        if mode.same_core is not None and args.qemu_cpu == args.backend_cpu:
            return mode.same_core
        listed = [int(c) for c in str(qemu_cores(args)).split(",")]
        if max(*listed, args.qemu_cpu, args.backend_cpu) >= cpus:
            return (f"this machine has {cpus} core(s): choose --qemu-cpu(s)/--backend-cpu below {cpus}, "
                    "or --no-pin")  # fmt: skip
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        return MATPLOTLIB_HINT
    return None


def option_problem(args: argparse.Namespace) -> str | None:
    """Options that do not go together, or ``None``."""
    if args.max_regress is not None and args.baseline is None:
        return "--max-regress needs --baseline FILE (an earlier 'nicsim bench --json' document)"
    if getattr(args, "qemu_cpus", None) is not None and getattr(args, "backend_only", False):
        return "--qemu-cpus places QEMU, and --backend-only runs none: use --qemu-cpu for the frontend"
    if getattr(args, "ndr", False) and args.backend_only:
        return "--ndr searches guest RX in a guest; it does not go with --backend-only"
    if args.json == "-" and args.json_stream == "-":
        return "--json and --json-stream cannot both write to stdout ('-'): give one of them a file"
    return None


def run_bench(args: argparse.Namespace) -> int:
    """``nicsim bench`` with parsed ``args``: 0 when every cell that ran was measured (none regressed),
    1 when a cell failed or regressed or none was measured, 2 for a usage error (one line)."""
    mode: Mode
    if getattr(args, "guests", 1) == 2:
        mode = TwoGuestMode(args)
    else:
        mode = BackendOnlyMode(args) if args.backend_only else VmMode(args)
    try:
        plan = mode.plan()
    except ValueError as err:
        _err(str(err))
        return 2
    problem = option_problem(args)
    baseline = None
    if problem is None and args.baseline is not None:
        try:
            baseline = load_baseline(args.baseline, mode=mode.name)
        except BaselineError as err:
            problem = str(err)
    problem = problem or mode.missing() or machine_problem(args, mode)
    if problem is not None:
        _err(problem)
        return 2
    stream = None
    if args.json_stream is not None:
        try:
            stream = JsonStream.open(args.json_stream, reference=reference_for(plan))
        except OSError as err:
            _err(f"--json-stream {args.json_stream}: cannot write it ({err.strerror or err})")
            return 2
    wake_us = getattr(args, "wake_latency_us", None)
    try:
        with contextlib.nullcontext() if wake_us is None else wake.held(wake_us):
            if _runs_nicsim(args):
                _compile_kernels()
            return asyncio.run(_run(args, mode, plan, baseline, stream))
    except wake.WakeLatencyError as err:
        _err(str(err))
        return 2
    finally:
        if stream is not None:
            stream.close()


async def _run(
    args: argparse.Namespace, mode: Mode, plan: Plan, baseline: Baseline | None, stream: JsonStream | None
) -> int:
    loop_before = speed.python_loop_ms()
    runs, estimate = await mode.prepare(plan)
    if stream is not None:
        stream.start(plan, mode=mode.name)
        mode.on_ndr = stream.ndr
    with run_directory(args.log_dir) as workdir:
        progress = Progress(runs, estimate=estimate, repetitions=plan.repetitions)
        try:
            on_cell = None if stream is None else stream.cell
            results = await mode.run(plan, workdir, progress.start_run, on_cell)
        finally:
            progress.finish()
    loop_after = speed.python_loop_ms()
    table, document = mode.report(plan, results)
    table = (f"{table}\nhost speed: a fixed Python loop took {loop_before:.1f} ms before the runs and "
             f"{loop_after:.1f} ms after (lower is faster; runs on one host compare when these agree)")
    wake_us = getattr(args, "wake_latency_us", None)
    if wake_us is not None:
        table = (f"{table}\nwake latency: /dev/cpu_dma_latency held at {wake_us} us for the whole run, "
                 "every backend alike (--wake-latency-us)")  # fmt: skip
    document = functools.cache(_with_config(document, wake_latency_us=wake_us,
                                            python_loop_ms=[round(loop_before, 2), round(loop_after, 2)]))
    # the comparison reads its config; --json writes it
    comparison = None
    if baseline is not None:
        current = document()
        comparison = compare(baseline, results, max_regress=args.max_regress, config=current["config"],
                             machine=current["machine"])  # fmt: skip
        table = f"{table}\n\n{render_comparison(comparison)}"
        document = functools.cache(lambda: {**current, "comparison": comparison_json(comparison)})
    status = emit(results, table, json_arg=args.json, plot_path=args.plot, document=document,
                  table_to_stderr=args.json_stream == "-")  # fmt: skip
    failed = [r.cell.label() for r in failed_cells(results)]
    if failed:
        _err(f"{len(failed)} cell(s) failed: {', '.join(failed)}")
    regressed = [] if comparison is None else [r.label() for r in comparison.regressions]
    for line in [] if comparison is None else regression_lines(comparison):
        _err(line)
    if regressed:
        status = 1
    if stream is not None:
        stream.end(status=status, failed=failed, regressed=regressed)
    return status


def _with_config(document: Callable[[], dict[str, Any]], **fields: Any) -> Callable[[], dict[str, Any]]:
    """``document`` with ``fields`` added to its config (settings every mode shares)."""

    def with_fields() -> dict[str, Any]:
        doc = document()
        doc["config"] = {**doc.get("config", {}), **fields}
        return doc

    return with_fields


def _runs_nicsim(args: argparse.Namespace) -> bool:
    """Whether a run starts ``nicsim serve`` with its compiled kernels (``--engine numpy`` needs none)."""
    backends: list[str] | None = getattr(args, "backends", None)
    pair = getattr(args, "guests", 1) == 2  # two guests on nicsim's switch
    uses = backends is None or pair or any(b.startswith("nicsim") for b in backends)
    return uses and "numpy" not in " ".join(nicsim_args(args)).replace("=", " ").split()


def _compile_kernels() -> None:
    """Compile nicsim's kernels here (or load them from numba's cache, about a second), before any
    run: a ``nicsim serve`` whose kernels are not cached yet (a fresh clone without ``./run setup``,
    or a changed kernel source) spends about 20 s compiling before its socket appears, past the
    runs' start timeout."""
    from nicsim.interrupts import interrupts_kept
    from nicsim.ports import enable_kernels
    from rings import kernels

    started = time.monotonic()
    _err("nicsim's compiled kernels: loading (compiling takes about 20 s once after an install or a change)")
    with interrupts_kept():
        compiled = enable_kernels()
    if not compiled:
        _err(f"nicsim's compiled kernels: none ({kernels.engine()}); nicsim runs its numpy path")
    elif (took := time.monotonic() - started) > 5:
        _err(f"nicsim's compiled kernels: compiled in {took:.0f} s, cached for later runs")
