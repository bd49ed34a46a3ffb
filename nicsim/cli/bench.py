"""``nicsim bench``: measure a test guest's network throughput, nicsim and its peers side by side.

This module owns the command line: it checks QEMU is there (and says which package to install if
not), builds or finds the guest image with progress, turns options into a plan (``--quick`` or the
full matrix, whose duration it states up front), says which backends it must skip and why, runs the
plan with live progress on stderr, and prints the table (stdout), the JSON (``--json``) and the plot
(``--plot``). A failed run is reported as failed with its reason; the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nicsim.bench.matrix import Plan

EPILOG = """\
examples:
  nicsim bench --quick                       nicsim alone, small matrix (< 2 minutes)
  nicsim bench --quick --peers               nicsim beside QEMU's tap and DPDK testpmd
  nicsim bench --backends qemu-tap,dpdk      the peers only, full matrix
  nicsim bench --peers --json out.json --plot out.png
  nicsim bench --backend-only                no VM: nicsim vs DPDK vhost under DPDK's virtio-user

Frame sizes include the 4-byte FCS (64 B = 60 bytes handed to the NIC). QEMU runs pinned to
--qemu-cpu and the backend to --backend-cpu. Peers: qemu-tap needs /dev/net/tun (a TAP inside a
network namespace created and deleted by the run); dpdk needs dpdk-testpmd ('apt-get install dpdk-dev').
"""


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _sizes(text: str) -> list[int]:
    try:
        return [int(s) for s in _csv(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"sizes must be integers, e.g. 64,512,1500: {err}") from err


def _directions(text: str) -> list[str]:
    from nicsim.bench.matrix import Direction

    choices = [d.value for d in Direction]
    bad = [d for d in _csv(text) if d not in choices]
    if bad:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad))}: choose from {', '.join(choices)}")
    return _csv(text)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="measure a test guest's network throughput (nicsim and peers side by side)",
        description="Boot the test guest once per run and measure guest TX (pktgen), guest RX and TCP "
        "(iperf3) through each backend; report min/median/max, CPU use and ratios.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--backends",
        type=_csv,
        metavar="LIST",
        help="comma-separated: nicsim, qemu-tap, dpdk (default: nicsim; --backend-only: nicsim,dpdk)",
    )
    p.add_argument("--peers", action="store_true", help="add qemu-tap and dpdk beside the chosen backends")
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 repetition, 64 and 1500 B, 2 s windows, no host->guest TCP row (< 2 minutes)",
    )
    p.add_argument("--sizes", type=_sizes, metavar="LIST", help="frame sizes with FCS (default 64,512,1500)")
    p.add_argument(
        "--directions",
        type=_directions,
        metavar="LIST",
        help="any of tx,rx,tcp-tx,tcp-rx (default: all; --quick: tx,rx,tcp-tx)",
    )
    p.add_argument("--repetitions", type=int, metavar="N", help="runs per cell (default 3; --quick 1)")
    p.add_argument(
        "--duration", type=float, metavar="S", help="measured seconds per run (default 5; --quick 2)"
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write every sample, versions and the machine as JSON to FILE (or stdout)",
    )
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="throughput against frame size (matplotlib)")
    p.add_argument(
        "--backend-only",
        action="store_true",
        help="no VM: DPDK's virtio-user frontend (dpdk-testpmd) drives nicsim's sink/generator and DPDK's "
        "own net_vhost backend; Mpps at 64 and 1500 B and their ratio (frontend on --qemu-cpu)",
    )
    p.add_argument(
        "--accel",
        choices=["auto", "kvm", "tcg"],
        default="auto",
        help="'auto' uses KVM only if a probe boot succeeds (default: auto)",
    )
    p.add_argument("--qemu-cpu", type=int, default=0, metavar="N", help="core QEMU is pinned to (default 0)")
    p.add_argument(
        "--backend-cpu", type=int, default=1, metavar="N", help="core the backend is pinned to (default 1)"
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin QEMU and the backend")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="the QEMU binary")
    p.add_argument("--kernel", type=Path, help="guest kernel (default: the built guest image's)")
    p.add_argument("--initrd", type=Path, help="guest initramfs (default: the built guest image's)")
    p.add_argument("--log-dir", type=Path, help="keep backend and helper logs here (default: discarded)")
    return p


def _err(message: str) -> None:
    print(f"nicsim bench: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from nicsim.bench import BACKEND_CLASSES, PEERS, Direction, build_plan

    if args.backend_only:
        from nicsim.bench.cmd_backend_only import run_backend_only

        return run_backend_only(args)
    names = list(dict.fromkeys((args.backends or ["nicsim"]) + (list(PEERS) if args.peers else [])))
    unknown = [n for n in names if n not in BACKEND_CLASSES]
    if unknown:
        _err(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKEND_CLASSES)}")
        return 2
    try:
        directions = None if args.directions is None else [Direction(d) for d in args.directions]
        plan = build_plan(names, quick=args.quick, sizes=args.sizes, directions=directions,
                          repetitions=args.repetitions, duration=args.duration)  # fmt: skip
    except ValueError as err:
        _err(str(err))
        return 2
    if shutil.which(args.qemu) is None:
        _err(f"{args.qemu} not found: install QEMU ('apt-get install qemu-system-x86' on Debian/Ubuntu)")
        return 2
    cpus = os.cpu_count() or 1
    if not args.no_pin and max(args.qemu_cpu, args.backend_cpu) >= cpus:
        _err(f"this machine has {cpus} core(s): choose --qemu-cpu/--backend-cpu below {cpus}, or --no-pin")
        return 2
    if args.plot is not None:
        import importlib.util

        from nicsim.bench.report import MATPLOTLIB_HINT

        if importlib.util.find_spec("matplotlib") is None:
            _err(MATPLOTLIB_HINT)
            return 2
    return asyncio.run(_run(args, names, plan))


async def _run(args: argparse.Namespace, names: list[str], plan: Plan) -> int:
    from nicsim.bench import BACKEND_CLASSES, RunContext, Runner
    from nicsim.bench.matrix import BOOT_OVERHEAD
    from nicsim.bench.progress import Progress, clock
    from nicsim.bench.report import emit, render_table, to_json
    from nicsim.bench.runner import skip_runs
    from nicsim.bench.sysinfo import machine, versions
    from qemu.testvm import choose_accel

    backends = [BACKEND_CLASSES[n]() for n in names]
    kernel, initrd, guest_kernel = args.kernel, args.initrd, None
    if kernel is None or initrd is None:
        from images.build import build_image

        image = build_image(progress=lambda line: print(f"image: {line}", file=sys.stderr))
        kernel, initrd = kernel or image.kernel, initrd or image.initrd
        guest_kernel = image.manifest.get("kernel_version")
    for b in backends:
        why = b.unavailable()
        if why is not None:
            _err(f"skipping {why}")
    runs = plan.runs - skip_runs(plan, backends)
    accel = await choose_accel(args.accel, kernel, qemu=args.qemu)
    estimate = runs * (plan.duration + BOOT_OVERHEAD)
    _err(f"{len(plan.cells)} cells x {plan.repetitions} repetition(s): {runs} guest boots, "
         f"about {clock(estimate)} (accelerator {accel})")  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="nicsim-bench-"))
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        workdir = args.log_dir
    pin = not args.no_pin
    ctx = RunContext(workdir=workdir, duration=plan.duration, qemu_cpu=args.qemu_cpu if pin else None,
                     backend_cpu=args.backend_cpu if pin else None)  # fmt: skip
    progress = Progress(runs, estimate=estimate, repetitions=plan.repetitions)
    runner = Runner(kernel=Path(kernel), initrd=Path(initrd), ctx=ctx, accel=accel, qemu=args.qemu,
                    on_run=progress.start_run)  # fmt: skip
    try:
        results = await runner.run_plan(plan, backends)
    finally:
        progress.finish()
        if args.log_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    config = {"backends": names, "quick": args.quick, "accel": accel, "pinned": pin,
              "qemu_cpu": ctx.qemu_cpu, "backend_cpu": ctx.backend_cpu}  # fmt: skip
    return emit(
        results, render_table(results), json_arg=args.json, plot_path=args.plot,
        document=lambda: to_json(results, plan=plan, machine=machine(), config=config,
                                 versions=versions(qemu=args.qemu, guest_kernel=guest_kernel)),
    )  # fmt: skip
