"""The device side of a packed virtqueue (virtio 1.2 §2.8): finding the chains the driver made
available (AVAIL/USED flags against the wrap counters), walking them in batches into a
:class:`~rings.chains.ChainBatch`, writing used descriptors back in place, and the notification
decisions in both directions (the event suppression structures, with and without EVENT_IDX).

A :class:`PackedQueue` owns its positions, wrap counters and ring GPAs, never memory: every operation
takes the current :class:`~rings.memory.GuestMemory`, and the typed views live in that memory's cache.

The methods the device uses on a :class:`~rings.split.SplitQueue` exist here with the same signatures
and the same meaning per *chain*: ``avail_pending``, ``pop_avail``, ``walk``, ``push_used``,
``push_used_few``, ``needs_interrupt``, ``suppress_kicks``, ``kick_after``, and the ``size``,
``index``, ``last_avail_idx`` and ``used_idx`` attributes. Differences the device must know about:

- ``pop_avail`` returns *buffer ids* (what the used ring takes back, §2.8.6), and ``walk`` takes them;
  it walks the chains recorded for those ids at their pop. :meth:`pop_chains` does both in one call.
- ``last_avail_idx`` and ``used_idx`` are free-running u16 counts of ring *descriptors* (a chain of
  three counts three), read-only: they show progress and feed ``needs_interrupt(old_used_idx=...)``;
  the ring position and wrap counter are ``avail_pos``/``avail_wrap``, ``used_pos``/``used_wrap``, and
  :attr:`vring_base` is the GET_VRING_BASE value. Giving popped chains back (the RX path writes
  ``last_avail_idx`` on a split ring) is :meth:`unpop_avail`.
- ``kick_after(count)`` counts descriptors, not chains.
- The ring addresses are the descriptor ring, the driver area (driver event suppression, read here)
  and the device area (device event suppression, written here): SET_VRING_ADDR's desc, avail and
  used addresses in that order.
- ``peek_short`` returns ShortChains whose ``head`` is the buffer id; ``skip_avail`` pops a prefix
  of what the last ``peek_short`` returned (the only way to pop after it).

Malformed chains are marked, never raised (see :meth:`pop_chains`); the only exception a guest can
cause is a GuestMemoryError for rings outside guest memory, as on the split ring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .barrier import full_fence
from .chains import ChainBatch
from .errors import GuestMemoryError, QueueConfigError
from .layout import U16_MASK, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from .memory import GuestMemory
from .packed_layout import (
    AVAIL_USED_MASK,
    EVENT_ALIGN,
    EVENT_FLAGS,
    EVENT_OFF_WRAP,
    PDESC_ALIGN,
    PDESC_DTYPE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    RING_EVENT_FLAGS_MASK,
    advance,
    avail_flags,
    is_valid_packed_size,
    off_wrap,
    packed_need_event,
    used_flags,
)
from .packed_short import peek_short_packed
from .packed_walk import NO_POP, PackedPop, SavedChains, walk_packed
from .short_chains import ShortChain

_U16 = np.dtype("<u2")
_IDS = 1 << 16  # buffer ids are le16 (§2.8.13); the driver picks them, so any value can come


class _PackedViews:
    """Typed views of one queue's descriptor ring and event suppression structures in one table."""

    __slots__ = ("d_addr", "d_flags", "d_id", "d_len", "device_event", "driver_event", "raw", "ring")

    def __init__(self, mem: GuestMemory, q: PackedQueue) -> None:
        ring = mem.view_as(q.desc_addr, PDESC_DTYPE, q.size)
        self.ring: npt.NDArray[np.void] = ring
        self.raw: memoryview = ring.view(np.uint8).data  # for the scalar reads of short rounds
        self.d_addr: npt.NDArray[np.uint64] = ring["addr"]
        self.d_len: npt.NDArray[np.uint32] = ring["len"]
        self.d_id: npt.NDArray[np.uint16] = ring["id"]
        self.d_flags: npt.NDArray[np.uint16] = ring["flags"]
        # §2.8.14 struct pvirtq_event_suppress as u16[2]: off_wrap, flags.
        self.driver_event: npt.NDArray[np.uint16] = mem.view_as(q.driver_addr, _U16, 2)
        self.device_event: npt.NDArray[np.uint16] = mem.view_as(q.device_addr, _U16, 2)


