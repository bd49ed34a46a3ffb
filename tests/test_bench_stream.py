"""``--json-stream``: the writer, with synthetic results: one flushed line per finished cell, carrying
the ``--json`` document's fields for that cell, between a start and an end line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nicsim.bench.matrix import Cell, Direction, build_plan
from nicsim.bench.report import to_json
from nicsim.bench.runner import CellResult, Sample
from nicsim.bench.stream import FORMAT, JsonStream, reference_for


def result(backend: str, pps: float | None, status: str = "ok") -> CellResult:
    samples = [] if pps is None else [Sample(ok=True, pps=pps, gbps=pps * 480 / 1e9, packets=int(pps))]
    return CellResult(cell=Cell(backend=backend, direction=Direction.TX, size=64), status=status,
                      reason=None if status == "ok" else "no tcp", samples=samples)  # fmt: skip


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_cell_is_one_flushed_line_with_the_json_documents_fields(tmp_path: Path) -> None:
    plan = build_plan(["nicsim", "dpdk", "qemu-tap"], quick=True, directions=[Direction.TX], sizes=[64])
    results = [result("nicsim", 200e3), result("dpdk", 400e3), result("qemu-tap", None, "skipped")]
    path = tmp_path / "run.jsonl"
    stream = JsonStream.open(str(path), reference=reference_for(plan))
    stream.start(plan, mode="vm")
    start = lines(path)  # read while the stream is still open: every line is flushed at once
    cells = [{"backend": b, "direction": "tx", "size": 64} for b in ("nicsim", "dpdk", "qemu-tap")]
    data = {"format": FORMAT, "mode": "vm", "repetitions": 1, "duration": 2.0, "reference": "nicsim",
            "cells": cells}  # fmt: skip
    assert start == [{"event": "start", "data": data}]
    for i, r in enumerate(results):
        stream.cell(r)
        assert len(lines(path)) == i + 2
    stream.end(status=0, failed=[], regressed=[])
    stream.close()
    got = lines(path)
    assert [g["event"] for g in got] == ["start", "cell", "cell", "cell", "end"]
    doc = to_json(results, plan=plan, versions={}, machine={}, config={})
    assert [g["data"] for g in got[1:4]] == json.loads(json.dumps(doc["cells"]))  # the same fields
    assert got[2]["data"]["ratio_reference_over_this"] == 0.5  # the reference ran first
    assert got[-1] == {"event": "end", "data": {"status": 0, "failed": [], "regressed": []}}


def test_a_ratio_needs_the_reference_to_have_run(tmp_path: Path) -> None:
    stream = JsonStream.open(str(tmp_path / "s.jsonl"), reference="nicsim")
    stream.cell(result("dpdk", 400e3))  # nicsim's cell has not run (yet)
    stream.close()
    (line,) = lines(tmp_path / "s.jsonl")
    assert line["data"]["backend"] == "dpdk" and line["data"]["ratio_reference_over_this"] is None


def test_dash_is_stdout_and_is_left_open(capsys: pytest.CaptureFixture[str]) -> None:
    stream = JsonStream.open("-", reference="nicsim")
    stream.end(status=1, failed=["nicsim tx 64 B"], regressed=[])
    stream.close()
    out = capsys.readouterr().out
    end = {"status": 1, "failed": ["nicsim tx 64 B"], "regressed": []}
    assert json.loads(out) == {"event": "end", "data": end}
    print("still open")  # close() did not close stdout


def test_the_reference_is_known_from_the_plan() -> None:
    assert reference_for(build_plan(["dpdk", "nicsim"], quick=True)) == "nicsim"
    assert reference_for(build_plan(["qemu-tap", "dpdk"], quick=True)) == "qemu-tap"


def test_an_ndr_search_is_one_line_with_the_json_documents_ndr_entry(tmp_path: Path) -> None:
    from nicsim.bench.ndr_vm import NdrCell

    path = tmp_path / "run.jsonl"
    stream = JsonStream.open(str(path), reference="nicsim")
    found = NdrCell(cell=Cell(backend="dpdk", direction=Direction.RX, size=64), mrr_pps=None,
                    error="dpdk: testpmd has no paced sender")  # fmt: skip
    stream.ndr(found)
    assert lines(path) == [{"event": "ndr", "data": found.to_json()}]
    stream.close()
