"""The TX half of the virtio-net device: :class:`TxBatch`, the view a port gets of one batch of chains
the guest made available, with the virtio-net header already skipped.

This module owns how frames are read out of guest memory: lengths as one numpy array (a counting port
never reads a byte), a per-frame view when the frame sits in one segment (zero copy), and a vectorised
gather of the whole batch, and the header-and-frame segment views a header-passing port writes out
with one ``writev``. It also carries what the device needs to return the chains when the port is
done (heads and pool descriptors), so an asynchronous port can complete the batch later.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from rings.memory import GuestMemory
from rings.split import ChainBatch


class TxBatch:
    """One batch of good TX chains handed to a port (implements :class:`nicsim.virtio.port.TxFrames`)."""

    __slots__ = (
        "_complete",
        "_gathered",
        "_lengths",
        "cancelled",
        "chains",
        "completed",
        "descriptors",
        "hdr_len",
        "heads",
        "mem",
        "pair",
        "positions",
        "queue",
    )

    def __init__(
        self,
        *,
        queue: int,
        mem: GuestMemory,
        chains: ChainBatch,
        positions: npt.NDArray[np.int64],
        descriptors: npt.NDArray[np.int32],
        hdr_len: int,
        on_complete: Callable[[TxBatch], None],
    ) -> None:
        self.queue = queue
        self.pair = queue // 2
        self.mem = mem
        self.chains = chains
        self.positions = positions            # chain positions in ``chains`` of the frames handed over
        # Positions are ascending and distinct: as many as there are chains means all of them, in order.
        every = positions.shape[0] == len(chains)
        self.heads = chains.heads if every else chains.heads[positions]  # returned on the used ring
        self.descriptors = descriptors        # pool descriptors tracking those heads
        self.hdr_len = hdr_len
        readable = chains.readable_len if every else chains.readable_len[positions]
        self._lengths = (readable - hdr_len).astype(np.uint32)
        self._complete = on_complete
        self._gathered: tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]] | None = None
        self.completed = False
        self.cancelled = False  # the device returned the chains itself (queue stopped)

    @property
    def count(self) -> int:
        return int(self.positions.shape[0])

    @property
    def lengths(self) -> npt.NDArray[np.uint32]:
        return self._lengths

    def frame(self, i: int) -> npt.NDArray[np.uint8]:
        cb = self.chains
        skip = self.hdr_len
        pieces: list[npt.NDArray[np.uint8]] = []
        for s in cb.segments(int(self.positions[i])):
            if cb.seg_writable[s]:
                break  # §2.7.4.2: writable descriptors follow the readable ones; they carry no frame
            n = int(cb.seg_len[s])
            if skip >= n:
                skip -= n
                continue
            pieces.append(cb.segment_view(self.mem, s)[skip:])
            skip = 0
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, np.uint8)

    def iovec(self, i: int) -> list[npt.NDArray[np.uint8]]:
        # The header goes along unchanged (§5.1.6.2: its flags/gso fields ask the other side for
        # checksum or segmentation), so nothing is skipped; writable segments carry no frame.
        cb = self.chains
        out: list[npt.NDArray[np.uint8]] = []
        for s in cb.segments(int(self.positions[i])):
            if cb.seg_writable[s]:
                break
            out.append(cb.segment_view(self.mem, s))
        return out

    def gather(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        if self._gathered is None:
            data, starts = self.chains.gather_readable(self.mem)
            self._gathered = data, starts[self.positions] + self.hdr_len
        return self._gathered

    def complete(self) -> None:
        if not self.completed:
            self.completed = True
            self._complete(self)
