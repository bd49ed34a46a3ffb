"""Test helpers for users' own suites, and the pieces the pytest plugin (``nicsim.pytest_plugin``) is
built from; usable without pytest too.

``unique`` (names, MACs and addresses unique per pytest-xdist worker and process), ``image`` (the
guest image, built once at a time across processes), ``server`` (``nicsim serve`` as a child process
on named sockets, with its stats file), ``vms`` (the test-guest factory). A future lab harness
composes these the same way the plugin's fixtures do.
"""

from .image import locked_build_image
from .server import ServerError, ServerProcess
from .unique import WorkerIds, worker_id, worker_number
from .vms import VMFactory

__all__ = ["ServerError", "ServerProcess", "VMFactory", "WorkerIds", "locked_build_image", "worker_id",
           "worker_number"]  # fmt: skip
