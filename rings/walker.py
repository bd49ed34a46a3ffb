"""The chain walker (virtio 1.2 §2.7.5): turns a batch of avail heads into a ChainBatch.

It walks every chain of the batch in lockstep, one numpy step per chain depth over the descriptor table,
and the indirect tables of the batch the same way, one step per table entry. Every walk is bounded by
the queue size, every segment is translated through the :class:`~rings.memory.GuestMemory` in full, and
a malformed chain is marked with an :class:`~rings.chains.ErrorCode` rather than raised. The walker
reads only the descriptor table it is handed (:class:`DescriptorTable`); the queue that owns the table
(``rings.split``) calls it, never the other way round.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from .chains import ChainBatch, ErrorCode
from .errors import (
    ChainError,
    ChainTooLongError,
    DescriptorIndexError,
    DescriptorLoopError,
    DescriptorOrderError,
    GuestMemoryError,
    IndirectLengthError,
    NestedIndirectError,
)
from .layout import DESC_DTYPE, DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from .memory import GuestMemory

U32_MAX = 0xFFFF_FFFF

_DESC_BYTES = np.arange(DESC_SIZE, dtype=np.int64)
# 0, 1, 2... and 1, 1, 1... for any batch (at most a queue size, 32768), sliced instead of built per
# batch; read-only, so a ChainBatch that shares a slice can never have it changed under it.
_IOTA = np.arange(32768, dtype=np.int64)
_IOTA.flags.writeable = False
_ONES = np.ones(32768, dtype=np.int64)
_ONES.flags.writeable = False

_ERROR_CLASS: dict[ErrorCode, type[ChainError]] = {
    ErrorCode.DESCRIPTOR_INDEX: DescriptorIndexError,
    ErrorCode.LOOP: DescriptorLoopError,
    ErrorCode.NESTED_INDIRECT: NestedIndirectError,
    ErrorCode.INDIRECT_LENGTH: IndirectLengthError,
    ErrorCode.CHAIN_TOO_LONG: ChainTooLongError,
    ErrorCode.DESCRIPTOR_ORDER: DescriptorOrderError,
}
"""The exception each chain error code stands for (GUEST_MEMORY is a GuestMemoryError)."""


class DescriptorTable(Protocol):
    """The four field views of one queue's descriptor table (§2.7.5), indexed by descriptor."""

    d_addr: npt.NDArray[np.uint64]
    d_len: npt.NDArray[np.uint32]
    d_flags: npt.NDArray[np.uint16]
    d_next: npt.NDArray[np.uint16]


class Segments(NamedTuple):
    """Walked descriptors, one entry each, in walk order (depth by depth, not yet chain by chain)."""

    chain: npt.NDArray[np.int64]  # position in the batch of the chain it belongs to
    desc: npt.NDArray[np.int64]  # descriptor-table index; for an indirect entry, its INDIRECT descriptor
    depth: npt.NDArray[np.int64]  # position within its chain, indirect entries included
    addr: npt.NDArray[np.uint64]
    length: npt.NDArray[np.uint32]
    flags: npt.NDArray[np.uint16]

    @classmethod
    def concat(cls, parts: list[Segments]) -> Segments:
        return cls._make(np.concatenate(column) for column in zip(*parts, strict=True))


