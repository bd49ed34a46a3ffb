"""The device side of a split virtqueue (virtio 1.2 §2.7): popping avail heads, handing chains to the
walker, publishing used entries, and the notification decisions in both directions.

A :class:`SplitQueue` owns its indices and ring addresses (GPAs), never memory: every operation takes
the current :class:`~rings.memory.GuestMemory`, and the typed ring views live in that memory's cache,
so a new memory table can never leave a stale view here. Walking the chains behind the popped heads is
``rings.walker``'s job; what it returns is a :class:`~rings.chains.ChainBatch`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import kernels
from .barrier import full_fence
from .chains import ChainBatch
from .errors import AvailIndexError, GuestMemoryError, QueueConfigError
from .layout import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    DESC_DTYPE,
    U16_MASK,
    USED_ALIGN,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_USED_F_NO_NOTIFY,
    is_valid_queue_size,
    vring_need_event,
)
from .memory import GuestMemory
from .pool import PacketPool
from .round_kernels import RoundArea
from .short_chains import ShortChain, walk_short
from .walker import ChainWalker

_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")
_U16_LE = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # §2.7.8 struct virtq_used_elem: id, len
_REGION_BYTES = "region bytes"  # GuestMemory.cached key of the regions' bytes as one tuple


def _region_bytes(mem: GuestMemory) -> tuple[npt.NDArray[np.uint8], ...]:
    """Every region's bytes, in region order (a compiled round reads frames in any of them)."""
    return tuple(r.data for r in mem.regions)


def region_bytes(mem: GuestMemory) -> tuple[npt.NDArray[np.uint8], ...]:
    """Every region's bytes as one tuple, built once per memory table: what compiled calls index by
    a segment's region number."""
    return mem.cached(_REGION_BYTES, _region_bytes)


