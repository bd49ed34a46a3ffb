"""Inflight I/O tracking for packed virtqueues: the ``QueueRegionPacked`` layout of vhost-user's
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (vhost-user spec, "Inflight I/O tracking", the packed variant)
and the device's operations on it, so that a backend restarted after a crash completes every chain it
had taken from the ring exactly once.

A packed ring keeps no used index in memory and overwrites available descriptors with used ones
(possibly while other chains are still in flight), so the region mirrors more than the split one
(``rings.inflight``): every descriptor of every chain in flight, in ``DescStatePacked`` entries linked
into a free list; per chain (at its head entry) ``inflight``, a ``counter`` giving the fetch order, the
descriptor count ``num`` and the ``last`` entry; and the device's used position and wrap counter, each
with an ``old_`` copy that makes an update of the used side commit-or-rollback on restart.

This module owns the dtypes, the region size, and :class:`InflightPackedQueue`: ``mark_popped`` (spec,
"When receiving available buffers"), ``pre_put`` / ``post_put`` around ``PackedQueue.push_used``
("When supplying used buffers") and ``recover`` ("When reconnecting"). The device operations are numpy
batch operations over a whole pop or a whole used batch: the free list is mirrored in memory as a
stack (its top is the list's head), so a pop takes its entries as one slice and a completion pushes
them back as one; only the links inside a chain are followed, one depth at a time. ``recover``
checks the whole region before it writes anything: a region it cannot trust (an unknown version,
another queue size, a position outside the ring, a free list or chain that loops, leaves the table,
overlaps another) is refused with :class:`~rings.inflight.InflightRegionError` and left unchanged.
Numbers are little-endian (the spec says native; nicsim runs on little-endian hosts only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .inflight import INFLIGHT_ALIGNMENT, INFLIGHT_VERSION, InflightRegionError
from .memory import GuestMemory
from .packed_layout import (
    AVAIL_USED_MASK,
    MAX_PACKED_QUEUE_SIZE,
    PDESC_DTYPE,
    advance,
    avail_flags,
    used_flags,
)
from .packed_walk import SavedChains

# vhost-user spec, QueueRegionPacked: the header; ``desc[]`` follows at byte 32 (the 29 bytes of fields
# rounded up to the 8-byte alignment of DescStatePacked, as a C compiler lays it out).
PACKED_HEADER_DTYPE = np.dtype(
    {
        "names": [
            "features", "version", "desc_num", "free_head", "old_free_head", "used_idx", "old_used_idx",
            "used_wrap_counter", "old_used_wrap_counter",
        ],
        "formats": ["<u8", "<u2", "<u2", "<u2", "<u2", "<u2", "<u2", "u1", "u1"],
        "offsets": [0, 8, 10, 12, 14, 16, 18, 20, 21],
        "itemsize": 32,
    }
)  # fmt: skip

# vhost-user spec, DescStatePacked (32 bytes): inflight u8, padding u8, next, last, num u16,
# counter u64, then the saved descriptor: id u16, flags u16, len u32, addr u64.
DESC_STATE_PACKED_DTYPE = np.dtype(
    [
        ("inflight", "u1"), ("padding", "u1"), ("next", "<u2"), ("last", "<u2"), ("num", "<u2"),
        ("counter", "<u8"), ("id", "<u2"), ("flags", "<u2"), ("len", "<u4"), ("addr", "<u8"),
    ]
)  # fmt: skip

_IDS = 1 << 16  # buffer ids are any u16 (§2.8.13)


def packed_region_size(queue_size: int) -> int:
    """Bytes of one packed queue's region: header and ``queue_size`` entries, rounded up to
    INFLIGHT_ALIGNMENT (DPDK's ``get_pervq_shm_size_packed`` gives the same)."""
    if not 1 <= queue_size <= MAX_PACKED_QUEUE_SIZE:
        raise ValueError(f"inflight queue size {queue_size} not in 1..{MAX_PACKED_QUEUE_SIZE}")
    raw = PACKED_HEADER_DTYPE.itemsize + DESC_STATE_PACKED_DTYPE.itemsize * queue_size
    return -(-raw // INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT


@dataclass(frozen=True, kw_only=True)
class PackedRecovery:
    """What :meth:`InflightPackedQueue.recover` found. ``resubmit``: chains in flight, oldest first, with
    their saved descriptors (walk them with ``PackedQueue.resubmit``). ``used_pos``/``used_wrap``: the
    device's used side; ``avail_pos``/``avail_wrap``: where popping resumes (past every chain either
    used or resubmitted). ``fresh``: the buffer was new (all zero); use SET_VRING_BASE instead.
    ``committed``: an interrupted completion had reached the ring and was kept, rather than rolled
    back. ``lost``: older chains of a buffer id a driver reused while it was in flight (only the
    newest chain of an id is resubmitted, as the ring itself keeps only the newest)."""

    resubmit: SavedChains
    used_pos: int
    used_wrap: int
    avail_pos: int
    avail_wrap: int
    fresh: bool
    committed: bool
    lost: int


def _lap_distance(p0: int, w0: int, p1: int, w1: int, n: int) -> int:
    """Descriptors from ``(p0, w0)`` to ``(p1, w1)`` on a ring of ``n``, at most ``n``."""
    d = (p1 - p0) % n
    if advance(p0, w0, d, n)[1] != w1:
        d = n  # a whole lap (or a state no batch produces: bounded to one lap)
    return d


class InflightPackedQueue:
    """One packed queue's region: typed views of the header and entries, the global counter, the
    entry each buffer id in flight started at, and the free list mirrored as a stack (all kept in
    memory; rebuilt by :meth:`recover`, which must run before the device operations)."""

    def __init__(self, raw: npt.NDArray[np.uint8], *, index: int, queue_size: int) -> None:
        hsize = PACKED_HEADER_DTYPE.itemsize
        need = hsize + DESC_STATE_PACKED_DTYPE.itemsize * queue_size
        if raw.dtype != np.uint8 or raw.ndim != 1 or raw.shape[0] < need:
            raise ValueError(f"inflight queue region must be 1-D uint8 of at least {need} bytes")
        self.index = index
        self.queue_size = queue_size
        self.h: npt.NDArray[Any] = raw[:hsize].view(PACKED_HEADER_DTYPE)
        self.e: npt.NDArray[Any] = raw[hsize : hsize + DESC_STATE_PACKED_DTYPE.itemsize * queue_size].view(
            DESC_STATE_PACKED_DTYPE
        )
        self._counter = 0
        self._entry_of_id = np.full(_IDS, -1, dtype=np.int32)
        # The free list as a stack: the list reads stack[top - 1], stack[top - 2], ..., stack[0].
        self._stack = np.zeros(queue_size, dtype=np.int64)
        self._top = 0
        self._freeing = np.empty(0, dtype=np.int64)  # heads pre_put gave back, for post_put
        self.ready = False  # recover() ran: the in-memory state matches the region

    def _get(self, name: str) -> int:
        return int(self.h[name][0])

    def _set(self, name: str, value: int) -> None:
        self.h[name] = value

    @property
    def version(self) -> int:
        return self._get("version")

    @property
    def free_entries(self) -> int:
        """Entries on the free list (the queue size minus the descriptors tracked in flight)."""
        return self._top

    def in_flight(self) -> npt.NDArray[np.int64]:
        """Head entries marked in flight, in counter order (oldest first)."""
        heads = np.flatnonzero(self.e["inflight"])
        return heads[np.argsort(self.e["counter"][heads], kind="stable")]

    # -- device operations ------------------------------------------------------------------------

    def mark_popped(self, descs: npt.NDArray[np.void], ndesc: npt.ArrayLike) -> int:
        """Chains just popped, in ring order (``PackedQueue.popped_descriptors``): the next entries of
        the free list take their descriptors, each chain's first entry becomes its head (``num``,
        ``last``, the next counter, then ``inflight = 1``), and only then do ``free_head`` and
        ``old_free_head`` move past them: a crash part-way leaves every chain of the batch on the free
        list from ``old_free_head``, so recovery clears them and the ring is read again from there.

        Returns how many chains were not tracked because the free list ran out, which only a driver
        reusing a buffer id in flight can cause (its earlier chain's entries are never given back):
        such chains are not resubmitted after a restart."""
        if not self.ready:
            return 0
        nd = np.minimum(np.asarray(ndesc, dtype=np.int64).reshape(-1), self.queue_size)
        c = int(nd.shape[0])
        if c == 0:
            return 0
        cum = np.cumsum(nd)
        m = int(np.searchsorted(cum, self._top, side="right"))  # the chains whose entries are free
        if m == 0:
            return c
        nd = nd[:m]
        total = int(cum[m - 1])
        taken = self._stack[self._top - total : self._top][::-1]
        first = cum[:m] - nd
        heads = taken[first]
        lasts = taken[first + nd - 1]
        d = descs[:total]
        e = self.e
        e["id"][taken] = d["id"]
        e["flags"][taken] = d["flags"]
        e["len"][taken] = d["len"]
        e["addr"][taken] = d["addr"]
        e["num"][heads] = nd
        e["last"][heads] = lasts
        e["counter"][heads] = np.arange(self._counter, self._counter + m, dtype=np.uint64)
        e["inflight"][heads] = 1
        self._top -= total
        free = int(self._stack[self._top - 1]) if self._top else self.queue_size
        self._set("free_head", free)
        self._set("old_free_head", free)  # the batch is recorded from here on
        self._counter = (self._counter + m) & 0xFFFF_FFFF_FFFF_FFFF
        self._entry_of_id[d["id"][first + nd - 1]] = heads  # §2.8.6: a chain's id is its last's
        return c - m

    def _members(self, heads: npt.NDArray[np.int64], nd: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The entries of the chains at ``heads`` (``nd`` each), chain after chain, each from its head
        along ``next``: one numpy step per depth."""
        first = np.cumsum(nd) - nd
        out = np.empty(int(nd.sum()), dtype=np.int64)
        cur = heads.copy()
        nxt = self.e["next"]
        for depth in range(int(nd.max())):
            sel = np.flatnonzero(nd > depth)
            out[first[sel] + depth] = cur[sel]
            on = np.flatnonzero(nd > depth + 1)
            if on.shape[0]:
                cur[on] = nxt[cur[on]]
        return out

    def pre_put(self, ids: npt.ArrayLike, used: tuple[int, int] | None = None) -> None:
        """Buffers about to be marked used, in the order ``push_used`` gets them: each chain's entries
        go back on the free list (its ``last`` links to the previous head, ``free_head`` becomes its
        head), then ``used_idx``/``used_wrap_counter`` take the position the ring will have (spec
        steps 1-5). ``used``: that position and wrap counter (``PackedQueue.used_after``), which also
        counts ids not tracked here; without it they move by the descriptors of the tracked chains.
        Call right before ``push_used``; a crash before its flags are written is rolled back."""
        if not self.ready:
            return
        e, n = self.e, self.queue_size
        idx = np.asarray(ids, dtype=np.int64).reshape(-1) & 0xFFFF
        heads = self._entry_of_id[idx].astype(np.int64)
        heads = heads[heads >= 0]
        if heads.shape[0] > 1:
            _, first_seen = np.unique(heads, return_index=True)
            if first_seen.shape[0] != heads.shape[0]:  # an id twice in one batch: its chain once
                heads = heads[np.sort(first_seen)]
        self._entry_of_id[idx] = -1
        free = self._get("free_head")
        k = int(heads.shape[0])
        if k:
            nd = np.clip(e["num"][heads].astype(np.int64), 1, n)
            if used is None:
                pos, wrap = self._get("used_idx"), self._get("used_wrap_counter")
                used = advance(pos, wrap, min(int(nd.sum()), n), n)
            prev = np.empty(k, dtype=np.int64)
            prev[0] = free
            prev[1:] = heads[:-1]
            e["next"][e["last"][heads].astype(np.int64)] = prev
            members = self._members(heads, nd)
            # Onto the stack: chain after chain, each last entry first, so the newest head is on top.
            first = np.cumsum(nd) - nd
            chain = np.repeat(np.arange(k), nd)
            rev = first[chain] + nd[chain] - 1 - (np.arange(members.shape[0]) - first[chain])
            total = int(members.shape[0])
            self._stack[self._top : self._top + total] = members[rev]
            self._top += total
            free = int(heads[-1])
        self._freeing = heads
        self._set("free_head", free)
        if used is not None:
            self._set("used_idx", used[0])
            self._set("used_wrap_counter", used[1])

    def post_put(self, ids: npt.ArrayLike = ()) -> None:
        """After ``push_used`` wrote the flags: clear ``inflight`` of the heads the last ``pre_put``
        gave back, then make the new state the committed one (``old_*``; spec, the last two steps).
        ``ids`` is the batch ``pre_put`` had (kept for symmetry with the split region)."""
        if not self.ready:
            return
        if self._freeing.shape[0]:
            self.e["inflight"][self._freeing] = 0
            self._freeing = np.empty(0, dtype=np.int64)
        self._set("old_free_head", self._get("free_head"))
        self._set("old_used_idx", self._get("used_idx"))
        self._set("old_used_wrap_counter", self._get("used_wrap_counter"))

    # -- restart ----------------------------------------------------------------------------------

    def _refuse(self, message: str, reason: str) -> InflightRegionError:
        return InflightRegionError(f"inflight region: {message}", queue=self.index, reason=reason)

    def recover(self, mem: GuestMemory, desc_addr: int, *, used_pos: int, used_wrap: int) -> PackedRecovery:
        """Reconcile the region with the descriptor ring at ``desc_addr`` and say what to resubmit
        (spec, "When reconnecting"). A fresh region (version 0) is initialised at ``used_pos`` /
        ``used_wrap`` (SET_VRING_BASE's used half), every entry on the free list.

        Otherwise: if ``used_idx`` moved past ``old_used_idx``, a completion was interrupted; if the
        ring descriptor at ``old_used_idx`` no longer looks available with ``old_used_wrap_counter``,
        its flags were written (``push_used`` writes the first one last, so the driver may have seen
        the batch), and the update is committed; else it is rolled back, and any later descriptor of
        that batch whose flags were already written (they look used to a driver that gets that far)
        is made to look available again: its chain is resubmitted, and its slot is the device's to
        overwrite. Entries on the free list are then not in flight, and the heads still in flight are
        resubmitted in counter order with their saved descriptors. The free list is then rebuilt
        from every entry no resubmitted chain holds.

        InflightRegionError, having changed nothing, when the region cannot be trusted: ``reason``
        ``version``, ``desc_num`` (another queue size), ``used_idx`` / ``wrap`` (a position outside the
        ring, a wrap counter not 0 or 1), ``free_list`` (it loops), ``chain`` (a chain in flight whose
        length is not 1..size, whose links leave the table, loop, end elsewhere than its ``last``, or
        share an entry with the free list or another chain). GuestMemoryError if the ring is outside
        guest memory. ValueError for a ``used_pos`` outside the ring.
        """
        n = self.queue_size
        e = self.e
        if not 0 <= used_pos < n:
            raise ValueError(f"used position {used_pos} is outside a ring of {n}")
        version = self.version
        if version == 0:
            self._fresh(used_pos, used_wrap & 1)
            return PackedRecovery(
                resubmit=_saved(e, np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)),
                used_pos=used_pos, used_wrap=used_wrap & 1, avail_pos=used_pos, avail_wrap=used_wrap & 1,
                fresh=True, committed=False, lost=0,
            )  # fmt: skip
        if version != INFLIGHT_VERSION:
            raise self._refuse(f"version {version} is not {INFLIGHT_VERSION}", "version")
        if self._get("desc_num") != n:
            raise self._refuse(f"made for {self._get('desc_num')} descriptors, the queue has {n}", "desc_num")
        for name in ("used_idx", "old_used_idx"):
            if self._get(name) >= n:
                raise self._refuse(f"{name} {self._get(name)} is outside a ring of {n}", "used_idx")
        for name in ("used_wrap_counter", "old_used_wrap_counter"):
            if self._get(name) > 1:
                raise self._refuse(f"{name} is {self._get(name)}, not 0 or 1", "wrap")
        cur = (self._get("free_head"), self._get("used_idx"), self._get("used_wrap_counter"))
        old = (self._get("old_free_head"), self._get("old_used_idx"), self._get("old_used_wrap_counter"))
        committed = False
        stale = np.empty(0, dtype=np.int64)
        stale_wrap = np.empty(0, dtype=np.int64)
        ring: npt.NDArray[Any] | None = None
        if cur[1:] != old[1:]:
            ring = mem.view_as(desc_addr, PDESC_DTYPE, n)
            if int(ring["flags"][old[1]]) & AVAIL_USED_MASK != avail_flags(old[2]):
                committed = True  # the batch's first used descriptor is visible: keep the update
            else:
                # Rolled back: the batch's other descriptors may already carry used flags.
                d = _lap_distance(old[1], old[2], cur[1], cur[2], n)
                lin = old[1] + np.arange(1, d, dtype=np.int64)
                stale = lin % n
                stale_wrap = (old[2] ^ (lin // n)) & 1
                looks_used = (ring["flags"][stale] & AVAIL_USED_MASK) == np.where(
                    stale_wrap == 1, used_flags(1), used_flags(0)
                )
                stale, stale_wrap = stale[looks_used], stale_wrap[looks_used]
        free_head, used_idx, used_wrap_now = cur if committed else old
        # The free list from the chosen head: its entries are not in flight.
        on_free = np.zeros(n, dtype=np.bool_)
        nxt = e["next"]
        f = free_head
        while f < n:
            if on_free[f]:
                raise self._refuse(f"the free list from entry {free_head} loops at entry {f}", "free_list")
            on_free[f] = True
            f = int(nxt[f])
        heads = np.flatnonzero((e["inflight"] != 0) & ~on_free)
        heads = heads[np.argsort(e["counter"][heads], kind="stable")]
        nd = e["num"][heads].astype(np.int64)
        members = self._check_chains(heads, nd, on_free)
        # A buffer id reused while in flight: only its newest chain is the ring's (PackedQueue keeps
        # the latest); the older ones are dropped.
        ends = np.cumsum(nd) - 1
        ids = e["id"][members[ends]] if heads.shape[0] else np.empty(0, np.uint16)
        keep = np.ones(heads.shape[0], dtype=np.bool_)
        if heads.shape[0] > 1:
            _, newest = np.unique(ids[::-1], return_index=True)
            keep[:] = False
            keep[heads.shape[0] - 1 - newest] = True
        lost = int(heads.shape[0] - keep.sum())
        chain_of = np.repeat(np.arange(heads.shape[0]), nd)
        kept_members = members[keep[chain_of]]
        heads, nd = heads[keep], nd[keep]
        total = int(nd.sum())
        avail_pos, avail_wrap = advance(used_idx, used_wrap_now, total, n)
        resubmit = _saved(e, heads, nd, kept_members)
        counters = e["counter"][heads]
        # -- everything checked: write ----------------------------------------------------------------
        if stale.shape[0]:
            assert ring is not None
            kept_bits = ring["flags"][stale] & ~np.uint16(AVAIL_USED_MASK)
            ring["flags"][stale] = kept_bits | np.where(stale_wrap == 1, avail_flags(1), avail_flags(0))
        for name, value in zip(("free_head", "used_idx", "used_wrap_counter"), (free_head, used_idx,
                                                                                used_wrap_now), strict=True):
            self._set("old_" + name, value)  # commit (or keep) first, then make the current state match
            self._set(name, value)
        busy = np.zeros(n, dtype=np.bool_)
        busy[kept_members] = True
        head_mask = np.zeros(n, dtype=np.bool_)
        head_mask[heads] = True
        e["inflight"][~head_mask] = 0
        free = np.flatnonzero(~busy)
        # An empty list while the links are rewritten: a crash now leaves only the kept chains in flight.
        self._set("old_free_head", n)
        self._set("free_head", n)
        if free.shape[0]:
            e["next"][free[:-1]] = free[1:]
            e["next"][free[-1]] = n
        head = int(free[0]) if free.shape[0] else n
        self._set("free_head", head)
        self._set("old_free_head", head)
        # -- the in-memory state ----------------------------------------------------------------------
        self._stack[: free.shape[0]] = free[::-1]
        self._top = int(free.shape[0])
        self._entry_of_id[:] = -1
        self._entry_of_id[resubmit.ids] = heads
        self._counter = (int(counters.max()) + 1) & 0xFFFF_FFFF_FFFF_FFFF if heads.shape[0] else 0
        self._freeing = np.empty(0, dtype=np.int64)
        self.ready = True
        return PackedRecovery(
            resubmit=resubmit, used_pos=used_idx, used_wrap=used_wrap_now, avail_pos=avail_pos,
            avail_wrap=avail_wrap, fresh=False, committed=committed, lost=lost,
        )  # fmt: skip

    def _fresh(self, used_pos: int, used_wrap: int) -> None:
        """Initialise a new (all-zero) region at the ring's used position: every entry free."""
        n, e = self.queue_size, self.e
        e["inflight"] = 0
        e["next"] = np.arange(1, n + 1, dtype=np.uint16)
        for name, value in (
            ("features", 0), ("desc_num", n), ("free_head", 0), ("old_free_head", 0),
            ("used_idx", used_pos), ("old_used_idx", used_pos),
            ("used_wrap_counter", used_wrap), ("old_used_wrap_counter", used_wrap),
            ("version", INFLIGHT_VERSION),  # last: the region is valid from here on
        ):  # fmt: skip
            self._set(name, value)
        self._stack[:] = np.arange(n - 1, -1, -1)
        self._top = n
        self._counter = 0
        self._entry_of_id[:] = -1
        self._freeing = np.empty(0, dtype=np.int64)
        self.ready = True

    def _check_chains(
        self, heads: npt.NDArray[np.int64], nd: npt.NDArray[np.int64], on_free: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.int64]:
        """The entries of the chains in flight at ``heads``, chain after chain; InflightRegionError
        unless each has 1..size entries, linked from its head to its ``last`` inside the table, and no
        entry is on the free list or in two chains."""
        n, e = self.queue_size, self.e
        if heads.shape[0] == 0:
            return np.empty(0, dtype=np.int64)
        bad = np.flatnonzero((nd < 1) | (nd > n))
        if bad.shape[0]:
            h = int(heads[bad[0]])
            raise self._refuse(f"chain at entry {h} has {int(nd[bad[0]])} descriptors, not 1..{n}", "chain")
        if int(nd.sum()) > n:
            raise self._refuse(f"{heads.shape[0]} chains in flight hold {int(nd.sum())} entries, "
                               f"more than the {n} there are", "chain")  # fmt: skip
        first = np.cumsum(nd) - nd
        out = np.empty(int(nd.sum()), dtype=np.int64)
        cur = heads.astype(np.int64)
        nxt = e["next"]
        for depth in range(int(nd.max())):
            sel = np.flatnonzero(nd > depth)
            out[first[sel] + depth] = cur[sel]
            on = np.flatnonzero(nd > depth + 1)
            if on.shape[0]:
                step = nxt[cur[on]].astype(np.int64)
                out_of_table = np.flatnonzero(step >= n)
                if out_of_table.shape[0]:
                    h = int(heads[on[out_of_table[0]]])
                    raise self._refuse(f"chain at entry {h} links to entry {int(step[out_of_table[0]])}, "
                                       f"outside the {n} entries", "chain")  # fmt: skip
                cur[on] = step
        ends = first + nd - 1
        wrong_end = np.flatnonzero(out[ends] != e["last"][heads])
        if wrong_end.shape[0]:
            h = int(heads[wrong_end[0]])
            why = f"chain at entry {h} does not end at its last entry {int(e['last'][h])}"
            raise self._refuse(why, "chain")
        if np.unique(out).shape[0] != out.shape[0]:
            raise self._refuse("chains in flight loop or share entries", "chain")
        on_list = np.flatnonzero(on_free[out])
        if on_list.shape[0]:
            raise self._refuse(f"entry {int(out[on_list[0]])} is both in a chain in flight and free", "chain")
        return out


def _saved(
    e: npt.NDArray[Any], heads: npt.NDArray[np.int64], nd: npt.NDArray[np.int64],
    members: npt.NDArray[np.int64],
) -> SavedChains:  # fmt: skip
    """The chains at ``heads`` (``nd`` entries each, ``members`` chain after chain) as copies of their
    saved descriptors: what ``PackedQueue.resubmit`` walks (later writes to the region cannot reach them)."""
    ends = np.cumsum(nd) - 1
    return SavedChains(
        ids=e["id"][members[ends]].astype(np.uint16) if heads.shape[0] else np.empty(0, np.uint16),
        ndesc=nd.astype(np.int64),
        d_addr=e["addr"][members].astype(np.uint64),
        d_len=e["len"][members].astype(np.uint32),
        d_flags=e["flags"][members].astype(np.uint16),
    )


def packed_inflight_size(num_queues: int, queue_size: int) -> int:
    """Bytes of the whole buffer (GET_INFLIGHT_FD's ``mmap_size``): one region per queue."""
    if num_queues < 1:
        raise ValueError(f"inflight buffer for {num_queues} queues")
    return num_queues * packed_region_size(queue_size)


class InflightPackedRegion:
    """The whole inflight buffer of a device with packed queues (``InflightRegion``'s packed twin):
    ``buffer`` is anything exposing writable bytes of at least :func:`packed_inflight_size`."""

    def __init__(self, buffer: Any, *, num_queues: int, queue_size: int) -> None:
        need = packed_inflight_size(num_queues, queue_size)
        raw = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
        if raw.dtype != np.uint8 or raw.ndim != 1 or raw.shape[0] < need or not raw.flags.writeable:
            raise ValueError(f"inflight buffer must be writable 1-D uint8 of at least {need} bytes")
        step = packed_region_size(queue_size)
        self.num_queues = num_queues
        self.queue_size = queue_size
        self._queues: tuple[InflightPackedQueue, ...] = tuple(
            InflightPackedQueue(raw[i * step : (i + 1) * step], index=i, queue_size=queue_size)
            for i in range(num_queues)
        )

    def queue(self, index: int) -> InflightPackedQueue:
        if not 0 <= index < len(self._queues):
            raise IndexError(f"inflight queue {index} not in 0..{self.num_queues - 1}")
        return self._queues[index]

    def release(self) -> None:
        """Drop this object's views of the buffer (before the caller closes its mmap). Idempotent."""
        self._queues = ()
