"""Reading a short chain of a packed ring with plain Python ints (virtio 1.2 §2.8): the scalar companion
of the batched walk in ``rings.packed`` for rounds of a few chains, as ``rings.short_chains`` is for the
split ring, and returning the same :class:`~rings.short_chains.ShortChain`.

This module owns :func:`peek_short_packed`. It accepts only what a NIC driver posts every packet: a
chain of at most :data:`~rings.short_chains.MAX_SHORT_DESCS` descriptors in the ring, or one indirect
descriptor whose table holds that many, every one available, translated and in order; anything else
(a longer chain, and every malformed one) is None, and the caller walks the round with
``PackedQueue.pop_chains``, which marks each error. It reads the ring and never writes it.
"""

from __future__ import annotations

import struct

from .layout import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT
from .memory import GuestMemory
from .packed_layout import AVAIL_USED_MASK, PDESC_SIZE, advance, avail_flags
from .short_chains import MAX_SHORT_DESCS, ShortChain, build_short_chain

_PDESC = struct.Struct("<QIHH")  # §2.8.13 struct pvirtq_desc: addr, len, id, flags (little-endian)


def peek_short_packed(
    mem: GuestMemory, ring: memoryview, size: int, pos: int, wrap: int, count: int, *, indirect: bool
) -> tuple[list[ShortChain], list[int]] | None:
    """The next ``count`` chains from ring position ``pos`` with wrap counter ``wrap`` and how many
    ring descriptors each takes, if every one is a good short chain; else None. ``ring`` is the raw
    bytes of the descriptor ring of ``size`` entries."""
    chains: list[ShortChain] = []
    ndescs: list[int] = []
    for _ in range(count):
        descs: list[tuple[int, int, int, int]] = []
        taken = 0
        while True:
            addr, length, buf_id, flags = _PDESC.unpack_from(ring, PDESC_SIZE * pos)
            if flags & AVAIL_USED_MASK != avail_flags(wrap):  # §2.8.1: not available (yet)
                return None
            pos, wrap = advance(pos, wrap, 1, size)
            taken += 1
            if indirect and flags & VIRTQ_DESC_F_INDIRECT:
                if descs or flags & VIRTQ_DESC_F_NEXT:  # §2.8.19: not in a NEXT-linked list
                    return None
                table = _indirect(mem, size, addr, length)
                if table is None:
                    return None
                descs = table
                break
            descs.append((addr, length, flags, 0))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if taken >= min(MAX_SHORT_DESCS, size):
                return None
        chain = build_short_chain(mem, buf_id, descs)  # §2.8.6: the id is the last descriptor's
        if chain is None:
            return None
        chains.append(chain)
        ndescs.append(taken)
    return chains, ndescs


def _indirect(mem: GuestMemory, size: int, addr: int, length: int) -> list[tuple[int, int, int, int]] | None:
    """The entries of the indirect table ``[addr, addr + length)`` (§2.8.7): every one, in order; only
    WRITE counts in their flags (the rest are reserved, ignored)."""
    if length == 0 or length % PDESC_SIZE or length // PDESC_SIZE > min(size, MAX_SHORT_DESCS):
        return None
    where = mem.translate_one(addr, length)
    if where is None:
        return None
    raw = mem.segment(where[0], where[1], length).data
    return [
        (e_addr, e_len, e_flags, 0)
        for e_addr, e_len, _, e_flags in (
            _PDESC.unpack_from(raw, PDESC_SIZE * j) for j in range(length // PDESC_SIZE)
        )
    ]
