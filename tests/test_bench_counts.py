"""Backend counts: the guest's (or frontend's) count against the backend's own, with synthetic results;
where each backend's own count comes from; the negotiated features; and a miscounted run failing its cell."""

from __future__ import annotations

from pathlib import Path

from nicsim.bench import testpmd  # its testpmd_* names must not look like tests here
from nicsim.bench.backend_only import build_frontend_argv
from nicsim.bench.counts import (
    RING_SIZE,
    Carried,
    check_counts,
    guest_features,
    virtio_user_features,
    virtio_user_ring,
)
from nicsim.bench.matrix import Cell, Direction, build_plan
from nicsim.bench.runner import Sample, run_cells
from nicsim.bench.serve import nicsim_carried
from nicsim.bench.tap import tap_carried
from nicsim.bench.vm import check_sample

TX = Cell(backend="nicsim", direction=Direction.TX, size=64)
RX = Cell(backend="nicsim", direction=Direction.RX, size=64)
TCP_TX = Cell(backend="nicsim", direction=Direction.TCP_TX)
CARRIED = Carried(source="test counters", tx_packets=1000, tx_bytes=60_000, rx_packets=5000,
                  rx_bytes=300_000)  # fmt: skip


def test_counts_spanning_the_same_run_may_differ_by_one_ring_either_way() -> None:
    for guest in (1000 - RING_SIZE, 1000, 1000 + RING_SIZE):
        assert check_counts(TX, counted=guest, carried=CARRIED, spans_run=True)["ok"]
    low = check_counts(TX, counted=1000 - RING_SIZE - 1, carried=CARRIED, spans_run=True)
    high = check_counts(TX, counted=1000 + RING_SIZE + 1, carried=CARRIED, spans_run=True)
    assert not low["ok"] and not high["ok"]
    assert low["rule"] == "within" and low["unit"] == "packets" and low["tolerance"] == RING_SIZE
    assert (low["guest"], low["backend"], low["backend_source"]) == (743, 1000, "test counters")
    assert "743 packets" in low["reason"] and "(test counters) 1000" in low["reason"]
    assert "257 apart, more than one ring (256)" in low["reason"]
    # DPDK's virtio-user receiving is allowed two rings of its own size (it discards one at start).
    two = check_counts(RX, counted=5000 - 1025, carried=CARRIED, spans_run=True, ring=512, rings=2)
    assert not two["ok"] and two["tolerance"] == 1024 and "more than 2 rings (1024)" in two["reason"]
    assert check_counts(RX, counted=5000 - 1024, carried=CARRIED, spans_run=True, ring=512, rings=2)["ok"]


def test_a_guest_window_may_be_anything_up_to_what_the_backend_gave() -> None:
    # Guest RX counts a window of a sender that ran longer: far fewer is fine, more is not.
    assert check_counts(RX, counted=10, carried=CARRIED, spans_run=False)["ok"]
    assert check_counts(RX, counted=5000 + RING_SIZE, carried=CARRIED, spans_run=False)["ok"]
    over = check_counts(RX, counted=5000 + RING_SIZE + 1, carried=CARRIED, spans_run=False)
    assert not over["ok"] and over["rule"] == "at_most" and over["backend"] == 5000
    assert "more than the backend (test counters) carried: 5000 + 256" in over["reason"]


def test_tcp_compares_payload_bytes_with_no_slack() -> None:
    # iperf3's payload cannot exceed the frame bytes the backend carried, even with spans_run.
    ok = check_counts(TCP_TX, counted=60_000, carried=CARRIED, spans_run=True)
    assert ok["ok"] and (ok["rule"], ok["unit"], ok["tolerance"]) == ("at_most", "bytes", 0)
    assert not check_counts(TCP_TX, counted=60_001, carried=CARRIED, spans_run=True)["ok"]


def test_a_missing_count_on_either_side_fails_and_says_which() -> None:
    no_backend = check_counts(TX, counted=5, carried=Carried(source="nicsim stats file"), spans_run=True)
    assert not no_backend["ok"]
    assert "own count of tx packets is missing (nicsim stats file)" in no_backend["reason"]
    assert "none reported" in check_counts(TX, counted=5, carried=None, spans_run=True)["reason"]
    who = check_counts(RX, counted=None, carried=CARRIED, spans_run=True, who="the frontend")
    assert not who["ok"] and who["reason"] == "the frontend reported no count of packets"


def test_each_backend_counts_from_the_guests_side() -> None:
    queues = [(0, 7, 70), (1, 40, 400), (2, 1, 10), (3, 2, 20)]
    stats = {"queues": [{"index": i, "packets": n, "bytes": b} for i, n, b in queues]}
    nicsim = nicsim_carried(stats)  # odd queues: the guest's transmit rings
    assert (nicsim.tx_packets, nicsim.tx_bytes, nicsim.rx_packets, nicsim.rx_bytes) == (42, 420, 8, 80)
    assert nicsim_carried({"sockets": []}).tx_packets is None  # no queues: no count, not zero
    pmd = testpmd.testpmd_carried({"RX-packets": 11, "TX-packets": 22, "RX-bytes": 3})
    assert (pmd.tx_packets, pmd.rx_packets, pmd.tx_bytes) == (11, 22, None)  # its bytes lag: unused
    tap = tap_carried({"rx": {"packets": 100, "dropped": 3, "bytes": 6000},
                       "tx": {"packets": 9, "bytes": 540}})  # fmt: skip
    assert (tap.tx_packets, tap.tx_bytes, tap.rx_packets, tap.rx_bytes) == (103, 6000, 9, 540)


