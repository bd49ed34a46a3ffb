"""``nicsim bench --guests 2``'s pure parts: the plan, the guests' workloads, B's counter lines, the
count check, the goals and the table, and the options it refuses (through the real command line)."""

from __future__ import annotations

import pytest

from nicsim.bench.matrix import Cell, Direction
from nicsim.bench.pair import (
    GOALS,
    PairBoot,
    check_b_count,
    goal_rows,
    pair_plan,
    render_pair_table,
    row_name,
)
from nicsim.bench.pair_run import B_IP, B_MAC, a_dropped, a_workloads, b_workloads, cpu_fields, last_watch
from nicsim.bench.procstat import CpuWindow
from nicsim.bench.runner import CellResult, Sample, conclude
from nicsim.cli import main


def test_the_plan_is_every_row_for_each_setup_in_order() -> None:
    plan = pair_plan(None, quick=False, repetitions=None, duration=None)
    rows = (("tcp-tx", 0), ("tx", 64), ("ping", 0))
    setups = ("nicsim", "linux-bridge")
    assert [c.key for c in plan.cells] == [(s, d, size) for s in setups for d, size in rows]
    assert [row_name(c) for c in plan.cells[:3]] == ["tcp", "pps64", "ping"]
    assert PairBoot(backend="nicsim", direction=Direction.TCP_TX).label() == "nicsim: tcp, pps64, ping"
    assert (plan.repetitions, plan.duration) == (3, 5.0)
    quick = pair_plan(["linux-bridge"], quick=True, repetitions=None, duration=None)
    assert (quick.repetitions, quick.duration, {c.backend for c in quick.cells}) == (1, 2.0, {"linux-bridge"})
    assert pair_plan(None, quick=False, repetitions=2, duration=1.5).duration == 1.5
    with pytest.raises(ValueError, match="qemu-tap"):
        pair_plan(["qemu-tap"], quick=False, repetitions=None, duration=None)
    with pytest.raises(ValueError, match="at least 1"):
        pair_plan(None, quick=False, repetitions=0, duration=None)


def test_a_sends_to_b_and_b_serves_then_counts() -> None:
    contact, tcp, gap1, pps, gap2, ping = a_workloads(3.0)
    assert (contact.name, tcp.name, gap1.name, pps.name, gap2.name, ping.name) == (
        "ping", "iperf3-client", "sleep", "pktgen-tx", "sleep", "ping")  # fmt: skip
    assert tcp.params["server"] == B_IP and tcp.params["time"] == "3"
    assert (pps.params["size"], pps.params["dst_mac"], pps.params["dst"]) == ("60", B_MAC, B_IP)
    assert (ping.params["count"], ping.params["interval"], ping.params["rtts"]) == ("300", "0.01", "1")
    assert [w.name for w in b_workloads()] == ["iperf3-server", "rx-watch"]


def test_b_s_last_counter_line_is_read_whole() -> None:
    text = "nicsim: rx-watch 0 10 0\nnicsim: rx-watch 1 250 3\r\nnicsim: rx-watch 2 9"
    assert last_watch(text) == (250, 3)  # the line still being printed is not read
    with pytest.raises(Exception, match="no rx-watch line"):
        last_watch("NICSIM-READY\n")


def test_b_s_count_and_the_wire_s_agree_within_a_small_slack() -> None:
    assert check_b_count(1000, 1000, "x")["ok"] is True
    assert check_b_count(100_000, 100_090, "x")["ok"] is True  # 0.1 % of the count
    far = check_b_count(1000, 1100, "nicsim's counters")
    assert far["ok"] is False and "nicsim's counters says 1100" in far["reason"]
    assert check_b_count(None, 5, "x")["ok"] is None


def test_frames_pktgen_counted_but_the_wire_never_took_were_dropped_in_a() -> None:
    pps = Sample(ok=True, guest={"sent_packets": 2_000_000})
    assert a_dropped(pps, 2_100_000) is None  # the wire took them all (and TCP's frames besides)
    assert a_dropped(pps, 213_114) == 2_000_000 - 213_114
    assert a_dropped(pps, None) is None


def result(backend: str, direction: Direction, *values: dict[str, float]) -> CellResult:
    cell = Cell(backend=backend, direction=direction, size=64 if direction is Direction.TX else 0)
    r = CellResult(cell=cell, samples=[Sample(ok=True, **v) for v in values])  # type: ignore[arg-type]
    conclude(r)
    return r


