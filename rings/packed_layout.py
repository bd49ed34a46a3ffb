"""The packed virtqueue's memory layout (virtio 1.2 §2.8): the descriptor as a little-endian numpy
structured dtype, the AVAIL/USED flag bits and the wrap counters they encode, the event suppression
structure, sizes and alignments, and the packed form of the EVENT_IDX comparison.

This module owns only definitions and pure arithmetic: nothing here touches memory. Both sides use it:
the device (``rings.packed``) and the driver model (``rings.driver_packed``). The NEXT, WRITE and
INDIRECT bits are the split ring's (``rings.layout``), with the same values (§2.8.6, §2.8.7).
"""

from __future__ import annotations

import numpy as np

# §2.8.13 struct pvirtq_desc: every field little-endian, 16 bytes; id before flags.
PDESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])
PDESC_SIZE = PDESC_DTYPE.itemsize  # 16: an indirect table's length must be a multiple of it

# §2.8.1 the two flags that mark a descriptor available (AVAIL == wrap, USED != wrap) or used
# (AVAIL == USED == the device's wrap counter).
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
AVAIL_USED_MASK = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED

# §2.8.10 Descriptor Ring Change Event Flags (the low 2 bits of pvirtq_event_suppress.flags).
RING_EVENT_FLAGS_ENABLE = 0x0
RING_EVENT_FLAGS_DISABLE = 0x1
RING_EVENT_FLAGS_DESC = 0x2  # only valid with VIRTIO_F_EVENT_IDX; 0x3 is reserved
RING_EVENT_FLAGS_MASK = 0x3

# §2.8.14 struct pvirtq_event_suppress: le16 desc (offset : 15, wrap : 1), le16 flags.
EVENT_OFF_WRAP = 0  # u16 index of the off_wrap word
EVENT_FLAGS = 1  # u16 index of the flags word
EVENT_WRAP_BIT = 1 << 15
EVENT_OFF_MASK = 0x7FFF

# §2.8.10.1 alignments of the three parts.
PDESC_ALIGN = 16
EVENT_ALIGN = 4
EVENT_SIZE = 4

MAX_PACKED_QUEUE_SIZE = 1 << 15  # §2.8: "up to 2^15 entries"; any size, not only powers of 2


def avail_flags(wrap: int) -> int:
    """The AVAIL/USED bits of a descriptor the driver makes available with wrap counter ``wrap``
    (§2.8.1: AVAIL matches the counter, USED its inverse)."""
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


def used_flags(wrap: int) -> int:
    """The AVAIL/USED bits of a descriptor the device marks used with wrap counter ``wrap`` (§2.8.1:
    both match the counter)."""
    return AVAIL_USED_MASK if wrap else 0


def is_valid_packed_size(size: int) -> bool:
    """A packed queue holds 1 to 2^15 descriptors, any number (§2.8, §2.8.10.1)."""
    return 0 < size <= MAX_PACKED_QUEUE_SIZE


def advance(pos: int, wrap: int, count: int, size: int) -> tuple[int, int]:
    """Ring position and wrap counter ``count`` (0 <= count <= size) descriptors after ``(pos, wrap)``:
    the counter flips on passing the end of the ring (§2.8.1)."""
    pos += count
    if pos >= size:
        return pos - size, wrap ^ 1
    return pos, wrap


def off_wrap(pos: int, wrap: int) -> int:
    """The event suppression ``desc`` word for descriptor ``pos`` with wrap counter ``wrap``."""
    return (pos & EVENT_OFF_MASK) | (EVENT_WRAP_BIT if wrap else 0)


def packed_need_event(event: int, new_pos: int, new_wrap: int, moved: int, size: int) -> bool:
    """§2.8.10: with RING_EVENT_FLAGS_DESC, notify iff the descriptor named by ``event`` (an off_wrap
    word) is among the ``moved`` descriptors just made available / used, the last of which ends at
    ``(new_pos, new_wrap)``.

    The event is placed on a line with the current lap at 0 .. size - 1 and the previous lap just
    below 0 (its wrap counter differs from ``new_wrap``); the descriptors passed are
    ``[new_pos - moved, new_pos)``. Linux ``virtqueue_kick_prepare_packed`` and DPDK
    ``vhost_vring_call_packed`` compute the same with u16 arithmetic (except for an offset past the
    end of the ring, which names no descriptor and so never fires here). From a full lap on every
    descriptor has been used, so every valid event has been passed.
    """
    off = event & EVENT_OFF_MASK
    if moved <= 0 or off >= size:
        return False  # an offset past the end names no descriptor (the driver's bug): never used
    if moved >= size:
        return True
    if bool(event & EVENT_WRAP_BIT) != bool(new_wrap):
        off -= size
    return new_pos - moved <= off < new_pos
