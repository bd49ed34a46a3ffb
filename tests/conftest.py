"""Shared fixtures: the guest image (built once per session) and throwaway network namespaces.

``guest_image`` builds (or finds in its cache) the guest kernel + initramfs with
``images.build.build_image()`` once per test session. ``netns`` is a factory: each call creates a
uniquely named namespace ``nicsim-<pid>-<n>`` with ``lo`` up and returns a ``Netns`` handle to run
commands in it (``run``, ``popen``, ``add_tap``); at teardown, even after a failure, every process the
handle started is killed by pid and the namespace is deleted (which deletes its TAP/veth devices).
All guest traffic in the tests goes to these namespaces and nowhere else.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

_netns_counter = itertools.count()


@pytest.fixture(scope="session")
def guest_image() -> Any:
    """The guest image (``GuestImage(kernel, initrd, manifest)``), built once and cached on disk."""
    from images.build import build_image  # only tests that boot a guest pay for this import

    return build_image()


@dataclass
class Netns:
    """A network namespace this test run created; ``ip netns exec`` wrappers that remember their children."""

    name: str
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], check=check, capture_output=True, text=True
        )

    def popen(self, *argv: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the namespace; it is killed by pid at teardown if still running."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)
        self.children.append(proc)
        return proc

    def add_tap(self, ifname: str = "tap0", address: str = "10.0.2.2/24") -> None:
        """A persistent TAP inside the namespace with ``address``; QEMU's tap backend attaches to it."""
        self.run("ip", "tuntap", "add", "dev", ifname, "mode", "tap")
        self.run("ip", "addr", "add", address, "dev", ifname)
        self.run("ip", "link", "set", ifname, "up")

    def close(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


@pytest.fixture
def netns() -> Iterator[Callable[[], Netns]]:
    """Factory of fresh namespaces (``lo`` up), all deleted when the test ends, pass or fail."""
    made: list[Netns] = []

    def make() -> Netns:
        ns = Netns(f"nicsim-{os.getpid()}-{next(_netns_counter)}")
        subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
        made.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.close()