def test_goals_and_the_table_compare_nicsim_with_the_bridge() -> None:
    results = [
        result("nicsim", Direction.TCP_TX, {"gbps": 1.0}, {"gbps": 1.2}, {"gbps": 1.1}),
        result("nicsim", Direction.TX, {"pps": 300e3, "cpu_total_pct": 150.0}),
        result("nicsim", Direction.PING, {"rtt_p50_ms": 0.5, "rtt_p99_ms": 1.0, "rtt_max_ms": 2.0}),
        result("linux-bridge", Direction.TCP_TX, {"gbps": 1.0}),
        result("linux-bridge", Direction.TX, {"pps": 250e3}),
        CellResult(cell=Cell(backend="linux-bridge", direction=Direction.PING), status="failed",
                   reason="no reply", samples=[Sample(ok=False, error="ping: no reply from B")]),
    ]  # fmt: skip
    goals = {g["row"]: g for g in goal_rows(results)}
    assert [g.row for g in GOALS] == ["tcp", "pps64", "ping"]
    assert goals["tcp"]["nicsim_over_bridge"] == pytest.approx(1.1) and goals["tcp"]["met"] is True
    assert goals["pps64"]["nicsim_over_bridge"] == pytest.approx(1.2) and goals["pps64"]["met"] is False
    assert goals["ping"]["met"] is None  # the bridge's ping failed: no verdict
    table = render_pair_table(results, placement="placement: here")
    lines = table.splitlines()
    tcp = next(line for line in lines if line.startswith("tcp Mbit/s"))
    assert "1100 (1000-1200)" in tcp and "1.10" in tcp and "yes" in tcp
    pps = next(line for line in lines if line.startswith("pps64 kpps received"))
    assert "300" in pps and "1.20" in pps and "NO" in pps and "1.50" in pps  # 150 % = 1.5 cores
    assert "linux-bridge ping: failed: no reply" in table and lines[-1] == "placement: here"


def test_cpu_of_a_row_adds_both_qemus_and_the_backend() -> None:
    window = CpuWindow({"qemu_a": None, "qemu_b": None, "backend": None})
    assert cpu_fields(window) == {"cpu_qemu_pct": None, "cpu_backend_pct": None, "cpu_total_pct": None,
                                  "cpu_threads": None}  # fmt: skip


def test_cpu_of_a_row_splits_each_qemu_into_its_vcpu_and_the_rest() -> None:
    window = CpuWindow({"qemu_a": 1, "qemu_b": 2, "backend": 3}, vcpus={"qemu_a": 1, "qemu_b": 2})
    window._t0, window._t1 = 10.0, 12.0  # a two-second window, as sampled at its two ends
    window._c0 = {"qemu_a": 1.0, "qemu_b": 1.0, "backend": 1.0, "qemu_a.vcpu": 0.5, "qemu_b.vcpu": 0.5}
    window._c1 = {"qemu_a": 2.8, "qemu_b": 2.2, "backend": 1.6, "qemu_a.vcpu": 2.1, "qemu_b.vcpu": None}
    fields = cpu_fields(window)
    assert fields["cpu_qemu_pct"] == pytest.approx(150.0) and fields["cpu_total_pct"] == pytest.approx(180.0)
    # B's vCPU could not be read at the end: B is left out rather than counted as all main loop
    assert fields["cpu_threads"] == pytest.approx({"a_vcpu": 80.0, "a_rest": 10.0, "nicsim": 30.0})


def test_the_table_says_where_the_cores_went_and_what_was_left() -> None:
    bridge = {"a_vcpu": 90.0, "a_rest": 5.0, "b_vcpu": 50.0, "b_rest": 5.0}
    split = {**bridge, "nicsim": 40.0}
    results = [
        result("nicsim", Direction.TX, {"pps": 50e3, "cpu_threads": split},
               {"pps": 60e3, "cpu_threads": {**split, "nicsim": 20.0}}),
        result("linux-bridge", Direction.TX, {"pps": 60e3, "cpu_threads": {**bridge, "a_rest": 35.0}}),
        result("linux-bridge", Direction.PING, {"rtt_p50_ms": 0.5}),  # measured with no split: no line
    ]  # fmt: skip
    lines = render_pair_table(results, placement="placement: here", ncores=2).splitlines()
    head = lines.index("where the cores went (median, in cores):")
    assert lines[head + 1].split() == ["row", "setup", "A", "vCPU", "A", "QEMU", "rest", "B", "vCPU", "B",
                                       "QEMU", "rest", "nicsim", "total", "left"]  # fmt: skip
    ours, theirs = lines[head + 3].split(), lines[head + 4].split()
    assert ours == ["pps64", "nicsim", "0.90", "0.05", "0.50", "0.05", "0.30", "1.80", "0.20"]
    assert theirs == ["pps64", "linux-bridge", "0.90", "0.35", "0.50", "0.05", "-", "1.80", "0.20"]
    assert lines[head + 5] == ""


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--sizes", "64"], "--sizes"),
        (["--peers"], "--peers"),
        (["--latency"], "--latency"),
        (["--backend-only"], "--backend-only"),
        (["--qemu-cpus", "0,1"], "--qemu-cpus"),
        (["--backends", "dpdk"], "not dpdk"),
    ],
)
def test_options_that_do_not_fit_two_guests_are_refused_in_one_line(
    extra: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--guests", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err


def test_help_shows_the_two_guest_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--guests {1,2}" in out and "nicsim bench --guests 2 --json pair.json" in out
    with pytest.raises(SystemExit):
        main(["bench", "--guests", "3"])
