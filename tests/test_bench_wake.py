"""``nicsim bench --wake-latency-us``: the PM QoS request is in force while held, gone afterwards, and a
request that cannot be made is one line and exit 2, before anything boots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nicsim.bench import wake

ROOT = Path(__file__).resolve().parent.parent


def test_the_request_holds_while_held_and_is_dropped_after() -> None:
    before = wake.current()
    with wake.held(0):
        assert wake.current() == 0
    assert wake.current() == before


def test_the_lowest_request_wins_and_each_is_dropped_with_its_hold() -> None:
    before = wake.current()
    with wake.held(7):
        assert wake.current() == min(7, before)
        with wake.held(3):
            assert wake.current() == min(3, before)
        assert wake.current() == min(7, before)
    assert wake.current() == before


def test_a_negative_latency_is_refused() -> None:
    with pytest.raises(wake.WakeLatencyError, match="0 or more"), wake.held(-1):
        pass


def test_a_missing_device_says_what_to_do(tmp_path: Path) -> None:
    missing, words = tmp_path / "cpu_dma_latency", r"no PM QoS device.*leave the option out"
    with pytest.raises(wake.WakeLatencyError, match=words), wake.held(0, missing):
        pass


def test_the_bench_refuses_a_bad_value_in_one_line_and_exits_2() -> None:
    done = subprocess.run([sys.executable, "-m", "nicsim", "bench", "--wake-latency-us", "-1", "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].endswith("--wake-latency-us -1: give 0 or more microseconds")
    assert "Traceback" not in done.stderr
