"""The benchmark's plumbing without a guest: statuses of cells that cannot run, workloads, peers' argv
and output parsing, progress, and the command's refusals."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest

from nicsim.bench import BACKEND_CLASSES, PEERS, DpdkBackend, NicsimBackend, QemuTapBackend, RunContext
from nicsim.bench.matrix import Cell, Direction, build_plan
from nicsim.bench.progress import Progress, clock
from nicsim.bench.runner import Sample, run_directory
from nicsim.bench.serve import TESTPMD_FRAME, high_water, serve_port
from nicsim.bench.testpmd import build_testpmd_argv, parse_counters
from nicsim.bench.vm import VmRunner, measure, skip_runs, workload_for
from nicsim.cli import main
from nicsim.cli.serve import parse_port
from nicsim.ports import GeneratorPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_NET_F_MRG_RXBUF
from nicsim.virtio.policy import NotifyPolicy, PollAction, policy_from_options, poll_action
from qemu.testvm import DEFAULT_MAC

CTX = RunContext(workdir=Path("/nonexistent"), duration=2.0)


def test_workloads_measure_what_each_direction_names() -> None:
    tx = workload_for(Cell(backend="b", direction=Direction.TX, size=64), CTX)
    assert tx.name == "pktgen-tx" and tx.params["size"] == "60" and tx.params["duration"] == "2.0"
    assert workload_for(Cell(backend="b", direction=Direction.RX, size=64), CTX).name == "rx-count"
    up = workload_for(Cell(backend="b", direction=Direction.TCP_TX), CTX)
    down = workload_for(Cell(backend="b", direction=Direction.TCP_RX), CTX)
    assert (up.name, up.params["reverse"], down.params["reverse"]) == ("iperf3-client", "0", "1")


def test_gbits_are_frame_bytes_over_the_guest_seconds() -> None:
    cell = Cell(backend="b", direction=Direction.RX, size=1500)
    m = measure(cell, {"pps": 1000.0, "packets": 2000, "bytes": 2000 * 1496, "seconds": 2.0})
    assert m["pps"] == 1000.0 and m["gbps"] == 2000 * 1496 * 8 / 2.0 / 1e9
    tcp = measure(Cell(backend="b", direction=Direction.TCP_TX), {"received_bps": 1.5e9, "seconds": 2})
    assert tcp["gbps"] == 1.5


class Gone(QemuTapBackend):
    name = "gone"

    def unavailable(self) -> str | None:
        return "gone: not installed here"


async def test_unavailable_backends_are_skipped_and_nonsense_cells_are_na_without_booting(
    tmp_path: Path,
) -> None:
    plan = build_plan(["gone", "dpdk"], quick=True, directions=[Direction.TCP_TX], repetitions=2)
    started: list[Cell] = []
    runner = VmRunner(kernel=tmp_path / "no-kernel", initrd=tmp_path / "no-initrd",
                      ctx=RunContext(workdir=tmp_path, duration=1.0),
                      on_run=lambda cell, rep: started.append(cell))  # fmt: skip
    results = await runner.run_plan(plan, [Gone(), DpdkBackend()])
    assert [(r.cell.backend, r.status) for r in results] == [("gone", "skipped"), ("dpdk", "n/a")]
    assert results[0].reason == "gone: not installed here"
    assert results[1].reason is not None and "TCP" in results[1].reason
    assert started == [] and skip_runs(plan, [Gone(), DpdkBackend()]) == plan.runs


async def test_a_run_that_cannot_boot_is_failed_with_its_reason_and_the_plan_goes_on(
    tmp_path: Path,
) -> None:
    plan = build_plan(["gone", "qemu-tap"], quick=True, directions=[Direction.TX], sizes=[64])
    runner = VmRunner(kernel=tmp_path / "no-kernel", initrd=tmp_path / "no-initrd",
                      ctx=RunContext(workdir=tmp_path, duration=1.0), accel="tcg")  # fmt: skip
    results = await runner.run_plan(plan, [Gone(), QemuTapBackend()])
    assert [r.status for r in results] == ["skipped", "failed"]
    # TestVM checks the kernel file before it starts QEMU, and says which parameter names it.
    assert results[1].reason is not None and "kernel= " in results[1].reason
    assert "no-kernel: no such file" in results[1].reason


def test_nicsim_guest_tx_reads_every_byte_unless_the_row_is_labelled_count_only() -> None:
    tx = Cell(backend="nicsim", direction=Direction.TX, size=1500)
    assert serve_port(tx, read=True) == "sink,read=on"
    assert NicsimBackend.read_tx is True
    count_only = BACKEND_CLASSES["nicsim-count-only"]()
    assert isinstance(count_only, NicsimBackend) and count_only.read_tx is False
    assert count_only.unsupported(tx) is None
    assert count_only.unsupported(Cell(backend="nicsim-count-only", direction=Direction.RX, size=64))
    assert "nicsim-count-only" not in PEERS


def test_the_mergeable_row_is_guest_rx_with_mergeable_buffers_offered_and_the_same_frame() -> None:
    rx = Cell(backend="nicsim-mergeable", direction=Direction.RX, size=64)
    mergeable = BACKEND_CLASSES["nicsim-mergeable"]()
    assert isinstance(mergeable, NicsimBackend) and "nicsim-mergeable" not in PEERS
    assert mergeable.unsupported(rx) is None
    assert mergeable.unsupported(Cell(backend="nicsim-mergeable", direction=Direction.TX, size=64))
    # The port nicsim serve gets: the rx rows' frame, with mergeable buffers offered; nicsim's own
    # rows offer none for frames that fit a small buffer.
    port = parse_port(f"{serve_port(rx)},{mergeable.generator_options}")
    assert isinstance(port, GeneratorPort)
    assert VirtioNetDevice(port=port).device_features() & (1 << VIRTIO_NET_F_MRG_RXBUF)
    own = parse_port(serve_port(rx))
    assert not VirtioNetDevice(port=own).device_features() & (1 << VIRTIO_NET_F_MRG_RXBUF)
    assert TESTPMD_FRAME in serve_port(rx)


def test_the_busy_poll_row_is_nicsim_polling_its_core_past_the_pings_interval() -> None:
    busy = BACKEND_CLASSES["nicsim-busy-poll"]()
    assert isinstance(busy, NicsimBackend) and "nicsim-busy-poll" not in PEERS
    args = busy.extra_serve_args(RunContext(workdir=Path("w"), duration=1.0), 0)
    policy = policy_from_options({"poll_us": args[args.index("--poll-us") + 1],
                                  "poll_rounds": args[args.index("--poll-rounds") + 1]})  # fmt: skip
    # Still polling 10 ms (a ping's interval) after the last work, however many rounds that took.
    assert poll_action(policy, more=False, empty_rounds=10**6, idle_us=10_000) is PollAction.POLL
    assert poll_action(NotifyPolicy(), more=False, empty_rounds=0, idle_us=10_000) is PollAction.REARM
    assert NicsimBackend().extra_serve_args(RunContext(workdir=Path("w"), duration=1.0), 0) == []


def test_the_no_lane_row_is_nicsim_with_its_request_lane_off() -> None:
    row = BACKEND_CLASSES["nicsim-no-lane"]()
    assert isinstance(row, NicsimBackend) and "nicsim-no-lane" not in PEERS
    args = row.extra_serve_args(RunContext(workdir=Path("w"), duration=1.0), 0)
    policy = policy_from_options({"lane_idle_ms": args[args.index("--lane-idle-ms") + 1]})
    assert policy.lane_idle_ms == 0 and NotifyPolicy().lane_idle_ms > 0


def test_nicsim_backend_speaks_the_serve_contract() -> None:
    assert serve_port(Cell(backend="nicsim", direction=Direction.TX, size=64)) == "sink"
    rx = serve_port(Cell(backend="nicsim", direction=Direction.RX, size=512))
    assert rx == f"generator,size=508,{TESTPMD_FRAME}"
    tcp = Cell(backend="nicsim", direction=Direction.TCP_RX)
    assert serve_port(tcp, "ns1") == "tap,netns=ns1,ifname=tap0,offload=on"
    assert NicsimBackend().unsupported(tcp) is None  # TCP rows run through the tap port
    assert high_water({"pool": {"usage": 0, "high_water": 77}, "queues": []}) == 77
    assert high_water({"queues": []}) is None


def test_testpmd_argv_pins_both_lcores_and_sizes_only_txonly() -> None:
    rx = build_testpmd_argv(socket=Path("s.sock"), mode="rxonly", frame_len=60, prefix="p", cpu=1,
                      peer_mac="52:54:00:12:34:56")  # fmt: skip
    tx = build_testpmd_argv(socket=Path("s.sock"), mode="txonly", frame_len=60, prefix="p", cpu=1,
                      peer_mac="52:54:00:12:34:56")  # fmt: skip
    for argv in (rx, tx):
        assert argv[argv.index("--lcores") + 1] == "0@1,1@1"
        assert {"--no-huge", "--no-pci", "--file-prefix=p", "net_vhost0,iface=s.sock"} <= set(argv)
        assert argv.index("--") < argv.index("--stats-period")
    assert "--forward-mode=rxonly" in rx and not any(a.startswith("--txpkts") for a in rx)
    assert "--forward-mode=txonly" in tx and "--txpkts=60" in tx and "--eth-peer=0,52:54:00:12:34:56" in tx


def test_testpmd_counters_are_the_last_block_it_printed() -> None:
    out = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 10         RX-missed: 0          RX-bytes:  600
  TX-packets: 0          TX-errors: 0          TX-bytes:  0
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 323309         RX-dropped: 0             RX-total: 323309
  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 323310         RX-dropped: 0             RX-total: 323310
"""
    counters = parse_counters(out)
    assert counters["RX-packets"] == 323310 and counters["RX-bytes"] == 600


