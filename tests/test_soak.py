"""The soak (``scripts/soak.py``) for one minute: link flaps and a reboot under mixed traffic leave nicsim
with the fds and pool usage it started with and an RSS within the script's bound.

The script is run as users run it (a subprocess, its own ``nicsim serve`` and QEMU); this test asserts
its verdict, its exit code, and that the disruptions really happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vm

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def test_one_minute_soak_leaves_no_fd_no_buffer_and_bounded_rss(guest_image: Any) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", "60", "--event-interval", "15", "--json-only"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line; exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    print(json.dumps(result, indent=1))
    assert result["ok"], result.get("problems") or result.get("error")
    assert proc.returncode == 0
    assert result["flaps"] >= 1 and result["reboots"] >= 1
    assert result["start"]["fds"] == result["end"]["fds"]
    assert result["start"]["pool_usage"] == result["end"]["pool_usage"] == 0
    assert result["icmp_echo_total"] > 0 and result["guest_pktgen"]["packets"] > 0
