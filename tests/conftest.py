"""Shared fixtures: the guest image (built once per session) and throwaway network namespaces.

``guest_image`` builds (or finds in its cache) the guest kernel + initramfs with
``images.build.build_image()`` once per test session. ``netns`` is a factory of
``qemu.testvm.Netns`` handles: each call creates a uniquely named namespace ``nicsim-<pid>-<n>`` with
``lo`` up (``run``, ``popen``, ``add_tap`` work in it); at teardown, even after a failure, every
process a handle started is killed by pid and its namespace is deleted (which deletes its TAP/veth
devices). All guest traffic in the tests goes to these namespaces and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qemu.testvm import Netns


@pytest.fixture(scope="session")
def guest_image() -> Any:
    """The guest image (``GuestImage(kernel, initrd, manifest)``), built once and cached on disk."""
    from images.build import build_image  # only tests that boot a guest pay for this import

    return build_image()


@pytest.fixture
def netns() -> Iterator[Callable[[], Netns]]:
    """Factory of fresh namespaces (``lo`` up), all deleted when the test ends, pass or fail."""
    made: list[Netns] = []

    def make() -> Netns:
        ns = Netns.create("nicsim")
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.close()
