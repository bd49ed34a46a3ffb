"""Our suite's fixture names, on top of nicsim's own pytest plugin (``nicsim.pytest_plugin``).

The plugin is what users get; this suite uses it too (``-p nicsim.pytest_plugin`` in pyproject's
addopts, so a checkout works before it is installed). ``guest_image`` is the plugin's
``nicsim_image`` (built once per session, cached on disk, built once at a time across xdist workers);
``netns`` is its ``nicsim_netns``: a factory of ``qemu.testvm.Netns`` handles, each a fresh namespace
``nicsim-<worker>-<pid>-<n>`` with ``lo`` up, and at teardown, even after a failure, every process a
handle started is killed by pid and its namespace is deleted (which deletes its TAP/veth devices).
All guest traffic in the tests goes to these namespaces and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from qemu.testvm import Netns


@pytest.fixture(scope="session")
def guest_image(nicsim_image: Any) -> Any:
    """The guest image (``GuestImage(kernel, initrd, manifest)``), built once and cached on disk."""
    return nicsim_image


@pytest.fixture
def netns(nicsim_netns: Callable[[], Netns]) -> Callable[[], Netns]:
    """Factory of fresh namespaces (``lo`` up), all deleted when the test ends, pass or fail."""
    return nicsim_netns

