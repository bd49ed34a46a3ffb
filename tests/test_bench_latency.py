"""Latency cells of ``nicsim bench``: the plan, the guest's ping and sockperf parameters, the host's
percentiles and transaction rate, the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from nicsim.bench import testpmd
from nicsim.bench.backend import RunContext
from nicsim.bench.latency import RR_PORT, percentile, ping_params, rr_measures, rr_params, rtt_measures
from nicsim.bench.matrix import Cell, Direction, build_plan
from nicsim.bench.report import render_table
from nicsim.bench.runner import CellResult, Sample
from nicsim.bench.vm import measure, workload_for


def test_latency_adds_the_ping_and_udp_rr_rows_sizeless_per_backend() -> None:
    plan = build_plan(["nicsim", "dpdk"], quick=True, latency=True)
    pings = [(c.backend, c.direction, c.size) for c in plan.cells if c.direction.is_latency]
    assert pings == [("nicsim", Direction.PING, 0), ("nicsim", Direction.PING_FLOOD, 0),
                     ("nicsim", Direction.UDP_RR, 0), ("dpdk", Direction.PING, 0),
                     ("dpdk", Direction.PING_FLOOD, 0), ("dpdk", Direction.UDP_RR, 0)]  # fmt: skip
    only = build_plan(["nicsim"], quick=True, directions=[Direction.UDP_RR])
    assert [(c.direction, c.size) for c in only.cells] == [(Direction.UDP_RR, 0)]
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
    assert row.split()[:5] == ["dpdk", "ping", "-", "0.250", "0.250-0.250"]  # no trans/s for ping
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


# A sockperf result as the host has it once qemu.testvm.sockperf has read the guest's report.
SOCKPERF = {"transactions": 1550, "sent": 1550, "seconds": 1.55, "tps": 1000.0, "total_sent": 2000,
            "total_received": 1999, "rtt_p50_us": 950.5, "rtt_p99_us": 1800.0, "rtt_max_us": 4200.0,
            "rtt_avg_us": 1000.0, "round_trip": True, "dropped": 0}  # fmt: skip


def test_udp_rr_workload_is_sockperf_ping_pong_to_the_host_address(tmp_path: Path) -> None:
    ctx = RunContext(workdir=tmp_path, duration=2.0)
    wl = workload_for(Cell(backend="nicsim", direction=Direction.UDP_RR), ctx)
    assert wl.name == "sockperf-ping-pong"
    assert dict(wl.params) == {"server": ctx.host_ip, "port": str(RR_PORT), "size": "64", "time": "2"}
    # sockperf takes whole seconds, and at least one.
    assert rr_params(0.3)["time"] == 1 and rr_params(2.6)["time"] == 3


def test_rr_measures_are_the_rate_and_sockperfs_percentiles_in_ms() -> None:
    got = rr_measures(SOCKPERF)
    assert got["tps"] == 1000.0 and got["seconds"] == 1.55
    assert (got["rtt_p50_ms"], got["rtt_p99_ms"], got["rtt_max_ms"]) == (0.9505, 1.8, 4.2)
    # Every reply of the run crossed the backend: that is what its count is checked against.
    assert got["packets"] == 1999 and got["loss_pct"] == 0.0
    lossy = rr_measures({**SOCKPERF, "sent": 100, "transactions": 99})
    assert lossy["loss_pct"] == pytest.approx(1.0)
    assert rr_measures({})["tps"] is None and rr_measures({})["rtt_p50_ms"] is None


def test_udp_rr_row_shows_transactions_per_second_and_its_json_has_them() -> None:
    from nicsim.bench.report import cell_json, headline

    cell = Cell(backend="qemu-tap", direction=Direction.UDP_RR)
    samples = []
    for tps in (900.0, 1000.0, 1100.0):
        sample = Sample(ok=True)
        for key, value in measure(cell, {**SOCKPERF, "tps": tps}).items():
            setattr(sample, key, value)
        samples.append(sample)
    result = CellResult(cell=cell, samples=samples)
    table = render_table([result, CellResult(cell=Cell(backend="dpdk", direction=Direction.UDP_RR),
                                             status="n/a", reason=testpmd.UDP_RR_NA)])  # fmt: skip
    header = next(line for line in table.splitlines() if line.startswith("backend"))
    assert header.split()[:4] == ["backend", "latency", "trans/s", "p50"]
    row = next(line for line in table.splitlines() if line.startswith("qemu-tap"))
    assert row.split()[:5] == ["qemu-tap", "udp-rr", "1k", "0.951", "0.951-0.951"]
    assert "udp-rr: the guest's sockperf ping-pong" in table
    assert "dpdk udp-rr -: n/a: testpmd has no UDP responder" in table
    assert headline(result) == 1000.0  # what --baseline compares a udp-rr cell on
    doc = cell_json(result, None)
    assert doc["summary"]["tps"] == {"min": 900.0, "median": 1000.0, "max": 1100.0, "n": 3}
    assert [s["tps"] for s in doc["samples"]] == [900.0, 1000.0, 1100.0]


def test_udp_rr_is_na_for_testpmd_and_runs_on_the_tap_peers() -> None:
    from nicsim.bench.serve import NicsimBackend
    from nicsim.bench.tap import QemuTapBackend

    cell = Cell(backend="dpdk", direction=Direction.UDP_RR)
    why = testpmd.DpdkBackend().unsupported(cell)
    assert why is not None and "5tswap" in why and "client" in why
    assert testpmd.DpdkBackend().unsupported(Cell(backend="dpdk", direction=Direction.PING)) is None
    # sockperf is on this host (./run setup installs it): the tap peers can answer.
    assert QemuTapBackend().unsupported(cell) is None
    assert NicsimBackend().unsupported(cell) is None


def test_bench_packed_puts_the_nicsim_guest_on_packed_rings() -> None:
    import argparse

    from nicsim.cli.bench import add_parser
    from qemu.testvm import VhostUserNic

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["bench", "--packed"]).packed is True
    assert parser.parse_args(["bench"]).packed is False
    # What nicsim.bench.serve builds for a packed run, and for a split one (QEMU's default: no property).
    assert "packed=on" in VhostUserNic(socket=Path("s"), packed=True).device_args(queues=1, tcg=True)
    assert "packed" not in VhostUserNic(socket=Path("s"), packed=None).device_args(queues=1, tcg=True)


# -- dpdk-tap: testpmd forwarding between the guest and a TAP, as nicsim's and QEMU's rows are -------


TWO_PORTS = """
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 3004           RX-dropped: 0             RX-total: 3004
  TX-packets: 3001           TX-dropped: 2             TX-total: 3003
  ----------------------------------------------------------------------------

  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 3001           RX-dropped: 0             RX-total: 3001
  TX-packets: 3004           TX-dropped: 0             TX-total: 3004
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 6005           RX-dropped: 0             RX-total: 6005
  TX-packets: 6005           TX-dropped: 0             TX-total: 6005
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
"""


def test_dpdk_tap_counts_the_guests_port_not_the_sum_of_both() -> None:
    from nicsim.bench.dpdk_tap import port_counters

    # Two ports forward each other's frames: the accumulated block counts every frame twice.
    assert port_counters(TWO_PORTS, 0) == {"RX-packets": 3004, "RX-dropped": 0, "TX-packets": 3001,
                                           "TX-dropped": 2}  # fmt: skip
    assert port_counters(TWO_PORTS, 1)["RX-packets"] == 3001
    assert port_counters(TWO_PORTS + TWO_PORTS.replace("3004 ", "4004 "), 0)["RX-packets"] == 4004  # the last
    carried = testpmd.testpmd_carried(port_counters(TWO_PORTS, 0))
    assert (carried.tx_packets, carried.rx_packets) == (3004, 3001)  # guest TX = port 0's RX


def test_dpdk_tap_forwards_between_the_guest_and_a_tap_of_its_own_for_latency_rows_only() -> None:
    from nicsim.bench.dpdk_tap import DpdkTapBackend

    argv = testpmd.build_testpmd_argv(socket=Path("s.sock"), mode="io", frame_len=60, prefix="p", cpu=1,
                                      peer_mac="52:54:00:12:34:56", tap="tap0")  # fmt: skip
    vdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "--vdev"]
    assert vdevs == ["net_vhost0,iface=s.sock", "net_tap0,iface=tap0"]  # the guest's port is port 0
    assert "--forward-mode=io" in argv
    backend = DpdkTapBackend()
    for direction in (Direction.PING, Direction.PING_FLOOD, Direction.UDP_RR):
        assert backend.unsupported(Cell(backend="dpdk-tap", direction=direction)) is None
    why = backend.unsupported(Cell(backend="dpdk-tap", direction=Direction.RX, size=64))
    assert why is not None and "latency rows only" in why


@pytest.mark.parametrize(("extra", "with_tap"), [(["--latency"], True), (["--directions", "ping"], True),
                                                  ([], False)])  # fmt: skip
def test_peers_add_dpdk_tap_only_when_the_plan_has_latency_rows(extra: list[str], with_tap: bool) -> None:
    import argparse

    from nicsim.bench.command import VmMode
    from nicsim.cli.bench import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    mode = VmMode(parser.parse_args(["bench", "--peers", *extra]))
    plan = mode.plan()
    assert mode.names[:3] == ["nicsim", "qemu-tap", "dpdk"]
    assert ("dpdk-tap" in mode.names) == with_tap
    assert ("dpdk-tap" in {c.backend for c in plan.cells}) == with_tap
