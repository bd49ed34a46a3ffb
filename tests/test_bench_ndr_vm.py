"""nicsim bench --ndr's plumbing that needs no guest: which cells are searched, the table."""

from __future__ import annotations

from nicsim.bench.matrix import Cell, Direction
from nicsim.bench.ndr import Phase, run_synthetic, search
from nicsim.bench.ndr_vm import NdrCell, ndr_candidates, render_ndr
from nicsim.bench.runner import CellResult, Sample


def rx(backend: str, pps: float | None, status: str = "ok") -> CellResult:
    cell = Cell(backend=backend, direction=Direction.RX, size=64)
    return CellResult(cell=cell, status=status, samples=[Sample(ok=pps is not None, pps=pps)])


def test_only_paced_rx_cells_with_an_mrr_are_searched_and_the_others_say_why() -> None:
    tx = CellResult(cell=Cell(backend="nicsim", direction=Direction.TX, size=64), samples=[Sample(ok=True)])
    found = ndr_candidates([tx, rx("nicsim", 1e5), rx("qemu-tap", 5e4), rx("dpdk", 5e4),
                            rx("nicsim", None, status="failed")])  # fmt: skip
    assert [(c.backend, mrr) for c, mrr, _ in found] == [("nicsim", 1e5), ("qemu-tap", 5e4), ("dpdk", None),
                                                         ("nicsim", None)]  # fmt: skip
    whys = [why for _, _, why in found]
    assert whys[0] is None and whys[1] is None and "rate control" in (whys[2] or "")
    assert "no MRR" in (whys[3] or "")


def test_table_shows_mrr_ndr_pdr_and_the_trial_durations() -> None:
    phases = (Phase(duration=0.5, precision=0.25), Phase(duration=1.0, precision=0.1))
    res = run_synthetic(search(max_rate=1.25e5, min_rate=1e3, phases=phases),
                        lambda r, d: 0.0 if r <= 2e4 else 0.01)  # fmt: skip
    cell = Cell(backend="nicsim", direction=Direction.RX, size=64)
    table = render_ndr([NdrCell(cell=cell, mrr_pps=1e5, result=res, phases=phases),
                        NdrCell(cell=Cell(backend="dpdk", direction=Direction.RX, size=64), mrr_pps=None,
                                error="testpmd's txonly has no simple rate control")])  # fmt: skip
    row = next(line for line in table.splitlines() if line.startswith("nicsim rx 64 B"))
    assert "100.0k" in row and f"{res.ndr.rate / 1e3:.1f}k" in row
    assert "0.5 s to 25%, then 1 s to 10%" in table and "no simple rate control" in table


def test_ndr_is_refused_with_backend_only() -> None:
    import argparse

    from nicsim.bench.command import option_problem

    args = argparse.Namespace(ndr=True, backend_only=True, max_regress=None, baseline=None, json=None,
                              json_stream=None)  # fmt: skip
    assert "--backend-only" in (option_problem(args) or "")
    args.backend_only = False
    assert option_problem(args) is None


def test_an_ndr_above_the_mrr_says_the_mrr_was_sender_bound() -> None:
    phases = (Phase(duration=1.0, precision=0.1),)
    res = run_synthetic(search(max_rate=1.25e5, min_rate=1e3, phases=phases), lambda r, d: 0.0)
    cell = Cell(backend="qemu-tap", direction=Direction.RX, size=64)
    assert "the MRR row's sender" in render_ndr([NdrCell(cell=cell, mrr_pps=1e5, result=res, phases=phases)])