class _RingViews:
    """Typed views of one queue's three rings in one memory table (cached in the GuestMemory)."""

    __slots__ = (
        "avail",
        "avail_raw",
        "avail_ring",
        "d_addr",
        "d_flags",
        "d_len",
        "d_next",
        "desc_raw",
        "take_ring",
        "used_head",
        "used_raw",
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
        # The same bytes untyped, for the scalar reads and writes of short rounds (``struct``). Like
        # the views above they live only in the memory's cache, so its release drops them too.
        self.desc_raw: memoryview = desc.view(np.uint8).data
        self.avail_raw: memoryview = self.avail.view(np.uint8).data
        self.used_raw: memoryview = mem.view(q.used_addr, 6 + 8 * size).data
        # The ring's part of a compiled round's arguments (rings.round_kernels._take_split_py).
        self.take_ring = (self.avail_ring, self.d_addr, self.d_len, self.d_flags, self.d_next, *mem.bounds)


RingViews = _RingViews  # what ring_views returns, named for its callers' annotations


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

    @property
    def vring_base(self) -> int:
        """GET_VRING_BASE for a split ring: ``last_avail_idx`` (the packed ring's has wrap counters)."""
        return self.last_avail_idx

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

    def ring_views(self, mem: GuestMemory) -> RingViews:
        """The ring's typed views in ``mem`` (cached there): for a caller that hands a compiled call
        the whole ring for longer than a round (``nicsim.virtio.lane``)."""
        return self._views(mem)

    def avail_view(self, mem: GuestMemory) -> npt.NDArray[np.uint16]:
        """The avail ring as u16[size + 3]: flags, idx, ring[size], used_event (§2.7.6), for a
        compiled round that decides the ring's interrupt itself (``nicsim.ports.fd_kernels``)."""
        return self._views(mem).avail

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

    def unpop_avail(self, count: int) -> None:
        """Give the last ``count`` popped heads back (not popped after all): the next pop reads them
        again. The same call as ``PackedQueue.unpop_avail``, so a path can give chains back on
        either ring; here it only moves ``last_avail_idx`` back."""
        if not 0 <= count <= self.size:
            raise ValueError(f"unpop_avail({count}) on a queue of {self.size}")
        self.last_avail_idx = (self.last_avail_idx - count) & U16_MASK

    # -- chain walking --------------------------------------------------------------------------------

    def walk(self, mem: GuestMemory, heads: npt.ArrayLike, *, indirect: bool = True) -> ChainBatch:
        """Walk the chains starting at ``heads`` (NEXT and, if ``indirect``, INDIRECT).

        With ``indirect`` False (VIRTIO_F_INDIRECT_DESC not negotiated) the INDIRECT flag is ignored and
        the descriptor is an ordinary buffer. An INDIRECT descriptor ends the direct part of its chain
        (§2.7.5.3.2: zero or more chained descriptors followed by one indirect one); NEXT on it is
        ignored.
        """
        table = self._views(mem)
        heads_a = np.asarray(heads, dtype=np.uint16)
        if kernels.enabled() and heads_a.shape[0]:
            starts, sizes = mem.bounds
            batch = kernels.walk_split(heads_a, table, starts, sizes, datas=region_bytes(mem),
                                       indirect=indirect)  # fmt: skip
            if batch is not None:
                return batch  # every chain good: what the walker would give, in one compiled call
        return ChainWalker(mem, table, heads_a, queue=self.index, indirect=indirect).run()

    # -- compiled rounds: pop, walk and track, then free and push used, one kernel call each ------------

    def take_round(
        self, mem: GuestMemory, count: int, pool: PacketPool, area: RoundArea, *, queue: int, indirect: bool,
        tx: bool, min_len: int, max_len: int, lens_off: int,
    ) -> tuple[int, int] | None:
        """Pop ``count`` heads (at most :meth:`avail_pending`, which the caller has just asked), walk
        them into ``area`` and track each in a descriptor of ``pool`` as ``queue``'s, in one compiled
        call (``rings.round_kernels``). Returns ``(segments, sum of area.lens)``, or None with nothing
        changed: the kernels are off, or the round is not one the kernel takes whole (see there)."""
        take = kernels.take_split
        if take is None or pool.closed or not 0 < count <= area.size:
            return None
        state = pool.round_state()
        got: tuple[int, int] = take(*self._views(mem).take_ring, region_bytes(mem), self.last_avail_idx,
                                    count, indirect, tx, min_len, max_len, lens_off, *state, queue,
                                    *area.outputs)  # fmt: skip
        if got[0] < 0:
            return None
        self.last_avail_idx = (self.last_avail_idx + count) & U16_MASK
        pool.round_allocated(state[0] + count)
        return got

    def absorb_round(
        self, mem: GuestMemory, count: int, pool: PacketPool, area: RoundArea, *, queue: int, indirect: bool,
        min_len: int, max_len: int, hdr: int, read: bool, every: int = 0, rounds: int = 1, again: int = 0,
        event_idx: bool = False, signalled: int = 0,
    ) -> tuple[int, int, int] | None:
        """A TX round for a port that absorbs its frames, in one compiled call
        (``rings.round_kernels._absorb_split_py``): :meth:`take_round` of ``count`` chains, with
        ``read`` the sum of their frame bytes (each chain's readable bytes after its first ``hdr``),
        then :meth:`complete_round` with used length 0, ``used.idx`` published inside the call after
        every ``every`` chains (0: once per round), once they are read and their descriptors freed;
        then, up to ``rounds`` rounds in all, more rounds of up to ``count`` while at least ``again``
        are pending and the driver wants no interrupt for the entries used since ``signalled``
        (``event_idx``: by ``used_event``). Returns ``(chains, frame bytes, byte sum or 0)``, or None
        with nothing changed, as take_round."""
        absorb = kernels.absorb_split
        if absorb is None or not self._fusable(pool, area, count):
            return None
        v, state, regions = self._views(mem), pool.round_state(), region_bytes(mem)
        got = absorb(*v.take_ring, self.last_avail_idx, count, indirect, min_len, max_len, hdr, *state, queue,
                     *area.outputs, v.used_ring, self.used_idx, area.zeros, regions, read, v.used_head,
                     every, v.avail, rounds, again, event_idx, signalled)  # fmt: skip
        taken = int(got[0])
        if not self._settle(taken, pool, state[0], count, queue, published=True):
            return None
        return taken, int(got[1]), int(got[2])

    def fill_round(
        self, mem: GuestMemory, count: int, pool: PacketPool, area: RoundArea, *, queue: int, indirect: bool,
        tmpl: npt.NDArray[np.uint8], every: int = 0, rounds: int = 1, again: int = 0, event_idx: bool = False,
        signalled: int = 0, limit: int = 0,
    ) -> tuple[int, int] | None:
        """RX rounds of ``tmpl`` (a virtio-net header and a frame), in one compiled call
        (``rings.round_kernels._fill_split_py``): :meth:`take_round` of ``count`` chains of at least
        ``len(tmpl)`` writable bytes, the frame into each, then :meth:`complete_round` with used length
        ``len(tmpl)``, ``used.idx`` published inside after every ``every`` chains (0: once per round);
        then more rounds as :meth:`absorb_round` runs them (``rounds``, ``again``, ``event_idx``,
        ``signalled``), ``limit`` chains in all at most (``count`` if less). Returns ``(chains
        written, segments)``; ``(0, segments)`` for a first round taken as :meth:`take_round` takes
        it but not written, its chains of several buffers (the caller writes and completes its
        ``count`` chains); None with nothing changed, as take_round."""
        fill = kernels.fill_split
        if fill is None or not self._fusable(pool, area, count):
            return None
        v, state, regions = self._views(mem), pool.round_state(), region_bytes(mem)
        done, segments = fill(*v.take_ring, self.last_avail_idx, count, indirect, int(tmpl.shape[0]), *state,
                              queue, *area.outputs, v.used_ring, self.used_idx, regions, tmpl, v.used_head,
                              every, v.avail, rounds, again, event_idx, signalled,
                              max(limit, count))  # fmt: skip
        written = int(done)
        if not self._settle(written if written else count, pool, state[0], count, queue,
                            published=written > 0):  # fmt: skip
            return None
        return written, int(segments)

    def kernel_round(
        self, mem: GuestMemory, count: int, pool: PacketPool, area: RoundArea, kernel: Callable[..., Any], *,
        queue: int, indirect: bool, min_len: int, max_len: int, hdr: int, extra: tuple[Any, ...],
        any_count: bool = False,
    ) -> tuple[Any, ...] | None:
        """A round by a caller's compiled kernel, in one call: a round that does I/O on its frames
        (``nicsim.ports.fd_kernels``: a TAP's ``writev`` and ``readv``), which ``rings`` does not.
        The kernel gets this queue's arguments in :meth:`take_round`'s order for
        ``round_kernels._take_split_py`` (the ring, the regions' bytes, ``last_avail_idx``,
        ``count``, ``indirect``, ``min_len``, ``max_len``, ``hdr``, the pool's state, ``queue``,
        ``area``'s arrays), then the used ring, ``used.idx``, ``area.zeros`` and the used ring's head,
        then ``extra``. It takes at most ``count`` chains with the compiled take, in order, gives back
        every chain it took with ``_return_chunk_py`` (which publishes ``used.idx``), and returns a
        tuple whose first item is how many it took, or -1 having changed nothing, or -2 (a free
        declined after a take: a bug). Returns that tuple, or None when it declined. ``any_count``: a
        round of 0 chains runs too (a kernel with other work: ``nicsim.ports.switch_kernel`` queues
        and drops frames for a guest with none left)."""
        if not (self._fusable(pool, area, count) or (any_count and count == 0 and not pool.closed)):
            return None
        v, state, regions = self._views(mem), pool.round_state(), region_bytes(mem)
        got: tuple[Any, ...] = kernel(*v.take_ring, regions, self.last_avail_idx, count, indirect, min_len,
                                      max_len, hdr, *state, queue, *area.outputs, v.used_ring, self.used_idx,
                                      area.zeros, v.used_head, *extra)  # fmt: skip
        if not self._settle(int(got[0]), pool, state[0], count, queue, published=True):
            return None
        return got

    @staticmethod
    def _fusable(pool: PacketPool, area: RoundArea, count: int) -> bool:
        """Whether a fused round of ``count`` chains may be tried (the kernel still checks the rest)."""
        return not pool.closed and 0 < count <= area.size

    def _settle(
        self, status: int, pool: PacketPool, in_use: int, count: int, queue: int, *, published: bool,
    ) -> bool:
        """After a fused round's call (absorb, fill) of rounds of at most ``count`` chains from a pool
        with ``in_use`` normal descriptors taken: False if it declined (``status`` -1: nothing
        changed); else ``status`` is the chains it took, the avail side moves on and the pool learns
        what the call took, and, when the call also freed them and wrote and published the used
        entries (``published``: the kernel stores ``used.idx`` itself, chunk by chunk), our copy of
        it moves on."""
        if status == -1:
            return False
        if status < 0:
            # The take held the descriptors it had just popped off the pool's stack: freeing them
            # cannot be refused unless the pool's records are corrupt.
            raise RuntimeError(f"queue {queue}: the pool refused to free the descriptors a round just took")
        self.last_avail_idx = (self.last_avail_idx + status) & U16_MASK
        pool.round_allocated(in_use + min(status, count))  # (its high-water mark: a round held them)
        if published:
            self.used_idx = (self.used_idx + status) & U16_MASK
            pool.round_freed(in_use)
        return True

    def complete_round(
        self, mem: GuestMemory, heads: npt.NDArray[np.uint16], lens: npt.NDArray[np.uint32],
        descs: npt.NDArray[np.int32], pool: PacketPool,
    ) -> bool:
        """:meth:`push_used` of ``(heads, lens)`` and ``pool.free_batch(descs)`` in one compiled call,
        then ``used.idx`` published last, as there. False, with nothing changed, when the kernels are
        off or the free is not one the kernel takes (the caller then does both the numpy way, which
        raises what is wrong)."""
        complete = kernels.complete_split
        k = int(heads.shape[0])
        if (complete is None or pool.closed or k > self.size or descs.shape[0] != k or lens.shape[0] != k
                or heads.dtype != np.uint16 or descs.dtype != np.int32
                or lens.dtype != np.uint32):  # fmt: skip
            return False  # (other dtypes would make numba compile another version, mid-round)
        v = self._views(mem)
        used, capacity, state, _, stack, *_ = pool.round_state()
        left: int = complete(v.used_ring, self.used_idx, heads, lens, descs, used, capacity, state, stack)
        if left < 0:
            return False
        self.used_idx = (self.used_idx + k) & U16_MASK
        v.used_head[1] = self.used_idx  # after the call: the entries are written (see push_used)
        pool.round_freed(left)
        return True

    # -- short rounds: a few chains, read and written with plain ints -----------------------------------

    def peek_short(self, mem: GuestMemory, count: int, *, indirect: bool = True) -> list[ShortChain] | None:
        """The next ``count`` avail chains, not popped, if every one is a good chain short enough
        for :func:`~rings.short_chains.walk_short`; else None. ``count`` must not exceed
        :meth:`avail_pending` (the caller has just asked it, which also checks ``avail.idx``)."""
        v = self._views(mem)
        avail, table, size, mask = v.avail_raw, v.desc_raw, self.size, self._mask
        chains: list[ShortChain] = []
        for i in range(self.last_avail_idx, self.last_avail_idx + count):
            (head,) = _U16_LE.unpack_from(avail, 4 + 2 * (i & mask))
            chain = walk_short(mem, table, size, head, indirect=indirect)
            if chain is None:
                return None
            chains.append(chain)
        return chains

    def skip_avail(self, count: int) -> None:
        """Pop ``count`` heads already read with :meth:`peek_short` (``count`` at most what it read)."""
        self.last_avail_idx = (self.last_avail_idx + count) & U16_MASK

    def push_used_few(self, mem: GuestMemory, ids: Sequence[int], lengths: Sequence[int]) -> None:
        """:meth:`push_used` for a few entries given as ints: the entries, then ``used.idx`` last
        (the same ordering argument)."""
        k = len(ids)
        if k == 0:
            return
        if k > self.size or len(lengths) != k:
            raise ValueError(f"push_used of {k} ids / {len(lengths)} lengths on a queue of {self.size}")
        v = self._views(mem)
        raw = v.used_raw
        idx, mask = self.used_idx, self._mask
        for head, length in zip(ids, lengths, strict=True):
            _USED_ELEM.pack_into(raw, 4 + 8 * (idx & mask), head, length)
            idx += 1
        self.used_idx = idx & U16_MASK
        # One 2-byte store, never struct: ``pack_into`` with a '<' format writes byte by byte
        # (CPython's _struct ``lp_uint``), and a driver reading used.idx between the two bytes sees a
        # torn index (0x00FF -> 0x0100 reads as 0x0000 or 0x01FF), then reads entries that were never
        # written, and takes an id that is not a head (Linux: "output.0:id N is not a head!"). The
        # entries above may be written bytewise: the driver reads none of them before this store.
        v.used_head[1] = self.used_idx

    # -- used side ------------------------------------------------------------------------------------

    def push_used(self, mem: GuestMemory, ids: npt.ArrayLike, lengths: npt.ArrayLike) -> None:
        """Append ``(id, len)`` entries to the used ring, then publish ``used.idx``.

        The entries must be visible to the driver before the index that exposes them (§2.7.8): the
        index is written last, and x86 (TSO) keeps stores in order, which is all that needs (Linux's
        ``smp_wmb`` is only a compiler barrier there; on arm64 a real store barrier would be needed).
        TSO does *not* keep this store ahead of a later load: whoever reads ``used_event`` or the
        avail flags next must fence first, which :meth:`needs_interrupt` does.
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

        A full fence stands between the ``used.idx`` that :meth:`push_used` stored and the load of
        ``used_event`` (or the flags) here. The driver does the mirror image (store ``used_event``,
        fence, load ``used.idx``); without ours the two can each read the other's old value, and the
        interrupt the driver is about to sleep for is never sent (QEMU ``virtio_split_should_notify``,
        Linux ``vhost_notify`` and DPDK ``vhost_vring_call_split`` all start with ``smp_mb()``).
        """
        if (old_used_idx & U16_MASK) == self.used_idx:
            return False
        v = self._views(mem)
        full_fence()
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
        ``avail_pending`` once more before sleeping. Re-enabling ends with a full fence, so that check
        loads ``avail.idx`` only after this store is visible (the driver stores ``avail.idx``, fences,
        then loads ``avail_event`` / the flags: without the fence both could read the other's old
        value, and the kick is lost; QEMU ``virtio_queue_split_set_notification``, Linux
        ``vhost_enable_notify``). Suppressing needs none: a late suppression costs one extra kick.
        """
        v = self._views(mem)
        if event_idx:
            v.used_tail[0] = (self.last_avail_idx - (1 if suppress else 0)) & U16_MASK
        else:
            v.used_head[0] = VIRTQ_USED_F_NO_NOTIFY if suppress else 0
        if not suppress:
            full_fence()

    def kick_after(self, mem: GuestMemory, count: int) -> None:
        """EVENT_IDX only: ask the driver to notify once it has made more than ``count`` entries
        available beyond ``last_avail_idx`` (0: on the first one, as re-enabling does).

        §2.7.10: the driver notifies when the ``idx`` it publishes passes ``avail_event``; the device
        chooses that index, so a value ahead of ``last_avail_idx`` means "wake me for a batch". The
        caller must look at ``avail_pending`` afterwards (the driver may already be past it) and keep a
        timer for a driver that stops short of the batch. Like re-enabling, it ends with a full fence
        so that look sees ``avail.idx`` as of after this store (see :meth:`suppress_kicks`).
        """
        if not 0 <= count < self.size:
            raise ValueError(f"kick_after({count}) on a queue of {self.size}")
        self._views(mem).used_tail[0] = (self.last_avail_idx + count) & U16_MASK
        full_fence()
