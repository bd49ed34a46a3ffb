"""The command line's conventions, as a script sees them: ``--version``, exit codes it can trust, one
line saying what to do on an expected failure (never a traceback), and bad options named with their
valid choices. Every test runs the real ``nicsim`` in a subprocess; the ``vm`` ones boot the real guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from images.apt import ImageBuildError
from nicsim import __version__
from nicsim.cli import main as nicsim_main
from nicsim.cli.failures import explain
from nicsim.interrupts import Terminated, interrupts_kept

ROOT = Path(__file__).resolve().parent.parent


def nicsim(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nicsim", *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=env,
    )  # fmt: skip


def test_version_prints_the_package_version() -> None:
    done = nicsim("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"nicsim {__version__}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_and_log_level_are_accepted_before_or_after_the_subcommand(where: str) -> None:
    opts = ["-v", "--log-level", "debug"]
    argv = [*opts, "serve", "--help"] if where == "before" else ["serve", *opts, "--help"]
    done = nicsim(*argv)
    assert done.returncode == 0, done.stderr
    assert "--log-level" in done.stdout and "--verbose" in done.stdout


def test_a_bad_log_level_lists_the_levels() -> None:
    done = nicsim("--log-level", "loud", "image", "build")
    assert done.returncode == 2
    assert "debug" in done.stderr and "warning" in done.stderr


def test_a_bad_port_value_names_the_key_and_lists_the_valid_ones(tmp_path: Path) -> None:
    done = nicsim("serve", "--socket", str(tmp_path / "s.sock"), "--port", "generator,size=abc")
    assert done.returncode == 2
    assert "size='abc' is not an integer" in done.stderr
    assert "keys: size, count" in done.stderr
    assert "invalid literal" not in done.stderr and "Traceback" not in done.stderr
    unknown = nicsim("serve", "--socket", str(tmp_path / "s.sock"), "--port", "generator,colour=red")
    assert unknown.returncode == 2 and "'colour=red'" in unknown.stderr and "dst_mac" in unknown.stderr


def test_a_bad_bench_direction_lists_the_choices() -> None:
    done = nicsim("bench", "--directions", "tx,up")
    assert done.returncode == 2
    assert "'up'" in done.stderr and "choose from tx, rx, tcp-tx, tcp-rx" in done.stderr


def test_missing_qemu_is_one_line_that_says_what_to_install(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing on PATH: no QEMU
    done = nicsim("vm", "--workload", "link", env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "nicsim vm: qemu-system-x86_64 not found: install it with 'apt-get install qemu-system-x86'"
    ]


def test_expected_failures_are_explained_in_one_line_and_bugs_are_not() -> None:
    ip = subprocess.CalledProcessError(1, ["ip", "netns", "add", "x"], stderr="mount --make-shared: denied\n")
    line = explain(ip)
    assert line is not None and line.startswith(
        "'ip netns add x' failed (exit 1): mount --make-shared: denied"
    )
    if os.geteuid() != 0:
        assert "need root" in line
    qemu = FileNotFoundError(2, "No such file or directory", "qemu-system-x86_64")
    assert explain(qemu) == "qemu-system-x86_64 not found: install it with 'apt-get install qemu-system-x86'"
    build = explain(ImageBuildError("apt-get download failed:\nE: no network"))
    assert build is not None and "\n" not in build and "apt-get download failed" in build
    assert explain(KeyError("a bug")) is None  # not expected: the traceback stays


def _results(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.mark.vm
def test_vm_exits_nonzero_when_a_workload_fails_and_keeps_the_console_quiet(guest_image: Any) -> None:
    done = nicsim(
        "vm", "--nic", "none", "--accel", "tcg", "--workload", "bogus", "--workload", "sleep,seconds=0"
    )
    assert done.returncode == 1, done.stderr
    results = _results(done.stdout)  # stdout is one JSON line per workload, nothing else
    assert [(r["workload"], r["ok"]) for r in results] == [("bogus", False), ("sleep", True)]
    assert "unknown workload 'bogus'" in done.stderr
    assert "Linux version" not in done.stdout + done.stderr  # the console is shown only with --verbose
    assert "Traceback" not in done.stderr


@pytest.mark.vm
def test_vm_exits_zero_when_every_workload_succeeds_and_verbose_shows_the_console(guest_image: Any) -> None:
    done = nicsim("vm", "--verbose", "--nic", "none", "--accel", "tcg", "--workload", "sleep,seconds=0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [(r["workload"], r["ok"]) for r in _results(done.stdout)] == [("sleep", True)]
    assert "Linux version" in done.stderr and "NICSIM-DONE" in done.stderr


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--nic", "user", "--nic", "none"], "--nic none means no NIC at all: give it alone"),
        (["--nic", "vhost-user,ip=10.1.0.1/24"], "needs socket=PATH (or --socket PATH, for the first NIC)"),
        (["--nic", "user", "--nic", "vhost-user"], "--nic 'vhost-user' needs socket=PATH"),
        (["--nic", "user,socket=/x.sock"], "'socket=/x.sock' is not KEY=VALUE with a KEY of mac, ip, mtu"),
        (["--nic", "bridge"], "the kind is one of user, tap, vhost-user, none"),
        (["--nic", "user,mtu=big"], "mtu=big is not a number"),
        (["--nic", "tap", "--nic", "tap"], "one --nic tap at most"),
        (["--nic", "user", "--nic", "user,mac=52:54:00:12:34:56"], "NICs 0 and 1 both have MAC"),
        (["--route", "10.2.0.0/24"], "route '10.2.0.0/24': write it NETWORK/PREFIX,via=ADDRESS"),
    ],
)
def test_vm_nic_and_route_mistakes_are_one_line_before_anything_boots(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = nicsim_main(["vm", "--accel", "tcg", "--kernel", __file__, *argv, "--workload", "sleep"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("nicsim vm: ") and words in err, err


@pytest.mark.vm
def test_vm_with_two_nics_configures_each_and_the_first_keeps_its_flags(guest_image: Any) -> None:
    done = nicsim(
        "vm", "--accel", "tcg", "--ip", "10.0.2.16/24",
        "--nic", "user", "--nic", "user,ip=10.0.3.15/24,mtu=1400",
        "--forward", "--route", "10.9.0.0/24,via=10.0.3.1",
        "--workload", "link,dev=eth1", "--workload", "link", "--workload", "ping,target=10.0.2.2,count=1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    eth1, eth0, ping = _results(done.stdout)
    seen = [(r["dev"], r["mac"], r["ip"], r["mtu"]) for r in (eth1, eth0)]
    assert seen == [
        ("eth1", "52:54:00:12:34:57", "10.0.3.15/24", 1400),
        ("eth0", "52:54:00:12:34:56", "10.0.2.16/24", 1500),
    ]
    assert ping["ok"] and ping["received"] == 1  # eth0 still reaches slirp's gateway


def test_a_failed_image_build_is_one_line_and_verbose_shows_the_commands_output(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import images.cli

    def fail(*_: object, **__: object) -> None:
        raise ImageBuildError("apt-get download busybox-static failed:\nE: 404  Not Found")

    monkeypatch.setattr(images.cli, "build_image", fail)
    assert images.cli.main(["build"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: apt-get download busybox-static failed: (-v shows the failing command's output)"
    ]
    assert images.cli.main(["build", "-v"]) == 1
    assert "E: 404  Not Found" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: list[int] = []
    for task in tasks.iterdir() if tasks.exists() else []:
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _is_qemu(pid: int) -> bool:
    try:
        return "qemu" in Path(f"/proc/{pid}/comm").read_text(errors="replace")
    except OSError:
        return False


@pytest.mark.vm
def test_sigterm_stops_a_vm_like_ctrl_c_and_leaves_no_qemu_or_namespace(guest_image: Any) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nicsim", "vm", "--nic", "tap", "--accel", "tcg",
         "--workload", "sleep,seconds=120"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    qemu: list[int] = []
    netns = f"nicsim-vm-{proc.pid}-"
    try:
        deadline = time.monotonic() + 60
        while not qemu and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            qemu = [c for c in _children(proc.pid) if _is_qemu(c)]
        assert qemu, "QEMU never started"
        assert netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the test failed: leave nothing of it running
            proc.kill()
            proc.communicate()
            for pid in qemu:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", f"{netns}0"], capture_output=True)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().endswith("terminated")
    assert not _is_qemu(qemu[0])
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_serve_says_it_is_compiling_when_no_kernel_is_cached_yet(tmp_path: Path) -> None:
    # An empty numba cache is a fresh clone's: the socket appears only after ~20 s of compiling.
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([sys.executable, "-m", "nicsim", "serve", "--socket", str(sock)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the notice comes 3 s in, long before the compile ends
        assert first.startswith("nicsim serve: compiling the kernels (about 20 s"), first
        assert not sock.exists()
        proc.send_signal(signal.SIGTERM)  # mid-compile: it stops like Ctrl-C, before any socket
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not sock.exists()


@pytest.mark.parametrize("sig, exc", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_swallowed_by_the_work_is_raised_again_when_it_returns(sig: int, exc: type) -> None:
    # What numba's compiler does to an exception raised in its ctypes callbacks: print it, drop it.
    def swallowing_work() -> str:
        try:
            os.kill(os.getpid(), sig)
            time.sleep(1)  # (the handler runs here, at the latest)
        except BaseException:  # (the point: it is lost here)
            return "swallowed"
        return "not raised"

    before = signal.getsignal(sig)
    with pytest.raises(exc) as info, interrupts_kept():
        assert swallowing_work() == "swallowed"
    assert type(info.value) is exc
    assert signal.getsignal(sig) is before  # the handlers are put back
