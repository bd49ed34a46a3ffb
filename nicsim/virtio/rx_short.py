"""The RX round for a few frames (virtio 1.2 §5.1.6.4), with plain ints instead of numpy batches: what
the guest gets is byte for byte what :class:`~nicsim.virtio.rx.RxPath`'s general delivery gives it.

This module owns :class:`ShortRx`. It takes a round only when every frame fits the one chain it goes
to: one buffer per frame (``num_buffers`` 1, with or without MRG_RXBUF), each chain a good one of one
or two device-writable descriptors (``rings.short_chains``). Anything else (a chain it does not read,
a frame needing several buffers or too big for its buffer, a carried header longer than its frame)
is declined before anything changes, and the general path takes the round and counts its drops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from nicsim.virtio.port import HDR_LEN_V1, NUM_BUFFERS_OFFSET
from nicsim.virtio.queues import QueueSet, QueueState
from rings.memory import GuestMemory
from rings.short_chains import ShortChain


class ShortRx:
    """Delivers a few frames into the guest's RX buffers, one buffer each."""

    def __init__(self, queues: QueueSet) -> None:
        self._qs = queues
        self._pool = queues.pool
        self._stats = queues.stats
        # One frame's header and bytes are put together here, then copied into the guest's buffer.
        self._staging: npt.NDArray[np.uint8] = np.zeros(0, np.uint8)

    def deliver(
        self,
        rxq: int,
        st: QueueState,
        mem: GuestMemory,
        data: npt.NDArray[np.uint8],
        offsets: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        *,
        carried: bool,
    ) -> int | None:
        """Place frames ``data[offsets[i]:][:lengths[i]]``, one per chain, in order; returns how many
        were placed (0: no buffer or no pool descriptor now), or None having changed nothing when
        the round is not one this path takes. ``carried``: the frames start with the port's (the
        kernel's) virtio-net header."""
        hdr = self._qs.hdr_len
        lens = lengths.tolist()
        if not lens or (carried and min(lens) < hdr):
            return None
        need = lens if carried else [n + hdr for n in lens]
        starts = offsets.tolist()

        def write(i: int, chain: ShortChain) -> None:
            self._write(mem, chain, data, starts[i], lens[i], hdr, carried)

        sizes = [n - hdr for n in lens] if carried else lens
        return self._place(rxq, st, mem, need, sizes, write)

    def deliver_views(
        self,
        rxq: int,
        st: QueueState,
        mem: GuestMemory,
        frames: Sequence[npt.NDArray[np.uint8]],
        headers: npt.NDArray[np.uint8] | None,
    ) -> int | None:
        """:meth:`deliver` for bare frames given as views (another guest's TX buffers, the switch's
        way), each with our header, or the first bytes of ``headers[i]`` (flags, GSO fields) when the
        driver negotiated GUEST_CSUM. None, having changed nothing, for a frame over the MTU."""
        qs = self._qs
        hdr = qs.hdr_len
        lens = [f.shape[0] for f in frames]
        if not lens or max(lens) > qs.frame_limit:
            return None
        keep = min(hdr, NUM_BUFFERS_OFFSET) if headers is not None and qs.guest_csum else 0

        def write(i: int, chain: ShortChain) -> None:
            head = headers[i, :keep] if headers is not None and keep else None
            self._write(mem, chain, frames[i], 0, lens[i], hdr, False, head=head)

        return self._place(rxq, st, mem, [n + hdr for n in lens], lens, write)

    def _place(
        self, rxq: int, st: QueueState, mem: GuestMemory, need: list[int], sizes: list[int],
        write: Callable[[int, ShortChain], None],
    ) -> int | None:  # fmt: skip
        """Frame ``i`` (``need[i]`` bytes with its header; ``sizes[i]`` frame bytes counted) written
        by ``write(i, chain)`` into the next posted chain each, in order, held by a pool descriptor
        meanwhile, then used; None, having changed nothing, if a chain is not one buffer big enough."""
        qs, q = self._qs, st.q
        placed = min(len(need), q.avail_pending(mem))
        if placed == 0:
            return 0
        chains = q.peek_short(mem, placed, indirect=qs.indirect)
        if chains is None or any(
            c.writable != len(c.segments) or c.writable_len < n for c, n in zip(chains, need, strict=False)
        ):
            return None
        placed = min(placed, self._pool.available)
        if placed == 0:
            return 0  # backpressure: frames stay queued until descriptors come back
        descs = [self._pool.allocate() for _ in range(placed)]
        for d, c in zip(descs, chains, strict=False):
            self._pool.track_one(d, queue=rxq, head=c.head, addr=0, length=c.writable_len)
        self._stats.add_inflight(rxq, placed)
        q.skip_avail(placed)
        for i in range(placed):
            write(i, chains[i])
        self._stats.count(rxq, placed, sum(sizes[:placed]))
        qs.mark_used_few(rxq, q, mem, [c.head for c in chains[:placed]], need[:placed], filled=True)
        for d in descs:
            self._pool.free(d)
        self._stats.add_inflight(rxq, -placed)
        return placed

    def _write(
        self,
        mem: GuestMemory,
        chain: ShortChain,
        data: npt.NDArray[np.uint8],
        start: int,
        n: int,
        hdr: int,
        carried: bool,
        *,
        head: npt.NDArray[np.uint8] | None = None,
    ) -> None:
        """Header (num_buffers 1) and frame into ``chain``'s writable segments, in order, as
        ``rx.stage_frames`` and ``rx.scatter_chains`` write them for a frame in one buffer. ``head``:
        for a bare frame, the flags and GSO fields its sender gave it, kept (GUEST_CSUM)."""
        total = n if carried else n + hdr
        if self._staging.shape[0] < total:
            self._staging = np.zeros(max(total, 2048), np.uint8)
        out = self._staging
        body = 0 if carried else hdr
        out[body : body + n] = data[start : start + n]
        if not (carried and self._qs.guest_csum):
            # flags 0, GSO_NONE: frames carry complete checksums (§5.1.6.4.1: without GUEST_CSUM the
            # device MUST set flags to zero).
            out[: min(hdr, NUM_BUFFERS_OFFSET)] = 0
        if head is not None:
            out[: head.shape[0]] = head
        if hdr >= HDR_LEN_V1:
            out[NUM_BUFFERS_OFFSET] = 1
            out[NUM_BUFFERS_OFFSET + 1] = 0
        at = 0
        for region, offset, length in chain.segments:
            take = min(length, total - at)
            if take <= 0:
                break
            mem.segment(region, offset, take)[:] = out[at : at + take]
            at += take