def test_negotiated_features_from_the_guest_and_from_virtio_user() -> None:
    bits = ["0"] * 64
    for n in (5, 15, 32):
        bits[n] = "1"
    record = guest_features({"features": "".join(bits)})
    assert record is not None and record["hex"] == hex((1 << 5) | (1 << 15) | (1 << 32))
    assert record["names"] == ["VIRTIO_NET_F_MAC", "VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_F_VERSION_1"]
    assert guest_features({"features": "01x"}) is None and guest_features({}) is None
    log = (  # as dpdk-testpmd 22.11 prints them with --log-level=pmd.net.virtio.init:debug
        "virtio_ethdev_negotiate_features(): guest_features before negotiate = 8000005f10ef8028\n"
        "virtio_ethdev_negotiate_features(): features after negotiate = 110018000\n"
        "virtio_init_queue(): vq_size: 256\nvirtio_init_queue(): vq_size: 512\n"
    )
    assert virtio_user_features(log) == 0x110018000 and virtio_user_ring(log) == 512
    assert virtio_user_features("EAL: nothing") is None and virtio_user_ring("") is None
    argv = build_frontend_argv(socket=Path("/run/x.sock"), mode="rxonly", frame_len=60, prefix="p",
                               cpu=None)  # fmt: skip
    assert "--log-level=pmd.net.virtio.init:debug" in argv[: argv.index("--")]  # an EAL option
    assert "--no-flush-rx" in argv[argv.index("--") :]  # so every frame it receives is counted


def test_a_vm_sample_is_checked_against_the_backend_and_fails_with_the_reason() -> None:
    good = Sample(ok=True, pps=1.0, packets=1000)
    check_sample(TX, good, CARRIED)
    assert good.ok and good.counts is not None and good.counts["rule"] == "within"  # pktgen: whole run
    window = Sample(ok=True, pps=1.0, packets=900)
    check_sample(RX, window, CARRIED)
    assert window.ok and window.counts is not None and window.counts["rule"] == "at_most"
    bad = Sample(ok=True, pps=1.0, packets=2000)
    check_sample(TX, bad, CARRIED)
    assert not bad.ok and bad.miscounted
    assert bad.error is not None
    assert bad.error.startswith("backend count check: the guest counted 2000 packets")


def test_udp_rr_replies_span_the_run_and_are_checked_against_what_the_backend_gave() -> None:
    rr = Cell(backend="qemu-tap", direction=Direction.UDP_RR)
    held = Sample(ok=True, tps=1.0, packets=4991)
    check_sample(rr, held, CARRIED)  # the backend gave 5000: a few ARP and IPv6 frames more
    assert held.ok and held.counts is not None and held.counts["rule"] == "within"
    assert held.counts["unit"] == "packets" and held.counts["backend"] == 5000
    # Far fewer replies than the backend gave the guest: something it carried never reached sockperf.
    short = Sample(ok=True, tps=1.0, packets=5000 - RING_SIZE - 1)
    check_sample(rr, short, CARRIED)
    assert not short.ok and short.miscounted


async def test_one_miscounted_run_fails_its_cell_even_when_the_others_hold() -> None:
    plan = build_plan(["nicsim"], quick=True, directions=[Direction.TX], sizes=[64, 1500], repetitions=3)
    runs: list[Cell] = []

    async def run_once(cell: Cell) -> Sample:
        runs.append(cell)
        # The third run is the 64 B cell's second (the rows take turns within a repetition).
        sample = Sample(ok=True, pps=1.0, packets=1000 if len(runs) != 3 else 5000)
        check_sample(cell, sample, CARRIED)
        return sample

    results = await run_cells(plan, run_once)
    assert runs[2] == plan.cells[0]
    assert [r.status for r in results] == ["failed", "ok"]
    assert len(results[0].good()) == 2  # two runs held; the cell still cannot be trusted
    assert results[0].reason is not None and "5000 packets" in results[0].reason


async def test_backends_take_turns_on_each_row_repetition_after_repetition() -> None:
    plan = build_plan(["nicsim", "dpdk"], quick=True, directions=[Direction.TX], sizes=[64, 1500],
                      repetitions=2)  # fmt: skip
    runs: list[tuple[str, int, int]] = []
    finished: list[tuple[str, int]] = []

    async def run_once(cell: Cell) -> Sample:
        return Sample(ok=True, pps=1.0)

    results = await run_cells(plan, run_once, on_run=lambda c, rep: runs.append((c.backend, c.size, rep)),
                              on_cell=lambda r: finished.append((r.cell.backend, r.cell.size)))  # fmt: skip
    # Each nicsim run sits next to DPDK's of the same row: a drifting host moves both alike.
    assert runs == [("nicsim", 64, 0), ("dpdk", 64, 0), ("nicsim", 1500, 0), ("dpdk", 1500, 0),
                    ("nicsim", 64, 1), ("dpdk", 64, 1), ("nicsim", 1500, 1), ("dpdk", 1500, 1)]  # fmt: skip
    assert finished == [("nicsim", 64), ("dpdk", 64), ("nicsim", 1500), ("dpdk", 1500)]
    assert [r.cell for r in results] == list(plan.cells) and all(len(r.samples) == 2 for r in results)
