"""``nicsim bench``: measure a test guest's network throughput, nicsim and its peers side by side.

This module owns the command line's options, for every mode (a guest per run, ``--backend-only``
with DPDK's virtio-user as the frontend, or ``--guests 2``: guest to guest, nicsim against a Linux
bridge): their names, defaults, help and syntax checks. What an
invocation does with them — the plan, the checks that say what to install, the image, the runs with
live progress on stderr, the table (stdout), the JSON (``--json``, or one line per finished cell
with ``--json-stream``), the comparison with an earlier run (``--baseline``, gated by
``--max-regress``) and the plot (``--plot``) — is :mod:`nicsim.bench.command`, imported only when
the command runs. A failed run is reported as failed with its reason and the run goes on; the exit
status is 1 when any cell failed (or regressed), so the benchmark can gate a regression suite.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  nicsim bench --quick                       nicsim alone, small matrix (< 2 minutes)
  nicsim bench --quick --peers               nicsim beside QEMU's tap and DPDK testpmd
  nicsim bench --backends qemu-tap,dpdk      the peers only, full matrix
  nicsim bench --peers --json out.json --plot out.png
  nicsim bench --backend-only                no VM: nicsim vs DPDK vhost under DPDK's virtio-user
  nicsim bench --guests 2 --json pair.json   guest to guest: nicsim's switch vs a Linux bridge
                                             (tcp, 64 B pps, ping p50/p99; root: a namespace)
  nicsim bench --json-stream run.jsonl       one JSON line per cell as it finishes (tail -f it)
  nicsim bench --json base.json              keep a run, then gate a later one against it:
  nicsim bench --baseline base.json --max-regress 10

Exit status: 0 when every cell that ran was measured; 1 when a cell failed (every run failed, or the
guest's count and the backend's own disagreed), none was measured, or a cell's median fell by more
than --max-regress percent from the baseline's; 2 for a usage error.

Frame sizes include the 4-byte FCS (64 B = 60 bytes handed to the NIC). QEMU runs pinned to
--qemu-cpu (or free on --qemu-cpus, e.g. 0,1) and the backend to --backend-cpu; the "cores" column
is each cell's total core use (QEMU + backend + sender), since QEMU's tap works inside QEMU.
Peers: qemu-tap needs /dev/net/tun (a TAP inside a network namespace created and deleted by the run);
dpdk needs dpdk-testpmd ('apt-get install dpdk-dev').
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


def _cpu_list(text: str) -> str:
    """``0,1``: a comma-separated list of core numbers (``taskset -c`` syntax, ranges not needed)."""
    try:
        cores = sorted({int(c) for c in _csv(text)})
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: core numbers separated by commas, e.g. 0,1") from err
    if not cores or cores[0] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: core numbers separated by commas, e.g. 0,1")
    return ",".join(map(str, cores))


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of percent, e.g. 5 or 2.5") from err
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"{value:g}: a percentage from 0 to below 100")
    return value


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
        help="comma-separated: nicsim, qemu-tap, dpdk; the labelled nicsim rows nicsim-busy-poll (polls "
        "its core as dpdk does), nicsim-count-only, nicsim-mergeable (guest RX in the peers' "
        "mergeable-buffer mode), nicsim-no-lane (requests through the event loop, the request lane "
        "off); dpdk-tap (latency rows: testpmd forwarding between "
        "the guest and a TAP, as nicsim and qemu-tap are measured) (default: nicsim; --backend-only: "
        "nicsim,dpdk)",
    )
    p.add_argument("--peers", action="store_true",
                   help="add qemu-tap and dpdk beside the chosen backends, and dpdk-tap when there are "
                        "latency rows")  # fmt: skip
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 repetition, 64 and 1500 B, 2 s windows, no host->guest TCP row (< 2 minutes)",
    )
    p.add_argument(
        "--ndr", action="store_true",
        help="after the plan, NDR and PDR (RFC 2544: highest offered rate with zero / at most 0.5%% loss) "
        "for each guest-RX cell, searched from its MRR in one guest per cell "
        "(nicsim and qemu-tap; dpdk has no paced sender)",
    )  # fmt: skip
    p.add_argument("--sizes", type=_sizes, metavar="LIST", help="frame sizes with FCS (default 64,512,1500)")
    p.add_argument(
        "--directions",
        type=_directions,
        metavar="LIST",
        help="any of tx,rx,tcp-tx,tcp-rx,ping,ping-flood,udp-rr "
        "(default: tx,rx,tcp-tx,tcp-rx; --quick: tx,rx,tcp-tx)",
    )
    p.add_argument(
        "--nicsim-args",
        metavar="ARGS",
        help="extra options for the nicsim backend's 'nicsim serve', e.g. \"--kick-batch 0 --poll-us 200\"",
    )
    p.add_argument(
        "--packed",
        action="store_true",
        help="the nicsim backend's guest NIC uses packed virtqueues (QEMU packed=on; default: split)",
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="add the latency rows: guest ping RTT p50/p99/max every 10 ms (ping) and back to back "
        "(ping-flood), and UDP request/response with one outstanding (udp-rr: sockperf ping-pong, "
        "transactions/s and RTT p50/p99/max; dpdk: n/a, testpmd has no UDP responder)",
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
    p.add_argument(
        "--json-stream",
        metavar="FILE",
        help="write one JSON line per finished cell to FILE (or '-', stdout) as it finishes, iperf3-style "
        "{\"event\": \"start\"|\"cell\"|\"ndr\"|\"end\", \"data\": ...}; a cell's (or an --ndr "
        "search's) data is its --json entry",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        help="compare each cell's median (pps; Gbit/s for TCP) with an earlier --json FILE of the same mode",
    )
    p.add_argument(
        "--max-regress",
        type=_percent,
        metavar="PCT",
        help="with --baseline: exit 1, naming each cell, when a median fell by more than PCT percent",
    )
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="throughput against frame size (matplotlib)")
    p.add_argument(
        "--backend-only",
        action="store_true",
        help="no VM: DPDK's virtio-user frontend (dpdk-testpmd) drives nicsim's sink/generator and DPDK's "
        "own net_vhost backend; Mpps at 64 and 1500 B and their ratio (frontend on --qemu-cpu)",
    )
    p.add_argument(
        "--guests",
        type=int,
        choices=[1, 2],
        default=1,
        help="2: two guests, A to B, through one 'nicsim serve --port switch' and through a Linux bridge "
        "(two TAPs in a namespace, QEMU's tap netdev), in the same run: iperf3 TCP, 64 B pktgen pps "
        "counted by B, ping every 10 ms; --backends may pick nicsim or linux-bridge; every QEMU and "
        "nicsim free on every core (default: 1, a guest per run)",
    )
    p.add_argument(
        "--accel",
        choices=["auto", "kvm", "tcg"],
        default="auto",
        help="'auto' uses KVM only if a probe boot succeeds (default: auto)",
    )
    p.add_argument("--qemu-cpu", type=int, default=0, metavar="N", help="core QEMU is pinned to (default 0)")
    p.add_argument(
        "--qemu-cpus",
        type=_cpu_list,
        metavar="LIST",
        help="cores QEMU may run on, instead of --qemu-cpu: '0,1' leaves QEMU free on both cores, so "
        "QEMU's own tap device model (in its main loop) need not share the vCPU's core",
    )
    p.add_argument(
        "--backend-cpu", type=int, default=1, metavar="N", help="core the backend is pinned to (default 1)"
    )
    p.add_argument(
        "--wake-latency-us",
        type=int,
        metavar="N",
        help="hold /dev/cpu_dma_latency at N microseconds for the whole run, every backend alike: idle "
        "cores then stay in states they leave within N us, so a latency row shows the data path more "
        "than this host's wakeups (machine-wide, dropped when the bench exits; needs root)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin QEMU and the backend")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="the QEMU binary")
    p.add_argument("--kernel", type=Path, help="guest kernel (default: the built guest image's)")
    p.add_argument("--initrd", type=Path, help="guest initramfs (default: the built guest image's)")
    p.add_argument("--log-dir", type=Path, help="keep backend and helper logs here (default: discarded)")
    return p


def run(args: argparse.Namespace) -> int:
    from nicsim.bench.command import run_bench  # the benchmark's imports only when it runs

    return run_bench(args)
