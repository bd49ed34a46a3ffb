"""What a chain walk hands to the device (virtio 1.2 §2.7.5): a :class:`ChainBatch`, every walked chain
of one batch and its segments as parallel numpy arrays, and the :class:`ErrorCode` that marks a malformed
chain. A bad chain is marked here (``error`` / ``errors``), not raised, so the rest of the batch goes on
and its head can still be returned on the used ring with length 0. This module reads and writes guest
memory only through the :class:`~rings.memory.GuestMemory` a caller passes in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .errors import ChainError, GuestMemoryError
from .memory import GuestMemory


class ErrorCode(enum.IntEnum):
    """Why a chain in a ChainBatch is bad (``ChainBatch.error``); 0 means good."""

    OK = 0
    DESCRIPTOR_INDEX = 1  # DescriptorIndexError
    LOOP = 2  # DescriptorLoopError
    NESTED_INDIRECT = 3  # NestedIndirectError
    INDIRECT_LENGTH = 4  # IndirectLengthError
    CHAIN_TOO_LONG = 5  # ChainTooLongError
    DESCRIPTOR_ORDER = 6  # DescriptorOrderError
    GUEST_MEMORY = 7  # GuestMemoryError


@dataclass(frozen=True, kw_only=True, eq=False)
class ChainBatch:
    """``n`` walked chains and their ``m`` segments, chain by chain in walk order.

    Chain ``k`` owns segments ``first_seg[k] : first_seg[k] + seg_count[k]``. A bad chain
    (``error[k] != 0``) has no segments and zero lengths; ``errors[k]`` is its exception. A zero-length
    segment is never translated (``seg_region`` -1). ``seg_desc`` is the descriptor-table index a
    segment came from (for a segment from an indirect table: the descriptor that points at the table).
    """

    heads: npt.NDArray[np.uint16]
    first_seg: npt.NDArray[np.int64]
    seg_count: npt.NDArray[np.int64]
    readable_len: npt.NDArray[np.int64]
    writable_len: npt.NDArray[np.int64]
    error: npt.NDArray[np.uint8]
    errors: dict[int, ChainError | GuestMemoryError] = field(default_factory=dict)
    seg_chain: npt.NDArray[np.int64]
    seg_desc: npt.NDArray[np.int64]
    seg_addr: npt.NDArray[np.uint64]
    seg_len: npt.NDArray[np.uint32]
    seg_writable: npt.NDArray[np.bool_]
    seg_region: npt.NDArray[np.int32]
    seg_offset: npt.NDArray[np.uint64]

    def __len__(self) -> int:
        return int(self.heads.shape[0])

    @property
    def ok(self) -> npt.NDArray[np.bool_]:
        return np.equal(self.error, 0)

    def segments(self, chain: int) -> range:
        """Segment positions of chain ``chain``."""
        start = int(self.first_seg[chain])
        return range(start, start + int(self.seg_count[chain]))

    def segment_view(self, mem: GuestMemory, seg: int) -> npt.NDArray[np.uint8]:
        """The guest bytes of segment ``seg`` as a writable numpy view (no copy)."""
        return mem.segment(int(self.seg_region[seg]), int(self.seg_offset[seg]), int(self.seg_len[seg]))

    def gather_readable(self, mem: GuestMemory) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """Every chain's device-readable bytes, concatenated into one array (TX path). Returns
        ``(data, starts)``: chain ``k`` is ``data[starts[k] : starts[k] + readable_len[k]]``."""
        readable = ~self.seg_writable
        lens = np.where(readable, self.seg_len, 0).astype(np.int64)
        data = mem.gather(self.seg_region, self.seg_offset, lens)
        rl = self.readable_len.astype(np.int64)
        return data, np.cumsum(rl) - rl
