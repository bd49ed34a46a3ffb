"""A lab's life beyond one command: claiming its directory, ``up`` (start the process that keeps it up
and wait until it is), ``status``, ``console`` and ``down``.

A lab's directory is its identity: ``lab.pid`` holds the pid of the process that owns it, so a second
``run`` or ``up`` of the same name is refused while the first lives, and ``state.json``
(:mod:`nicsim.lab.state`) says what a lab that is up has started. ``down`` asks that process to stop
(SIGTERM: it stops its guests and switches and removes its sockets), then, if it does not within
:data:`DOWN_TIMEOUT`, kills it and every process it recorded, by pid. Nothing else is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import plan as planning
from . import topology
from .state import STATE_FILE, alive, console_socket, default_dir, known_labs, read_state

DOWN_TIMEOUT = 60.0
DETACH = b"\x1d"  # Ctrl-]


def load_plan(
    file: Path, name: str | None, where: Path | None, *, interactive: bool = False
) -> planning.LabPlan:
    top = topology.load(file)
    if name is not None:
        top = topology.renamed(top, name)
    run_dir = (where or default_dir(top.name)).resolve()
    return planning.plan(top, run_dir, interactive=interactive)


def owner(run_dir: Path) -> int | None:
    """The pid of the live process that owns ``run_dir``, if there is one (not this one)."""
    try:
        pid = int((run_dir / "lab.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and alive(pid) else None


def claim(lab: planning.LabPlan, pid: int | None = None) -> str | None:
    """Empty the lab's directory and own it; the reason if another live lab owns it."""
    other = owner(lab.run_dir)
    if other is not None:
        return (
            f"lab {lab.topology.name} is running (pid {other}) in {lab.run_dir}: 'nicsim lab down "
            f"{lab.topology.name}', or give this one another --name"
        )
    if lab.run_dir.exists():
        shutil.rmtree(lab.run_dir)
    lab.run_dir.mkdir(parents=True)
    (lab.run_dir / "lab.pid").write_text(f"{pid or os.getpid()}\n")
    return None


def image_for(lab: planning.LabPlan, *, quiet: bool = False) -> Any:
    """The built-in guest image, if a guest needs it (built now if it is not cached)."""
    if all(g.spec.kernel is not None for g in lab.guests.values()):
        return None
    from images.build import build_image

    def progress(line: str) -> None:
        if not quiet:
            print(f"nicsim lab: image: {line}", file=sys.stderr)

    return build_image(progress=progress)


# -- up -----------------------------------------------------------------------------------------------


