"""``nicsim.bench.procstat``: CPU time of real processes from /proc, and the measured window."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nicsim.bench.procstat import CLK_TCK, CpuWindow, cpu_seconds, vcpu_seconds

# The child spins until *it* has used this much CPU, then says so and sleeps: the figure /proc must
# show is then known, whatever else the machine is doing, with no timing in the assertion.
SPIN = 0.5
BUSY = (
    "import sys, time\n"
    f"while time.process_time() < {SPIN}: pass\n"
    "print('spun', flush=True)\n"
    "sys.stdin.read()\n"
)
IDLE = "import sys\nprint('idle', flush=True)\nsys.stdin.read()\n"


@pytest.fixture
def child() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def start(code: str, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)  # fmt: skip
    procs.append(p)
    assert p.stdout is not None
    p.stdout.readline()
    return p


def test_a_busy_child_shows_the_cpu_time_it_used(child: list[subprocess.Popen[str]]) -> None:
    busy = start(BUSY, child)
    used = cpu_seconds(busy.pid)
    assert used is not None
    # process_time counts the same utime+stime; /proc rounds to clock ticks.
    assert used >= SPIN - 2 / CLK_TCK


def test_an_idle_child_shows_little_cpu_time(child: list[subprocess.Popen[str]]) -> None:
    idle = start(IDLE, child)
    used = cpu_seconds(idle.pid)
    assert used is not None and used < SPIN / 2


def test_window_attributes_cpu_to_each_process(child: list[subprocess.Popen[str]]) -> None:
    idle = start(IDLE, child)
    # Open the window before the busy child exists as a spinner: start it idle, then make it spin.
    code = "import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n" + BUSY
    busy = start(code, child)
    window = CpuWindow({"busy": busy.pid, "idle": idle.pid, "none": None})
    window.start()
    assert busy.stdin is not None and busy.stdout is not None
    busy.stdin.write("go\n")
    busy.stdin.flush()
    assert busy.stdout.readline().strip() == "spun"
    window.stop()
    busy_s, idle_s = window.seconds("busy"), window.seconds("idle")
    assert busy_s is not None and idle_s is not None
    assert busy_s >= SPIN - 0.1 - 2 / CLK_TCK  # the interpreter's start-up was before the window
    assert idle_s < busy_s / 4
    assert window.seconds("none") is None and window.percent("none") is None
    percent = window.percent("busy")
    assert percent is not None and percent == pytest.approx(100 * busy_s / window.wall)


def test_a_process_gone_reads_as_none_not_zero(child: list[subprocess.Popen[str]]) -> None:
    p = start(IDLE, child)
    p.kill()
    p.wait()
    assert cpu_seconds(p.pid) is None


def test_a_command_name_with_spaces_and_parentheses_is_parsed(tmp_path: Path) -> None:
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 30
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text(f"42 (a) b (c) {' '.join(fields)}\n")
    assert cpu_seconds(42, proc=tmp_path) == pytest.approx(400 / CLK_TCK)


def _stat(comm: str, utime: int, stime: int) -> str:
    fields = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 30
    return f"7 ({comm}) {' '.join(fields)}\n"


def test_vcpu_threads_are_told_apart_by_the_names_qemu_gives_them(tmp_path: Path) -> None:
    # QEMU with -name debug-threads=on: "CPU 0/TCG" per vCPU; its main loop keeps the binary's name.
    for tid, comm, ut in ((7, "qemu-system-x86", 30), (8, "CPU 0/TCG", 500), (9, "CPU 1/TCG", 200),
                          (10, "worker", 5)):  # fmt: skip
        (tmp_path / "7" / "task" / str(tid)).mkdir(parents=True)
        (tmp_path / "7" / "task" / str(tid) / "stat").write_text(_stat(comm, ut, 0))
    assert vcpu_seconds(7, proc=tmp_path) == pytest.approx(700 / CLK_TCK)
    (tmp_path / "8" / "task" / "8").mkdir(parents=True)
    (tmp_path / "8" / "task" / "8" / "stat").write_text(_stat("python", 10, 10))
    assert vcpu_seconds(8, proc=tmp_path) is None  # no thread so named: not a zero
    assert vcpu_seconds(9, proc=tmp_path) is None  # no such process


def test_a_real_thread_named_as_a_vcpu_shows_its_own_cpu_time(child: list[subprocess.Popen[str]]) -> None:
    code = (
        "import sys, threading, time\n"
        "def vcpu():\n"
        "    open(f'/proc/self/task/{threading.get_native_id()}/comm', 'w').write('CPU 0/TCG')\n"
        f"    while time.thread_time() < {SPIN}: pass\n"
        "    print('spun', flush=True)\n"
        "    time.sleep(3600)  # and stays, idle, to be read\n"
        "threading.Thread(target=vcpu, daemon=True).start()\n"
        "sys.stdin.read()\n"
    )
    p = start(code, child)
    vcpu, whole = vcpu_seconds(p.pid), cpu_seconds(p.pid)
    assert vcpu is not None and whole is not None
    assert SPIN - 2 / CLK_TCK <= vcpu <= whole
    window = CpuWindow({"q": p.pid}, vcpus={"q": p.pid})
    window.start()
    window.stop()
    assert window.seconds("q" + CpuWindow.VCPU) == pytest.approx(0.0, abs=2 / CLK_TCK)  # it has stopped
