"""A real, tiny ``nicsim bench --guests 2``: both setups, one repetition of a 1 s window, real guests.

It goes through the command line as a user would and checks the JSON: every row of both setups
measured with positive figures, B's own count of what it received agreeing with nicsim's (and the
bridge port's) count of what was handed to it, the goals stated, and the namespace gone afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_bench_e2e import bench_namespaces

pytestmark = pytest.mark.vm

RUN_TIMEOUT = 240.0  # a failure deadline on a loaded TCG host, not a performance claim


def test_tiny_two_guest_bench_measures_every_row_on_both_setups(guest_image: Any, tmp_path: Path) -> None:
    out = tmp_path / "pair.json"
    t0 = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-m", "nicsim", "bench", "--guests", "2", "--repetitions", "1", "--duration", "1",
         "--accel", "tcg", "--kernel", str(guest_image.kernel), "--initrd", str(guest_image.initrd),
         "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as bench:  # fmt: skip
        stdout, stderr = bench.communicate(timeout=RUN_TIMEOUT)
    done = subprocess.CompletedProcess(bench.args, bench.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "two guests, nicsim and linux-bridge" in done.stderr  # the plan, on stderr
    assert done.stdout.startswith("measure") and "placement:" in done.stdout
    assert "where the cores went (median, in cores):" in done.stdout
    doc = json.loads(out.read_text())
    assert doc["config"]["mode"] == "two-guest" and doc["config"]["placement"].startswith("placement:")
    cells = {(c["backend"], c["direction"]): c for c in doc["cells"]}
    assert set(cells) == {(s, d) for s in ("nicsim", "linux-bridge") for d in ("tcp-tx", "tx", "ping")}
    for (setup, direction), cell in cells.items():
        assert cell["status"] == "ok", cell
        (sample,) = cell["samples"]
        assert sample["cpu_qemu_pct"] > 0, (setup, direction)
        # Each QEMU's vCPU thread is told apart from the rest of it, and nicsim shows on its setup only.
        threads = sample["cpu_threads"]
        parts = {"a_vcpu", "a_rest", "b_vcpu", "b_rest"} | ({"nicsim"} if setup == "nicsim" else set())
        assert set(threads) == parts, (setup, direction, threads)
        assert threads["a_vcpu"] > 0 and threads["b_vcpu"] > 0
        assert sum(threads.values()) == pytest.approx(sample["cpu_total_pct"], rel=0.02)  # read a tick apart
        if direction == "tcp-tx":
            assert sample["gbps"] > 0
        elif direction == "tx":
            assert sample["pps"] > 0 and sample["guest"]["sent_packets"] >= sample["packets"] > 0
            counts = sample["counts"]
            assert counts["ok"], counts
            # B's own count of what it received against what the wire says it handed to B.
            assert abs(counts["guest"] - counts["backend"]) <= max(16, counts["backend"] // 1000), counts
        else:
            assert 0 < sample["rtt_p50_ms"] <= sample["rtt_p99_ms"] <= sample["rtt_max_ms"]
    assert cells[("nicsim", "tx")]["samples"][0]["counts"]["backend_source"].startswith("nicsim")
    assert [g["row"] for g in doc["goals"]] == ["tcp", "pps64", "ping"]
    assert all(g["nicsim_over_bridge"] > 0 for g in doc["goals"])
    # The run's namespaces are gone (another test's bench, running meanwhile, may have its own).
    assert not {ns for ns in bench_namespaces() if ns.startswith(f"nicsim-bench-{bench.pid}-")}
    print(f"two-guest bench: {time.monotonic() - t0:.1f} s")
