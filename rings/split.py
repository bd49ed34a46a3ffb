"""The device side of a split virtqueue (virtio 1.2 §2.7): popping avail heads, walking descriptor
chains in batches, publishing used entries, and the notification decisions in both directions.

A :class:`SplitQueue` owns its indices and ring addresses (GPAs), never memory: every operation takes
the current :class:`~rings.memory.GuestMemory`, and the typed ring views live in that memory's cache,
so a new memory table can never leave a stale view here. Chains are walked in lockstep (one numpy step
per chain depth for the whole batch); indirect tables take a short per-chain path. A malformed chain
is marked in the :class:`ChainBatch` (``error`` / ``errors``), not raised, so the rest of the batch goes
on and the bad head can still be returned on the used ring with length 0.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import (
    AvailIndexError,
    ChainError,
    ChainTooLongError,
    DescriptorIndexError,
    DescriptorLoopError,
    DescriptorOrderError,
    GuestMemoryError,
    IndirectLengthError,
    NestedIndirectError,
    QueueConfigError,
)
from .layout import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    DESC_DTYPE,
    DESC_SIZE,
    U16_MASK,
    USED_ALIGN,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    is_valid_queue_size,
    vring_need_event,
)
from .memory import GuestMemory

U32_MAX = 0xFFFF_FFFF

_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")
_DESC_BYTES = np.arange(DESC_SIZE, dtype=np.int64)
# 0, 1, 2... and 1, 1, 1... for any batch (at most a queue size, 32768), sliced instead of built per
# batch; read-only, so a ChainBatch that shares a slice can never have it changed under it.
_IOTA = np.arange(32768, dtype=np.int64)
_IOTA.flags.writeable = False
_ONES = np.ones(32768, dtype=np.int64)
_ONES.flags.writeable = False


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


_ERROR_CLASS: dict[ErrorCode, type[ChainError]] = {
    ErrorCode.DESCRIPTOR_INDEX: DescriptorIndexError,
    ErrorCode.LOOP: DescriptorLoopError,
    ErrorCode.NESTED_INDIRECT: NestedIndirectError,
    ErrorCode.INDIRECT_LENGTH: IndirectLengthError,
    ErrorCode.CHAIN_TOO_LONG: ChainTooLongError,
    ErrorCode.DESCRIPTOR_ORDER: DescriptorOrderError,
}
"""The exception each chain error code stands for (GUEST_MEMORY is a GuestMemoryError)."""


class _RingViews:
    """Typed views of one queue's three rings in one memory table (cached in the GuestMemory)."""

    __slots__ = (
        "avail",
        "avail_ring",
        "d_addr",
        "d_flags",
        "d_len",
        "d_next",
        "used_head",
        "used_ring",
        "used_tail",
    )

    def __init__(self, mem: GuestMemory, q: SplitQueue) -> None:
        size = q.size
        desc = mem.view_as(q.desc_addr, DESC_DTYPE, size)
        self.d_addr: npt.NDArray[np.uint64] = desc["addr"]
        self.d_len: npt.NDArray[np.uint32] = desc["len"]
        self.d_flags: npt.NDArray[np.uint16] = desc["flags"]
        self.d_next: npt.NDArray[np.uint16] = desc["next"]
        # avail as u16[size + 3]: flags, idx, ring[size], used_event (§2.7.6).
        self.avail: npt.NDArray[np.uint16] = mem.view_as(q.avail_addr, _U16, size + 3)
        self.avail_ring = self.avail[2 : 2 + size]
        # used: u16 flags, idx; then (id, len) u32 pairs; then u16 avail_event (§2.7.8).
        self.used_head: npt.NDArray[np.uint16] = mem.view_as(q.used_addr, _U16, 2)
        self.used_ring: npt.NDArray[np.uint32] = mem.view_as(q.used_addr + 4, _U32, 2 * size).reshape(size, 2)
        self.used_tail: npt.NDArray[np.uint16] = mem.view_as(q.used_addr + 4 + 8 * size, _U16, 1)


