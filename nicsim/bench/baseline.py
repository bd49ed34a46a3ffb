"""``--baseline FILE --max-regress PCT``: this run against an earlier ``--json`` document, cell by cell.

Cells are matched on (backend, direction, size) and compared on the figure the table's ratios use:
the median pps, the median Gbit/s for TCP cells, the median transactions/s for udp-rr (ping cells
have none and are not compared). A cell regressed when its median fell by more
than PCT percent of the baseline's; without ``--max-regress`` the comparison is shown and gates
nothing. A cell measured on one side only (absent, failed, skipped or n/a on the other) is not
compared and is listed as such; a cell measured on neither side is left out. The baseline must be a
``nicsim bench --json`` document (``"format": "nicsim-bench/1"``) of the same mode (a guest per run,
or ``--backend-only``); anything else is a ``BaselineError``, which the command reports in one line
(exit 2) before it runs anything. Settings that make figures incomparable (accelerator, pinning,
duration, the machine) are named when they differ, but do not stop the comparison.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .matrix import Direction
from .report import headline, headline_measure, si
from .runner import CellResult

FORMAT = "nicsim-bench/1"
Key = tuple[str, str, int]
# config and machine fields that, when they differ, make a comparison doubtful (named, not refused)
SETTINGS = ("accel", "pinned", "qemu_cpu", "backend_cpu", "frontend_cpu", "duration", "repetitions",
            "wake_latency_us")
MACHINE = ("cpu_model", "cores")
UNITS = {"pps": "pps", "gbps": "Gbit/s", "tps": "trans/s"}  # a headline measure's unit, as shown


class BaselineError(ValueError):
    """The ``--baseline`` file cannot be compared with this run; the message is the one line to print."""


@dataclass(frozen=True, kw_only=True)
class Baseline:
    """What a ``--json`` document holds for a comparison: each cell's headline median (``None``:
    not measured there, with its status), its mode, settings and machine."""

    path: str
    mode: str
    medians: Mapping[Key, float | None]
    statuses: Mapping[Key, str]
    config: Mapping[str, Any]
    machine: Mapping[str, Any]


def document_mode(config: Mapping[str, Any]) -> str:
    """``"backend-only"`` or ``"vm"`` (documents from before the VM mode said so have no ``mode``)."""
    return "backend-only" if config.get("mode") == "backend-only" else "vm"


def _cell_median(cell: Mapping[str, Any]) -> float | None:
    measure = headline_measure(Direction(cell["direction"]))
    summary = cell.get("summary") or {}
    value = (summary.get(measure) or {}).get("median")
    return float(value) if isinstance(value, int | float) else None


def parse_baseline(doc: Any, path: str) -> Baseline:
    """The comparable parts of a decoded ``--json`` document; ``BaselineError`` if it is not one."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("cells"), list):
        raise BaselineError(f"--baseline {path}: not a 'nicsim bench --json' document (format {FORMAT})")
    config, machine = doc.get("config"), doc.get("machine")
    config = config if isinstance(config, dict) else {}
    machine = machine if isinstance(machine, dict) else {}
    medians: dict[Key, float | None] = {}
    statuses: dict[Key, str] = {}
    for i, cell in enumerate(doc["cells"]):
        try:
            key = (str(cell["backend"]), str(cell["direction"]), int(cell["size"]))
            medians[key] = _cell_median(cell) if cell.get("status") == "ok" else None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BaselineError(f"--baseline {path}: cell {i + 1} is malformed ({err!r})") from err
        statuses[key] = str(cell.get("status"))
    return Baseline(path=path, mode=document_mode(config), medians=medians, statuses=statuses,
                    config=config, machine=machine)  # fmt: skip


def load_baseline(path: Path, *, mode: str) -> Baseline:
    """Read ``path`` for a run of ``mode``; ``BaselineError`` (one line) if it cannot be compared."""
    try:
        text = path.read_text()
    except OSError as err:
        raise BaselineError(f"--baseline {path}: cannot read it ({err.strerror or err})") from err
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise BaselineError(f"--baseline {path}: not JSON ({err})") from err
    baseline = parse_baseline(doc, str(path))
    if baseline.mode != mode:
        raise BaselineError(f"--baseline {path} is from the {baseline.mode} mode; this run is {mode}: "
                            "compare like with like")  # fmt: skip
    return baseline


@dataclass(frozen=True, kw_only=True)
class Row:
    """One cell measured on both sides; ``change_pct`` is (now - baseline) / baseline, in percent."""

    key: Key
    unit: str
    baseline: float
    now: float
    change_pct: float | None
    regressed: bool

    def label(self) -> str:
        return _label(self.key)


@dataclass(frozen=True, kw_only=True)
class Comparison:
    baseline: Baseline
    max_regress: float | None
    rows: list[Row]
    not_compared: list[tuple[Key, str]]  # measured on one side only, and why not on the other
    differences: list[str]  # settings or machine that differ between the two runs

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.regressed]