def _linear_tables(
    datas: list[npt.NDArray[np.uint8]], c: npt.NDArray[np.int64], d: npt.NDArray[np.int64],
    dep: npt.NDArray[np.int64], reg: npt.NDArray[np.integer[Any]], off: npt.NDArray[np.int64],
    count: npt.NDArray[np.int64], limit: npt.NDArray[np.int64],
) -> Segments | None:
    """Indirect tables (checked to lie in guest memory) that each hold one chain in table order, as
    Linux fills them: entry k chains to k + 1, the last ends the chain, none is indirect, and the chain
    fits the queue (§2.7.5.3.1). Every entry of every table is read at once, so a 64 KB GSO frame's
    table of ~18 entries costs a few numpy steps rather than one step per entry. None when any table
    is not so: the lockstep walk then takes them all, and reports what is wrong."""
    if not c.shape[0] or bool((count > limit).any()):
        return None
    total = int(count.sum())
    first = np.cumsum(count) - count
    k = np.arange(total, dtype=np.int64) - np.repeat(first, count)
    ent = np.empty(total, dtype=DESC_DTYPE)
    raw = ent.view(np.uint8).reshape(-1, DESC_SIZE)
    where = (np.repeat(off, count) + DESC_SIZE * k)[:, None] + _DESC_BYTES
    rows = np.repeat(reg, count)
    for r in np.unique(reg).tolist():
        sel = rows == r
        raw[sel] = datas[r][where[sel]]
    fl = ent["flags"]
    last = k == np.repeat(count - 1, count)
    if bool((fl & VIRTQ_DESC_F_INDIRECT).any()) or bool((((fl & VIRTQ_DESC_F_NEXT) != 0) == last).any()):
        return None
    if bool((ent["next"][~last].astype(np.int64) != k[~last] + 1).any()):
        return None
    return Segments(np.repeat(c, count), np.repeat(d, count), np.repeat(dep, count) + k,
                    ent["addr"], ent["len"], fl)  # fmt: skip


_NO_SEGMENTS = Segments(
    np.empty(0, np.int64),
    np.empty(0, np.int64),
    np.empty(0, np.int64),
    np.empty(0, np.uint64),
    np.empty(0, np.uint32),
    np.empty(0, np.uint16),
)