def test_progress_counts_runs_and_estimates_what_is_left() -> None:
    out = io.StringIO()
    p = Progress(4, estimate=100.0, repetitions=2, stream=out)
    cell = Cell(backend="dpdk", direction=Direction.RX, size=64)
    p.start_run(cell, 0)
    p.start_run(cell, 1)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/4] dpdk rx 64 B (run 1/2)")
    assert lines[1].startswith("[2/4] dpdk rx 64 B (run 2/2)") and "left" in lines[1]
    assert p.remaining(now=p._t0 + 10.0) == 30.0  # one run done in 10 s, three to go
    p.finish()
    assert out.getvalue().splitlines()[-1].startswith("2 runs in")
    assert (clock(59), clock(61), clock(3661)) == ("0:59", "1:01", "1:01:01")


def test_backend_only_refuses_tcp_and_peers(capsys: pytest.CaptureFixture[str]) -> None:
    # The backend-only mode itself is tested in test_bench_backend_only.py.
    assert main(["bench", "--backend-only", "--directions", "tcp-tx"]) == 2
    assert "TCP needs a guest" in capsys.readouterr().err
    assert main(["bench", "--backend-only", "--peers"]) == 2
    assert "drop --peers" in capsys.readouterr().err


def test_unknown_backend_is_refused_with_the_known_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--backends", "vpp"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend(s) vpp" in err and "qemu-tap" in err and "dpdk" in err