def up(lab: planning.LabPlan, file: Path, name: str | None) -> int:
    refused = claim(lab)
    if refused:
        print(f"nicsim lab: {refused}", file=sys.stderr)
        return 1
    image_for(lab)  # in the foreground, where its progress shows
    argv = [sys.executable, "-m", "nicsim", "lab", "_supervise", str(file), "--dir", str(lab.run_dir)]
    if name is not None:
        argv += ["--name", name]
    with (lab.run_dir / "lab.log").open("wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    (lab.run_dir / "lab.pid").write_text(f"{proc.pid}\n")
    print(
        f"nicsim lab: {lab.topology.name}: starting (pid {proc.pid}; log {lab.run_dir / 'lab.log'})",
        file=sys.stderr,
    )
    deadline = time.monotonic() + lab.topology.timeout + 30
    state: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        state = read_state(lab.run_dir)
        if state is not None and state.get("state") in ("up", "failed", "down"):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    if state is None or state.get("state") != "up":
        why = (state or {}).get("error") or "it did not come up in time"
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(DOWN_TIMEOUT)
        print(
            f"nicsim lab: {lab.topology.name} failed: {why}; see {lab.run_dir / 'lab.log'}", file=sys.stderr
        )
        return 1
    _print_status(lab.run_dir, state)
    failed = [c["name"] for c in state.get("checks", []) if not c["passed"]] + state.get("errors", [])
    if failed:
        print(f"nicsim lab: up, but these failed: {'; '.join(failed)}", file=sys.stderr)
    lab_name = lab.topology.name
    print(f"attach: nicsim lab console GUEST --lab {lab_name}   stop: nicsim lab down {lab_name}")
    return 1 if failed else 0


# -- finding a lab ----------------------------------------------------------------------------------


def find(name: str | None, where: Path | None) -> Path:
    """The directory of the lab called ``name`` (or the one in ``where``, or the only one up)."""
    if where is not None:
        return where.resolve()
    if name is not None:
        return default_dir(name)
    live = [d for d in known_labs() if alive((read_state(d) or {}).get("pid"))]
    if len(live) == 1:
        return live[0]
    names = ", ".join(d.name.removeprefix("nicsim-lab-") for d in live) or "none is up"
    raise LookupError(f"say which lab ({names})")


# -- status ---------------------------------------------------------------------------------------------


def status(name: str | None, where: Path | None, *, as_json: bool) -> int:
    """Each lab that is up (or the one named), its guests and whether its processes live."""
    dirs = [find(name, where)] if (name or where) else list(known_labs())
    docs = []
    for d in dirs:
        state = read_state(d)
        if state is None:
            print(f"nicsim lab status: no lab is up in {d}", file=sys.stderr)
            return 1
        state["alive"] = alive(state.get("pid"))
        state["processes"] = {k: alive(pid) for k, pid in state.get("pids", {}).items()}
        docs.append((d, state))
    if as_json:
        import json

        print(json.dumps([s for _, s in docs], indent=2))
        return 0
    if not docs:
        print("no lab is up")
    for d, state in docs:
        _print_status(d, state)
    return 0


def _print_status(run_dir: Path, state: dict[str, Any]) -> None:
    running = "running" if alive(state.get("pid")) else "not running"
    print(f"lab {state['lab']}: {state['state']} ({running}, pid {state['pid']}) in {run_dir}")
    rows = [("guest", "address", "mac", "process", "console")]
    for g, info in state.get("guests", {}).items():
        pid = state.get("pids", {}).get(f"guest:{g}")
        proc = f"{pid} {'up' if alive(pid) else 'gone'}" if pid else "-"
        rows.append((g, info["ip"], info["mac"], proc, info["console"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    for c in state.get("checks", []):
        print(f"  check {c['name']}: {'pass' if c['passed'] else 'FAIL'} ({c['measured']})")


# -- down ---------------------------------------------------------------------------------------------


def down(name: str | None, where: Path | None) -> int:
    try:
        run_dir = find(name, where)
    except LookupError as err:
        print(f"nicsim lab down: {err}", file=sys.stderr)
        return 2
    state = read_state(run_dir)
    if state is None:
        print(f"nicsim lab down: no lab in {run_dir}", file=sys.stderr)
        return 1
    pid = int(state.get("pid") or 0)
    if alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
            _reap(pid)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    for what, p in state.get("pids", {}).items():
        if alive(p):
            print(f"nicsim lab down: {what} (pid {p}) outlived the lab: killed", file=sys.stderr)
            os.kill(p, signal.SIGKILL)
    for sock in [*run_dir.glob("*.sock"), run_dir / STATE_FILE, run_dir / "lab.pid"]:
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
    print(f"lab {state['lab']}: down (logs and consoles kept in {run_dir})")
    return 0


def _reap(pid: int) -> None:
    # Our own child when this process ran `up` itself (tests do): collect it so it is not a zombie.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# -- console ------------------------------------------------------------------------------------------


def console(guest: str, name: str | None, where: Path | None, *, seconds: float) -> int:
    try:
        run_dir = find(name, where)
    except LookupError as err:
        print(f"nicsim lab console: {err}", file=sys.stderr)
        return 2
    path = console_socket(run_dir, guest)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as err:
        guests = ", ".join(sorted((read_state(run_dir) or {}).get("guests", {}))) or "none"
        print(
            f"nicsim lab console: {guest}: no console at {path} ({err.strerror}); the lab's guests: {guests}",
            file=sys.stderr,
        )
        return 1
    with sock:
        if sys.stdin.isatty():
            return _interactive(sock)
        return _scripted(sock, sys.stdin.buffer.read(), seconds)


def _scripted(sock: socket.socket, data: bytes, seconds: float) -> int:
    """Send ``data`` (a line at a time, as typed), then show the output for ``seconds`` more."""
    sock.sendall(data)
    sock.settimeout(0.2)
    end = time.monotonic() + seconds
    out = sys.stdout.buffer
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        out.write(chunk)
        out.flush()
    return 0


def _interactive(sock: socket.socket) -> int:
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    print("nicsim lab console: attached; Ctrl-] detaches\r", file=sys.stderr)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    sel.register(sock, selectors.EVENT_READ)
    try:
        tty.setraw(fd)
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return 0
                    os.write(sys.stdout.fileno(), chunk.replace(b"\n", b"\r\n"))
                else:
                    data = os.read(fd, 1024)
                    if not data or DETACH in data:
                        return 0
                    sock.sendall(data)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        print("\r\nnicsim lab console: detached", file=sys.stderr)