class PackedQueue:
    """The device side of one packed virtqueue. Owns positions, wrap counters and ring GPAs; every call
    takes ``mem``. Both wrap counters start at 1 (§2.8.1); a restarted queue gets its positions and
    counters from SET_VRING_BASE (:meth:`from_vring_base`)."""

    def __init__(
        self,
        *,
        index: int,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        avail_pos: int = 0,
        avail_wrap: int = 1,
        used_pos: int = 0,
        used_wrap: int = 1,
    ) -> None:
        if not is_valid_packed_size(size):
            raise QueueConfigError(f"packed queue size {size} is not in 1..32768", queue=index)
        for name, addr, align in (
            ("descriptor ring", desc_addr, PDESC_ALIGN),
            ("driver area", driver_addr, EVENT_ALIGN),
            ("device area", device_addr, EVENT_ALIGN),
        ):
            # §2.8.10.1: each part has an alignment requirement the driver MUST meet.
            if addr < 0 or addr % align:
                raise QueueConfigError(f"{name} address 0x{addr:x} is not {align}-byte aligned", queue=index)
        for name, pos in (("avail", avail_pos), ("used", used_pos)):
            if not 0 <= pos < size:
                raise QueueConfigError(f"{name} position {pos} is outside a ring of {size}", queue=index)
        self.index = index
        self.size = size
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self.avail_pos = avail_pos
        self.avail_wrap = avail_wrap & 1
        self.used_pos = used_pos
        self.used_wrap = used_wrap & 1
        self.last_avail_idx = 0  # descriptors popped, mod 2^16
        self.used_idx = 0  # descriptors marked used, mod 2^16
        # Per buffer id, where its chain began in the ring and how many descriptors it took, as
        # recorded when it was last popped: walk() and push_used() need them, the driver only
        # gives the id back. An id reused while in flight (the driver's bug) keeps the latest.
        self._start = np.zeros(_IDS, dtype=np.int32)  # 2 x 256 KiB per queue: ids are any u16
        self._ndesc = np.ones(_IDS, dtype=np.int32)
        self._unended = np.zeros(_IDS, dtype=np.bool_)
        self._last_pop = np.empty(0, dtype=np.int64)  # ndesc of the last pop, for unpop_avail
        self._peeked: tuple[list[int], list[int]] = ([], [])  # ids, ndesc of the last peek_short
        self._found: PackedPop | None = None  # what avail_pending found at the current position
        self._key = ("packed", size, desc_addr, driver_addr, device_addr)

    @classmethod
    def from_vring_base(
        cls, num: int, *, index: int, size: int, desc_addr: int, driver_addr: int, device_addr: int
    ) -> PackedQueue:
        """A queue resumed from SET_VRING_BASE. For a packed ring ``num`` holds both sides (vhost-user
        spec, "Vring descriptor indices for packed virtqueues"; QEMU
        ``virtio_queue_packed_get_last_avail_idx``): bits 0-14 the next avail position, bit 15 its
        wrap counter, bits 16-30 the next used position, bit 31 its wrap counter. (DPDK reads only the
        low half and starts the used side there; QEMU sends both, which differ while chains are in
        flight.) A position outside the ring is a QueueConfigError."""
        low, high = num & U16_MASK, (num >> 16) & U16_MASK
        return cls(
            index=index, size=size, desc_addr=desc_addr, driver_addr=driver_addr, device_addr=device_addr,
            avail_pos=low & 0x7FFF, avail_wrap=low >> 15, used_pos=high & 0x7FFF, used_wrap=high >> 15,
        )  # fmt: skip

    @property
    def vring_base(self) -> int:
        """GET_VRING_BASE for a packed ring: avail position | avail wrap << 15, and the same for the
        used side in bits 16-31."""
        return off_wrap(self.avail_pos, self.avail_wrap) | off_wrap(self.used_pos, self.used_wrap) << 16

    def __repr__(self) -> str:
        return (
            f"PackedQueue(index={self.index}, size={self.size}, avail={self.avail_pos}/{self.avail_wrap}, "
            f"used={self.used_pos}/{self.used_wrap})"
        )

    def _views(self, mem: GuestMemory) -> _PackedViews:
        try:
            return mem.cached(self._key, self._build_views)
        except GuestMemoryError as err:
            raise GuestMemoryError(
                err.address, err.length, queue=self.index, reason="a ring outside guest memory"
            ) from err

    def _build_views(self, mem: GuestMemory) -> _PackedViews:
        return _PackedViews(mem, self)

    # -- finding available chains ---------------------------------------------------------------------

    def _scan(self, v: _PackedViews, max_chains: int) -> PackedPop:
        """The first ``max_chains`` complete chains from the avail position, without moving it.

        §2.8.1: a descriptor is available when its AVAIL bit matches the wrap counter of its lap and
        USED does not; the device reads no further than the first one that is not (§2.8.15: "MUST NOT
        use a descriptor unless it observes the VIRTQ_DESC_F_AVAIL bit ... being changed"), so a chain
        whose tail is not available yet is not taken. A chain ends at its first descriptor without
        NEXT (§2.8.6); one that fills the whole ring without ending is taken as one (bad) chain.
        """
        size, p = self.size, self.avail_pos
        if max_chains <= 0:
            return NO_POP
        # Look at a window big enough for max_chains short chains first, and widen it only when the
        # chains are longer than that.
        win = size if max_chains >= size else min(size, max(64, 2 * max_chains))
        while True:
            flags = self._avail_prefix(v, win)
            n_avail = int(flags.shape[0])
            ends = np.flatnonzero((flags & VIRTQ_DESC_F_NEXT) == 0)
            if ends.shape[0] >= max_chains or n_avail < win or win == size:
                break
            win = min(size, 4 * win)
        unended = False
        if ends.shape[0] == 0:
            if n_avail < size:
                return NO_POP
            ends = np.array([size - 1], dtype=np.int64)  # §2.8.17: no list is longer than the queue
            unended = True
        ends = ends[:max_chains]
        starts = np.empty_like(ends)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        ndesc = ends - starts + 1
        ring_ends = (ends + p) % size
        return PackedPop(
            ids=v.d_id[ring_ends],
            starts=(starts + p) % size,
            ndesc=ndesc,
            unended=np.full(ends.shape[0], unended, dtype=np.bool_),
        )

    def _avail_prefix(self, v: _PackedViews, win: int) -> npt.NDArray[np.uint16]:
        """A copy of the flags of the available descriptors among the ``win`` from the avail
        position, in the order the device reads them (to the end of the ring in this lap, then from
        0 in the next, where the wrap counter is the other one), up to the first one not available."""
        size, p, w = self.size, self.avail_pos, self.avail_wrap
        end = min(size, p + win)
        f1 = v.d_flags[p:end].copy()
        bad = (f1 & AVAIL_USED_MASK) != avail_flags(w)
        if bad.any():
            return f1[: int(bad.argmax())]
        rest = win - (end - p)
        if rest == 0:
            return f1
        f2 = v.d_flags[:rest].copy()
        bad = (f2 & AVAIL_USED_MASK) != avail_flags(w ^ 1)
        if bad.any():
            f2 = f2[: int(bad.argmax())]
        return np.concatenate((f1, f2))

    def avail_pending(self, mem: GuestMemory) -> int:
        """Complete chains the driver has made available that we have not popped yet.

        The chains found are kept for the next pop from the same position: they stay available until
        we pop them (§2.8.16: the driver MUST NOT change a descriptor it made available), so a pop of
        at most that many needs no second scan; a pop of more scans again.
        """
        pop = self._scan(self._views(mem), self.size)
        self._found = pop
        return int(pop.ids.shape[0])

    def avail_descriptors(self, mem: GuestMemory) -> int:
        """The descriptors of the chains :meth:`avail_pending` counts: what ``kick_after`` counts in."""
        self.avail_pending(mem)
        assert self._found is not None
        return int(self._found.ndesc.sum())

    def _find(self, v: _PackedViews, max_count: int) -> PackedPop:
        found = self._found
        if found is not None and max_count <= found.ids.shape[0]:
            k = max_count
            return PackedPop(
                ids=found.ids[:k], starts=found.starts[:k], ndesc=found.ndesc[:k], unended=found.unended[:k]
            )
        return self._scan(v, max_count)

    def _take(self, pop: PackedPop) -> None:
        """Move the avail position past the chains of ``pop`` and record them by id."""
        total = int(pop.ndesc.sum())
        self.avail_pos, self.avail_wrap = advance(self.avail_pos, self.avail_wrap, total, self.size)
        self.last_avail_idx = (self.last_avail_idx + total) & U16_MASK
        self._start[pop.ids] = pop.starts
        self._ndesc[pop.ids] = pop.ndesc
        self._unended[pop.ids] = pop.unended
        self._last_pop = pop.ndesc
        self._found = None

    def pop_avail(self, mem: GuestMemory, max_count: int) -> npt.NDArray[np.uint16]:
        """The buffer ids of up to ``max_count`` available chains (a copy), advancing past them."""
        pop = self._find(self._views(mem), max(0, max_count))
        self._take(pop)
        return pop.ids

    def unpop_avail(self, count: int) -> None:
        """Give the last ``count`` chains of the last pop back (not popped after all): the avail
        position moves back over their descriptors, so the next pop reads them again."""
        if not 0 <= count <= self._last_pop.shape[0]:
            raise ValueError(f"unpop_avail({count}) after a pop of {self._last_pop.shape[0]} chains")
        if count == 0:
            return
        self._found = None
        back = int(self._last_pop[self._last_pop.shape[0] - count :].sum())
        self._last_pop = self._last_pop[: self._last_pop.shape[0] - count]
        pos = self.avail_pos - back
        if pos < 0:
            pos += self.size
            self.avail_wrap ^= 1
        self.avail_pos = pos
        self.last_avail_idx = (self.last_avail_idx - back) & U16_MASK

    # -- chain walking --------------------------------------------------------------------------------

    def pop_chains(self, mem: GuestMemory, max_count: int, *, indirect: bool = True) -> ChainBatch:
        """Pop up to ``max_count`` available chains and walk them: ``pop_avail`` then ``walk``, but
        walking each chain where it was found even if the driver gave two chains one id."""
        v = self._views(mem)
        pop = self._find(v, max(0, max_count))
        self._take(pop)
        return walk_packed(mem, v, pop, queue=self.index, indirect=indirect, size=self.size)

    def walk(self, mem: GuestMemory, heads: npt.ArrayLike, *, indirect: bool = True) -> ChainBatch:
        """Walk the chains last popped with buffer ids ``heads`` (from :meth:`pop_avail`).

        With ``indirect`` False (VIRTIO_F_INDIRECT_DESC not negotiated) the INDIRECT flag is ignored and
        the descriptor is an ordinary buffer.
        """
        v = self._views(mem)
        ids = np.asarray(heads, dtype=np.uint16)
        ndesc = self._ndesc[ids].astype(np.int64)
        starts = self._start[ids].astype(np.int64)
        pop = PackedPop(ids=ids, starts=starts, ndesc=ndesc, unended=self._unended[ids])
        return walk_packed(mem, v, pop, queue=self.index, indirect=indirect, size=self.size)

    def popped_descriptors(self, mem: GuestMemory) -> tuple[npt.NDArray[np.void], npt.NDArray[np.int64]]:
        """The descriptors of the chains of the last pop (after any :meth:`unpop_avail`), copied from
        the ring in ring order, and how many each chain has: what inflight tracking saves, since the
        ring slots are overwritten by used descriptors while a chain may still be in flight."""
        ring = self._views(mem).ring
        total = int(self._last_pop.sum())
        pos = (np.arange(total, dtype=np.int64) + self.avail_pos - total) % self.size
        return ring[pos], self._last_pop.copy()

    def resubmit(self, mem: GuestMemory, chains: SavedChains, *, indirect: bool = True) -> ChainBatch:
        """Walk chains saved before a restart (``rings.inflight_packed`` recovery) as :meth:`walk`
        walks popped ones, and record their ids so :meth:`push_used` skips the right number of
        descriptors. The saved descriptors are as untrusted as the ring they were copied from."""
        ndesc = np.minimum(chains.ndesc.astype(np.int64), self.size)
        starts = np.cumsum(ndesc) - ndesc
        self._ndesc[chains.ids] = ndesc
        self._unended[chains.ids] = False
        pop = PackedPop(
            ids=chains.ids, starts=starts, ndesc=ndesc, unended=np.zeros(ndesc.shape[0], np.bool_)
        )
        return walk_packed(mem, chains, pop, queue=self.index, indirect=indirect, size=self.size)

    # -- short rounds: a few chains, read with plain ints ----------------------------------------------

    def peek_short(self, mem: GuestMemory, count: int, *, indirect: bool = True) -> list[ShortChain] | None:
        """The next ``count`` available chains, not popped, if every one is a good short chain
        (:func:`~rings.packed_short.peek_short_packed`); else None. ``ShortChain.head`` is the buffer
        id. :meth:`skip_avail` then pops a prefix of them."""
        v = self._views(mem)
        got = peek_short_packed(
            mem, v.raw, self.size, self.avail_pos, self.avail_wrap, count, indirect=indirect
        )
        if got is None:
            return None
        chains, ndescs = got
        self._peeked = ([c.head for c in chains], ndescs)
        return chains

    def skip_avail(self, count: int) -> None:
        """Pop the first ``count`` chains the last :meth:`peek_short` returned."""
        ids, ndescs = self._peeked
        if count > len(ids):
            raise ValueError(f"skip_avail({count}) after peeking {len(ids)} chains")
        starts = []
        pos = self.avail_pos
        for n in ndescs[:count]:
            starts.append(pos)
            pos = pos + n - self.size if pos + n >= self.size else pos + n
        pop = PackedPop(
            ids=np.array(ids[:count], dtype=np.uint16),
            starts=np.array(starts, dtype=np.int64),
            ndesc=np.array(ndescs[:count], dtype=np.int64),
            unended=np.zeros(count, dtype=np.bool_),
        )
        self._take(pop)
        self._peeked = ([], [])

    # -- used side ------------------------------------------------------------------------------------

    def push_used(self, mem: GuestMemory, ids: npt.ArrayLike, lengths: npt.ArrayLike) -> None:
        """Write one used descriptor per buffer id, in order (§2.8.12: the device writes used
        descriptors in the order it completes them): each at the used position, which then skips the
        descriptors that id's chain took (§2.8.6), the wrap counter flipping at the end of the ring.

        A used descriptor carries the id, the bytes written (``len``) and flags: AVAIL and USED both
        equal to the wrap counter of its lap, and WRITE when ``len`` is not zero (§2.8.3). The driver
        sees a used descriptor when its flags change, so ids and lengths are stored first, then the
        flags of every descriptor but the first, then the first one's (DPDK
        ``vhost_flush_enqueue_shadow_packed``): the driver reads in ring order and stops at the first,
        so nothing after it is seen before everything is written. As on the split ring, x86 (TSO)
        keeps these stores in order; the load that follows (``needs_interrupt``) fences first.
        """
        ids_a = np.asarray(ids, dtype=np.uint16)
        lens_a = np.asarray(lengths)
        k = int(ids_a.shape[0])
        if k == 0:
            return
        if k > self.size or lens_a.shape[0] != k:
            raise ValueError(f"push_used of {k} ids / {lens_a.shape[0]} lengths on a queue of {self.size}")
        v = self._views(mem)
        size = self.size
        nd = self._ndesc[ids_a].astype(np.int64)
        offsets = np.cumsum(nd) - nd
        # A driver that reused an id in flight can make the sum pass a lap: every position still lies
        # in the ring, each lap with its own wrap counter.
        lin = offsets + self.used_pos
        lap = lin // size
        pos = lin - lap * size
        wrap = (lap & 1) ^ self.used_wrap
        flags = np.where(wrap == 1, used_flags(1), used_flags(0)).astype(np.uint16)
        flags |= np.where(lens_a != 0, VIRTQ_DESC_F_WRITE, 0).astype(np.uint16)
        v.d_id[pos] = ids_a
        v.d_len[pos] = lens_a
        if k > 1:
            v.d_flags[pos[1:]] = flags[1:]
        v.d_flags[pos[0]] = flags[0]
        total = int(lin[-1] + nd[-1]) - self.used_pos
        laps, rest = divmod(self.used_pos + total, size)
        self.used_pos = rest
        self.used_wrap ^= laps & 1
        self.used_idx = (self.used_idx + total) & U16_MASK

    def used_after(self, ids: npt.ArrayLike) -> tuple[int, int]:
        """The used position and wrap counter :meth:`push_used` will leave after writing ``ids``
        (inflight tracking records them before the ring is written)."""
        nd = self._ndesc[np.asarray(ids, dtype=np.uint16)]
        laps, rest = divmod(self.used_pos + int(nd.sum(dtype=np.int64)), self.size)
        return rest, self.used_wrap ^ (laps & 1)

    def push_used_few(self, mem: GuestMemory, ids: Sequence[int], lengths: Sequence[int]) -> None:
        """:meth:`push_used` for a few entries given as ints (the same stores in the same order)."""
        if len(ids) != len(lengths):
            raise ValueError(f"push_used of {len(ids)} ids / {len(lengths)} lengths")
        self.push_used(mem, np.array(ids, dtype=np.uint16), np.array(lengths, dtype=np.uint32))

    # -- notifications --------------------------------------------------------------------------------

    def needs_interrupt(self, mem: GuestMemory, *, old_used_idx: int, event_idx: bool) -> bool:
        """Should the device signal the driver after ``used_idx`` moved from ``old_used_idx``?

        §2.8.10 the driver event suppression structure: DISABLE never, ENABLE always, DESC (with
        EVENT_IDX) when the descriptor it names is among those just used (:func:`packed_need_event`).
        DESC without EVENT_IDX and the reserved value 3 are not the driver's to write: we signal, as a
        lost interrupt hangs the guest and an extra one costs little.

        The full fence orders the used descriptors' flags (stored by :meth:`push_used`) before the
        load of the driver's structure; the driver does the mirror image (store the structure, fence,
        reload the flags), as on the split ring (DPDK ``vhost_vring_call_packed`` starts with one too).
        """
        moved = (self.used_idx - old_used_idx) & U16_MASK
        if moved == 0:
            return False
        v = self._views(mem)
        full_fence()
        kind = int(v.driver_event[EVENT_FLAGS]) & RING_EVENT_FLAGS_MASK
        if kind == RING_EVENT_FLAGS_DISABLE:
            return False
        if kind != RING_EVENT_FLAGS_DESC or not event_idx:
            return True
        event = int(v.driver_event[EVENT_OFF_WRAP])
        return packed_need_event(event, self.used_pos, self.used_wrap, moved, self.size)

    def suppress_kicks(self, mem: GuestMemory, suppress: bool, *, event_idx: bool) -> None:
        """Ask the driver not to (or again to) notify us of new available descriptors (§2.8.10, the
        device event suppression structure).

        Suppressing writes DISABLE. Re-enabling writes ENABLE, or with EVENT_IDX the descriptor at the
        avail position (kick when that one is made available), its offset before the flags that make it
        count. The hint is racy: after re-enabling, check ``avail_pending`` once more before sleeping;
        re-enabling ends with a full fence so that check reads the ring only after this store is
        visible (the split ring's argument, :meth:`~rings.split.SplitQueue.suppress_kicks`).
        """
        v = self._views(mem)
        if suppress:
            v.device_event[EVENT_FLAGS] = RING_EVENT_FLAGS_DISABLE
            return
        if event_idx:
            v.device_event[EVENT_OFF_WRAP] = off_wrap(self.avail_pos, self.avail_wrap)
            v.device_event[EVENT_FLAGS] = RING_EVENT_FLAGS_DESC
        else:
            v.device_event[EVENT_FLAGS] = RING_EVENT_FLAGS_ENABLE
        full_fence()

    def kick_after(self, mem: GuestMemory, count: int) -> None:
        """EVENT_IDX only: ask the driver to notify once it has made more than ``count`` descriptors
        available beyond the avail position (0: on the first one, as re-enabling does). The caller
        must look at ``avail_pending`` afterwards and keep a timer, as on the split ring."""
        if not 0 <= count < self.size:
            raise ValueError(f"kick_after({count}) on a queue of {self.size}")
        v = self._views(mem)
        pos, wrap = advance(self.avail_pos, self.avail_wrap, count, self.size)
        v.device_event[EVENT_OFF_WRAP] = off_wrap(pos, wrap)
        v.device_event[EVENT_FLAGS] = RING_EVENT_FLAGS_DESC
        full_fence()
