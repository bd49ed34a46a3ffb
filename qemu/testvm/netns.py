"""Throwaway network namespaces for test guests: the one place that creates, fills and deletes them.

``Netns.create(prefix)`` makes a namespace ``<prefix>-<pid>-<n>`` (the pid keeps concurrent processes
apart, the counter this process's own namespaces) with ``lo`` up. ``add_tap`` puts a persistent TAP
with an address in it, optionally with the guest as a permanent neighbour so that no ARP has to be
answered before the first frame. ``exec_argv`` wraps a command in ``ip netns exec``; ``run`` and
``popen`` run one there, and ``close`` kills what ``popen`` started (by pid) and deletes the namespace,
which deletes its TAP; it is harmless when the namespace is already gone, and the handle is a context
manager that closes on the way out. ``add_bridge`` makes a bridge there whose ports are TAPs made with
``add_tap(..., master=...)``. A failed ``ip`` command raises ``NetnsError``, whose message says
which command failed and what it printed (without root: "Operation not permitted"). Nothing here
addresses anything outside the namespace it created.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from .cmdline import in_netns
from .errors import NetnsError

_counter = itertools.count()


def _run(argv: Sequence[str], *, check: bool) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise NetnsError(done.returncode, done.args, done.stdout, done.stderr)
    return done


class Netns:
    """A network namespace this process created (or adopts by ``name``), with ``ip netns exec`` helpers."""

    def __init__(self, name: str) -> None:
        in_netns((), name)  # refuses a name that is not a plain one, before any `ip` sees it
        self.name = name
        self.children: list[subprocess.Popen[Any]] = []

    @classmethod
    def create(cls, prefix: str = "nicsim") -> Netns:
        """A new, uniquely named namespace with ``lo`` up; deleted again if bringing ``lo`` up fails."""
        ns = cls(f"{prefix}-{os.getpid()}-{next(_counter)}")
        _run(["ip", "netns", "add", ns.name], check=True)
        try:
            ns.run("ip", "link", "set", "lo", "up")
        except BaseException:
            ns.close()
            raise
        return ns

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace (``ip netns exec`` execs, so the pid is the command's)."""
        return in_netns(argv, self.name)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` here to the end, output captured as text; ``NetnsError`` if it fails and ``check``."""
        return _run(self.exec_argv(argv), check=check)

    def popen(self, *argv: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` here; ``close`` kills it by pid if it is still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.exec_argv(argv), **kwargs)
        self.children.append(proc)
        return proc

    def add_tap(
        self, ifname: str = "tap0", address: str | None = "10.0.2.2/24", *,
        neighbour: tuple[str, str] | None = None, master: str | None = None,
    ) -> None:  # fmt: skip
        """A persistent TAP ``ifname`` with ``address`` (CIDR; ``None``: none), up, for QEMU's tap backend
        or nicsim's tap port to attach to; ``neighbour=(ip, mac)`` adds that host as a permanent
        neighbour on it; ``master`` enslaves it to that bridge (``add_bridge``) before it goes up."""
        self.run("ip", "tuntap", "add", "dev", ifname, "mode", "tap")
        if address is not None:
            self.run("ip", "addr", "add", address, "dev", ifname)
        if master is not None:
            self.run("ip", "link", "set", ifname, "master", master)
        self.run("ip", "link", "set", ifname, "up")
        if neighbour is not None:
            ip, mac = neighbour
            self.run("ip", "neigh", "replace", ip, "lladdr", mac, "dev", ifname, "nud", "permanent")

    def add_bridge(self, name: str = "br0") -> None:
        """A Linux bridge ``name``, up, without STP and with no forwarding delay, so that its ports
        forward as soon as they are up (``NetnsError`` when the kernel has no bridge support)."""
        self.run("ip", "link", "add", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self.run("ip", "link", "set", name, "up")

    def close(self) -> None:
        """Kill the children still running, then delete the namespace (and its TAP); a second call is
        harmless, and so is a namespace someone else already deleted."""
        for proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        _run(["ip", "netns", "del", self.name], check=False)

    def __enter__(self) -> Netns:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