class ChainAssembler:
    """The half of a batch walk that does not depend on the ring format: marking bad chains (the
    first error found wins) and :meth:`assemble`, which turns walked segments into a ChainBatch with
    the order, length and translation checks. ``heads`` are what the used ring will be given back
    (split: head indices; packed: buffer ids). ``rings.packed`` walks its ring itself and uses this.
    """

    def __init__(self, mem: GuestMemory, heads: npt.NDArray[np.uint16], *, queue: int) -> None:
        self.mem = mem
        self.queue = queue
        self.heads = heads
        n = heads.shape[0]
        self.n = n
        self.error = np.zeros(n, dtype=np.uint8)
        self.errors: dict[int, ChainError | GuestMemoryError] = {}

    def fail(self, chain: int, code: ErrorCode, descriptor: int, message: str) -> None:
        """Mark ``chain`` bad (the first error found wins) with the exception class ``code`` names."""
        if self.error[chain] == 0:
            self.error[chain] = code
            self.errors[chain] = _ERROR_CLASS[code](message, queue=self.queue, descriptor=descriptor)

    def fail_memory(self, chain: int, exc: GuestMemoryError) -> None:
        if self.error[chain] == 0:
            self.error[chain] = ErrorCode.GUEST_MEMORY
            self.errors[chain] = exc

    def assemble(
        self,
        s_chain: npt.NDArray[np.int64],
        s_desc: npt.NDArray[np.int64],
        s_depth: npt.NDArray[np.int64],
        s_addr: npt.NDArray[np.uint64],
        s_len: npt.NDArray[np.uint32],
        s_flags: npt.NDArray[np.uint16],
        ordered: bool,
    ) -> ChainBatch:
        """The ChainBatch of walked segments given in any order: ``s_chain`` the chain (batch
        position), ``s_depth`` the position within it, ``s_desc`` the descriptor each came from, and
        its addr/len/flags (only WRITE is looked at). ``ordered`` says they are already chain by
        chain in depth order. Checks, in this order, what every ring format shares: readable after
        writable (§2.7.4.2, §2.8.17), a total above 2^32 - 1, and every non-empty segment inside guest
        memory; segments of chains already marked bad are dropped."""
        n, qi = self.n, self.queue
        if self.errors:
            keep = self.error[s_chain] == 0
            s_chain, s_desc, s_depth = s_chain[keep], s_desc[keep], s_depth[keep]
            s_addr, s_len, s_flags = s_addr[keep], s_len[keep], s_flags[keep]
        counts = np.bincount(s_chain, minlength=n).astype(np.int64)
        first = np.cumsum(counts) - counts
        if not ordered:
            # Depth-major walk order -> chain-major segment order.
            pos = first[s_chain] + s_depth
            order = np.empty_like(pos)
            order[pos] = np.arange(pos.shape[0], dtype=np.int64)
            s_chain, s_desc = s_chain[order], s_desc[order]
            s_addr, s_len, s_flags = s_addr[order], s_len[order], s_flags[order]
        writable = (s_flags & VIRTQ_DESC_F_WRITE) != 0
        lens64 = s_len.astype(np.float64)  # exact: < 2^32 * 2^16 * ...  well below 2^53
        wlen = np.bincount(s_chain, weights=np.where(writable, lens64, 0.0), minlength=n)
        rlen = np.bincount(s_chain, weights=np.where(writable, 0.0, lens64), minlength=n)
        new_bad = False

        # §2.7.4.2: device-writable descriptors come after all device-readable ones.
        if writable.shape[0] > 1:
            viol = writable[:-1] & ~writable[1:] & (s_chain[:-1] == s_chain[1:])
            if viol.any():
                for p in np.flatnonzero(viol).tolist():
                    c, d = int(s_chain[p + 1]), int(s_desc[p + 1])
                    self.fail(
                        c,
                        ErrorCode.DESCRIPTOR_ORDER,
                        d,
                        f"device-readable descriptor {d} follows a device-writable one",
                    )
                new_bad = True

        # The used ring's len is u32, so a chain may not describe more than 2^32 - 1 bytes.
        too_long = (wlen + rlen) > U32_MAX
        if too_long.any():
            for c in np.flatnonzero(too_long).tolist():
                d = int(self.heads[c])
                self.fail(
                    c,
                    ErrorCode.CHAIN_TOO_LONG,
                    d,
                    f"chain totals {int(wlen[c] + rlen[c])} bytes, above 2^32 - 1",
                )
            new_bad = True

        # Translate every segment at once; zero lengths are left untranslated (CVE-2020-10725).
        region, offset, ok = self.mem.translate_batch(s_addr, s_len)
        if not ok.all():
            for p in np.flatnonzero(~ok).tolist():
                c, d = int(s_chain[p]), int(s_desc[p])
                self.fail_memory(c, GuestMemoryError(int(s_addr[p]), int(s_len[p]), queue=qi, descriptor=d))
            new_bad = True

        if new_bad:
            keep = self.error[s_chain] == 0
            s_chain, s_desc, s_addr, s_len = s_chain[keep], s_desc[keep], s_addr[keep], s_len[keep]
            writable, region, offset = writable[keep], region[keep], offset[keep]
            counts = np.bincount(s_chain, minlength=n).astype(np.int64)
            first = np.cumsum(counts) - counts
            good = self.error == 0
            wlen = np.where(good, wlen, 0.0)
            rlen = np.where(good, rlen, 0.0)
        return ChainBatch(
            heads=self.heads,
            first_seg=first,
            seg_count=counts,
            readable_len=rlen.astype(np.int64),
            writable_len=wlen.astype(np.int64),
            error=self.error,
            errors=self.errors,
            seg_chain=s_chain,
            seg_desc=s_desc,
            seg_addr=s_addr,
            seg_len=s_len,
            seg_writable=writable,
            seg_region=region,
            seg_offset=offset,
        )

    def assemble_single(
        self,
        desc: npt.NDArray[np.int64],
        s_addr: npt.NDArray[np.uint64],
        s_len: npt.NDArray[np.uint32],
        flags: npt.NDArray[np.uint16],
    ) -> ChainBatch:
        """:meth:`assemble` for a batch of one-descriptor chains (no NEXT, no INDIRECT, nothing marked
        yet): chain ``k`` is segment ``k``, descriptor ``desc[k]``; only translation can fail (a
        one-descriptor chain can be neither out of order nor longer than 2^32 - 1 bytes)."""
        n = self.n
        writable = (flags & VIRTQ_DESC_F_WRITE) != 0
        # Zero lengths are left untranslated (CVE-2020-10725).
        region, offset, ok = self.mem.translate_batch(s_addr, s_len)
        lens = s_len.astype(np.int64)
        wlen = np.where(writable, lens, 0)
        s_chain = _IOTA[:n]
        if np.count_nonzero(ok) == n:
            return ChainBatch(
                heads=self.heads, first_seg=s_chain, seg_count=_ONES[:n],
                readable_len=lens - wlen, writable_len=wlen, error=self.error, errors=self.errors,
                seg_chain=s_chain, seg_desc=desc, seg_addr=s_addr, seg_len=s_len, seg_writable=writable,
                seg_region=region, seg_offset=offset,
            )  # fmt: skip
        qi = self.queue
        for p in np.flatnonzero(~ok).tolist():
            exc = GuestMemoryError(int(s_addr[p]), int(s_len[p]), queue=qi, descriptor=int(desc[p]))
            self.fail_memory(p, exc)
        counts = ok.astype(np.int64)
        wlen = np.where(ok, wlen, 0)
        return ChainBatch(
            heads=self.heads, first_seg=np.cumsum(counts) - counts, seg_count=counts,
            readable_len=np.where(ok, lens, 0) - wlen, writable_len=wlen, error=self.error,
            errors=self.errors, seg_chain=s_chain[ok], seg_desc=desc[ok], seg_addr=s_addr[ok],
            seg_len=s_len[ok], seg_writable=writable[ok], seg_region=region[ok], seg_offset=offset[ok],
        )  # fmt: skip


