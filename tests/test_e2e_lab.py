"""End to end: ``nicsim lab run`` on real guests, as a user runs it.

The example topology (two guests, a lossy link, a ping, an iperf3 and a capture check) runs twice at
once under two lab names, which must not clash, and passes both times; a variant that asks for what
the lossy link cannot give fails, and says which check failed. A lab whose switch cannot start fails
at once, with the reason. The router example (h1 and h2 on two switches, r1 on both) passes, its pings
seen crossing r1; the same lab with r1 not forwarding fails its ping check.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "labs" / "lossy-pair.toml"
ROUTER = ROOT / "examples" / "labs" / "router.toml"

pytestmark = pytest.mark.vm


async def lab_run(file: Path, run_dir: Path, *more: str) -> tuple[int, dict[str, Any], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nicsim",
        "lab",
        "run",
        str(file),
        "--dir",
        str(run_dir),
        "--json",
        "-",
        *more,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    doc = json.loads(out) if out.strip() else {}
    return proc.returncode, doc, err.decode()


async def test_the_example_lab_passes_twice_at_once_under_two_names(guest_image: Any, tmp_path: Path) -> None:
    (rc_a, a, err_a), (rc_b, b, err_b) = await asyncio.gather(
        lab_run(EXAMPLE, tmp_path / "a", "--name", "pair-a"),
        lab_run(EXAMPLE, tmp_path / "b", "--name", "pair-b"),
    )
    assert rc_a == 0 and rc_b == 0, (err_a[-2000:], err_b[-2000:])
    for doc, name in ((a, "pair-a"), (b, "pair-b")):
        assert doc["lab"] == name and doc["passed"] is True
        assert [c["name"] for c in doc["checks"]] == [
            "ping h1 -> h2",
            "iperf3 h1 -> h2",
            "the capture holds the pings",
            "h2's link saw requests and replies",
        ]
        assert all(c["passed"] for c in doc["checks"]), doc["checks"]
        assert doc["checks"][1]["value"] > 1  # Mbit/s
        sw = doc["switches"]["lan"]
        assert [e["pool"]["usage"] for e in sw["sockets"]] == [0, 0]  # every guest buffer went back
        loss = sw["switch"]["ports"][doc["guests"]["h2"]["socket"]]["impair"]["rx"]
        assert loss["dropped"]["loss"] >= 1
    assert {g["mac"] for g in a["guests"].values()}.isdisjoint(g["mac"] for g in b["guests"].values())
    assert (tmp_path / "a" / "lan.pcapng").stat().st_size > 0
    assert (tmp_path / "a" / "h2.pcapng").stat().st_size > 0


async def test_a_check_the_link_cannot_meet_fails_the_run_and_is_named(
    guest_image: Any, tmp_path: Path
) -> None:
    strict = tmp_path / "strict.toml"
    strict.write_text(
        EXAMPLE.read_text()
        .replace('rx = "loss=10% seed=1"', 'rx = "loss=50% seed=1"')
        .replace("max_loss_pct = 30", "max_loss_pct = 0")
    )
    rc, doc, err = await lab_run(strict, tmp_path / "run", "--name", "strict")
    assert rc == 1, err[-2000:]
    verdict = {c["name"]: c["passed"] for c in doc["checks"]}
    assert verdict["ping h1 -> h2"] is False
    assert verdict["the capture holds the pings"] is True
    assert "FAILED" in err and "ping h1 -> h2" in err


async def test_the_router_lab_passes_through_r1_and_fails_when_r1_does_not_forward(
    guest_image: Any, tmp_path: Path
) -> None:
    text = ROUTER.read_text()
    assert "\nforward = true " in text
    off = tmp_path / "router-off.toml"
    # wait = 10: h1 stops waiting for h2 (unreachable now) after 10 s and runs its ping regardless.
    off.write_text("wait = 10\n" + text.replace("\nforward = true ", "\nforward = false "))
    (rc, doc, err), (rc_off, doc_off, err_off) = await asyncio.gather(
        lab_run(ROUTER, tmp_path / "on", "--name", "router-on"),
        lab_run(off, tmp_path / "off", "--name", "router-off"),
    )
    assert rc == 0, err[-3000:]
    assert [(c["name"], c["passed"]) for c in doc["checks"]] == [
        ("ping h1 -> h2", True),
        ("h1's pings crossed r1 into b", True),
    ]
    assert doc["checks"][0]["value"] == 0  # % loss
    r1 = doc["guests"]["r1"]
    assert [(n["switch"], n["ip"]) for n in r1["nics"]] == [("a", "10.1.0.1/24"), ("b", "10.2.0.1/24")]
    assert doc["guests"]["h1"]["routes"] == ["10.2.0.0/24,via=10.1.0.1"]
    # r1's two NICs are ports of two switches, and each gave back every guest buffer.
    for sw, sock in (("a", r1["nics"][0]["socket"]), ("b", r1["nics"][1]["socket"])):
        stats = doc["switches"][sw]
        assert sock in stats["switch"]["ports"]
        assert [e["pool"]["usage"] for e in stats["sockets"]] == [0, 0]
    assert rc_off == 1, err_off[-3000:]
    verdict = {c["name"]: c for c in doc_off["checks"]}
    assert verdict["ping h1 -> h2"]["passed"] is False, verdict
    assert verdict["h1's pings crossed r1 into b"]["passed"] is False
    assert "FAILED" in err_off and "ping h1 -> h2" in err_off


def test_a_lab_whose_switch_cannot_start_fails_at_once_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[switches.lan]\nuplinks = ["tap,netns=nicsim-no-such-namespace"]\n[guests.h1]\nswitch = "lan"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "nicsim", "lab", "run", str(bad), "--dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 1, done.stderr
    assert "switch lan: nicsim serve exited" in done.stderr


def test_up_console_status_and_down_leave_nothing_behind(guest_image: Any, tmp_path: Path) -> None:
    """A lab that stays up: its consoles answer, status sees its processes, down ends every one of them."""
    top = tmp_path / "solo.toml"
    disk = tmp_path / "data.img"  # h1's own disk, relative to the file: the guest sees it, never changes it
    disk.write_bytes(b"nicsim-lab-disk!" + bytes(1 << 20))
    top.write_text(
        'name = "solo"\n[switches.lan]\n[guests.h1]\nswitch = "lan"\ndisk = "data.img"\n'
        'workloads = [{ run = "disk", write = "changed", id = "disk" }]\n[guests.h2]\nswitch = "lan"\n'
        '[[checks]]\nkind = "ping"\nfrom = "h2"\nto = "h1"\ncount = 3\n'
        '[[checks]]\nkind = "result"\nguest = "h1"\nworkload = "disk"\nfield = "bytes"\nmin = 1048576\n'
    )
    run_dir = tmp_path / "lab"

    def lab(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nicsim", "lab", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=240,
            cwd=ROOT,
        )

    up = lab("up", str(top), "--dir", str(run_dir))
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert "check ping h2 -> h1: pass" in up.stdout
        assert "check h1 disk.bytes: pass" in up.stdout  # the topology's disk is the guest's /dev/vda
        status = lab("status", "--dir", str(run_dir), "--json")
        (state,) = json.loads(status.stdout)
        assert state["state"] == "up" and state["alive"] is True
        assert set(state["processes"]) == {"switch:lan", "guest:h1", "guest:h2"}
        assert all(state["processes"].values()), state["processes"]
        said = lab("console", "h2", "--dir", str(run_dir), "--for", "4", stdin="echo nicsim-$((6*7))\n")
        assert "nicsim-42" in said.stdout, said.stdout[-2000:]
        second = lab("up", str(top), "--dir", str(run_dir))
        assert second.returncode == 1 and "is running" in second.stderr  # one lab per directory
    finally:
        down = lab("down", "--dir", str(run_dir))
    assert down.returncode == 0, down.stderr
    pids = [state["pid"], *state["pids"].values()]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "a process of the lab outlived nicsim lab down"
    assert not list(run_dir.glob("*.sock")) and not (run_dir / "state.json").exists()
    assert (run_dir / "h1" / "console.log").stat().st_size > 0  # the logs stay for a person to read
    assert disk.read_bytes().startswith(b"nicsim-lab-disk!")  # the guest wrote to a snapshot only


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")
