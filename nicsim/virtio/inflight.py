"""The interface the device calls to track what is in flight (vhost-user "Inflight I/O tracking").

The device defines it and calls it; the asyncio shell implements it (``nicsim.server.inflight_fd``'s
``InflightStore`` over the shared memfd, in the split or the packed layout), so the device never
imports the shell. Every call passes the ring, so a packed layout can read what it saves (the
descriptors of the last pop, the used position ``push_used`` will leave) and a split one the used
index; every call takes a whole batch.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from rings.memory import GuestMemory


class TrackedQueue(Protocol):
    """What the hooks are handed of a ring: the device's queue, split (``rings.split.SplitQueue``) or
    packed (``rings.packed.PackedQueue``); a store looks at which it is before using more of it."""

    index: int
    used_idx: int


class InflightHooks(Protocol):
    """What the device tells the inflight buffer (called on the event loop, inside device calls)."""

    def popped(self, index: int, q: TrackedQueue, mem: GuestMemory, heads: npt.NDArray[np.uint16]) -> None:
        """``heads`` were just popped (the whole of ``q``'s last pop) and stay in flight past this
        call (TX): record them before acting on them."""
        ...

    def filling(self, index: int, q: TrackedQueue, mem: GuestMemory, heads: npt.NDArray[np.uint16]) -> None:
        """``heads``, the first chains of ``q``'s last pop, are published in this same call (RX) and
        were not recorded at the pop. A split layout needs nothing (its avail ring is never
        overwritten, so a crash simply reads them again); a packed one records them now, since
        ``push_used`` is about to overwrite their descriptors in the ring."""
        ...

    def before_used(self, index: int, q: TrackedQueue, heads: npt.NDArray[np.uint16]) -> None:
        """``q.push_used(heads, ...)`` comes next."""
        ...

    def after_used(self, index: int, q: TrackedQueue, heads: npt.NDArray[np.uint16]) -> None:
        """``q.push_used(heads, ...)`` is done (the used index / flags are published)."""
        ...