class ChainWalker(ChainAssembler):
    """One batch walk: lockstep over the descriptor table, per chain inside indirect tables.

    ``table`` is the descriptor table of queue ``queue`` (its length is the queue size); ``indirect``
    says whether VIRTIO_F_INDIRECT_DESC was negotiated.
    """

    def __init__(
        self,
        mem: GuestMemory,
        table: DescriptorTable,
        heads: npt.NDArray[np.uint16],
        *,
        queue: int,
        indirect: bool,
    ) -> None:
        super().__init__(mem, heads, queue=queue)
        self.v = table
        self.size = int(table.d_addr.shape[0])
        self.indirect = indirect

    def run(self) -> ChainBatch:
        v, n, size = self.v, self.n, self.size
        cur = self.heads.astype(np.int64)
        if 0 < n <= _IOTA.shape[0] and not np.count_nonzero(cur >= size):
            # The common case (a NIC's RX buffers, a TX frame pushed behind its header): every chain
            # is one descriptor, neither NEXT nor (when negotiated) INDIRECT. One check decides it;
            # then there is no per-depth loop and nothing to reorder.
            f = v.d_flags[cur]
            if not np.count_nonzero(f & self._chain_flags()):
                return self.assemble_single(cur, v.d_addr[cur], v.d_len[cur], f)
        return self._run_lockstep(cur)

    def _run_lockstep(self, cur: npt.NDArray[np.int64]) -> ChainBatch:
        """The general walk of chains starting at ``cur``: one numpy step per chain depth."""
        v, n, size = self.v, self.n, self.size
        alive = np.arange(n, dtype=np.int64)
        bad = cur >= size
        if bad.any():
            for c, d in zip(alive[bad].tolist(), cur[bad].tolist(), strict=True):
                # §2.7.5.2: heads index the descriptor table.
                self.fail(c, ErrorCode.DESCRIPTOR_INDEX, d, f"head {d} is outside a table of {size}")
            alive, cur = alive[~bad], cur[~bad]
        chain_parts: list[npt.NDArray[np.int64]] = []
        desc_parts: list[npt.NDArray[np.int64]] = []
        depth_parts: list[npt.NDArray[np.int64]] = []
        ind: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]] = []
        depth = 0
        while alive.shape[0]:
            if depth == size:
                # §2.7.5.2: a chain has at most Queue Size descriptors; more means a loop.
                for c, d in zip(alive.tolist(), cur.tolist(), strict=True):
                    self.fail(
                        c,
                        ErrorCode.LOOP,
                        d,
                        f"chain still continues at descriptor {d} after {size} descriptors",
                    )
                break
            f = v.d_flags[cur]
            if self.indirect:
                is_ind = (f & VIRTQ_DESC_F_INDIRECT) != 0
                if is_ind.any():
                    ind.append((alive[is_ind], cur[is_ind], depth))
                    keep = ~is_ind
                    alive, cur, f = alive[keep], cur[keep], f[keep]
            chain_parts.append(alive)
            desc_parts.append(cur)
            depth_parts.append(np.full(alive.shape[0], depth, dtype=np.int64))
            more = (f & VIRTQ_DESC_F_NEXT) != 0
            prev = cur[more]
            alive = alive[more]
            cur = v.d_next[prev].astype(np.int64)
            oob = cur >= size
            if oob.any():
                for c, p, d in zip(alive[oob].tolist(), prev[oob].tolist(), cur[oob].tolist(), strict=True):
                    self.fail(
                        c,
                        ErrorCode.DESCRIPTOR_INDEX,
                        p,
                        f"descriptor {p} chains to {d}, outside a table of {size}",
                    )
                alive, cur = alive[~oob], cur[~oob]
            depth += 1

        if len(chain_parts) == 1:
            s_chain, s_desc, s_depth = chain_parts[0], desc_parts[0], depth_parts[0]
        else:
            s_chain = np.concatenate(chain_parts) if chain_parts else np.empty(0, np.int64)
            s_desc = np.concatenate(desc_parts) if desc_parts else np.empty(0, np.int64)
            s_depth = np.concatenate(depth_parts) if depth_parts else np.empty(0, np.int64)
        s_addr = v.d_addr[s_desc]
        s_len = v.d_len[s_desc]
        s_flags = v.d_flags[s_desc]
        if ind:
            extra = self._walk_indirect(
                np.concatenate([a for a, _, _ in ind]),
                np.concatenate([b for _, b, _ in ind]),
                np.concatenate([np.full(a.shape[0], k, np.int64) for a, _, k in ind]),
            )
            s_chain = np.concatenate((s_chain, extra.chain))
            s_desc = np.concatenate((s_desc, extra.desc))
            s_depth = np.concatenate((s_depth, extra.depth))
            s_addr = np.concatenate((s_addr, extra.addr))
            s_len = np.concatenate((s_len, extra.length))
            s_flags = np.concatenate((s_flags, extra.flags))
        # One depth and no indirect tables: segments are already in chain order.
        ordered = len(chain_parts) <= 1 and not ind
        return self.assemble(s_chain, s_desc, s_depth, s_addr, s_len, s_flags, ordered)

    def _chain_flags(self) -> int:
        return VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT if self.indirect else VIRTQ_DESC_F_NEXT

    def _walk_indirect(
        self, ind_c: npt.NDArray[np.int64], ind_d: npt.NDArray[np.int64], ind_depth: npt.NDArray[np.int64]
    ) -> Segments:
        """Walk every indirect table of the batch in lockstep: one numpy step per table entry depth."""
        v, mem, size = self.v, self.mem, self.size
        taddr = v.d_addr[ind_d]
        tlen = v.d_len[ind_d].astype(np.int64)
        # §2.7.5.3.1: an indirect table holds whole descriptors, at least one.
        badlen = (tlen == 0) | (tlen % DESC_SIZE != 0)
        for c, d, n in zip(
            ind_c[badlen].tolist(), ind_d[badlen].tolist(), tlen[badlen].tolist(), strict=True
        ):
            self.fail(
                c, ErrorCode.INDIRECT_LENGTH, d, f"indirect table length {n} is not a positive multiple of 16"
            )
        region, offset, ok = mem.translate_batch(taddr, tlen)
        ok &= ~badlen
        for i in np.flatnonzero(~ok & ~badlen).tolist():
            exc = GuestMemoryError(
                int(taddr[i]),
                int(tlen[i]),
                queue=self.queue,
                descriptor=int(ind_d[i]),
                reason="an indirect table outside guest memory",
            )
            self.fail_memory(int(ind_c[i]), exc)
        c, d, dep = ind_c[ok], ind_d[ok], ind_depth[ok]
        reg, off = region[ok], offset[ok].astype(np.int64)
        count = tlen[ok] // DESC_SIZE
        # §2.7.5.3.1: no chain, counting its indirect entries, is longer than the Queue Size; within
        # that, the walk is bounded by the table's own entry count.
        limit = np.minimum(count, size - dep)
        datas = [r.data for r in mem.regions]
        linear = _linear_tables(datas, c, d, dep, reg, off, count, limit)
        if linear is not None:
            return linear
        j = np.zeros(c.shape[0], dtype=np.int64)
        parts: list[Segments] = []
        steps = 0
        while c.shape[0]:
            ent = np.empty(c.shape[0], dtype=DESC_DTYPE)
            raw = ent.view(np.uint8).reshape(-1, DESC_SIZE)
            where = (off + DESC_SIZE * j)[:, None] + _DESC_BYTES
            r0 = int(reg[0])
            if (reg == r0).all():
                raw[:] = datas[r0][where]
            else:
                for r in np.unique(reg).tolist():
                    sel = reg == r
                    raw[sel] = datas[r][where[sel]]
            fl = ent["flags"]
            nested = (fl & VIRTQ_DESC_F_INDIRECT) != 0
            if nested.any():
                # §2.7.5.3.1: the driver MUST NOT set INDIRECT inside an indirect table.
                for cc, dd, jj in zip(
                    c[nested].tolist(), d[nested].tolist(), j[nested].tolist(), strict=True
                ):
                    self.fail(
                        cc, ErrorCode.NESTED_INDIRECT, dd, f"entry {jj} of the indirect table is indirect"
                    )
                keep = ~nested
                c, d, dep, reg, off, count, limit, j = (
                    x[keep] for x in (c, d, dep, reg, off, count, limit, j)
                )
                ent, fl = ent[keep], fl[keep]
            parts.append(Segments(c, d, dep + steps, ent["addr"], ent["len"], fl))
            steps += 1
            more = (fl & VIRTQ_DESC_F_NEXT) != 0
            nxt = ent["next"][more].astype(np.int64)
            c, d, dep, reg, off, count, limit, j = (x[more] for x in (c, d, dep, reg, off, count, limit, j))
            oob = nxt >= count
            if oob.any():
                for cc, dd, jj, nn in zip(
                    c[oob].tolist(), d[oob].tolist(), j[oob].tolist(), nxt[oob].tolist(), strict=True
                ):
                    self.fail(
                        cc,
                        ErrorCode.DESCRIPTOR_INDEX,
                        dd,
                        f"indirect entry {jj} chains to {nn}, outside a table of the given length",
                    )
            j = nxt
            over = steps >= limit
            for cc, dd in zip(c[over & ~oob].tolist(), d[over & ~oob].tolist(), strict=True):
                self.fail(cc, ErrorCode.LOOP, dd, f"indirect chain still continues after {steps} entries")
            keep = ~(oob | over)
            c, d, dep, reg, off, count, limit, j = (x[keep] for x in (c, d, dep, reg, off, count, limit, j))
        return Segments.concat(parts) if parts else _NO_SEGMENTS