class SplitQueue:
    """The device side of one split virtqueue. Owns indices and ring GPAs; every call takes ``mem``.

    ``last_avail_idx`` and ``used_idx`` are free-running u16 counters (set them from SET_VRING_BASE;
    report ``last_avail_idx`` in GET_VRING_BASE).
    """

    def __init__(
        self,
        *,
        index: int,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        last_avail_idx: int = 0,
        used_idx: int = 0,
    ) -> None:
        if not is_valid_queue_size(size):
            raise QueueConfigError(f"split queue size {size} is not a power of 2 in 1..32768", queue=index)
        for name, addr, align in (
            ("descriptor table", desc_addr, DESC_ALIGN),
            ("avail ring", avail_addr, AVAIL_ALIGN),
            ("used ring", used_addr, USED_ALIGN),
        ):
            # §2.7: each part has an alignment requirement the driver MUST meet.
            if addr < 0 or addr % align:
                raise QueueConfigError(f"{name} address 0x{addr:x} is not {align}-byte aligned", queue=index)
        self.index = index
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.last_avail_idx = last_avail_idx & U16_MASK
        self.used_idx = used_idx & U16_MASK
        self._mask = size - 1
        self._key = ("split", size, desc_addr, avail_addr, used_addr)

    def __repr__(self) -> str:
        return (
            f"SplitQueue(index={self.index}, size={self.size}, last_avail_idx={self.last_avail_idx}, "
            f"used_idx={self.used_idx})"
        )

    def _views(self, mem: GuestMemory) -> _RingViews:
        try:
            return mem.cached(self._key, self._build_views)
        except GuestMemoryError as err:
            raise GuestMemoryError(
                err.address, err.length, queue=self.index, reason="a ring outside guest memory"
            ) from err

    def _build_views(self, mem: GuestMemory) -> _RingViews:
        return _RingViews(mem, self)

    # -- avail side -----------------------------------------------------------------------------------

    def avail_pending(self, mem: GuestMemory) -> int:
        """Heads the driver has made available that we have not popped yet."""
        v = self._views(mem)
        avail_idx = int(v.avail[1])
        pending = (avail_idx - self.last_avail_idx) & U16_MASK
        if pending > self.size:
            # §2.7.6: the driver never has more than Queue Size entries outstanding; the ring is corrupt.
            raise AvailIndexError(
                f"avail.idx {avail_idx} is {pending} ahead of last_avail_idx {self.last_avail_idx}, more "
                f"than the queue size {self.size}",
                queue=self.index,
            )
        return pending

    def pop_avail(self, mem: GuestMemory, max_count: int) -> npt.NDArray[np.uint16]:
        """Up to ``max_count`` available heads (a copy), advancing ``last_avail_idx``."""
        k = min(self.avail_pending(mem), max_count)
        v = self._views(mem)
        start = self.last_avail_idx & self._mask
        if start + k <= self.size:
            heads = v.avail_ring[start : start + k].copy()
        else:
            heads = np.concatenate((v.avail_ring[start:], v.avail_ring[: start + k - self.size]))
        self.last_avail_idx = (self.last_avail_idx + k) & U16_MASK
        return heads

    # -- chain walking --------------------------------------------------------------------------------

    def walk(self, mem: GuestMemory, heads: npt.ArrayLike, *, indirect: bool = True) -> ChainBatch:
        """Walk the chains starting at ``heads`` (NEXT and, if ``indirect``, INDIRECT).

        With ``indirect`` False (VIRTIO_F_INDIRECT_DESC not negotiated) the INDIRECT flag is ignored and
        the descriptor is an ordinary buffer. An INDIRECT descriptor ends the direct part of its chain
        (§2.7.5.3.2: zero or more chained descriptors followed by one indirect one); NEXT on it is
        ignored.
        """
        return _Walker(self, mem, np.asarray(heads, dtype=np.uint16), indirect).run()

    # -- used side ------------------------------------------------------------------------------------

    def push_used(self, mem: GuestMemory, ids: npt.ArrayLike, lengths: npt.ArrayLike) -> None:
        """Append ``(id, len)`` entries to the used ring, then publish ``used.idx``.

        The entries must be visible to the driver before the index that exposes them (§2.7.8). Python
        has no store barrier: this relies on the host keeping store order (x86 TSO), and on writing
        the index last. On weakly ordered hosts (arm64) a real barrier would be needed.
        """
        ids_a = np.asarray(ids)
        lens_a = np.asarray(lengths)
        k = int(ids_a.shape[0])
        if k == 0:
            return
        if k > self.size or lens_a.shape[0] != k:
            raise ValueError(f"push_used of {k} ids / {lens_a.shape[0]} lengths on a queue of {self.size}")
        v = self._views(mem)
        start = self.used_idx & self._mask
        ring = v.used_ring
        if start + k <= self.size:
            ring[start : start + k, 0] = ids_a
            ring[start : start + k, 1] = lens_a
        else:
            first = self.size - start
            ring[start:, 0] = ids_a[:first]
            ring[start:, 1] = lens_a[:first]
            ring[: k - first, 0] = ids_a[first:]
            ring[: k - first, 1] = lens_a[first:]
        self.used_idx = (self.used_idx + k) & U16_MASK
        v.used_head[1] = self.used_idx

    def needs_interrupt(self, mem: GuestMemory, *, old_used_idx: int, event_idx: bool) -> bool:
        """Should the device signal the driver after moving used.idx from ``old_used_idx``?

        EVENT_IDX: §2.7.10 ``vring_need_event(used_event, used_idx, old)``; otherwise §2.7.7 the
        driver's VIRTQ_AVAIL_F_NO_INTERRUPT hint.
        """
        if (old_used_idx & U16_MASK) == self.used_idx:
            return False
        v = self._views(mem)
        if event_idx:
            used_event = int(v.avail[2 + self.size])
            return vring_need_event(used_event, self.used_idx, old_used_idx & U16_MASK)
        return not (int(v.avail[0]) & VIRTQ_AVAIL_F_NO_INTERRUPT)

    def suppress_kicks(self, mem: GuestMemory, suppress: bool, *, event_idx: bool) -> None:
        """Ask the driver not to (or again to) notify us of new avail entries.

        Without EVENT_IDX this is the VIRTQ_USED_F_NO_NOTIFY flag (§2.7.7). With EVENT_IDX (§2.7.10)
        re-enabling writes ``avail_event = last_avail_idx`` (kick once the driver publishes past what
        we consumed); suppressing writes ``last_avail_idx - 1``, a value the driver's new entries
        cannot pass before we consume them. Either way the hint is racy: after re-enabling, check
        ``avail_pending`` once more before sleeping.
        """
        v = self._views(mem)
        if event_idx:
            v.used_tail[0] = (self.last_avail_idx - (1 if suppress else 0)) & U16_MASK
        else:
            v.used_head[0] = VIRTQ_USED_F_NO_NOTIFY if suppress else 0

    def kick_after(self, mem: GuestMemory, count: int) -> None:
        """EVENT_IDX only: ask the driver to notify once it has made more than ``count`` entries
        available beyond ``last_avail_idx`` (0: on the first one, as re-enabling does).

        §2.7.10: the driver notifies when the ``idx`` it publishes passes ``avail_event``; the device
        chooses that index, so a value ahead of ``last_avail_idx`` means "wake me for a batch". The
        caller must look at ``avail_pending`` afterwards (the driver may already be past it) and keep a
        timer for a driver that stops short of the batch.
        """
        if not 0 <= count < self.size:
            raise ValueError(f"kick_after({count}) on a queue of {self.size}")
        self._views(mem).used_tail[0] = (self.last_avail_idx + count) & U16_MASK


