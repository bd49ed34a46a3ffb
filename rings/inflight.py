"""Inflight I/O tracking for split virtqueues: the shared-memory layout of vhost-user's
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (vhost-user spec, "Inflight I/O tracking"; the layout of QEMU's
libvhost-user ``VuVirtqInflight``) and the device's operations on it, so that a backend restarted
after a crash completes every chain it had taken off the avail ring exactly once.

This module owns the numpy structured dtypes of one queue region (a 16-byte header, then one 16-byte
``DescStateSplit`` per descriptor-table entry), the region size, and three batch operations: heads
taken from the avail ring are marked in flight with an increasing counter (:meth:`InflightQueue.
mark_popped`); heads about to be returned are linked into the "last batch" list (:meth:`~InflightQueue.
pre_put`) before the used ring is written and cleared after it (:meth:`~InflightQueue.post_put`); on
restart :meth:`~InflightQueue.recover` reconciles the region with the used ring's ``idx`` and returns
the heads to process again, oldest first. It works on a buffer it is handed (the server maps the memfd)
and never maps, reads or writes anything else. Numbers are little-endian: the spec says "native", and
nicsim only runs on little-endian hosts (as ``rings.layout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import RingsError
from .layout import MAX_QUEUE_SIZE, U16_MASK
from .memory import GuestMemory

INFLIGHT_VERSION = 1
"""``version`` of an initialised queue region; 0 means a fresh (all-zero) buffer."""

INFLIGHT_ALIGNMENT = 64
"""Each queue region starts on a 64-byte boundary (libvhost-user and DPDK's INFLIGHT_ALIGNMENT)."""

# vhost-user spec, QueueRegionSplit (header part; ``desc[]`` follows at byte 16).
INFLIGHT_HEADER_DTYPE = np.dtype(
    [
        ("features", "<u8"),
        ("version", "<u2"),
        ("desc_num", "<u2"),
        ("last_batch_head", "<u2"),
        ("used_idx", "<u2"),
    ]
)

# vhost-user spec, DescStateSplit: inflight u8, padding[5], next u16, counter u64 (16 bytes).
DESC_STATE_DTYPE = np.dtype(
    [("inflight", "u1"), ("padding", "u1", (5,)), ("next", "<u2"), ("counter", "<u8")]
)

NO_HEAD = 0xFFFF
"""``last_batch_head`` / ``next`` value that ends the last-batch list (never a valid head: queue sizes
are at most 32768, virtio 1.2 §2.6)."""

_U64_MASK = (1 << 64) - 1


class InflightRegionError(RingsError):
    """The inflight region cannot be used: ``reason`` says why (an unknown version, a queue size that is
    not the one the region was made for, a used index that moved further than one batch since the last
    completion was recorded). ``queue`` is the queue index. The region was not changed."""

    def __init__(self, message: str, *, queue: int, reason: str) -> None:
        super().__init__(f"{message} (queue {queue})")
        self.queue = queue
        self.reason = reason


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region: the 16-byte header plus ``queue_size`` 16-byte entries, rounded up
    to INFLIGHT_ALIGNMENT. (libvhost-user computes ``ALIGN_UP(16 * size + 2, 64)``, DPDK
    ``ALIGN_UP(16 * size + 16, 64)``; the two agree for every size, and this is the latter.)"""
    if not 1 <= queue_size <= MAX_QUEUE_SIZE:
        raise ValueError(f"inflight queue size {queue_size} not in 1..{MAX_QUEUE_SIZE}")
    raw = INFLIGHT_HEADER_DTYPE.itemsize + DESC_STATE_DTYPE.itemsize * queue_size
    return -(-raw // INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT


def inflight_size(num_queues: int, queue_size: int) -> int:
    """Bytes of the whole buffer (GET_INFLIGHT_FD's ``mmap_size``): one region per queue, back to back."""
    if num_queues < 1:
        raise ValueError(f"inflight buffer for {num_queues} queues")
    return num_queues * queue_region_size(queue_size)


def ring_used_idx(mem: GuestMemory, used_addr: int) -> int:
    """The ``idx`` the used ring at GPA ``used_addr`` holds now (§2.7.8: u16 after the u16 flags), for
    :meth:`InflightQueue.recover` after a restart. GuestMemoryError if the ring is outside memory."""
    return int(mem.view_as(used_addr + 2, "<u2", 1)[0])


@dataclass(frozen=True, kw_only=True)
class Recovery:
    """What :meth:`InflightQueue.recover` found. ``resubmit``: heads to walk and complete again, oldest
    first (not to be popped again: they stay marked in flight). ``used_idx``: the used ring's index, the
    device's next used position. ``last_avail_idx``: where popping resumes (``used_idx + len(resubmit)``:
    every head taken from the avail ring was either returned or is in ``resubmit``). ``fresh``: the buffer
    was new (all zero), nothing was known; use SET_VRING_BASE's value for ``last_avail_idx`` instead.
    ``cleared``: heads of an interrupted last batch that were already on the used ring."""

    resubmit: npt.NDArray[np.uint16]
    used_idx: int
    last_avail_idx: int
    fresh: bool
    cleared: npt.NDArray[np.uint16]


class InflightQueue:
    """One queue's region: typed views of its header and entries, and the device's in-memory counter.

    Operations take arrays of heads (numpy or sequences). A head not below ``desc_num`` has no entry
    (it can only come from a driver that broke §2.7.5.2: heads index the descriptor table) and is
    skipped: such a chain is returned at once with length 0 and never needs resubmitting.
    """

    def __init__(self, raw: npt.NDArray[np.uint8], *, index: int, queue_size: int) -> None:
        hsize = INFLIGHT_HEADER_DTYPE.itemsize
        self.index = index
        self.queue_size = queue_size
        self._header: npt.NDArray[Any] = raw[:hsize].view(INFLIGHT_HEADER_DTYPE)
        desc = raw[hsize : hsize + DESC_STATE_DTYPE.itemsize * queue_size].view(DESC_STATE_DTYPE)
        self.inflight: npt.NDArray[np.uint8] = desc["inflight"]
        self.next: npt.NDArray[np.uint16] = desc["next"]
        self.counter: npt.NDArray[np.uint64] = desc["counter"]
        self._next_counter = 0

    # -- header fields ----------------------------------------------------------------------------

    def _field(self, name: str) -> int:
        return int(self._header[name][0])

    @property
    def version(self) -> int:
        return self._field("version")

    @property
    def desc_num(self) -> int:
        return self._field("desc_num")

    @property
    def last_batch_head(self) -> int:
        return self._field("last_batch_head")

    @property
    def used_idx(self) -> int:
        """The used ring's ``idx`` as of the last completed :meth:`post_put`."""
        return self._field("used_idx")

    @property
    def next_counter(self) -> int:
        """The counter the next popped head gets (kept in memory, recomputed by :meth:`recover`)."""
        return self._next_counter

    def in_flight(self) -> npt.NDArray[np.uint16]:
        """Heads marked in flight, in counter order (oldest first)."""
        heads = np.flatnonzero(self.inflight)
        order = np.argsort(self.counter[heads], kind="stable")
        return heads[order].astype(np.uint16)

    def _trackable(self, heads: npt.ArrayLike) -> npt.NDArray[np.int64]:
        h = np.asarray(heads, dtype=np.int64).reshape(-1)
        return h[(h >= 0) & (h < self.queue_size)]

    # -- device operations ------------------------------------------------------------------------

    def mark_popped(self, heads: npt.ArrayLike) -> None:
        """Heads just taken from the avail ring, in avail order: set each ``counter`` (increasing) and
        then ``inflight = 1`` (spec, "When receiving available buffers").

        Call right after ``pop_avail`` and before acting on the chains. Marking in avail order matters:
        if the process dies part-way, the marked heads are a prefix of the batch, so recovery's
        ``last_avail_idx`` (returned + in flight) points exactly at the first unmarked one, which is read
        again from the avail ring (its slot cannot have been reused: the driver cannot post more than the
        queue size beyond a head that was never returned, §2.7.6).
        """
        h = self._trackable(heads)
        k = int(h.shape[0])
        if k == 0:
            return
        start = self._next_counter
        self.counter[h] = np.arange(start, start + k, dtype=np.uint64)
        self.inflight[h] = 1
        self._next_counter = (start + k) & _U64_MASK

    def pre_put(self, heads: npt.ArrayLike) -> None:
        """Heads about to be returned on the used ring, in used-ring order: link them into the
        last-batch list ending at ``last_batch_head`` (spec, "When supplying used buffers", steps 1-3).

        The spec links the first head of a batch to the previous batch's list; here it ends the list
        instead (``next = NO_HEAD``), so recovery can never walk into an older batch whose heads may be
        in flight again by then. A batch with no trackable head still resets ``last_batch_head``, for
        the same reason. Call before ``push_used``; a crash before ``push_used`` publishes ``used.idx``
        leaves the list unused (the used index did not move).
        """
        h = self._trackable(heads)
        if h.shape[0]:
            self.next[h[0]] = NO_HEAD
            self.next[h[1:]] = h[:-1]
            self._header["last_batch_head"] = h[-1]
        else:
            self._header["last_batch_head"] = NO_HEAD

    def post_put(self, heads: npt.ArrayLike, used_idx: int) -> None:
        """After ``push_used`` published ``used_idx``: clear ``inflight`` of the batch, then record
        ``used_idx`` (spec, "When supplying used buffers", last two steps). Until the second store lands,
        recovery sees ``used_idx`` behind the ring and clears the batch itself from the list."""
        h = self._trackable(heads)
        self.inflight[h] = 0
        self._header["used_idx"] = used_idx & U16_MASK

    # -- restart ----------------------------------------------------------------------------------

    def recover(self, ring_used_idx: int) -> Recovery:
        """Reconcile the region with the used ring's ``idx`` (read from guest memory) and say what to
        resubmit (spec, "When reconnecting"; libvhost-user ``vu_check_queue_inflights``).

        A fresh buffer (``version`` 0) is initialised and has nothing to resubmit. Otherwise, if the
        recorded ``used_idx`` is behind ``ring_used_idx``, the process died between publishing a batch
        and clearing it: the ``ring_used_idx - used_idx`` heads at the front of the last-batch list are
        cleared (they were returned; resubmitting them would complete them twice). Every head still in
        flight is then returned in counter order. The walk is bounded by ``desc_num`` and stops at an
        out-of-range or repeated index, so a corrupt region cannot make it loop or index outside.

        Raises :class:`InflightRegionError` (nothing changed) for an unknown version, a ``desc_num``
        other than this queue's size, or a used index more than ``desc_num`` ahead.
        """
        used = ring_used_idx & U16_MASK
        version = self.version
        empty = np.empty(0, dtype=np.uint16)
        if version == 0:
            self.inflight[:] = 0
            self._header["features"] = 0
            self._header["desc_num"] = self.queue_size
            self._header["last_batch_head"] = NO_HEAD
            self._header["used_idx"] = used
            self._header["version"] = INFLIGHT_VERSION  # last: the region is valid from here on
            self._next_counter = 0
            return Recovery(resubmit=empty, used_idx=used, last_avail_idx=used, fresh=True, cleared=empty)
        if version != INFLIGHT_VERSION:
            raise InflightRegionError(
                f"inflight region version {version} is not {INFLIGHT_VERSION}",
                queue=self.index,
                reason="version",
            )
        if self.desc_num != self.queue_size:
            raise InflightRegionError(
                f"inflight region is for {self.desc_num} descriptors, the queue has {self.queue_size}",
                queue=self.index,
                reason="desc_num",
            )
        behind = (used - self.used_idx) & U16_MASK
        if behind > self.queue_size:
            # One batch is at most the queue size (push_used refuses more): the region missed completions.
            raise InflightRegionError(
                f"used.idx {used} is {behind} ahead of the recorded {self.used_idx}, more than one batch",
                queue=self.index,
                reason="used_idx",
            )
        cleared = self._last_batch(behind)
        self.inflight[cleared] = 0
        self._header["used_idx"] = used
        # Any non-zero byte counts as in flight (a corrupt 2 must not be lost); normalise to 1.
        self.inflight[self.inflight != 0] = 1
        heads = self.in_flight()
        counters = self.counter[heads.astype(np.int64)]
        self._next_counter = (int(counters.max()) + 1) & _U64_MASK if heads.shape[0] else 0
        return Recovery(
            resubmit=heads,
            used_idx=used,
            last_avail_idx=(used + int(heads.shape[0])) & U16_MASK,
            fresh=False,
            cleared=cleared.astype(np.uint16),
        )

    def _last_batch(self, count: int) -> npt.NDArray[np.int64]:
        """The first ``count`` heads of the last-batch list, stopping early at an out-of-range or
        repeated index (never more than ``queue_size`` steps)."""
        out: list[int] = []
        seen = np.zeros(self.queue_size, dtype=np.bool_)
        cur = self.last_batch_head
        nxt = self.next
        while len(out) < count and cur < self.queue_size and not seen[cur]:
            seen[cur] = True
            out.append(cur)
            cur = int(nxt[cur])
        return np.array(out, dtype=np.int64)


class InflightRegion:
    """The whole inflight buffer: ``num_queues`` queue regions of ``queue_size`` entries each.

    ``buffer`` is anything exposing writable bytes (an ``mmap`` of the memfd, a ``bytearray``, a
    ``uint8`` numpy array) of at least :func:`inflight_size` bytes. Call :meth:`release` before closing
    the mmap: it drops every view this object made.
    """

    def __init__(self, buffer: Any, *, num_queues: int, queue_size: int) -> None:
        need = inflight_size(num_queues, queue_size)
        raw = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError(f"inflight buffer must be 1-D uint8, got {raw.dtype} {raw.shape}")
        if raw.shape[0] < need:
            raise ValueError(f"inflight buffer of {raw.shape[0]} bytes, {need} needed")
        if not raw.flags.writeable:
            raise ValueError("inflight buffer is read-only")
        self.num_queues = num_queues
        self.queue_size = queue_size
        step = queue_region_size(queue_size)
        self._queues: tuple[InflightQueue, ...] = tuple(
            InflightQueue(raw[i * step : (i + 1) * step], index=i, queue_size=queue_size)
            for i in range(num_queues)
        )

    def queue(self, index: int) -> InflightQueue:
        if not 0 <= index < len(self._queues):
            raise IndexError(f"inflight queue {index} not in 0..{self.num_queues - 1}")
        return self._queues[index]

    def release(self) -> None:
        """Drop this object's views of the buffer, so the caller can close its mmap once it has also
        dropped the InflightQueue objects it took from :meth:`queue`. Idempotent."""
        self._queues = ()
