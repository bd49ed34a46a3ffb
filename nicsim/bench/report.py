"""Rendering results: the table for a person, the JSON document for tools, the plot for a slide.

One row per cell: backend, direction, frame size, pps min / median / max, Gbit/s median, the cell's
total core use beside it (QEMU + backend + sender, median, in cores: QEMU's tap works inside QEMU,
nicsim and DPDK on a core of their own), the sender's CPU share (flagged ``!`` at 90 % and
``sender_bound`` in the JSON: it may have set the rate), the median CPU share of QEMU and of the
backend process, nicsim's pool high-water mark (the largest over the
runs), and the ratio *reference ÷ this row* of the median throughput (pps, or Gbit/s for TCP) against
the reference backend's row with the same direction and size — nicsim when it is benchmarked. Cells
that were not measured show their status ("n/a", "skipped", "failed") and the reason is listed
under the table. Latency cells get a table of their own under it: RTT p50 / p99 / max in ms, and
for udp-rr the transactions per second.
The JSON holds every sample. The plot is throughput against frame size, one line
per backend and direction, and needs matplotlib (``pip install matplotlib``), said so if missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .matrix import Direction, Plan, Summary, ratio
from .runner import SENDER_BOUND_PCT, CellResult

LATENCY_MEASURES = ("rtt_p50_ms", "rtt_p99_ms", "rtt_max_ms", "loss_pct", "tps")
MATPLOTLIB_HINT = "--plot needs matplotlib: install it with 'pip install matplotlib'"


def si(value: float | None, digits: int = 3) -> str:
    """``123k``, ``1.23M``: throughput figures a person can compare at a glance."""
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def headline_measure(direction: Direction) -> str:
    """The measure a cell is compared on: Gbit/s for TCP, transactions/s for udp-rr, else pps (which
    ping cells have none of: they are not compared)."""
    if direction.is_tcp:
        return "gbps"
    return "tps" if direction is Direction.UDP_RR else "pps"


def headline(result: CellResult) -> float | None:
    """The figure ratios and baselines compare: median pps, Gbit/s for TCP, transactions/s for udp-rr."""
    s = result.summary(headline_measure(result.cell.direction))
    return None if s is None else s.median


def reference_of(results: Sequence[CellResult], preferred: str = "nicsim") -> str | None:
    names = [r.cell.backend for r in results]
    if preferred in names:
        return preferred
    return names[0] if names else None


def ratios(results: Sequence[CellResult], reference: str | None) -> dict[tuple[str, str, int], float | None]:
    """For each non-reference cell, ``reference median ÷ this median`` (``None`` when undefined)."""
    ref = {(r.cell.direction.value, r.cell.size): headline(r) for r in results if r.cell.backend == reference}
    out: dict[tuple[str, str, int], float | None] = {}
    for r in results:
        if r.cell.backend != reference:
            out[r.cell.key] = ratio(ref.get((r.cell.direction.value, r.cell.size)), headline(r))
    return out


def _median(s: Summary | None) -> float | None:
    return None if s is None else s.median


def core_columns(result: CellResult) -> list[str]:
    """"cores" (the median total core use, QEMU + backend + sender, in cores) and "CPU sender" (the
    median, ``!`` when some run's sender was at or above ``SENDER_BOUND_PCT``: maybe the bottleneck)."""
    total = _median(result.summary("cpu_total_pct"))
    sender = pct(_median(result.summary("cpu_sender_pct")))
    return ["-" if total is None else f"{total / 100:.2f}", f"{sender}!" if result.sender_bound else sender]


def table_rows(results: Sequence[CellResult], reference: str | None) -> list[list[str]]:
    rat = ratios(results, reference)
    rows: list[list[str]] = []
    for r in results:
        c = r.cell
        size = str(c.size) if c.size else "-"
        head = [c.backend, c.direction.value, size]
        if r.status != "ok":
            rows.append([*head, r.status, "", "", "", "", "", "", "", "", ""])
            continue
        pps = r.summary("pps")
        hw = [s.pool_high_water for s in r.good() if s.pool_high_water is not None]
        if c.backend == reference:
            rel = "(ref)"
        else:
            value = rat.get(c.key)
            rel = "-" if value is None else f"{value:.2f}"
        rows.append([
            *head,
            si(None if pps is None else pps.min), si(_median(pps)), si(None if pps is None else pps.max),
            "-" if r.summary("gbps") is None else f"{_median(r.summary('gbps')):.3f}",
            *core_columns(r),
            pct(_median(r.summary("cpu_qemu_pct"))), pct(_median(r.summary("cpu_backend_pct"))),
            str(max(hw)) if hw else "-", rel,
        ])  # fmt: skip
    return rows


def grid(header: list[str], rows: list[list[str]]) -> list[str]:
    """``header``, a rule and ``rows`` in aligned columns, the first two left-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left = {0, 1}

    def fmt(row: list[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in pairs]
        return "  ".join(cells).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(row) for row in rows)]


LATENCY_HEADER = ["backend", "latency", "trans/s", "p50 ms", "p50 min-max", "p99 ms", "p99-p50", "max ms",
                  "loss", "runs"]  # fmt: skip
LATENCY_LEGEND = (
    "latency: guest ping RTT to the host address behind the backend (ping: every 10 ms; ping-flood: "
    "the next request as soon as the reply is in); p50/p99 are nearest-rank over one run's replies, "
    "the median over runs shown, p50 min-max its spread over runs; max ms the largest RTT of any run. "
    "udp-rr: the guest's sockperf ping-pong to a sockperf server there, 64-byte UDP messages, one "
    "outstanding; trans/s its replies per second (median over runs), its RTTs sockperf's own over its "
    "window (the run without sockperf's 0.45 s warm-up and cool-down)."
)


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def latency_rows(results: Sequence[CellResult]) -> list[list[str]]:
    """One row per latency cell: median transactions/s (udp-rr), median p50 / p99 over runs, the p50
    spread, the worst RTT, loss."""
    rows: list[list[str]] = []
    for r in results:
        head = [r.cell.backend, r.cell.direction.value]
        if r.status != "ok":
            rows.append([*head, r.status, "", "", "", "", "", "", ""])
            continue
        p50, p99, worst = (r.summary(m) for m in ("rtt_p50_ms", "rtt_p99_ms", "rtt_max_ms"))
        loss = r.summary("loss_pct")
        spread = "-" if p50 is None else f"{p50.min:.3f}-{p50.max:.3f}"
        gap = None if p50 is None or p99 is None else p99.median - p50.median
        tps = si(_median(r.summary("tps")))
        rows.append([*head, tps, ms(_median(p50)), spread, ms(_median(p99)), ms(gap),
                     ms(None if worst is None else worst.max),
                     "-" if loss is None else f"{loss.max:.1f}%", str(len(r.good()))])  # fmt: skip
    return rows


def render_table(
    results: Sequence[CellResult], *, reference: str | None = None, first_cpu: str = "QEMU",
    footer: Sequence[str] = (),
) -> str:
    """The person's table, then one note per cell that was not measured (why). ``first_cpu`` names the
    process of the first CPU column (QEMU; the frontend with ``--backend-only``); ``footer`` is extra
    lines printed under the legend."""
    reference = reference if reference is not None else reference_of(results)
    header = ["backend", "dir", "size", "pps min", "pps med", "pps max", "Gbit/s", "cores", "CPU sender",
              f"CPU {first_cpu}", "CPU backend", "pool HW", f"{reference}÷this"]  # fmt: skip
    throughput = [r for r in results if not r.cell.direction.is_latency]
    latency = [r for r in results if r.cell.direction.is_latency]
    lines = grid(header, table_rows(throughput, reference)) if throughput or not latency else []
    if latency:
        lines += [*([""] if lines else []), *grid(LATENCY_HEADER, latency_rows(latency))]
    notes = [f"  {r.cell.label()}: {r.status}: {r.reason}" for r in results if r.status != "ok"]
    failed_runs = [
        f"  {r.cell.label()} run {i + 1}: {s.error}"
        for r in results if r.status == "ok" for i, s in enumerate(r.samples) if not s.ok
    ]  # fmt: skip
    if notes or failed_runs:
        lines += ["", "not measured / failed runs:", *notes, *failed_runs]
    legend = [
        "size: Ethernet frame with FCS (64 B hands 60 bytes to the NIC); Gbit/s counts frame bytes "
        "without FCS; CPU: share of one core over the measured window (median); pool HW: nicsim's "
        f"packet pool high-water mark; {reference}÷this: ratio of median pps (Gbit/s for TCP).",
        f"cores: {first_cpu} + backend + sender together, in cores (median); CPU sender: the traffic "
        f"helper outside {first_cpu} and the backend (qemu-tap's RX sender, iperf3's server); "
        f"'!': a run's sender used >= {SENDER_BOUND_PCT:.0f}% of its core and may have set the rate.",
    ]
    lines += [
        "",
        *(legend if throughput or not latency else []),
        *([LATENCY_LEGEND] if latency else []),
        *footer,
    ]
    return "\n".join(lines)


def _summary_dict(s: Summary | None) -> dict[str, float] | None:
    return None if s is None else dataclasses.asdict(s)


def cell_json(result: CellResult, ratio_value: float | None) -> dict[str, Any]:
    c = result.cell
    return {
        "backend": c.backend, "direction": c.direction.value, "size": c.size, "frame_len": c.frame_len,
        "status": result.status, "reason": result.reason,
        "summary": {m: _summary_dict(result.summary(m))
                    for m in ("pps", "gbps", "cpu_qemu_pct", "cpu_backend_pct", "cpu_sender_pct",
                              "cpu_total_pct", "pool_high_water", *LATENCY_MEASURES)},
        "sender_bound": result.sender_bound,
        "ratio_reference_over_this": ratio_value,
        "samples": [dataclasses.asdict(s) for s in result.samples],
    }  # fmt: skip


def to_json(
    results: Sequence[CellResult], *, plan: Plan, versions: dict[str, Any], machine: dict[str, Any],
    config: dict[str, Any], reference: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    reference = reference if reference is not None else reference_of(results)
    rat = ratios(results, reference)
    return {
        "format": "nicsim-bench/1",
        "config": {**config, "repetitions": plan.repetitions, "duration": plan.duration,
                   "reference": reference},
        "versions": versions,
        "machine": machine,
        "cells": [cell_json(r, rat.get(r.cell.key)) for r in results],
    }  # fmt: skip


def plot(results: Sequence[CellResult], path: Path) -> str | None:
    """Write a PNG of pps against frame size, one line per backend and direction; an error or ``None``."""
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")  # no display on a benchmark host
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return MATPLOTLIB_HINT
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in results:
        value = headline(r)
        if r.cell.direction.sizeless or value is None:
            continue
        lines.setdefault((r.cell.backend, r.cell.direction.value), []).append((r.cell.size, value))
    if not lines:
        return "--plot: no frame-size cell was measured, nothing to plot"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (backend, direction), points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] / 1e3 for p in points], marker="o",
                label=f"{backend} guest {direction.upper()}")  # fmt: skip
    ax.set_xlabel("frame size (bytes, with FCS)")
    ax.set_ylabel("kpps (median)")
    ax.set_title("nicsim bench: guest throughput by frame size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def emit(
    results: Sequence[CellResult],
    table: str,
    *,
    json_arg: str | None,
    plot_path: str | Path | None,
    document: Callable[[], dict[str, Any]],
    table_to_stderr: bool = False,
) -> int:
    """Print ``table`` (to stderr when JSON goes to stdout: ``json_arg == "-"`` or ``table_to_stderr``),
    write the JSON ``document()`` and the plot as asked, and return :func:`exit_status`."""
    json_to_stdout = json_arg == "-"
    print(table, file=sys.stderr if json_to_stdout or table_to_stderr else sys.stdout)
    if json_arg is not None:
        text = json.dumps(document(), indent=2)
        if json_to_stdout:
            print(text)
        else:
            Path(json_arg).write_text(text + "\n")
            print(f"nicsim bench: JSON written to {json_arg}", file=sys.stderr)
    if plot_path is not None:
        problem = plot(results, Path(plot_path))
        said = problem if problem is not None else f"plot written to {plot_path}"
        print(f"nicsim bench: {said}", file=sys.stderr)
    return exit_status(results)


def failed_cells(results: Sequence[CellResult]) -> list[CellResult]:
    return [r for r in results if r.status == "failed"]


def exit_status(results: Sequence[CellResult]) -> int:
    """1 when any cell failed (every run failed, or a run's backend count check did not hold) or when
    no cell was measured at all; 0 otherwise. Cells that are "n/a" or "skipped" are not failures."""
    if failed_cells(results) or not any(r.status == "ok" for r in results):
        return 1
    return 0
