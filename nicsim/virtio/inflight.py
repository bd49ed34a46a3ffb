"""The interface the device calls to track in-flight heads (vhost-user "Inflight I/O tracking").

The device defines it and calls it; the asyncio shell implements it (``nicsim.server.inflight_fd``'s
``InflightStore`` over the shared memfd), so the device never imports the shell.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt


class InflightHooks(Protocol):
    """What the device tells the inflight buffer (called on the event loop, inside device calls)."""

    def popped(self, index: int, heads: npt.NDArray[np.uint16]) -> None: ...

    def before_used(self, index: int, heads: npt.NDArray[np.uint16]) -> None: ...

    def after_used(self, index: int, heads: npt.NDArray[np.uint16], used_idx: int) -> None: ...
