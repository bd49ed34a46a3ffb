"""The TX batch of a short round (a few chains, read with plain ints by ``rings.short_chains``): what a
port sees of it is exactly what :class:`~nicsim.virtio.tx.TxBatch` shows for the same chains.

This module owns :class:`ShortTxBatch`, the :class:`~nicsim.virtio.port.TxFrames` the TX path hands a
port for a round that took the scalar path: every chain good, short, device-readable only, at least a
virtio-net header and an Ethernet header long (anything else went down the numpy path). Its numpy
arrays (lengths, the heads and descriptors a deferred completion returns) are built only when asked
for: a port that reads a frame or two (the responder) never pays for them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from rings.memory import GuestMemory
from rings.short_chains import ShortChain


class ShortTxBatch:
    """A short round's frames handed to a port (implements :class:`nicsim.virtio.port.TxFrames`)."""

    __slots__ = (
        "_complete",
        "_lengths",
        "cancelled",
        "chains",
        "completed",
        "desc_list",
        "hdr_len",
        "mem",
        "pair",
        "queue",
    )

    def __init__(
        self,
        *,
        queue: int,
        mem: GuestMemory,
        chains: list[ShortChain],
        descriptors: list[int],
        hdr_len: int,
        on_complete: Callable[[ShortTxBatch], None],
    ) -> None:
        self.queue = queue
        self.pair = queue // 2
        self.mem = mem
        self.chains = chains
        self.desc_list = descriptors  # pool descriptors tracking the chains, in order
        self.hdr_len = hdr_len
        self._complete = on_complete
        self._lengths: npt.NDArray[np.uint32] | None = None
        self.completed = False
        self.cancelled = False  # the device returned the chains itself (queue stopped)

    @property
    def count(self) -> int:
        return len(self.chains)

    @property
    def head_list(self) -> list[int]:
        return [c.head for c in self.chains]

    @property
    def heads(self) -> npt.NDArray[np.uint16]:
        """The heads as the used ring gets them when a deferred batch comes back."""
        return np.array(self.head_list, np.uint16)

    @property
    def descriptors(self) -> npt.NDArray[np.int32]:
        return np.array(self.desc_list, np.int32)

    def byte_sum(self) -> None:
        return None  # a few frames: the sink gathers them

    @property
    def frame_bytes(self) -> int:
        """Bytes of all frames, headers excluded (the sum of :attr:`lengths`), without numpy."""
        return sum(c.readable_len for c in self.chains) - self.hdr_len * len(self.chains)

    @property
    def lengths(self) -> npt.NDArray[np.uint32]:
        if self._lengths is None:
            self._lengths = np.array([c.readable_len - self.hdr_len for c in self.chains], np.uint32)
        return self._lengths

    def frame(self, i: int) -> npt.NDArray[np.uint8]:
        skip = self.hdr_len
        pieces: list[npt.NDArray[np.uint8]] = []
        for region, offset, n in self.chains[i].segments:
            if skip >= n:
                skip -= n
                continue
            pieces.append(self.mem.segment(region, offset, n)[skip:])
            skip = 0
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, np.uint8)

    def iovec(self, i: int) -> list[npt.NDArray[np.uint8]]:
        # The header goes along unchanged (§5.1.6.2), as TxBatch.iovec gives it.
        return [self.mem.segment(r, o, n) for r, o, n in self.chains[i].segments]

    def gather(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        views = [self.mem.segment(r, o, n) for c in self.chains for r, o, n in c.segments]
        data = np.concatenate(views) if views else np.empty(0, np.uint8)
        starts: list[int] = []
        at = self.hdr_len
        for c in self.chains:
            starts.append(at)
            at += c.readable_len
        return data, np.array(starts, np.int64)

    def complete(self) -> None:
        if not self.completed:
            self.completed = True
            self._complete(self)
