"""``nicsim bench --backend-only``: command lines, parsing of the receiving side's counters, the plan,
and one real short run (nicsim's sink driven by DPDK's virtio-user frontend, no VM)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nicsim.bench import backend_only as bo  # its testpmd_* names must not look like tests here
from nicsim.bench.backend_only import (
    FRONTEND_MEMORY_MB,
    Interval,
    NicsimReceiver,
    build_frontend_argv,
    build_serve_argv,
    build_vhost_argv,
    frontend_mode,
    nicsim_intervals,
    nicsim_received,
    vhost_mode,
    window,
)
from nicsim.bench.command import backend_only_plan
from nicsim.bench.matrix import Cell, Direction
from nicsim.bench.serve import TESTPMD_FRAME
from nicsim.bench.testpmd import RUNTIME_DIR
from nicsim.cli import main
from nicsim.cli.serve import write_json_atomic

SOCK = Path("/run/x/bo.sock")


def block(port: int, rx_packets: int, rx_pps: int) -> str:
    """One ``--stats-period`` block as dpdk-testpmd 22.11 prints it (copied from a real log)."""
    return (
        "\x1b[2J\x1b[1;1H\n"
        f"  ######################## NIC statistics for port {port}  ########################\n"
        f"  RX-packets: {rx_packets}   RX-missed: 0          RX-bytes:  730091520\n"
        "  RX-errors: 0\n  RX-nombuf:  0         \n"
        "  TX-packets: 0          TX-errors: 0          TX-bytes:  0\n\n"
        "  Throughput (since last show)\n"
        f"  Rx-pps:      {rx_pps}          Rx-bps:   2703025336\n"
        "  Tx-pps:            0          Tx-bps:            0\n"
        "  ############################################################################\n"
    )


# -- command lines ----------------------------------------------------------------------------------


def test_modes_mirror_each_other_and_refuse_tcp() -> None:
    assert (frontend_mode(Direction.TX), vhost_mode(Direction.TX)) == ("txonly", "rxonly")
    assert (frontend_mode(Direction.RX), vhost_mode(Direction.RX)) == ("rxonly", "txonly")
    with pytest.raises(ValueError, match="frames"):
        frontend_mode(Direction.TCP_TX)


def test_frontend_is_virtio_user_without_hugepages_pinned_to_its_core() -> None:
    argv = build_frontend_argv(socket=SOCK, mode="txonly", frame_len=60, prefix="p-fe", cpu=0)
    assert argv[:3] == ["taskset", "-c", "0"]
    assert argv[argv.index("--lcores") + 1] == "0@0,1@0"
    assert argv[argv.index("-m") + 1] == str(FRONTEND_MEMORY_MB)
    for arg in ("--no-huge", "--no-pci", "--file-prefix=p-fe", "--forward-mode=txonly", "--txpkts=60",
                "--total-num-mbufs=16384"):  # fmt: skip
        assert arg in argv
    assert argv[argv.index("--vdev") + 1] == f"net_virtio_user0,path={SOCK},queues=1"
    assert argv[argv.index("--stats-period") + 1] == "1"
    assert argv.index("--vdev") < argv.index("--") < argv.index("--forward-mode=txonly")  # EAL | app
    rx = build_frontend_argv(socket=SOCK, mode="rxonly", frame_len=60, prefix="p", cpu=None)
    assert rx[0] == "dpdk-testpmd" and "--forward-mode=rxonly" in rx
    assert not any(a.startswith("--txpkts") for a in rx)


def test_dpdk_backend_is_net_vhost_and_nicsim_serves_the_cell_port(tmp_path: Path) -> None:
    vh = build_vhost_argv(
        socket=SOCK, mode="txonly", frame_len=1496, prefix="p-be", cpu=1, mac="52:54:00:12:34:56"
    )
    assert vh[:3] == ["taskset", "-c", "1"] and vh[3] == "dpdk-testpmd"
    assert f"net_vhost0,iface={SOCK}" in vh and "--txpkts=1496" in vh and "--file-prefix=p-be" in vh
    stats = tmp_path / "s.json"
    sink = build_serve_argv(socket=SOCK, cell=Cell(backend="nicsim", direction=Direction.TX, size=64),
                            stats_file=stats, cpu=1)  # fmt: skip
    assert sink[:3] == ["taskset", "-c", "1"] and sink[3:6] == [sys.executable, "-m", "nicsim"]
    assert sink[sink.index("--port") + 1] == "sink,read=on"  # reads every byte, as vhost's copy does
    assert sink[sink.index("--stats-file") + 1] == str(stats)
    gen = build_serve_argv(socket=SOCK, cell=Cell(backend="nicsim", direction=Direction.RX, size=1500),
                           stats_file=stats, cpu=None, extra=("--rounds-per-call", "8"))  # fmt: skip
    assert gen[0] == sys.executable and gen[gen.index("--port") + 1] == f"generator,size=1496,{TESTPMD_FRAME}"
    assert gen[-2:] == ["--rounds-per-call", "8"]  # nicsim bench --nicsim-args, last


# -- counters -----------------------------------------------------------------------------------------


def test_testpmd_blocks_are_read_per_port_and_only_when_complete() -> None:
    text = "EAL: noise\nRX-packets: 999\n" + block(0, 0, 0) + block(1, 7, 7) + block(0, 1000, 1000)
    text += block(0, 3000, 2000)[:-90]  # a block still being written
    assert bo.testpmd_blocks(text) == [(0, 0), (1000, 1000)]
    assert bo.testpmd_blocks(text, port=1) == [(7, 7)]
    # The final "Forward statistics" summary also says RX-packets; it is not a periodic block.
    assert bo.testpmd_blocks("  RX-packets: 5              RX-dropped: 0\n") == []


def test_testpmd_intervals_use_its_own_rate_for_the_time() -> None:
    ivs = bo.testpmd_intervals([(0, 0), (500, 1000), (2500, 2000), (2500, 0)])
    assert ivs == [Interval(500, 0.5), Interval(2000, 1.0), Interval(0, 1.0)]
    assert ivs[1].pps == 2000.0 and Interval(0, 0.0).pps == 0.0


def test_nicsim_counts_what_it_took_off_the_transmit_rings() -> None:
    stats = {"queues": [{"index": 0, "packets": 9}, {"index": 1, "packets": 40}, {"index": 3, "packets": 2}]}
    assert nicsim_received(stats) == 42
    assert nicsim_received({"sockets": []}) == 0
    # A zero-length step (same time twice) is no interval: it cannot be turned into a rate.
    assert nicsim_intervals([(1.0, 0), (2.0, 100), (2.0, 150), (3.5, 400)]) == [
        Interval(100, 1.0),
        Interval(250, 1.5),
    ]


def test_window_skips_idle_intervals_and_the_first_partial_one() -> None:
    ivs = [Interval(0, 1.0), Interval(10, 1.0), Interval(100, 1.0), Interval(110, 1.0)]
    assert window(ivs, 2) == (1, [Interval(100, 1.0), Interval(110, 1.0)])
    assert window(ivs, 3) is None  # not enough yet
    assert window([Interval(0, 1.0)] * 5, 1) is None  # no traffic at all


def test_receivers_follow_their_files(tmp_path: Path) -> None:
    stats = tmp_path / "s.json"
    rx = NicsimReceiver(stats)
    assert rx.intervals() == []  # not written yet
    write_json_atomic(stats, {"uptime": 1.0, "queues": [{"index": 1, "packets": 10}]})
    assert rx.intervals() == [] and rx.intervals() == []  # one snapshot, read once
    write_json_atomic(stats, {"uptime": 3.0, "queues": [{"index": 1, "packets": 410}]})
    assert rx.intervals() == [Interval(400, 2.0)]
    log = tmp_path / "testpmd.log"
    tp = bo.TestpmdReceiver("testpmd vhost", log)
    assert tp.intervals() == []
    log.write_text(block(0, 0, 0) + block(0, 800, 800))
    assert tp.intervals() == [Interval(800, 1.0)]


# -- the plan and the command -------------------------------------------------------------------------


def ns(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {"backends": None, "directions": None, "sizes": None, "repetitions": None,
                               "duration": None, "quick": False}  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_plan_defaults_and_quick() -> None:
    plan = backend_only_plan(ns())
    assert (plan.repetitions, plan.duration) == (3, 3.0)
    assert [c.key for c in plan.cells] == [
        (b, d, s) for b in ("nicsim", "dpdk") for d in ("tx", "rx") for s in (64, 1500)
    ]
    quick = backend_only_plan(ns(quick=True))
    assert (quick.repetitions, quick.duration, len(quick.cells)) == (1, 2.0, 8)
    one = backend_only_plan(
        ns(backends=["nicsim"], directions=["rx"], sizes=[512], repetitions=2, duration=4.0)
    )
    assert [c.key for c in one.cells] == [("nicsim", "rx", 512)] and one.repetitions == 2
    with pytest.raises(ValueError, match="qemu-tap"):
        backend_only_plan(ns(backends=["qemu-tap"]))
    with pytest.raises(ValueError, match="TCP"):
        backend_only_plan(ns(directions=["tx", "tcp-rx"]))


def test_same_core_for_frontend_and_backend_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--backend-only", "--qemu-cpu", "0", "--backend-cpu", "0"]) == 2
    assert "different cores" in capsys.readouterr().err


# -- one real run -------------------------------------------------------------------------------------

RUN_TIMEOUT = 120.0  # a failure deadline on a loaded host, not a performance claim


def runtime_dirs_of(pid: int) -> list[str]:
    """DPDK runtime directories the bench process ``pid`` named (``--file-prefix=nicsim-bo-PID-...``)."""
    if not RUNTIME_DIR.exists():
        return []
    return [p.name for p in RUNTIME_DIR.iterdir() if p.name.startswith(f"nicsim-bo-{pid}-")]


def test_real_run_nicsim_sink_under_virtio_user_reports_positive_mpps(tmp_path: Path) -> None:
    out = tmp_path / "bo.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nicsim", "bench", "--backend-only", "--backends", "nicsim", "--directions",
         "tx", "--sizes", "64", "--repetitions", "1", "--duration", "2", "--json", str(out),
         "--nicsim-args", "--tx-batch 64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr + stdout
    assert runtime_dirs_of(proc.pid) == []  # the frontend's --file-prefix directory is gone
    assert "[1/1] nicsim tx 64 B (run 1/1)" in stderr
    header = stdout.splitlines()[0]
    assert header.startswith("backend") and "CPU frontend" in header
    assert "backend-only: no VM" in stdout  # the legend says what tx and rx mean here
    doc = json.loads(out.read_text())
    assert doc["config"]["mode"] == "backend-only" and "qemu" not in doc["versions"]
    (cell,) = doc["cells"]
    assert (cell["backend"], cell["direction"], cell["size"], cell["status"]) == ("nicsim", "tx", 64, "ok")
    (sample,) = cell["samples"]
    assert sample["ok"] and sample["pps"] > 0 and sample["packets"] > 0
    assert sample["backend"]["receiver"] == "nicsim" and len(sample["backend"]["intervals_pps"]) == 2
    # What the frontend sent covers what nicsim counted in the window.
    assert sample["backend"]["frontend"]["TX-packets"] >= sample["packets"]
    # ... and, over the whole run, agrees with nicsim's own count within a ring.
    counts = sample["counts"]
    assert counts["ok"] and counts["guest"] == sample["backend"]["frontend"]["TX-packets"]
    assert abs(counts["guest"] - counts["backend"]) <= counts["tolerance"] == 256
    assert "VIRTIO_F_VERSION_1" in sample["features"]["names"]  # from virtio-user's init log
    assert sample["cpu_backend_pct"] > 0 and sample["cpu_qemu_pct"] > 0
    # --nicsim-args reached nicsim serve: rounds of at most 64 chains, the sink done with each in it.
    assert doc["config"]["nicsim_args"] == ["--tx-batch", "64"]
    assert 0 < sample["pool_high_water"] <= 64
