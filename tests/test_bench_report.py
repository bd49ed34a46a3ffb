"""``nicsim.bench.report``: the table (rows, ratios, notes), the JSON document and the plot's fallback."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from nicsim.bench.matrix import Cell, Direction, build_plan
from nicsim.bench.report import MATPLOTLIB_HINT, plot, ratios, render_table, to_json
from nicsim.bench.runner import CellResult, Sample


def sample(pps: float, *, cpu_q: float = 90.0, cpu_b: float = 50.0, hw: int | None = None) -> Sample:
    return Sample(ok=True, pps=pps, gbps=pps * 60 * 8 / 1e9, packets=int(pps), bytes=int(pps) * 60,
                  seconds=1.0, cpu_qemu_pct=cpu_q, cpu_backend_pct=cpu_b, pool_high_water=hw)  # fmt: skip


def results() -> list[CellResult]:
    tx = Direction.TX
    return [
        CellResult(cell=Cell(backend="nicsim", direction=tx, size=64),
                   samples=[sample(100e3, hw=40), sample(300e3, hw=90), sample(200e3, hw=64)]),
        CellResult(cell=Cell(backend="nicsim", direction=Direction.TCP_TX), status="n/a",
                   reason="needs nicsim's tap port"),
        CellResult(cell=Cell(backend="dpdk", direction=tx, size=64),
                   samples=[sample(400e3), Sample(ok=False, error="boom: QEMU died"), sample(400e3)]),
        CellResult(cell=Cell(backend="qemu-tap", direction=tx, size=64), status="failed",
                   reason="guest workload failed", samples=[Sample(ok=False, error="x")]),
    ]  # fmt: skip


def test_ratio_is_reference_median_over_the_peer_median() -> None:
    rat = ratios(results(), "nicsim")
    assert rat[("dpdk", "tx", 64)] == 0.5  # 200k / 400k
    assert rat[("qemu-tap", "tx", 64)] is None  # failed cell: no median
    assert ("nicsim", "tx", 64) not in rat


def test_table_has_one_row_per_cell_with_min_median_max_cpu_pool_and_ratio() -> None:
    text = render_table(results())
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["backend", "dir", "size", "pps", "min", "pps"]
    assert "nicsim÷this" in lines[0]
    nicsim_row = next(line for line in lines if line.startswith("nicsim") and " tx " in line)
    assert nicsim_row.split()[3:6] == ["100k", "200k", "300k"]
    assert nicsim_row.split()[-4:] == ["90%", "50%", "90", "(ref)"]  # pool HW is the largest run
    dpdk_row = next(line for line in lines if line.startswith("dpdk"))
    assert dpdk_row.split()[4] == "400k" and dpdk_row.split()[-1] == "0.50"


def test_cells_not_measured_show_their_status_and_reason_under_the_table() -> None:
    text = render_table(results())
    assert any(line.startswith("nicsim") and "n/a" in line for line in text.splitlines())
    assert "nicsim tcp-tx -: n/a: needs nicsim's tap port" in text
    assert "qemu-tap tx 64 B: failed: guest workload failed" in text
    assert "dpdk tx 64 B run 2: boom: QEMU died" in text


def test_json_holds_every_sample_versions_machine_and_summaries() -> None:
    plan = build_plan(["nicsim", "dpdk"], quick=True)
    doc = to_json(results(), plan=plan, versions={"qemu": "7.2"}, machine={"cores": 2},
                  config={"quick": True})  # fmt: skip
    doc = json.loads(json.dumps(doc))  # it must survive a round trip as it is
    assert doc["versions"] == {"qemu": "7.2"} and doc["machine"] == {"cores": 2}
    assert doc["config"]["reference"] == "nicsim" and doc["config"]["repetitions"] == 1
    first = doc["cells"][0]
    assert [s["pps"] for s in first["samples"]] == [100e3, 300e3, 200e3]
    assert first["summary"]["pps"] == {"min": 100e3, "median": 200e3, "max": 300e3, "n": 3}
    assert first["summary"]["pool_high_water"]["max"] == 90
    dpdk = doc["cells"][2]
    assert len(dpdk["samples"]) == 3 and dpdk["samples"][1]["error"] == "boom: QEMU died"
    assert dpdk["summary"]["pps"]["n"] == 2 and dpdk["ratio_reference_over_this"] == 0.5
    assert doc["cells"][1]["status"] == "n/a" and doc["cells"][1]["summary"]["pps"] is None


def test_reference_is_the_first_backend_when_nicsim_is_absent() -> None:
    peers = [r for r in results() if r.cell.backend != "nicsim"]
    assert "dpdk÷this" in render_table(peers).splitlines()[0]


def test_plot_writes_a_png_or_says_which_package_to_install(tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    problem = plot(results(), out)
    if importlib.util.find_spec("matplotlib") is None:
        assert problem == MATPLOTLIB_HINT and "pip install matplotlib" in problem
        assert not out.exists()
    else:
        assert problem is None
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cores_column_sits_beside_the_rate_and_a_busy_sender_is_flagged() -> None:
    def run(sender: float) -> Sample:
        s = sample(150e3, cpu_q=100.0, cpu_b=0.0)
        s.cpu_sender_pct, s.cpu_total_pct = sender, 100.0 + sender
        return s

    rx = Direction.RX
    cells = [
        CellResult(cell=Cell(backend="qemu-tap", direction=rx, size=64), samples=[run(60.0), run(70.0)]),
        CellResult(cell=Cell(backend="dpdk", direction=rx, size=64), samples=[run(50.0), run(95.0)]),
    ]
    lines = render_table(cells).splitlines()
    header = lines[0].split()
    assert header[header.index("Gbit/s") + 1 : header.index("Gbit/s") + 4] == ["cores", "CPU", "sender"]
    tap_row = next(line for line in lines if line.startswith("qemu-tap")).split()
    gbps = 6  # backend dir size min med max Gbit/s
    assert tap_row[gbps + 1 : gbps + 3] == ["1.65", "65%"]  # medians: 165 % of a core, sender 65 %
    dpdk_row = next(line for line in lines if line.startswith("dpdk")).split()
    assert dpdk_row[gbps + 2] == "72%!"  # one run's sender at 95 %: flagged
    plan = build_plan(["qemu-tap", "dpdk"], quick=True)
    doc = to_json(cells, plan=plan, versions={}, machine={}, config={})
    assert [c["sender_bound"] for c in doc["cells"]] == [False, True]
    assert doc["cells"][0]["summary"]["cpu_total_pct"]["median"] == 165.0
    assert doc["cells"][1]["samples"][1]["cpu_sender_pct"] == 95.0
