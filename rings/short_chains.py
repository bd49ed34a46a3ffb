"""Reading a short chain with plain Python ints (virtio 1.2 §2.7.5): the scalar companion of
``rings.walker`` for rounds of a few chains, where one numpy call (about a microsecond on a small
array) costs more than reading a 16-byte descriptor with ``struct``.

This module owns :class:`ShortChain` and :func:`walk_short`. It accepts only the shapes a NIC driver
posts every packet (a chain of at most :data:`MAX_SHORT_DESCS` descriptors, direct or all in the
indirect table its head points at, every non-empty one inside one memory region, the readable ones
before the writable ones) and answers None for anything else: a longer chain, an indirect descriptor
behind a direct one, and every malformed chain. None changes nothing, so the caller then walks the
same chain with ``rings.walker``, which marks each error with its code; the rules for the good shapes
are the walker's, so both give the same segments.
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
    """One good short chain. ``segments`` are ``(region, offset, length)`` in chain order (region -1
    for a zero-length descriptor, which is never translated); the first ``len(segments) - writable``
    are device-readable, the rest device-writable. ``addr`` is the first segment's address (what the
    pool records)."""

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
    None when it is not a good chain of at most ``MAX_SHORT_DESCS`` descriptors: direct, or (with
    ``indirect``) a head whose indirect table chains that many entries.

    With ``indirect`` False (VIRTIO_F_INDIRECT_DESC not negotiated) the INDIRECT flag is ignored, as
    the walker ignores it. An indirect descriptor after a direct one is left to the walker.
    """
    if head >= size:  # §2.7.5.2: heads index the descriptor table
        return None
    desc = _DESC.unpack_from(table, DESC_SIZE * head)
    if indirect and desc[2] & VIRTQ_DESC_F_INDIRECT:
        return _indirect(mem, size, head, desc[0], desc[1])
    descs = [desc]
    while desc[2] & VIRTQ_DESC_F_NEXT:
        d = desc[3]
        if len(descs) == MAX_SHORT_DESCS or d >= size:  # too long (a loop is), or next out of the table
            return None
        desc = _DESC.unpack_from(table, DESC_SIZE * d)
        if indirect and desc[2] & VIRTQ_DESC_F_INDIRECT:
            return None
        descs.append(desc)
    return build_short_chain(mem, head, descs)


def _indirect(mem: GuestMemory, size: int, head: int, addr: int, length: int) -> ShortChain | None:
    """The chain in the indirect table ``[addr, addr + length)`` of head ``head`` (§2.7.5.3)."""
    # §2.7.5.3.1: the table holds whole descriptors, at least one, and lies in guest memory.
    if length == 0 or length % DESC_SIZE:
        return None
    where = mem.translate_one(addr, length)
    if where is None:
        return None
    raw = mem.segment(where[0], where[1], length).data
    count = length // DESC_SIZE
    # The whole chain, this table's entries included, is at most Queue Size long (the head is 1 of it
    # and does not count: the walker's bound is min(count, size - depth of the head), depth 0).
    limit = min(count, size)
    desc = _DESC.unpack_from(raw, 0)
    descs = []
    while True:
        if desc[2] & VIRTQ_DESC_F_INDIRECT:  # §2.7.5.3.1: no indirect descriptor inside a table
            return None
        descs.append(desc)
        if not desc[2] & VIRTQ_DESC_F_NEXT:
            return build_short_chain(mem, head, descs)
        j = desc[3]
        if len(descs) == MAX_SHORT_DESCS or j >= count or len(descs) >= limit:
            return None
        desc = _DESC.unpack_from(raw, DESC_SIZE * j)


def build_short_chain(
    mem: GuestMemory, head: int, descs: list[tuple[int, int, int, int]]
) -> ShortChain | None:
    """The chain of ``descs`` (addr, len, flags, next), if its order, length and memory are good. Only
    WRITE is looked at in the flags (``rings.packed_short`` builds packed chains with it too)."""
    segments: list[tuple[int, int, int]] = []
    readable = writable_len = writable = 0
    for addr, length, flags, _ in descs:
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
        segments.append((where[0], where[1], length))
    # The used ring's len is u32: a chain may not describe more than 2^32 - 1 bytes.
    if readable + writable_len > U32_MAX:
        return None
    return ShortChain(head, descs[0][0], readable, writable_len, writable, tuple(segments))
