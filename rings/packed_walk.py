"""Walking packed-ring chains in batches (virtio 1.2 §2.8): what a scan of the ring found
(:class:`PackedPop`) becomes a :class:`~rings.chains.ChainBatch`. A packed chain is consecutive in the
ring, so every descriptor of every chain is read at once (no lockstep over depths), then every indirect
table at once; the checks shared with the split ring are the walker's :class:`~rings.walker.
ChainAssembler`. The same walk takes descriptors saved outside the ring (:class:`SavedChains`, inflight
resubmission). This module reads only what it is handed; ``rings.packed`` owns the ring.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from .chains import ChainBatch, ErrorCode
from .errors import GuestMemoryError
from .layout import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_WRITE
from .memory import GuestMemory
from .packed_layout import PDESC_DTYPE, PDESC_SIZE
from .walker import ChainAssembler


class PackedPop(NamedTuple):
    """Chains found available, in ring order: buffer ``ids`` (from each chain's last descriptor,
    §2.8.6), ring position of each chain's first descriptor (``starts``), descriptors each takes in
    the ring (``ndesc``), and ``unended``: the chain fills the whole ring and still has NEXT on its last
    descriptor (longer than the queue size, §2.8.17)."""

    ids: npt.NDArray[np.uint16]
    starts: npt.NDArray[np.int64]
    ndesc: npt.NDArray[np.int64]
    unended: npt.NDArray[np.bool_]


class Descriptors(Protocol):
    """Descriptor fields indexed by position: the ring's views, or saved descriptors."""

    @property
    def d_addr(self) -> npt.NDArray[np.uint64]: ...
    @property
    def d_len(self) -> npt.NDArray[np.uint32]: ...
    @property
    def d_flags(self) -> npt.NDArray[np.uint16]: ...


class SavedChains(NamedTuple):
    """Chains to walk from descriptors saved outside the ring (inflight recovery): buffer ``ids``,
    descriptors per chain ``ndesc``, and the descriptors of all of them back to back."""

    ids: npt.NDArray[np.uint16]
    ndesc: npt.NDArray[np.int64]
    d_addr: npt.NDArray[np.uint64]
    d_len: npt.NDArray[np.uint32]
    d_flags: npt.NDArray[np.uint16]


EMPTY_SAVED = SavedChains(
    ids=np.empty(0, np.uint16),
    ndesc=np.empty(0, np.int64),
    d_addr=np.empty(0, np.uint64),
    d_len=np.empty(0, np.uint32),
    d_flags=np.empty(0, np.uint16),
)


def split_saved(chains: SavedChains, count: int) -> tuple[SavedChains, SavedChains]:
    """The first ``count`` chains of ``chains`` and the rest, each with its own descriptors."""
    k = max(0, min(count, int(chains.ids.shape[0])))
    cut = int(chains.ndesc[:k].sum())
    head = SavedChains(ids=chains.ids[:k], ndesc=chains.ndesc[:k], d_addr=chains.d_addr[:cut],
                       d_len=chains.d_len[:cut], d_flags=chains.d_flags[:cut])  # fmt: skip
    rest = SavedChains(ids=chains.ids[k:], ndesc=chains.ndesc[k:], d_addr=chains.d_addr[cut:],
                       d_len=chains.d_len[cut:], d_flags=chains.d_flags[cut:])  # fmt: skip
    return head, rest


NO_POP = PackedPop(
    ids=np.empty(0, np.uint16),
    starts=np.empty(0, np.int64),
    ndesc=np.empty(0, np.int64),
    unended=np.empty(0, np.bool_),
)


