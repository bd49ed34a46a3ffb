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
("When supplying used buffers") and ``recover`` ("When reconnecting"). The free list is a linked list,
so these walk it one descriptor at a time in Python (not batched; the feature is optional). Numbers
are little-endian (the spec says native; nicsim runs on little-endian hosts only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .inflight import INFLIGHT_ALIGNMENT, INFLIGHT_VERSION, InflightRegionError
from .layout import U16_MASK
from .memory import GuestMemory
from .packed_layout import AVAIL_USED_MASK, MAX_PACKED_QUEUE_SIZE, advance, avail_flags
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

_U64_MASK = (1 << 64) - 1


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
    back. ``lost``: in-flight heads whose entries were corrupt (not resubmitted)."""

    resubmit: SavedChains
    used_pos: int
    used_wrap: int
    avail_pos: int
    avail_wrap: int
    fresh: bool
    committed: bool
    lost: int


class InflightPackedQueue:
    """One packed queue's region: typed views of the header and entries, the global counter, and the
    entry each buffer id in flight started at (kept in memory; rebuilt by :meth:`recover`)."""

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
        self._entry_of_id = np.full(1 << 16, -1, dtype=np.int32)

    def _get(self, name: str) -> int:
        return int(self.h[name][0])

    def _set(self, name: str, value: int) -> None:
        self.h[name] = value

    @property
    def version(self) -> int:
        return self._get("version")

    # -- device operations ------------------------------------------------------------------------

    def mark_popped(self, descs: npt.NDArray[np.void], ndesc: npt.ArrayLike) -> int:
        """Chains just popped, in ring order (``PackedQueue.popped_descriptors``): each gets a head
        entry (``old_free_head``) with the next counter and ``inflight = 1``, and every descriptor is
        saved into the entry at ``free_head``, which then follows the free list; ``old_free_head``
        moves once a chain is complete, so a crash part-way leaves the partial chain in the free list.

        Returns how many chains were not tracked because the free list ran out, which only a driver
        reusing a buffer id in flight can cause (its earlier chain's entries are never given back);
        such a chain is left as a crash part-way would leave it, and is not resubmitted."""
        e, n = self.e, self.queue_size
        nxt, last, num = e["next"], e["last"], e["num"]
        at = untracked = 0
        for k in np.asarray(ndesc, dtype=np.int64).tolist():
            head = free = self._get("old_free_head")
            if head >= n:
                untracked += 1
                at += k
                continue
            num[head] = 0
            e["counter"][head] = self._counter
            self._counter = (self._counter + 1) & _U64_MASK
            e["inflight"][head] = 1
            for j in range(k):
                if free >= n:
                    break
                d = descs[at + j]
                if j == k - 1:
                    last[head] = free
                num[head] += 1
                e["id"][free], e["flags"][free] = d["id"], d["flags"]
                e["len"][free], e["addr"][free] = d["len"], d["addr"]
                free = int(nxt[free])
                self._set("free_head", free)
            else:
                self._set("old_free_head", free)
                self._entry_of_id[int(descs[at + k - 1]["id"])] = head
                at += k
                continue
            # The list ran out part-way: undo as recovery would (the entries stay free).
            e["inflight"][head] = 0
            self._set("free_head", head)
            untracked += 1
            at += k
        return untracked

    def pre_put(self, ids: npt.ArrayLike) -> None:
        """Buffers about to be marked used, in the order ``push_used`` gets them: each chain's entries
        go back on the free list and ``used_idx``/``used_wrap_counter`` move past its descriptors
        (spec steps 1-5). Call before ``push_used``; ids not tracked here are skipped."""
        e, n = self.e, self.queue_size
        pos, wrap = self._get("used_idx"), self._get("used_wrap_counter")
        free = self._get("free_head")
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            head = int(self._entry_of_id[i & U16_MASK])
            if head < 0:
                continue
            e["next"][int(e["last"][head]) % n] = free
            free = head
            pos, wrap = advance(pos, wrap, min(int(e["num"][head]), n), n)
        self._set("free_head", free)
        self._set("used_idx", pos)
        self._set("used_wrap_counter", wrap)

    def post_put(self, ids: npt.ArrayLike) -> None:
        """After ``push_used`` wrote the flags: clear ``inflight`` of the batch's heads, then make the
        new state the committed one (``old_*``; spec, the last two steps)."""
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            head = int(self._entry_of_id[i & U16_MASK])
            if head >= 0:
                self.e["inflight"][head] = 0
                self._entry_of_id[i & U16_MASK] = -1
        self._set("old_free_head", self._get("free_head"))
        self._set("old_used_idx", self._get("used_idx"))
        self._set("old_used_wrap_counter", self._get("used_wrap_counter"))

    # -- restart ----------------------------------------------------------------------------------

    def recover(self, mem: GuestMemory, desc_addr: int, *, used_pos: int, used_wrap: int) -> PackedRecovery:
        """Reconcile the region with the descriptor ring at ``desc_addr`` and say what to resubmit
        (spec, "When reconnecting"). A fresh region (version 0) is initialised at ``used_pos`` /
        ``used_wrap`` (SET_VRING_BASE's used half), every entry on the free list.

        Otherwise: if ``used_idx`` moved past ``old_used_idx``, a completion was interrupted; if the
        ring descriptor at ``old_used_idx`` no longer looks available with ``old_used_wrap_counter``,
        its flags were written (the driver may have seen the batch), so it is committed, else rolled
        back. Entries on the free list are then not in flight, and the heads still in flight are
        resubmitted in counter order with their saved descriptors. Every walk is bounded by the queue
        size; a head whose entries are corrupt is counted in ``lost``.

        InflightRegionError (nothing changed) for an unknown version or another queue size;
        GuestMemoryError if the ring is outside guest memory.
        """
        n = self.queue_size
        e = self.e
        version = self.version
        if version == 0:
            e["inflight"] = 0
            e["next"] = np.arange(1, n + 1, dtype=np.uint16)
            for name, value in (
                ("features", 0), ("desc_num", n), ("free_head", 0), ("old_free_head", 0),
                ("used_idx", used_pos), ("old_used_idx", used_pos),
                ("used_wrap_counter", used_wrap), ("old_used_wrap_counter", used_wrap),
                ("version", INFLIGHT_VERSION),  # last: the region is valid from here on
            ):  # fmt: skip
                self._set(name, value)
            self._counter = 0
            self._entry_of_id[:] = -1
            return PackedRecovery(
                resubmit=_saved(e, []), used_pos=used_pos, used_wrap=used_wrap, avail_pos=used_pos,
                avail_wrap=used_wrap, fresh=True, committed=False, lost=0,
            )  # fmt: skip
        if version != INFLIGHT_VERSION:
            raise InflightRegionError(
                f"inflight region version {version} is not {INFLIGHT_VERSION}",
                queue=self.index,
                reason="version",
            )
        if self._get("desc_num") != n:
            raise InflightRegionError(
                f"inflight region is for {self._get('desc_num')} descriptors, the queue has {n}",
                queue=self.index, reason="desc_num",
            )  # fmt: skip
        old_pos, old_wrap = self._get("old_used_idx"), self._get("old_used_wrap_counter") & 1
        committed = False
        moved = (self._get("used_idx"), self._get("used_wrap_counter") & 1) != (old_pos, old_wrap)
        if moved and old_pos < n:
            flags = int(mem.view_as(desc_addr + 16 * old_pos + 14, "<u2", 1)[0])
            if flags & AVAIL_USED_MASK != avail_flags(old_wrap):
                committed = True
                self._set("old_free_head", self._get("free_head"))
                self._set("old_used_idx", self._get("used_idx"))
                self._set("old_used_wrap_counter", self._get("used_wrap_counter"))
        self._set("free_head", self._get("old_free_head"))
        self._set("used_idx", self._get("old_used_idx"))
        self._set("used_wrap_counter", self._get("old_used_wrap_counter"))
        cur, steps = self._get("free_head"), 0
        while cur < n and steps < n:
            e["inflight"][cur] = 0
            cur, steps = int(e["next"][cur]), steps + 1
        heads = np.flatnonzero(e["inflight"])
        heads = heads[np.argsort(e["counter"][heads], kind="stable")]
        chains: list[list[int]] = []
        lost = 0
        for h in heads.tolist():
            chain = _chain(e, h, n)
            if chain is None:
                lost += 1
                e["inflight"][h] = 0
            else:
                chains.append(chain)
        self._entry_of_id[:] = -1
        for chain in chains:
            self._entry_of_id[int(e["id"][chain[-1]])] = chain[0]
        self._counter = (int(e["counter"][heads].max()) + 1) & _U64_MASK if heads.shape[0] else 0
        used_pos = min(self._get("used_idx"), n - 1)
        used_wrap = self._get("used_wrap_counter") & 1
        avail_pos, avail_wrap = used_pos, used_wrap
        for chain in chains:
            avail_pos, avail_wrap = advance(avail_pos, avail_wrap, len(chain), n)
        return PackedRecovery(
            resubmit=_saved(e, chains), used_pos=used_pos, used_wrap=used_wrap, avail_pos=avail_pos,
            avail_wrap=avail_wrap, fresh=False, committed=committed, lost=lost,
        )  # fmt: skip


def _chain(e: npt.NDArray[Any], head: int, n: int) -> list[int] | None:
    """The entries of the chain at ``head``: ``num`` of them along ``next``, ending at ``last``; None
    when that does not hold (a corrupt region)."""
    num = int(e["num"][head])
    if not 1 <= num <= n:
        return None
    out = [head]
    cur = head
    for _ in range(num - 1):
        cur = int(e["next"][cur])
        if cur >= n:
            return None
        out.append(cur)
    return out if cur == int(e["last"][head]) else None


def _saved(e: npt.NDArray[Any], chains: list[list[int]]) -> SavedChains:
    flat = np.array([i for c in chains for i in c], dtype=np.int64)
    ends = np.array([c[-1] for c in chains], dtype=np.int64)
    return SavedChains(
        ids=e["id"][ends].astype(np.uint16),
        ndesc=np.array([len(c) for c in chains], dtype=np.int64),
        d_addr=e["addr"][flat].astype(np.uint64),
        d_len=e["len"][flat].astype(np.uint32),
        d_flags=e["flags"][flat].astype(np.uint16),
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