class _Walker:
    """One batch walk: lockstep over the descriptor table, per chain inside indirect tables."""

    def __init__(
        self, q: SplitQueue, mem: GuestMemory, heads: npt.NDArray[np.uint16], indirect: bool
    ) -> None:
        self.q = q
        self.mem = mem
        self.v = q._views(mem)
        self.heads = heads
        self.indirect = indirect
        n = heads.shape[0]
        self.n = n
        self.error = np.zeros(n, dtype=np.uint8)
        self.errors: dict[int, ChainError | GuestMemoryError] = {}

    def fail(self, chain: int, code: ErrorCode, descriptor: int, message: str) -> None:
        """Mark ``chain`` bad (the first error found wins) with the exception class ``code`` names."""
        if self.error[chain] == 0:
            self.error[chain] = code
            self.errors[chain] = _ERROR_CLASS[code](message, queue=self.q.index, descriptor=descriptor)

    def fail_memory(self, chain: int, exc: GuestMemoryError) -> None:
        if self.error[chain] == 0:
            self.error[chain] = ErrorCode.GUEST_MEMORY
            self.errors[chain] = exc

    def run(self) -> ChainBatch:
        v, n, size = self.v, self.n, self.q.size
        cur = self.heads.astype(np.int64)
        if 0 < n <= _IOTA.shape[0] and not np.count_nonzero(cur >= size):
            # The common case (a NIC's RX buffers, a TX frame pushed behind its header): every chain
            # is one descriptor, neither NEXT nor (when negotiated) INDIRECT. One check decides it;
            # then there is no per-depth loop and nothing to reorder.
            f = v.d_flags[cur]
            if not np.count_nonzero(f & self._chain_flags()):
                return self._assemble_single(cur, f)
        return self._run_lockstep(cur)

    def _run_lockstep(self, cur: npt.NDArray[np.int64]) -> ChainBatch:
        """The general walk of chains starting at ``cur``: one numpy step per chain depth."""
        v, n, size = self.v, self.n, self.q.size
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
            s_chain = np.concatenate((s_chain, extra[0]))
            s_desc = np.concatenate((s_desc, extra[1]))
            s_depth = np.concatenate((s_depth, extra[2]))
            s_addr = np.concatenate((s_addr, extra[3]))
            s_len = np.concatenate((s_len, extra[4]))
            s_flags = np.concatenate((s_flags, extra[5]))
        # One depth and no indirect tables: segments are already in chain order.
        ordered = len(chain_parts) <= 1 and not ind
        return self._assemble(s_chain, s_desc, s_depth, s_addr, s_len, s_flags, ordered)

    def _chain_flags(self) -> int:
        return VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT if self.indirect else VIRTQ_DESC_F_NEXT

    def _assemble_single(self, desc: npt.NDArray[np.int64], flags: npt.NDArray[np.uint16]) -> ChainBatch:
        """``_assemble`` for a batch of one-descriptor chains (valid heads, no NEXT, no INDIRECT):
        chain ``k`` is segment ``k``; only translation can fail (a one-descriptor chain can be neither
        out of order nor longer than 2^32 - 1 bytes)."""
        v, n = self.v, self.n
        s_addr = v.d_addr[desc]
        s_len = v.d_len[desc]
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
        qi = self.q.index
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

    def _walk_indirect(
        self, ind_c: npt.NDArray[np.int64], ind_d: npt.NDArray[np.int64], ind_depth: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[Any], ...]:
        """Walk every indirect table of the batch in lockstep: one numpy step per table entry depth."""
        v, mem, size = self.v, self.mem, self.q.size
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
                queue=self.q.index,
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
        j = np.zeros(c.shape[0], dtype=np.int64)
        parts: list[tuple[npt.NDArray[Any], ...]] = []
        steps = 0
        datas = [r.data for r in mem.regions]
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
            parts.append((c, d, dep + steps, ent["addr"], ent["len"], fl))
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
        if not parts:
            return (
                np.empty(0, np.int64),
                np.empty(0, np.int64),
                np.empty(0, np.int64),
                np.empty(0, np.uint64),
                np.empty(0, np.uint32),
                np.empty(0, np.uint16),
            )
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(6))

    def _assemble(
        self,
        s_chain: npt.NDArray[np.int64],
        s_desc: npt.NDArray[np.int64],
        s_depth: npt.NDArray[np.int64],
        s_addr: npt.NDArray[np.uint64],
        s_len: npt.NDArray[np.uint32],
        s_flags: npt.NDArray[np.uint16],
        ordered: bool,
    ) -> ChainBatch:
        n, qi = self.n, self.q.index
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
