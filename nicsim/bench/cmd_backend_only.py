"""The ``nicsim bench --backend-only`` command: options into a plan, the runs, the table and the JSON.

The measuring itself is :mod:`nicsim.bench.backend_only`. Defaults: backends nicsim and dpdk (DPDK's
own ``net_vhost``), directions tx and rx, 64 and 1500 B, 3 repetitions of 3 s (``--quick``: 1 of 2 s).
The frontend is pinned to ``--qemu-cpu`` and the backend to ``--backend-cpu``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

import nicsim

from .backend import RunContext
from .backend_only import (
    BACKEND_ONLY_NAMES,
    DEFAULT_DURATION,
    DEFAULT_SIZES,
    NOTES,
    QUICK_DURATION,
    BackendOnlyRunner,
    unavailable,
)
from .matrix import Direction, Plan, build_plan
from .progress import Progress, clock
from .report import MATPLOTLIB_HINT, emit, render_table, to_json
from .sysinfo import machine
from .testpmd import dpdk_version

# Starting both processes and waiting for the first interval with traffic, per run; a planning figure.
RUN_OVERHEAD = 4.0
FRONTEND = "dpdk-testpmd net_virtio_user (no hugepages)"


def backend_only_versions() -> dict[str, Any]:
    """What the VM benchmark records, without QEMU and the guest kernel (neither takes part)."""
    return {
        "nicsim": nicsim.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "host_kernel": platform.release(),
        "dpdk": dpdk_version(),
    }


def _err(message: str) -> None:
    print(f"nicsim bench: {message}", file=sys.stderr)


def plan_for(args: argparse.Namespace) -> Plan:
    """The backend-only plan from the command line; ValueError says what is wrong."""
    names = list(dict.fromkeys(args.backends or BACKEND_ONLY_NAMES))
    unknown = [n for n in names if n not in BACKEND_ONLY_NAMES]
    if unknown:
        known = " and ".join(BACKEND_ONLY_NAMES)
        raise ValueError(f"--backend-only compares {known}; not {', '.join(unknown)}")
    directions = [Direction.TX, Direction.RX]
    if args.directions is not None:
        directions = [Direction(d) for d in args.directions]
        if any(d.is_tcp for d in directions):
            raise ValueError("--backend-only measures frames (tx, rx); TCP needs a guest")
    duration = (
        args.duration if args.duration is not None else (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    )
    return build_plan(
        names,
        quick=args.quick,
        sizes=args.sizes or DEFAULT_SIZES,
        directions=directions,
        repetitions=args.repetitions,
        duration=duration,
    )


def run_backend_only(args: argparse.Namespace) -> int:
    if args.peers:
        _err("--backend-only already runs DPDK's own backend beside nicsim; drop --peers")
        return 2
    try:
        plan = plan_for(args)
    except ValueError as err:
        _err(str(err))
        return 2
    pin = not args.no_pin
    if pin and args.qemu_cpu == args.backend_cpu:
        _err("the frontend (--qemu-cpu) and the backend (--backend-cpu) should be on different cores")
        return 2
    cpus = os.cpu_count() or 1
    if pin and max(args.qemu_cpu, args.backend_cpu) >= cpus:
        _err(f"this machine has {cpus} core(s): choose --qemu-cpu/--backend-cpu below {cpus}, or --no-pin")
        return 2
    if args.plot is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            _err(MATPLOTLIB_HINT)
            return 2
    why = unavailable()
    if why is not None:
        _err(why)
        return 2
    return asyncio.run(_run(args, plan, pin))


async def _run(args: argparse.Namespace, plan: Plan, pin: bool) -> int:
    estimate = plan.estimate_seconds(RUN_OVERHEAD)
    _err(
        f"backend-only, frontend {FRONTEND}: {len(plan.cells)} cells x {plan.repetitions} repetition(s), "
        f"about {clock(estimate)}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="nicsim-bench-"))
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
        workdir = args.log_dir
    ctx = RunContext(
        workdir=workdir,
        duration=plan.duration,
        qemu_cpu=None,
        backend_cpu=args.backend_cpu if pin else None,
        start_timeout=30.0,
    )
    progress = Progress(plan.runs, estimate=estimate, repetitions=plan.repetitions)
    runner = BackendOnlyRunner(
        ctx=ctx, frontend_cpu=args.qemu_cpu if pin else None, on_run=progress.start_run
    )
    try:
        results = await runner.run_plan(plan)
    finally:
        progress.finish()
        if args.log_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    notes = textwrap.wrap(NOTES, width=110)
    config = {
        "mode": "backend-only",
        "frontend": FRONTEND,
        "backends": sorted({c.backend for c in plan.cells}),
        "quick": args.quick,
        "pinned": pin,
        "frontend_cpu": runner.frontend_cpu,
        "backend_cpu": ctx.backend_cpu,
        "intervals_per_run": runner.intervals_per_run,
        "cpu_qemu_pct": "the frontend's CPU share (no QEMU in this mode)",
    }
    return emit(
        results, render_table(results, first_cpu="frontend", footer=notes), json_arg=args.json,
        plot_path=args.plot,
        document=lambda: to_json(results, plan=plan, versions=backend_only_versions(), machine=machine(),
                                 config=config),
    )  # fmt: skip
