"""The two-guest mode's pure parts: its setups, rows, plan, count check, table and goals.

``nicsim bench --guests 2`` puts two guests, A and B, on one wire and measures guest to guest, once
through nicsim (one ``nicsim serve`` with a socket per guest and ``--port switch``) and once through
what users would pick instead: a Linux bridge whose two TAPs are QEMU's tap netdevs. Its rows are
cells of the existing matrix, so the repetition, median and JSON machinery is the VM mode's: ``tcp``
is a ``tcp-tx`` cell (iperf3 from A to B, Mbit/s), ``pps64`` a 64-byte ``tx`` cell (A's pktgen to B's
MAC and address; the rate is what B's own eth0 counted over A's sending time, with what A sent
beside it), ``ping`` a ``ping`` cell (A pings B every 10 ms; p50/p99/max). The goals of issue 12
are stated here once: nicsim at least 1.0x the bridge on TCP, 1.5x on 64-byte packets per second,
and a ping p50 no worse. Nothing here does I/O; :mod:`nicsim.bench.pair_run` boots the guests.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

from .matrix import Cell, Direction, Plan, build_plan, ratio
from .report import grid
from .runner import CellResult, Sample

NICSIM = "nicsim"
BRIDGE = "linux-bridge"
SETUPS = (NICSIM, BRIDGE)
PPS_SIZE = 64  # with FCS: pktgen hands 60 bytes to the NIC
DEFAULT_DURATION = 5.0
QUICK_DURATION = 2.0
# Two guest boots one after the other (B first, so that A finds it up), the settling sleeps between
# rows and teardown, per repetition of a setup; a planning figure, not a promise.
PAIR_OVERHEAD = 16.0
#: the count check: B's own count and the setup's count of frames handed to B may differ by this much
COUNT_SLACK = 16
COUNT_SLACK_FRACTION = 0.001

ROWS: dict[Direction, str] = {Direction.TCP_TX: "tcp", Direction.TX: "pps64", Direction.PING: "ping"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Goal:
    """A row's goal: nicsim's median ``measure`` over the bridge's is at least (or at most) ``target``."""

    row: str
    measure: str
    target: float
    at_least: bool = True

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.target if self.at_least else value <= self.target

    def text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.target:g}x"


