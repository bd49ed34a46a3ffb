"""Reading a short chain with plain Python ints (virtio 1.2 §2.7.5): the scalar companion of
``rings.walker`` for rounds of a few chains, where one numpy call (about a microsecond on a small
array) costs more than reading a 16-byte descriptor with ``struct``.

This module owns :class:`ShortChain` and :func:`walk_short`. It accepts only the shapes a NIC driver
posts every packet (a direct chain of at most :data:`MAX_SHORT_DESCS` descriptors, every non-empty
one inside one memory region, the readable ones before the writable ones) and answers None for
anything else: an indirect descriptor, a longer chain, and every malformed chain. None changes
nothing, so the caller then walks the same chain with ``rings.walker``, which marks each error with
its code; the rules for the good shapes are the walker's, so both give the same segments.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .layout import DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from .memory import GuestMemory

MAX_SHORT_DESCS = 2
"""The longest chain read here: a frame in one descriptor, or a header and a frame in two."""

U32_MAX = 0xFFFF_FFFF

_DESC = struct.Struct("<QIHH")  # §2.7.5 struct virtq_desc: addr, len, flags, next (little-endian)


class ShortChain(NamedTuple):
    """One good direct chain. ``segments`` are ``(region, offset, length)`` in chain order (region -1
    for a zero-length descriptor, which is never translated); the first ``len(segments) - writable``
    are device-readable, the rest device-writable. ``addr`` is the head descriptor's address."""

    head: int
    addr: int
    readable_len: int
    writable_len: int
    writable: int
    segments: tuple[tuple[int, int, int], ...]


def walk_short(
    mem: GuestMemory, table: memoryview, size: int, head: int, *, indirect: bool
) -> ShortChain | None:
    """The chain at ``head`` of a descriptor table of ``size`` entries (``table``: its raw bytes), or
    None when it is not a good direct chain of at most ``MAX_SHORT_DESCS`` descriptors.

    With ``indirect`` False (VIRTIO_F_INDIRECT_DESC not negotiated) the INDIRECT flag is ignored, as
    the walker ignores it; with it True an indirect descriptor is left to the walker.
    """
    stop = VIRTQ_DESC_F_INDIRECT if indirect else 0
    segments: list[tuple[int, int, int]] = []
    readable = writable_len = writable = 0
    first = 0
    d = head
    for _ in range(MAX_SHORT_DESCS):
        if d >= size:  # §2.7.5.2: heads and next index the descriptor table
            return None
        addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * d)
        if flags & stop:
            return None
        if flags & VIRTQ_DESC_F_WRITE:
            writable_len += length
            writable += 1
        elif writable:  # §2.7.4.2: device-readable after device-writable
            return None
        else:
            readable += length
        where = mem.translate_one(addr, length)
        if where is None:
            return None
        if not segments:
            first = addr
        segments.append((where[0], where[1], length))
        if not flags & VIRTQ_DESC_F_NEXT:
            # The used ring's len is u32: a chain may not describe more than 2^32 - 1 bytes.
            if readable + writable_len > U32_MAX:
                return None
            return ShortChain(head, first, readable, writable_len, writable, tuple(segments))
        d = nxt
    return None  # longer than MAX_SHORT_DESCS (a loop is one of those)
