"""``nicsim bench`` as a regression gate: its exit status (a failed cell, a regression beyond
``--max-regress``), the comparison and the stream as the command writes them, and the options it
refuses in one line. The runs are synthetic (a stand-in mode that returns given results)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nicsim.bench import command
from nicsim.bench.baseline import load_baseline
from nicsim.bench.matrix import Cell, Direction, Plan
from nicsim.bench.report import exit_status, render_table, to_json
from nicsim.bench.runner import CellResult, Sample
from nicsim.bench.stream import JsonStream
from nicsim.cli import main


def result(backend: str, pps: float | None = None, *, status: str = "ok", size: int = 64) -> CellResult:
    samples = [] if pps is None else [Sample(ok=True, pps=pps, gbps=pps * 480 / 1e9)]
    if status == "failed":
        samples = [Sample(ok=False, error="backend count check: the guest counted 9 packets, ...")]
    return CellResult(cell=Cell(backend=backend, direction=Direction.TX, size=size), status=status,
                      reason=None if status == "ok" else f"{status}: why", samples=samples)  # fmt: skip


class Given(command.Mode):
    """A mode whose runs return the given results at once."""

    name = "vm"

    def __init__(self, args: argparse.Namespace, results: list[CellResult]) -> None:
        super().__init__(args)
        self.results = results

    def plan(self) -> Plan:
        return Plan(cells=tuple(r.cell for r in self.results), repetitions=1, duration=1.0)

    def missing(self) -> str | None:
        return None

    async def prepare(self, plan: Plan) -> tuple[int, float]:
        return plan.runs, 0.0

    async def run(self, plan: Plan, workdir: Path, on_run: Callable[[Cell, int], None],
                  on_cell: command.OnCell = None) -> list[CellResult]:  # fmt: skip
        for r in self.results:
            on_run(r.cell, 0)
            if on_cell is not None:
                on_cell(r)
        return self.results

    def report(self, plan: Plan, results: list[CellResult]) -> tuple[str, command.Document]:
        return render_table(results), lambda: to_json(results, plan=plan, versions={}, machine={"cores": 2},
                                                      config={"mode": self.name, "accel": "tcg"})  # fmt: skip


def run(tmp_path: Path, results: list[CellResult], **options: Any) -> int:
    args = argparse.Namespace(**{"no_pin": True, "json": None, "json_stream": None, "plot": None,
                                 "log_dir": tmp_path / "logs", "baseline": None, "max_regress": None,
                                 **options})  # fmt: skip
    mode = Given(args, results)
    baseline = None if args.baseline is None else load_baseline(args.baseline, mode="vm")
    stream = None if args.json_stream is None else JsonStream.open(args.json_stream, reference="nicsim")
    try:
        return asyncio.run(command._run(args, mode, mode.plan(), baseline, stream))
    finally:
        if stream is not None:
            stream.close()


def test_any_failed_cell_exits_1_and_is_named_while_the_table_still_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = [result("nicsim", 1e5), result("dpdk", status="n/a"), result("qemu-tap", status="skipped")]
    assert run(tmp_path, ok) == 0  # n/a and skipped cells are not failures
    capsys.readouterr()
    assert run(tmp_path, [*ok, result("nicsim", status="failed", size=1500)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("backend") and "nicsim tx 1500 B: failed: failed: why" in out
    assert "nicsim bench: 1 cell(s) failed: nicsim tx 1500 B" in err
    assert exit_status([result("dpdk", status="n/a")]) == 1  # nothing measured at all


def test_a_regression_beyond_the_limit_exits_1_naming_the_cell_in_every_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base.json"
    assert run(tmp_path, [result("nicsim", 1e5), result("nicsim", 2e5, size=1500)], json=str(base)) == 0
    capsys.readouterr()
    now = [result("nicsim", 0.8e5), result("nicsim", 1.99e5, size=1500)]  # -20 % and -0.5 %
    stream, doc = tmp_path / "run.jsonl", tmp_path / "now.json"
    assert run(tmp_path, now, baseline=base, max_regress=10.0, json_stream=str(stream), json=str(doc)) == 1
    out, err = capsys.readouterr()
    assert f"compared with {base} (median pps; Gbit/s for TCP; trans/s for udp-rr), limit -10%:" in out
    regressed = next(line for line in out.splitlines() if "REGRESSED" in line)
    assert regressed.split()[:3] == ["nicsim", "tx", "64"] and "-20.00%" in regressed
    named = [line for line in err.splitlines() if "regression:" in line]
    assert named == ["nicsim bench: regression: nicsim tx 64 B: median 100k -> 80k pps (-20.00%, limit -10%)"]
    events = [json.loads(line) for line in stream.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "cell", "cell", "end"]
    assert events[-1]["data"] == {"status": 1, "failed": [], "regressed": ["nicsim tx 64 B"]}
    comparison = json.loads(doc.read_text())["comparison"]
    assert [c["regressed"] for c in comparison["cells"]] == [True, False]
    # The same run without a limit compares, and gates nothing.
    assert run(tmp_path, now, baseline=base) == 0
    assert "not gating (no --max-regress)" in capsys.readouterr().out


def test_with_the_stream_on_stdout_the_table_goes_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path, [result("nicsim", 1e5)], json_stream="-") == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["event"] for line in out.splitlines()] == ["start", "cell", "end"]
    assert any(line.startswith("backend") for line in err.splitlines())


def one_line_refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    # Any existing program as "QEMU": the refusals come before anything is started.
    assert main(["bench", "--no-pin", "--qemu", sys.executable, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_options_that_cannot_work_are_refused_in_one_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "--max-regress needs --baseline" in one_line_refusal(["--max-regress", "5"], capsys)
    assert "cannot both write to stdout" in one_line_refusal(["--json", "-", "--json-stream", "-"], capsys)
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
        main(["bench", "--baseline", "x.json", "--max-regress", "-1"])
    assert exit_.value.code == 2 and "-1: a percentage from 0 to below 100" in capsys.readouterr().err
    not_bench = tmp_path / "iperf3.json"
    not_bench.write_text('{"start": {}, "end": {}}')
    err = one_line_refusal(["--baseline", str(not_bench)], capsys)
    assert "not a 'nicsim bench --json' document" in err
    vm_doc = tmp_path / "vm.json"
    vm_doc.write_text(json.dumps({"format": "nicsim-bench/1", "config": {"accel": "tcg"}, "cells": []}))
    err = one_line_refusal(["--backend-only", "--baseline", str(vm_doc)], capsys)
    assert "is from the vm mode; this run is backend-only" in err
    err = one_line_refusal(["--json-stream", str(tmp_path / "no-such-dir" / "s.jsonl")], capsys)
    assert "--json-stream" in err and "cannot write it" in err
