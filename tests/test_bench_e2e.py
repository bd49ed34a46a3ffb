"""A real, tiny ``nicsim bench``: the qemu-tap peer, one cell, one run, a 2 s window, a real guest.

It goes through the command line as a user would and checks the JSON document: a positive packet
rate counted by the guest, checked against the TAP's own counters, the negotiated features, QEMU's
CPU share, the versions and machine, and that the network namespace the run created is gone
afterwards; and the gate's outputs: the cell streamed as one line as it finished, and the comparison
with a baseline (one the run beats, and one cell the run does not have).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vm

RUN_TIMEOUT = 180.0  # a failure deadline on a loaded TCG host, not a performance claim


def bench_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("nicsim-bench-")}


def test_tiny_qemu_tap_bench_reports_a_positive_packet_rate(guest_image: Any, tmp_path: Path) -> None:
    out, stream, base = tmp_path / "bench.json", tmp_path / "bench.jsonl", tmp_path / "base.json"
    cells = [{"backend": "qemu-tap", "direction": d, "size": 64, "status": "ok",
              "summary": {"pps": {"min": 1.0, "median": 1.0, "max": 1.0, "n": 1}}} for d in ("tx", "rx")]
    base.write_text(json.dumps({"format": "nicsim-bench/1", "config": {"mode": "vm"}, "cells": cells}))
    with subprocess.Popen(
        [sys.executable, "-m", "nicsim", "bench", "--backends", "qemu-tap", "--directions", "tx",
         "--sizes", "64", "--repetitions", "1", "--duration", "2", "--accel", "tcg",
         "--kernel", str(guest_image.kernel), "--initrd", str(guest_image.initrd), "--json", str(out),
         "--json-stream", str(stream), "--baseline", str(base), "--max-regress", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as bench:  # fmt: skip
        stdout, stderr = bench.communicate(timeout=RUN_TIMEOUT)
    done = subprocess.CompletedProcess(bench.args, bench.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr
    assert "[1/1] qemu-tap tx 64 B (run 1/1)" in done.stderr  # the live progress line
    assert done.stdout.splitlines()[0].startswith("backend")  # the table
    doc = json.loads(out.read_text())
    (cell,) = doc["cells"]
    assert (cell["backend"], cell["direction"], cell["size"], cell["status"]) == ("qemu-tap", "tx", 64, "ok")
    (sample,) = cell["samples"]
    assert sample["ok"] and sample["pps"] > 0 and sample["packets"] > 0
    assert sample["guest"]["workload"] == "pktgen-tx" and sample["guest"]["size"] == 60
    assert sample["counts"]["ok"] and sample["counts"]["rule"] == "within"  # pktgen: the whole run
    assert sample["counts"]["backend_source"] == "tap0 counters in the namespace"
    assert abs(sample["counts"]["guest"] - sample["counts"]["backend"]) <= 256
    assert "VIRTIO_F_VERSION_1" in sample["features"]["names"]
    assert sample["cpu_qemu_pct"] > 0
    assert doc["versions"]["qemu"].startswith("QEMU emulator version")
    assert doc["machine"]["cores"] >= 1
    # The run's namespace is gone (another test's bench, running meanwhile, may have its own).
    assert not {ns for ns in bench_namespaces() if ns.startswith(f"nicsim-bench-{bench.pid}-")}
    events = [json.loads(line) for line in stream.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "cell", "end"] and events[1]["data"] == cell
    assert "compared with" in done.stdout and "  qemu-tap rx 64 B: not in this run" in done.stdout
    assert doc["comparison"]["cells"][0]["regressed"] is False


def test_ndr_search_reports_ndr_up_to_pdr_from_exact_offered_counts(guest_image: Any, tmp_path: Path) -> None:
    out = tmp_path / "ndr.json"
    done = subprocess.run(
        [sys.executable, "-m", "nicsim", "bench", "--ndr", "--quick", "--backends", "nicsim", "--directions",
         "rx", "--sizes", "64", "--accel", "tcg", "--kernel", str(guest_image.kernel), "--initrd",
         str(guest_image.initrd), "--json", str(out)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "RFC 2544 throughput, guest RX" in done.stdout
    (cell,) = json.loads(out.read_text())["ndr"]
    assert cell["error"] is None and cell["mrr_pps"] > 0
    assert 0 < cell["ndr"]["pps"] <= cell["pdr"]["pps"] <= 1.25 * cell["mrr_pps"]
    # Every trial's offered count is exact and its loss is what the generator dropped at the ring
    # or the guest lost after it: never negative (the guest never counts more than was offered).
    for trial in cell["trials"]:
        assert trial["offered"] == max(round(trial["rate_pps"] * trial["duration"]), 1)
        assert 0 <= trial["dropped_at_ring"] <= trial["offered"] - trial["received"]
    assert cell["ndr"]["duration"] == 1.0  # confirmed by the last phase's (longest) trials


def test_udp_rr_rows_report_a_transaction_rate_through_nicsim_qemu_tap_and_dpdk_to_a_tap(
    guest_image: Any, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    with subprocess.Popen(
        [sys.executable, "-m", "nicsim", "bench", "--backends", "nicsim,qemu-tap,dpdk,dpdk-tap",
         "--directions", "udp-rr", "--repetitions", "1", "--duration", "2", "--accel", "tcg",
         "--wake-latency-us", "0", "--kernel", str(guest_image.kernel), "--initrd", str(guest_image.initrd),
         "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as bench:  # fmt: skip
        stdout, stderr = bench.communicate(timeout=RUN_TIMEOUT)
    assert bench.returncode == 0, stderr
    assert stdout.splitlines()[0].split()[:3] == ["backend", "latency", "trans/s"]
    # The wakeup latency the run held is said under the table and in the JSON's config.
    assert "wake latency: /dev/cpu_dma_latency held at 0 us for the whole run" in stdout
    doc = json.loads(out.read_text())
    assert doc["config"]["wake_latency_us"] == 0
    # So is the host's speed, before and after the runs.
    assert "host speed: a fixed Python loop took" in stdout
    assert len(doc["config"]["python_loop_ms"]) == 2 and min(doc["config"]["python_loop_ms"]) > 0
    cells = {c["backend"]: c for c in doc["cells"]}
    for backend in ("nicsim", "qemu-tap", "dpdk-tap"):  # (dpdk-tap: testpmd forwarding to a TAP)
        cell = cells[backend]
        assert (cell["direction"], cell["status"]) == ("udp-rr", "ok"), cell
        (sample,) = cell["samples"]
        assert sample["ok"] and sample["tps"] > 0 and sample["seconds"] > 0, sample
        guest = sample["guest"]
        assert guest["workload"] == "sockperf-ping-pong" and guest["round_trip"] is True
        assert guest["dropped"] == 0 and guest["duplicated"] == 0 and sample["loss_pct"] == 0
        assert 0 < sample["rtt_p50_ms"] <= sample["rtt_p99_ms"] <= sample["rtt_max_ms"]
        # Every reply sockperf counted crossed the backend, and little else did.
        assert sample["counts"]["ok"] and sample["counts"]["rule"] == "within", sample["counts"]
        assert sample["counts"]["guest"] == guest["total_received"] > 0
    # testpmd cannot answer sockperf: the row says so instead of failing (skipped without testpmd).
    assert cells["dpdk"]["status"] in ("n/a", "skipped")
    if cells["dpdk"]["status"] == "n/a":
        assert "5tswap" in cells["dpdk"]["reason"]
    # The run's namespaces (and their sockperf servers) are gone; another bench may have its own.
    assert not {ns for ns in bench_namespaces() if ns.startswith(f"nicsim-bench-{bench.pid}-")}


def test_a_bench_before_any_kernel_is_compiled_compiles_them_first_and_measures(
    guest_image: Any, tmp_path: Path
) -> None:
    # An empty numba cache is a fresh clone's: without the bench compiling first, nicsim serve spent
    # ~20 s compiling before its socket appeared, past the 15 s start timeout, and the cell failed.
    out = tmp_path / "bench.json"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    done = subprocess.run(
        [sys.executable, "-m", "nicsim", "bench", "--backends", "nicsim", "--directions", "tx",
         "--sizes", "64", "--repetitions", "1", "--duration", "1", "--accel", "tcg",
         "--kernel", str(guest_image.kernel), "--initrd", str(guest_image.initrd), "--json", str(out)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nicsim's compiled kernels: loading" in done.stderr
    assert any((tmp_path / "numba-cache").rglob("*.nbi"))  # compiled into the cache the servers read
    (cell,) = json.loads(out.read_text())["cells"]
    assert (cell["backend"], cell["status"]) == ("nicsim", "ok")
    assert cell["samples"][0]["backend"]["nicsim"]["engine"] == "compiled"