def walk_packed(
    mem: GuestMemory, v: Descriptors, pop: PackedPop, *, queue: int, indirect: bool, size: int
) -> ChainBatch:
    """The ChainBatch of the chains in ``pop``: every descriptor of every chain at once (a packed
    chain is consecutive in the ring, so there is no lockstep), then every indirect table at once.
    ``v`` is the ring, or (resubmission) descriptors saved elsewhere, read circularly from each
    chain's start; ``size`` is the queue size that bounds lists and indirect tables."""
    ring_len = max(1, int(v.d_addr.shape[0]))
    asm = ChainAssembler(mem, pop.ids, queue=queue)
    n = pop.ids.shape[0]
    if n == 0:
        return asm.assemble(*_EMPTY_SEGMENTS, ordered=True)
    ndesc = np.minimum(pop.ndesc, size)
    if bool((ndesc == 1).all()) and not pop.unended.any():
        # The common case (a NIC's RX buffers, a TX frame behind its header): every chain is one
        # descriptor; unless one is INDIRECT, only translation can fail.
        pos = pop.starts % ring_len
        flags = v.d_flags[pos]
        if not (indirect and np.count_nonzero(flags & VIRTQ_DESC_F_INDIRECT)):
            return asm.assemble_single(pos, v.d_addr[pos], v.d_len[pos], flags)
    for c in np.flatnonzero(pop.unended).tolist():
        # §2.8.17: a list is never longer than the Queue Size (so never loops round the ring).
        d = int(pop.starts[c])
        asm.fail(c, ErrorCode.LOOP, d, f"the chain from descriptor {d} still continues after {size}")
    total = int(ndesc.sum())
    chain = np.repeat(np.arange(n, dtype=np.int64), ndesc)
    first = np.cumsum(ndesc) - ndesc
    depth = np.arange(total, dtype=np.int64) - first[chain]
    pos = (pop.starts[chain] + depth) % ring_len
    flags = v.d_flags[pos]
    ind_c = np.empty(0, np.int64)
    if indirect:
        is_ind = (flags & VIRTQ_DESC_F_INDIRECT) != 0
        if is_ind.any():
            multi = is_ind & (ndesc[chain] > 1)
            for p in np.flatnonzero(multi).tolist():
                # §2.8.19: the driver MUST NOT put an INDIRECT descriptor in a NEXT-linked list.
                c, d = int(chain[p]), int(pos[p])
                asm.fail(c, ErrorCode.NESTED_INDIRECT, d, f"indirect descriptor {d} is part of a chain")
            single = is_ind & ~multi
            ind_c = chain[single]
            keep = ~is_ind
            chain, depth, pos, flags = chain[keep], depth[keep], pos[keep], flags[keep]
    addr, length = v.d_addr[pos], v.d_len[pos]
    if ind_c.shape[0] == 0:
        return asm.assemble(chain, pos, depth, addr, length, flags, ordered=True)
    i_chain, i_pos, i_depth, i_addr, i_len, i_flags = _walk_indirect(
        mem, v, asm, ind_c, pop.starts[ind_c], size
    )
    return asm.assemble(
        np.concatenate((chain, i_chain)), np.concatenate((pos, i_pos)), np.concatenate((depth, i_depth)),
        np.concatenate((addr, i_addr)), np.concatenate((length, i_len)), np.concatenate((flags, i_flags)),
        ordered=False,
    )  # fmt: skip


_EMPTY_SEGMENTS = (
    np.empty(0, np.int64),
    np.empty(0, np.int64),
    np.empty(0, np.int64),
    np.empty(0, np.uint64),
    np.empty(0, np.uint32),
    np.empty(0, np.uint16),
)


def _walk_indirect(
    mem: GuestMemory,
    v: Descriptors,
    asm: ChainAssembler,
    ind_c: npt.NDArray[np.int64],
    ind_d: npt.NDArray[np.int64],
    size: int,
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.uint64],
    npt.NDArray[np.uint32],
    npt.NDArray[np.uint16],
]:
    """The segments of the chains ``ind_c`` whose one descriptor (at ring position ``ind_d``) points at
    an indirect table (§2.8.7): every entry of the table in order; WRITE is the only flag that counts
    in an entry, the rest are reserved and ignored, and so is the entry's id."""
    taddr = v.d_addr[ind_d]
    tlen = v.d_len[ind_d].astype(np.int64)
    count = tlen // PDESC_SIZE
    # The table holds whole descriptors, at least one, and (§2.8.17, a list no longer than the
    # Queue Size) at most the queue size of them.
    badlen = (tlen == 0) | (tlen % PDESC_SIZE != 0) | (count > size)
    for c, d, n in zip(ind_c[badlen].tolist(), ind_d[badlen].tolist(), tlen[badlen].tolist(), strict=True):
        why = f"indirect table length {n} is not a positive multiple of 16 up to 16 * {size}"
        asm.fail(c, ErrorCode.INDIRECT_LENGTH, d, why)
    region, offset, ok = mem.translate_batch(taddr, tlen)
    for i in np.flatnonzero(~ok & ~badlen).tolist():
        exc = GuestMemoryError(
            int(taddr[i]), int(tlen[i]), queue=asm.queue, descriptor=int(ind_d[i]),
            reason="an indirect table outside guest memory",
        )  # fmt: skip
        asm.fail_memory(int(ind_c[i]), exc)
    ok &= ~badlen
    c, d, count = ind_c[ok], ind_d[ok], count[ok]
    raw = mem.gather(region[ok], offset[ok], tlen[ok])
    ent = raw.view(PDESC_DTYPE)
    chain = np.repeat(c, count)
    first = np.cumsum(count) - count
    depth = np.arange(chain.shape[0], dtype=np.int64) - np.repeat(first, count)
    flags = (ent["flags"] & VIRTQ_DESC_F_WRITE).astype(np.uint16)
    return chain, np.repeat(d, count), depth, ent["addr"].copy(), ent["len"].copy(), flags