def _label(key: Key) -> str:
    """As ``Cell.label`` says it: ``nicsim tx 64 B``, ``nicsim tcp-tx -``."""
    backend, direction, size = key
    return f"{backend} {direction} {size} B" if size else f"{backend} {direction} -"


def differences(baseline: Baseline, config: Mapping[str, Any], machine: Mapping[str, Any]) -> list[str]:
    """``"accel tcg -> kvm"`` for each setting or machine field both runs state and that differs."""
    out = []
    for where, mine, theirs in (("", config, baseline.config), ("machine ", machine, baseline.machine)):
        names = SETTINGS if not where else MACHINE
        for name in names:
            if name in mine and name in theirs and mine[name] != theirs[name]:
                out.append(f"{where}{name} {theirs[name]} -> {mine[name]}")
    return out


def compare(
    baseline: Baseline, results: Sequence[CellResult], *, max_regress: float | None,
    config: Mapping[str, Any] | None = None, machine: Mapping[str, Any] | None = None,
) -> Comparison:  # fmt: skip
    """This run's ``results`` against ``baseline``, in this run's cell order, then the baseline's
    cells that this run did not have."""
    rows: list[Row] = []
    not_compared: list[tuple[Key, str]] = []
    seen: set[Key] = set()
    for r in results:
        key = r.cell.key
        seen.add(key)
        now = headline(r) if r.status == "ok" else None
        base = baseline.medians.get(key)
        if now is None and base is None:
            continue  # measured on neither side (n/a here and there, say): nothing to say
        if key not in baseline.medians:
            not_compared.append((key, "not in the baseline"))
        elif base is None:
            not_compared.append((key, f"{baseline.statuses.get(key, 'not measured')} in the baseline"))
        elif now is None:
            not_compared.append((key, f"{r.status} in this run"))
        else:
            change = (now - base) / base * 100 if base > 0 else None
            regressed = max_regress is not None and change is not None and change < -max_regress
            unit = UNITS[headline_measure(r.cell.direction)]
            rows.append(Row(key=key, unit=unit, baseline=base, now=now, change_pct=change,
                            regressed=regressed))  # fmt: skip
    for key, base in baseline.medians.items():
        if key not in seen and base is not None:
            not_compared.append((key, "not in this run"))
    return Comparison(baseline=baseline, max_regress=max_regress, rows=rows, not_compared=not_compared,
                      differences=differences(baseline, config or {}, machine or {}))  # fmt: skip


def _figure(value: float, unit: str) -> str:
    return f"{value:.3f}" if unit == "Gbit/s" else si(value)


def _change(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def render_comparison(c: Comparison) -> str:
    """The comparison table for a person, with what was not compared and why."""
    gate = "not gating (no --max-regress)" if c.max_regress is None else f"limit -{c.max_regress:g}%"
    lines = [f"compared with {c.baseline.path} (median pps; Gbit/s for TCP; trans/s for udp-rr), {gate}:"]
    header = ["backend", "dir", "size", "unit", "baseline", "now", "change", ""]
    body = [[r.key[0], r.key[1], str(r.key[2]) if r.key[2] else "-", r.unit, _figure(r.baseline, r.unit),
             _figure(r.now, r.unit), _change(r.change_pct), "REGRESSED" if r.regressed else ""]
            for r in c.rows]  # fmt: skip
    if body:
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        for row in [header, ["-" * w if i < 7 else "" for i, w in enumerate(widths)], *body]:
            pairs = enumerate(zip(row, widths, strict=True))
            cells = [v.ljust(w) if i in (0, 1, 3, 7) else v.rjust(w) for i, (v, w) in pairs]
            lines.append("  ".join(cells).rstrip())
    else:
        lines.append("  no cell was measured on both sides")
    if c.not_compared:
        lines.append("not compared (measured on one side only):")
        lines += [f"  {_label(key)}: {why}" for key, why in c.not_compared]
    if c.differences:
        lines.append("the runs differ in: " + ", ".join(c.differences))
    return "\n".join(lines)


def regression_lines(c: Comparison) -> list[str]:
    """One line per regressed cell, naming it, for stderr."""
    return [f"regression: {r.label()}: median {_figure(r.baseline, r.unit)} -> "
            f"{_figure(r.now, r.unit)} {r.unit} ({_change(r.change_pct)}, limit -{c.max_regress:g}%)"
            for r in c.regressions]  # fmt: skip


def comparison_json(c: Comparison) -> dict[str, Any]:
    """The comparison as the ``--json`` document's ``comparison`` field."""
    def where(key: Key) -> dict[str, Any]:
        return {"backend": key[0], "direction": key[1], "size": key[2]}

    return {
        "baseline": c.baseline.path,
        "max_regress_pct": c.max_regress,
        "cells": [{**where(r.key), "unit": r.unit, "baseline": r.baseline, "now": r.now,
                   "change_pct": r.change_pct, "regressed": r.regressed} for r in c.rows],
        "not_compared": [{**where(key), "why": why} for key, why in c.not_compared],
        "differences": c.differences,
    }  # fmt: skip