def test_missing_qemu_says_which_package_to_install(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--backends", "qemu-tap", "--qemu", "no-such-qemu-binary"]) == 2
    assert "apt-get install qemu-system-x86" in capsys.readouterr().err


def test_every_backend_is_registered_under_its_name() -> None:
    assert {name: cls.name for name, cls in BACKEND_CLASSES.items()} == {n: n for n in BACKEND_CLASSES}


def test_the_working_directory_is_the_log_dir_or_a_temporary_one_never_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where mkdtemp() would put a temporary one
    logs = tmp_path / "logs" / "run1"
    with run_directory(logs) as workdir:
        assert workdir == logs and workdir.is_dir()
        assert list(tmp.iterdir()) == []  # none made beside the log dir
        (workdir / "backend.log").write_text("kept")
    assert (logs / "backend.log").read_text() == "kept"
    with run_directory(None) as workdir:
        assert workdir.parent == tmp and workdir.is_dir()
    assert list(tmp.iterdir()) == []


def test_a_bench_with_a_log_dir_keeps_its_logs_there_and_leaves_no_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The whole command, not just the helper: it used to make a temporary directory, switch to
    # --log-dir and never remove the temporary one. The run itself fails at once (no kernel).
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    logs = tmp_path / "logs"
    status = main(["bench", "--backends", "qemu-tap", "--directions", "tx", "--sizes", "64",
                   "--repetitions", "1", "--duration", "1", "--accel", "tcg",
                   "--qemu-cpu", "0", "--backend-cpu", "0",
                   "--kernel", str(tmp_path / "no-kernel"), "--initrd", str(tmp_path / "no-initrd"),
                   "--log-dir", str(logs)])  # fmt: skip
    assert status == 1 and "no-kernel: no such file" in capsys.readouterr().out
    assert (logs / "qemu-pinned").exists()  # the runs worked there (QEMU's taskset wrapper)
    assert list(tmp.iterdir()) == []


def test_total_core_use_counts_qemu_backend_and_sender_once_each() -> None:
    from nicsim.bench.vm import total_cpu

    assert total_cpu(Sample(ok=True, cpu_qemu_pct=98.0, cpu_backend_pct=None, cpu_sender_pct=40.0)) == 138.0
    assert total_cpu(Sample(ok=True, cpu_qemu_pct=90.0, cpu_backend_pct=100.0)) == 190.0
    assert total_cpu(Sample(ok=True, cpu_backend_pct=100.0)) is None  # QEMU not measured: no total


def test_qemu_tap_rx_sender_writes_the_frame_nicsims_generator_sends() -> None:
    from nicsim.bench.blaster import frame_for
    from nicsim.cli.serve import parse_port
    from nicsim.ports import GeneratorPort
    from nicsim.ports import frames as fr

    for size in (64, 1500):
        cell = Cell(backend="nicsim", direction=Direction.RX, size=size)
        port = parse_port(serve_port(cell))
        assert isinstance(port, GeneratorPort)
        frame = frame_for(cell.frame_len, DEFAULT_MAC)
        assert frame == port.template.tobytes() and len(frame) == cell.frame_len
        assert frame[:6] == fr.mac_bytes(DEFAULT_MAC)
        assert frame[fr.ETH_HLEN + 16 : fr.ETH_HLEN + 20] == fr.ip_bytes("198.18.0.2")
        assert frame[fr.ETH_HLEN + fr.IPV4_HLEN + 6 : fr.ETH_HLEN + fr.IPV4_HLEN + 8] == b"\0\0"


def test_qemu_cpus_lets_qemu_run_free_on_a_list_of_cores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nicsim.bench.command import qemu_cores
    from nicsim.bench.vm import qemu_wrapper
    from nicsim.cli import build_parser

    args = build_parser().parse_args(["bench", "--qemu-cpus", "1,0"])
    assert args.qemu_cpus == "0,1" and qemu_cores(args) == "0,1"
    assert qemu_cores(build_parser().parse_args(["bench", "--qemu-cpu", "1"])) == 1
    wrapper = Path(qemu_wrapper(tmp_path, qemu_cores(args), "qemu-system-x86_64"))
    assert "exec taskset -c 0,1 qemu-system-x86_64" in wrapper.read_text()
    with pytest.raises(SystemExit) as usage:
        main(["bench", "--qemu-cpus", "0,x"])
    assert usage.value.code == 2
    assert "core numbers separated by commas" in capsys.readouterr().err
    assert main(["bench", "--qemu-cpus", "0,99"]) == 2
    assert "core(s)" in capsys.readouterr().err
    assert main(["bench", "--backend-only", "--qemu-cpus", "0,1"]) == 2
    assert "--qemu-cpus places QEMU" in capsys.readouterr().err


def test_qemu_tap_sender_backs_off_while_the_tap_is_full_and_counts_what_it_sent() -> None:
    import errno

    from nicsim.bench import blaster

    clock = [0.0]
    drops = [0]
    sleeps: list[float] = []
    calls = [0]

    def send() -> None:
        calls[0] += 1
        clock[0] += 0.001
        if calls[0] % 200 == 0:
            drops[0] += 5  # the TAP's queue overflowed: the kernel dropped frames
        if calls[0] % 300 == 0:
            raise OSError(errno.ENOBUFS, "No buffer space available")

    result = blaster.send_loop(send, lambda: drops[0], 1.0, sleep=sleeps.append, monotonic=lambda: clock[0])
    refused = calls[0] // 300
    assert result["sent"] == calls[0] - refused and result["refused"] == refused
    assert result["dropped_at_tap"] == drops[0]
    assert result["backoffs"] == len(sleeps) > 0 and set(sleeps) == {blaster.BACKOFF}
    # a burst backs off only when the queue was full: not after every burst
    assert len(sleeps) < calls[0] // blaster.BURST
