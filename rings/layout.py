"""The split virtqueue's memory layout (virtio 1.2 §2.7): the descriptor as a little-endian numpy
structured dtype, the flag bits, ring sizes and alignments, and the EVENT_IDX comparison
``vring_need_event``.

This module owns only definitions: nothing here touches memory. Both sides use it: the device
(``rings.split``, ``rings.walker``) and the driver model (``rings.driver``).
"""

from __future__ import annotations

import numpy as np

# §2.7.5 struct virtq_desc: every field little-endian, 16 bytes.
DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
DESC_SIZE = DESC_DTYPE.itemsize  # 16: an indirect table's length must be a multiple of it (§2.7.5.3.1)

# §2.7.5 descriptor flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# §2.7.6 / §2.7.8 ring flags (the non-EVENT_IDX notification hints).
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# §2.7 alignment requirements of the three parts.
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

MAX_QUEUE_SIZE = 32768  # §2.6: the maximum Queue Size; split queues need a power of 2 (§2.7)

U16_MASK = 0xFFFF


def split_ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, avail ring, used ring) for a queue of ``size`` (§2.7 table)."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


def is_valid_queue_size(size: int) -> bool:
    """A split queue's size is a power of 2 between 1 and 32768 (§2.7)."""
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.7.2 / §2.7.10: with EVENT_IDX, notify iff ``event_idx`` lies in ``[old_idx, new_idx)``
    (all u16, wrapping): the other side asked to hear once the index passes ``event_idx``."""
    return ((new_idx - event_idx - 1) & U16_MASK) < ((new_idx - old_idx) & U16_MASK)