GOALS = (
    Goal(row="tcp", measure="gbps", target=1.0),
    Goal(row="pps64", measure="pps", target=1.5),
    Goal(row="ping", measure="rtt_p50_ms", target=1.0, at_least=False),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairBoot(Cell):
    """What the progress line names: one boot of the pair on ``backend``, which measures every row."""

    def label(self) -> str:
        return f"{self.backend}: {', '.join(ROWS.values())}"


def row_name(cell: Cell) -> str:
    return ROWS[cell.direction]


def pair_plan(
    setups: Sequence[str] | None, *, quick: bool, repetitions: int | None, duration: float | None
) -> Plan:
    """Every row for each setup (default: both), in setup order; ``ValueError`` says what is wrong."""
    names = list(dict.fromkeys(setups or SETUPS))
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        raise ValueError(f"--guests 2 compares {' and '.join(SETUPS)}; not {', '.join(unknown)}")
    secs = duration if duration is not None else (QUICK_DURATION if quick else DEFAULT_DURATION)
    return build_plan(names, quick=quick, sizes=[PPS_SIZE], directions=list(ROWS),
                      repetitions=repetitions, duration=secs)  # fmt: skip


def setup_cells(plan: Plan, setup: str) -> list[Cell]:
    """The cells one boot of the guest pair measures, in the order A runs them."""
    return [c for c in plan.cells if c.backend == setup]


def check_b_count(seen: int | None, handed: int | None, source: str) -> dict[str, Any]:
    """B's own count of frames received (``seen``: eth0's rx_packets + rx_dropped at the end) against
    what the setup says it handed to B (``handed``: nicsim's receive-queue counters for B's socket,
    or the bridge port's TAP tx counter): they agree within ``COUNT_SLACK`` frames and
    ``COUNT_SLACK_FRACTION`` of the count (a neighbour frame after B's last reading, say)."""
    out: dict[str, Any] = {"guest": seen, "backend": handed, "backend_source": source, "rule": "close"}
    if seen is None or handed is None:
        return {**out, "ok": None, "reason": "no count from B or from the setup"}
    slack = max(COUNT_SLACK, int(COUNT_SLACK_FRACTION * max(seen, handed)))
    out["slack"] = slack
    if abs(seen - handed) > slack:
        return {**out, "ok": False, "reason": f"B counted {seen} frames, {source} says {handed} "
                                              f"(more than {slack} apart)"}  # fmt: skip
    return {**out, "ok": True, "reason": None}


def _median(result: CellResult | None, measure: str) -> float | None:
    s = None if result is None or result.status != "ok" else result.summary(measure)
    return None if s is None else s.median


def goal_rows(results: Sequence[CellResult]) -> list[dict[str, Any]]:
    """Per goal: nicsim's and the bridge's median and their ratio nicsim÷bridge, and whether it is met."""
    by = {(r.cell.backend, row_name(r.cell)): r for r in results}
    out = []
    for g in GOALS:
        ours = _median(by.get((NICSIM, g.row)), g.measure)
        theirs = _median(by.get((BRIDGE, g.row)), g.measure)
        value = ratio(ours, theirs)
        out.append({"row": g.row, "measure": g.measure, "nicsim": ours, "linux_bridge": theirs,
                    "nicsim_over_bridge": value, "goal": g.text(), "met": g.met(value)})  # fmt: skip
    return out


def _fmt(value: float | None, scale: float = 1.0) -> str:
    """Three significant digits, but whole numbers from 100 up (no exponent for 1100 Mbit/s)."""
    if value is None:
        return "-"
    v = value * scale
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


MEASURES = (  # what the table shows per row: (row, label, measure, scale to the unit shown)
    ("tcp", "tcp Mbit/s", "gbps", 1000.0),
    ("pps64", "pps64 kpps received by B", "pps", 1e-3),
    ("pps64", "pps64 kpps sent by A", "sent_pps", 1e-3),
    ("ping", "ping p50 ms", "rtt_p50_ms", 1.0),
    ("ping", "ping p99 ms", "rtt_p99_ms", 1.0),
    ("ping", "ping max ms", "rtt_max_ms", 1.0),
)


def sample_value(sample: Sample, measure: str) -> float | None:
    """A sample's ``measure``; ``sent_pps`` (what A's pktgen sent) is kept with the guest's figures."""
    value = sample.guest.get(measure) if measure == "sent_pps" else getattr(sample, measure, None)
    return float(value) if isinstance(value, int | float) else None


def _spread(result: CellResult | None, measure: str, scale: float) -> str:
    if result is None or result.status != "ok":
        return "-" if result is None else result.status
    nums = [v for v in (sample_value(s, measure) for s in result.good()) if v is not None]
    if not nums:
        return "-"
    med = statistics.median(nums)
    if len(nums) == 1:
        return _fmt(med, scale)
    return f"{_fmt(med, scale)} ({_fmt(min(nums), scale)}-{_fmt(max(nums), scale)})"


def cores(result: CellResult | None) -> str:
    s = None if result is None or result.status != "ok" else result.summary("cpu_total_pct")
    return "-" if s is None else f"{s.median / 100:.2f}"


THREADS = (  # the parts of a row's CPU, in the order shown: (key in Sample.cpu_threads, column)
    ("a_vcpu", "A vCPU"), ("a_rest", "A QEMU rest"), ("b_vcpu", "B vCPU"), ("b_rest", "B QEMU rest"),
    ("nicsim", "nicsim"),
)


def thread_rows(results: Sequence[CellResult], ncores: int | None) -> list[list[str]]:
    """Per row and setup, the median share (in cores) of each part of ``THREADS`` over its good runs,
    their sum, and what was left of the ``ncores`` cores they may use (a figure near 0: the host's
    cores, not the wire, set the pace)."""
    rows = []
    for result in sorted(results, key=lambda r: (list(ROWS.values()).index(row_name(r.cell)),
                                                 SETUPS.index(r.cell.backend))):  # fmt: skip
        parts = [s.cpu_threads for s in result.good() if s.cpu_threads]
        if not parts:
            continue
        medians = {key: statistics.median(p[key] for p in parts) if all(key in p for p in parts) else None
                   for key, _ in THREADS}  # fmt: skip
        total = statistics.median(sum(p.values()) for p in parts)
        left = "-" if ncores is None else f"{max(ncores * 100 - total, 0.0) / 100:.2f}"
        rows.append([row_name(result.cell), result.cell.backend,
                     *("-" if v is None else f"{v / 100:.2f}" for v in medians.values()),
                     f"{total / 100:.2f}", left])  # fmt: skip
    return rows


def render_pair_table(results: Sequence[CellResult], *, placement: str, ncores: int | None = None) -> str:
    """Median (min-max) per measure and setup, nicsim÷bridge with its goal, the cores each setup used,
    then the cells that were not measured and the legend."""
    by = {(r.cell.backend, row_name(r.cell)): r for r in results}
    goals = {(g["row"], g["measure"]): g for g in goal_rows(results)}
    header = ["measure", NICSIM, BRIDGE, "nicsim÷bridge", "goal", "met", "cores nicsim", "cores bridge"]
    rows = []
    for row, label, measure, scale in MEASURES:
        ours, theirs = by.get((NICSIM, row)), by.get((BRIDGE, row))
        if ours is None and theirs is None:
            continue
        g = goals.get((row, measure))
        value = ratio(_median(ours, measure), _median(theirs, measure)) if g is not None else None
        met = "-" if g is None or g["met"] is None else ("yes" if g["met"] else "NO")
        first = measure in ("gbps", "pps", "rtt_p50_ms")
        rows.append([label, _spread(ours, measure, scale), _spread(theirs, measure, scale),
                     "-" if value is None else f"{value:.2f}", "" if g is None else g["goal"], met,
                     cores(ours) if first else "", cores(theirs) if first else ""])  # fmt: skip
    lines = grid(header, rows)
    threads = thread_rows(results, ncores)
    if threads:
        lines += ["", "where the cores went (median, in cores):",
                  *grid(["row", "setup", *(c for _, c in THREADS), "total", "left"], threads)]  # fmt: skip
    notes = [f"  {r.cell.backend} {row_name(r.cell)}: {r.status}: {r.reason}"
             for r in results if r.status != "ok"]  # fmt: skip
    failed = [f"  {r.cell.backend} {row_name(r.cell)} run {i + 1}: {s.error}"
              for r in results if r.status == "ok" for i, s in enumerate(r.samples) if not s.ok]  # fmt: skip
    if notes or failed:
        lines += ["", "not measured / failed runs:", *notes, *failed]
    lines += [
        "",
        "guest A -> guest B on one wire: nicsim = one 'nicsim serve --port switch' with a socket per "
        "guest; linux-bridge = two TAPs in a Linux bridge inside a namespace, QEMU's tap netdev "
        "(vhost=off) per guest. Median over runs (min-max); tcp: iperf3, A's client, receiver's rate; "
        "pps64: A's pktgen, 64 B frames (60 B to the NIC), B's eth0 count over A's sending time; ping: "
        "A pings B every 10 ms, nearest-rank percentiles. cores: both QEMUs + nicsim, in cores (median). "
        "Where the cores went: each guest's vCPU thread, the rest of its QEMU (its main loop: QEMU's tap "
        "netdev with the bridge's work in the sender's kernel context, or the interrupts nicsim asks "
        "for), nicsim, and what was left of the cores they may use.",
        placement,
    ]
    return "\n".join(lines)
