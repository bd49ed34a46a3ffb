"""Latency cells of ``nicsim bench``: the plan, the guest's ping parameters, the host's percentiles,
the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from nicsim.bench import testpmd
from nicsim.bench.backend import RunContext
from nicsim.bench.latency import percentile, ping_params, rtt_measures
from nicsim.bench.matrix import Cell, Direction, build_plan
from nicsim.bench.report import render_table
from nicsim.bench.runner import CellResult, Sample
from nicsim.bench.vm import measure, workload_for


def test_latency_adds_both_ping_rows_sizeless_per_backend() -> None:
    plan = build_plan(["nicsim", "dpdk"], quick=True, latency=True)
    pings = [(c.backend, c.direction, c.size) for c in plan.cells if c.direction.is_latency]
    assert pings == [("nicsim", Direction.PING, 0), ("nicsim", Direction.PING_FLOOD, 0),
                     ("dpdk", Direction.PING, 0), ("dpdk", Direction.PING_FLOOD, 0)]  # fmt: skip
    assert not any(c.direction.is_latency for c in build_plan(["nicsim"], quick=True).cells)


def test_nearest_rank_percentile_is_a_value_that_occurred() -> None:
    values = [float(v) for v in range(1, 201)]  # 1..200
    assert percentile(values, 50) == 100.0
    assert percentile(values, 99) == 198.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_rtt_measures_from_the_guests_raw_rtts() -> None:
    guest = {"transmitted": 4, "received": 3, "rtt_ms": [0.5, 0.2, 9.0]}
    got = rtt_measures(guest)
    assert (got["rtt_p50_ms"], got["rtt_p99_ms"], got["rtt_max_ms"]) == (0.5, 9.0, 9.0)
    assert got["packets"] == 3 and got["loss_pct"] == 25.0
    assert rtt_measures({"transmitted": 4, "received": 0, "rtt_ms": []})["rtt_p50_ms"] is None


def test_ping_workloads_every_10ms_and_back_to_back(tmp_path: Path) -> None:
    ctx = RunContext(workdir=tmp_path, duration=2.0)
    paced = workload_for(Cell(backend="nicsim", direction=Direction.PING), ctx)
    flood = workload_for(Cell(backend="nicsim", direction=Direction.PING_FLOOD), ctx)
    assert paced.name == flood.name == "ping"
    assert dict(paced.params) == {"target": ctx.host_ip, "count": "200", "interval": "0.01", "rtts": "1"}
    assert flood.params["adaptive"] == "1" and "adaptive" not in paced.params
    with pytest.raises(ValueError):
        ping_params(Direction.TX, 2.0)


def test_measure_and_table_for_a_latency_cell() -> None:
    cell = Cell(backend="dpdk", direction=Direction.PING)
    sample = Sample(ok=True)
    for key, value in measure(cell, {"transmitted": 2, "received": 2, "rtt_ms": [0.25, 0.75]}).items():
        setattr(sample, key, value)
    assert sample.rtt_p50_ms == 0.25 and sample.rtt_max_ms == 0.75
    table = render_table([CellResult(cell=cell, samples=[sample])])
    row = next(line for line in table.splitlines() if line.startswith("dpdk"))
    assert row.split()[:4] == ["dpdk", "ping", "0.250", "0.250-0.250"]
    assert "pps min" not in table and "size: Ethernet" not in table  # no throughput cell, no its table
    assert "latency: guest ping RTT" in table


def test_testpmd_answers_pings_itself() -> None:
    assert testpmd.testpmd_mode(Direction.PING) == testpmd.testpmd_mode(Direction.PING_FLOOD) == "icmpecho"
    assert (testpmd.testpmd_mode(Direction.TX), testpmd.testpmd_mode(Direction.RX)) == ("rxonly", "txonly")


def test_nicsim_args_reach_nicsim_serve_as_argv_words() -> None:
    import argparse

    from nicsim.bench.command import nicsim_args
    from nicsim.cli.bench import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--nicsim-args", "--kick-batch 0 --poll-us 200", "--latency"])
    assert nicsim_args(args) == ("--kick-batch", "0", "--poll-us", "200")
    assert args.latency is True
    assert nicsim_args(parser.parse_args(["bench"])) == ()
