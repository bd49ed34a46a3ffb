"""``--baseline``: reading an earlier ``--json`` document, and the cell-by-cell comparison, with
synthetic results (no guest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nicsim.bench.baseline import (
    BaselineError,
    compare,
    comparison_json,
    load_baseline,
    parse_baseline,
    regression_lines,
    render_comparison,
)
from nicsim.bench.matrix import Cell, Direction, build_plan
from nicsim.bench.report import to_json
from nicsim.bench.runner import CellResult, Sample

TX, RX, TCP = Direction.TX, Direction.RX, Direction.TCP_TX


def cell(backend: str, direction: Direction, size: int, *values: float, status: str = "ok") -> CellResult:
    tcp = direction.is_tcp
    samples = [Sample(ok=True, pps=None if tcp else v, gbps=v if tcp else v * 60 * 8 / 1e9) for v in values]
    return CellResult(cell=Cell(backend=backend, direction=direction, size=size), status=status,
                      reason=None if status == "ok" else "why", samples=samples)  # fmt: skip


def document(results: list[CellResult], **config: Any) -> dict[str, Any]:
    """A document exactly as ``--json`` writes it, through a JSON round trip."""
    plan = build_plan(["nicsim"], quick=True)
    doc = to_json(results, plan=plan, versions={}, machine={"cpu_model": "AMD EPYC", "cores": 2},
                  config={"mode": "vm", "accel": "tcg", **config})  # fmt: skip
    return json.loads(json.dumps(doc))  # type: ignore[no-any-return]


BASE = [
    cell("nicsim", TX, 64, 900e3, 1000e3, 1100e3),  # median 1000k
    cell("nicsim", RX, 64, 500e3),
    cell("nicsim", TCP, 0, 2.0),
    cell("dpdk", TX, 64, 3e6),  # not in the run below
    cell("dpdk", TCP, 0, status="n/a"),  # measured on neither side
    cell("qemu-tap", TX, 64, status="failed"),
]


def test_each_cell_is_compared_on_its_median_and_regressions_are_flagged_beyond_the_limit() -> None:
    baseline = parse_baseline(document(BASE), "base.json")
    now = [
        cell("nicsim", TX, 64, 940e3),  # -6 %: regressed with a 5 % limit
        cell("nicsim", RX, 64, 480e3),  # -4 %: within it
        cell("nicsim", TCP, 0, 2.5),  # +25 %: compared in Gbit/s, better
        cell("dpdk", TCP, 0, status="n/a"),
        cell("qemu-tap", TX, 64, 50e3),  # failed in the baseline: nothing to compare with
        cell("qemu-tap", RX, 64, 40e3),  # not in the baseline
    ]
    c = compare(baseline, now, max_regress=5.0)
    rows = {r.key: r for r in c.rows}
    assert list(rows) == [("nicsim", "tx", 64), ("nicsim", "rx", 64), ("nicsim", "tcp-tx", 0)]
    tx, rx, tcp = rows.values()
    assert (tx.baseline, tx.now, tx.unit) == (1000e3, 940e3, "pps") and tx.regressed
    assert tx.change_pct == pytest.approx(-6.0) and not rx.regressed
    assert (tcp.unit, tcp.baseline, tcp.now, tcp.regressed) == ("Gbit/s", 2.0, 2.5, False)
    assert [r.label() for r in c.regressions] == ["nicsim tx 64 B"]
    assert c.not_compared == [
        (("qemu-tap", "tx", 64), "failed in the baseline"),
        (("qemu-tap", "rx", 64), "not in the baseline"),
        (("dpdk", "tx", 64), "not in this run"),
    ]  # dpdk tcp-tx, n/a on both sides, is not mentioned at all
    assert regression_lines(c) == ["regression: nicsim tx 64 B: median 1M -> 940k pps (-6.00%, limit -5%)"]


def test_a_cell_failed_in_this_run_is_not_compared_and_the_limit_is_strict() -> None:
    baseline = parse_baseline(document(BASE), "base.json")
    c = compare(baseline, [cell("nicsim", TX, 64, 950e3), cell("nicsim", RX, 64, status="failed")],
                max_regress=5.0)  # fmt: skip
    assert not c.regressions  # exactly -5 % is not more than 5 %
    assert (("nicsim", "rx", 64), "failed in this run") in c.not_compared


def test_without_a_limit_the_comparison_gates_nothing() -> None:
    baseline = parse_baseline(document(BASE), "base.json")
    c = compare(baseline, [cell("nicsim", TX, 64, 1e3)], max_regress=None)
    assert c.rows[0].change_pct == pytest.approx(-99.9) and c.regressions == []
    assert "not gating (no --max-regress)" in render_comparison(c)


def test_the_table_shows_baseline_now_and_change_and_says_what_was_not_compared() -> None:
    baseline = parse_baseline(document(BASE, duration=2.0), "base.json")
    now = [cell("nicsim", TX, 64, 940e3), cell("nicsim", TCP, 0, 2.5)]
    c = compare(baseline, now, max_regress=5.0, config={"accel": "kvm", "duration": 2.0},
                machine={"cpu_model": "AMD EPYC", "cores": 4})  # fmt: skip
    lines = render_comparison(c).splitlines()
    assert lines[0] == "compared with base.json (median pps; Gbit/s for TCP; trans/s for udp-rr), limit -5%:"
    assert lines[1].split() == ["backend", "dir", "size", "unit", "baseline", "now", "change"]
    assert lines[3].split() == ["nicsim", "tx", "64", "pps", "1M", "940k", "-6.00%", "REGRESSED"]
    assert lines[4].split() == ["nicsim", "tcp-tx", "-", "Gbit/s", "2.000", "2.500", "+25.00%"]
    assert "not compared (measured on one side only):" in lines
    assert "  dpdk tx 64 B: not in this run" in lines
    assert lines[-1] == "the runs differ in: accel tcg -> kvm, machine cores 2 -> 4"
    doc = comparison_json(c)
    assert doc["max_regress_pct"] == 5.0 and doc["cells"][0]["regressed"] is True
    assert {"backend": "dpdk", "direction": "tx", "size": 64, "why": "not in this run"} in doc["not_compared"]


def write(path: Path, doc: Any) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_a_file_that_is_not_a_bench_document_of_the_same_mode_is_refused_in_one_line(tmp_path: Path) -> None:
    good = write(tmp_path / "good.json", document(BASE))
    assert load_baseline(good, mode="vm").medians[("nicsim", "tx", 64)] == 1000e3
    old = document(BASE)
    del old["config"]["mode"]  # written before the VM mode named itself: still the VM mode
    assert load_baseline(write(tmp_path / "old.json", old), mode="vm").mode == "vm"
    cases = {
        tmp_path / "missing.json": "cannot read it",
        write(tmp_path / "text.json", "backend dir size\n"): "not JSON",
        write(tmp_path / "iperf.json", {"start": {}, "end": {}}): "not a 'nicsim bench --json' document",
        write(tmp_path / "bad.json", {"format": "nicsim-bench/1", "cells": [{"backend": "x"}]}): "cell 1 is",
        good: "is from the vm mode; this run is backend-only",
    }
    for path, why in cases.items():
        with pytest.raises(BaselineError) as err:
            load_baseline(path, mode="backend-only")
        assert why in str(err.value) and "\n" not in str(err.value) and str(path) in str(err.value)
