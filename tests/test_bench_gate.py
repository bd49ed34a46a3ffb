"""``nicsim bench`` as a regression gate: its exit status when a cell failed, the stream as the
command writes it, and the options it refuses in one line. The runs are synthetic (a stand-in mode
that returns given results)."""

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
                                 "log_dir": tmp_path / "logs", **options})  # fmt: skip
    mode = Given(args, results)
    stream = None if args.json_stream is None else JsonStream.open(args.json_stream, reference="nicsim")
    try:
        return asyncio.run(command._run(args, mode, mode.plan(), stream))
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
    assert "cannot both write to stdout" in one_line_refusal(["--json", "-", "--json-stream", "-"], capsys)
    err = one_line_refusal(["--json-stream", str(tmp_path / "no-such-dir" / "s.jsonl")], capsys)
    assert "--json-stream" in err and "cannot write it" in err
