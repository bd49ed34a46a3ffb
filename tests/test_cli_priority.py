"""``nicsim serve --nice N`` (``nicsim.cli.priority``): nicsim lowers its own CPU priority, and its own
session's autogroup when it leads one, and leaves a shell's autogroup alone. Debian's kernel has
autogroups (CONFIG_SCHED_AUTOGROUP), as every machine these tests run on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nicsim.cli.priority import check_nice

ROOT = Path(__file__).resolve().parents[1]
# A child that lowers its priority, says what it set and its nice value, then waits to be read.
CHILD = (
    "import os, sys\n"
    "from nicsim.cli.priority import lower_priority\n"
    "print(lower_priority(int(sys.argv[1])), os.getpriority(os.PRIO_PROCESS, 0), flush=True)\n"
    "sys.stdin.read()\n"
)


def autogroup_nice(pid: int) -> int | None:
    """The nice of ``pid``'s autogroup ("/autogroup-123 nice 19"), or None in the root one: a process
    whose session has not been set up since boot (PID 1's, as a CI runner's can be) reads nothing."""
    words = Path(f"/proc/{pid}/autogroup").read_text().split()
    return int(words[-1]) if words else None


def process_nice(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[16])  # field 19, nice


def child(value: int, *, own_session: bool) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(value)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=own_session)  # fmt: skip
    assert proc.stdout is not None
    return proc, proc.stdout.readline()


@pytest.mark.parametrize("value", [-1, 20])
def test_only_nice_values_that_lower_the_priority_are_taken(value: int) -> None:
    with pytest.raises(ValueError, match="--nice"):
        check_nice(value)
    for fine in (0, 19):
        check_nice(fine)


def test_a_session_leader_lowers_itself_and_its_own_autogroup() -> None:
    proc, line = child(7, own_session=True)
    try:
        assert line.strip().endswith("7"), line
        assert "its own autogroup at nice 7" in line
        assert process_nice(proc.pid) == 7
        assert autogroup_nice(proc.pid) == 7
    finally:
        proc.kill()
        proc.communicate()


def test_a_process_in_its_launcher_s_session_leaves_that_autogroup_alone() -> None:
    before = autogroup_nice(os.getpid())
    proc, line = child(7, own_session=False)
    try:
        assert "autogroup" not in line, line
        assert process_nice(proc.pid) == 7
        assert autogroup_nice(proc.pid) == before  # the test's own session, as it was
    finally:
        proc.kill()
        proc.communicate()


def test_nice_zero_changes_nothing() -> None:
    proc, line = child(0, own_session=True)
    try:
        assert line.split() == ["[]", str(os.getpriority(os.PRIO_PROCESS, 0))]
    finally:
        proc.kill()
        proc.communicate()


def test_serve_refuses_a_nice_value_it_cannot_take_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "nicsim", "serve", "--socket", str(tmp_path / "s.sock"),
                           "--nice", "-5"], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == "nicsim serve: --nice -5: use 0 (unchanged) to 19 (yield the most)"
    assert not (tmp_path / "s.sock").exists()


def test_serve_runs_at_the_nice_value_it_was_given(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([sys.executable, "-m", "nicsim", "serve", "--socket", str(sock), "--nice", "11"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        said = proc.stderr.readline()
        assert said.startswith("nicsim serve: running at nice 11"), said
        assert process_nice(proc.pid) == 11
        assert autogroup_nice(proc.pid) == 11
        deadline = time.monotonic() + 60
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), "nicsim serve never listened"
        proc.send_signal(signal.SIGINT)  # listening: it shuts down cleanly, status 0
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
