"""The guest's side of packed virtqueues (virtio 1.2 §2.8), for tests and benchmarks without a VM: the
ring and event suppression areas laid out in :class:`~rings.driver.GuestRam`, posting chains the way
Linux ``virtqueue_add_packed`` does (the first descriptor's flags written last), the kick decision,
reaping used descriptors with the driver's checks, and malformed chains on request.

This module owns :class:`PackedDriverQueue` and :class:`PackedMalformed`; the RAM, the TX layouts and
:class:`~rings.driver.Completion` are the split driver model's (``rings.driver``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .driver import Completion, FramePosting, GuestRam, QueueAddresses
from .errors import DeviceError
from .layout import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from .packed import PackedQueue
from .packed_layout import (
    AVAIL_USED_MASK,
    EVENT_FLAGS,
    EVENT_OFF_WRAP,
    EVENT_SIZE,
    PDESC_DTYPE,
    PDESC_SIZE,
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

U16_MASK = 0xFFFF


class PackedMalformed(enum.Enum):
    """Chains a packed driver can get wrong (``PackedDriverQueue.post_malformed``), and the error the
    device marks them with. The split ring's index errors have no packed form (there is no ``next``
    and a buffer id is opaque to the device); the last three kinds are legal and must *not* be
    errors."""

    UNENDED = "unended"  # every descriptor of the ring with NEXT: longer than the queue (LOOP)
    INDIRECT_IN_CHAIN = "indirect_in_chain"  # INDIRECT in a NEXT-linked list, §2.8.19 (NESTED_INDIRECT)
    INDIRECT_EMPTY = "indirect_empty"  # indirect table of length 0 (INDIRECT_LENGTH)
    INDIRECT_MISALIGNED = "indirect_misaligned"  # length not a multiple of 16 (INDIRECT_LENGTH)
    INDIRECT_TOO_LONG = "indirect_too_long"  # more entries than the queue size (INDIRECT_LENGTH)
    INDIRECT_OUTSIDE_MEMORY = "indirect_outside_memory"  # the table is not in RAM (GUEST_MEMORY)
    CHAIN_TOO_LONG = "chain_too_long"  # lengths summing over 2^32 - 1 (CHAIN_TOO_LONG)
    READ_AFTER_WRITE = "read_after_write"  # readable after writable (DESCRIPTOR_ORDER)
    OUTSIDE_MEMORY = "outside_memory"  # a buffer past the end of guest RAM (GUEST_MEMORY)
    SPANS_REGIONS = "spans_regions"  # a buffer across two regions (GUEST_MEMORY)
    ADDRESS_OVERFLOW = "address_overflow"  # addr + len wraps the u64 space (GUEST_MEMORY)
    ZERO_LENGTH_WILD = "zero_length_wild"  # legal: len 0 at a wild address, never translated
    TABLE_FLAGS_IGNORED = "table_flags_ignored"  # legal: NEXT/INDIRECT in a table are reserved, ignored
    ID_BEYOND_SIZE = "id_beyond_size"  # legal: a buffer id >= the queue size is opaque to the device


@dataclass
class _Posted:
    ndesc: int  # ring descriptors the chain took
    buffers: list[int]  # guest buffers to free
    writable: list[tuple[int, int]]  # (gpa, len) of writable buffers, in chain order
    descs: list[tuple[int, int, int]] = field(default_factory=list)  # as posted, for recycle()


class PackedDriverQueue(FramePosting):
    """One packed virtqueue, driver side (Linux-style posting and reaping, §2.8.21, §2.8.22).

    ``start_pos``/``start_wrap`` put both sides' ring position and wrap counters there (the device then
    gets them via SET_VRING_BASE), to exercise the wrap-around.
    """

    def __init__(
        self,
        ram: GuestRam,
        *,
        index: int,
        size: int,
        event_idx: bool = False,
        start_pos: int = 0,
        start_wrap: int = 1,
    ) -> None:
        if not is_valid_packed_size(size) or not 0 <= start_pos < size:
            raise ValueError(f"packed queue size {size} / start {start_pos} is not usable")
        self.ram = ram
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.desc_addr = ram.alloc(PDESC_SIZE * size, align=4096, region=0)
        self.driver_addr = ram.alloc(EVENT_SIZE, align=64, region=len(ram.regions) - 1)
        self.device_addr = ram.alloc(EVENT_SIZE, align=64, region=0)
        mem = ram._own
        self._ring = mem.view(self.desc_addr, PDESC_SIZE * size).view(PDESC_DTYPE)
        self._driver_event = mem.view(self.driver_addr, EVENT_SIZE).view("<u2")  # we write it
        self._device_event = mem.view(self.device_addr, EVENT_SIZE).view("<u2")  # the device writes it
        self.start_pos, self.start_wrap = start_pos, start_wrap & 1
        if not self.start_wrap:
            # Descriptors of the lap before look used-with-wrap-1, not used-with-wrap-0 as zeros would.
            self._ring["flags"] = used_flags(1)
        self.next_avail, self.avail_wrap = start_pos, self.start_wrap
        self.next_used, self.used_wrap = start_pos, self.start_wrap
        self._free_ids = list(range(size - 1, -1, -1))
        self._free_slots = size
        self._inflight: dict[int, _Posted] = {}
        self._added = 0  # descriptors made available, mod 2^16
        self._kick_old = 0
        self.interrupts_enabled = True

    @property
    def addresses(self) -> QueueAddresses:
        """SET_VRING_ADDR: desc = the ring, avail = the driver area, used = the device area."""
        uva = self.ram.gpa_to_uva
        return QueueAddresses(
            desc_gpa=self.desc_addr, avail_gpa=self.driver_addr, used_gpa=self.device_addr,
            desc_uva=uva(self.desc_addr), avail_uva=uva(self.driver_addr), used_uva=uva(self.device_addr),
        )  # fmt: skip

    def device_queue(self) -> PackedQueue:
        """The device side as a backend would configure it, at the start position: call it before
        the device has run."""
        return PackedQueue(
            index=self.index, size=self.size, desc_addr=self.desc_addr, driver_addr=self.driver_addr,
            device_addr=self.device_addr, avail_pos=self.start_pos, avail_wrap=self.start_wrap,
            used_pos=self.start_pos, used_wrap=self.start_wrap,
        )  # fmt: skip

    @property
    def num_free(self) -> int:
        """Ring descriptors not holding an outstanding chain."""
        return self._free_slots

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- posting --------------------------------------------------------------------------------------

    def _write(self, descs: Sequence[tuple[int, int, int]], buf_id: int, posted: _Posted) -> int:
        """Put ``(addr, len, flags)`` descriptors in the ring from ``next_avail``, id on every one (as
        Linux does; the device reads the last), and make them available first-descriptor-last
        (§2.8.21.1: the device may read the whole list once the first is available)."""
        k = len(descs)
        if k > self._free_slots:
            # Nothing posted: the id and the buffers go back.
            if buf_id < self.size:
                self._free_ids.append(buf_id)
            for b in posted.buffers:
                self.ram.free(b)
            raise MemoryError(f"queue {self.index}: {k} descriptors wanted, {self._free_slots} free")
        first = self.next_avail
        first_flags = 0
        pos, wrap = self.next_avail, self.avail_wrap
        for j, (addr, length, flags) in enumerate(descs):
            f = flags | avail_flags(wrap)
            self._ring[pos] = (addr, length, buf_id, self._ring["flags"][pos])
            if j == 0:
                first_flags = f
            else:
                self._ring["flags"][pos] = f
            pos, wrap = advance(pos, wrap, 1, self.size)
        # Linux: a write barrier, then the first descriptor's flags (x86 keeps the stores in order).
        self._ring["flags"][first] = first_flags
        self.next_avail, self.avail_wrap = pos, wrap
        self._free_slots -= k
        self._added = (self._added + k) & U16_MASK
        posted.descs = list(descs)
        self._inflight[buf_id] = posted
        return buf_id

    def _new_id(self) -> int:
        if not self._free_ids:
            raise MemoryError(f"queue {self.index}: no free buffer id")
        return self._free_ids.pop()

    def post_chain(
        self,
        segments: Sequence[tuple[int, int, bool]],
        *,
        indirect: bool = False,
        buffers: Sequence[int] = (),
    ) -> int:
        """Post one chain of ``(gpa, len, writable)`` segments; return its buffer id. ``buffers`` are
        ``GuestRam`` allocations freed when it is reaped."""
        if not segments:
            raise ValueError("a chain needs at least one segment")
        writable = [(g, n) for g, n, w in segments if w]
        if indirect:
            if len(segments) > self.size:
                raise ValueError(
                    f"an indirect table of {len(segments)} entries exceeds queue size {self.size}"
                )
            table_gpa = self._table([(g, n, VIRTQ_DESC_F_WRITE if w else 0) for g, n, w in segments])
            descs = [(table_gpa, PDESC_SIZE * len(segments), VIRTQ_DESC_F_INDIRECT)]
            return self._write(descs, self._new_id(), _Posted(1, [*buffers, table_gpa], writable))
        descs = [
            (g, n, (VIRTQ_DESC_F_NEXT if j < len(segments) - 1 else 0) | (VIRTQ_DESC_F_WRITE if w else 0))
            for j, (g, n, w) in enumerate(segments)
        ]
        return self._write(descs, self._new_id(), _Posted(len(descs), list(buffers), writable))

    def _table(self, entries: Sequence[tuple[int, int, int]]) -> int:
        gpa = self.ram.alloc(PDESC_SIZE * len(entries), align=16)
        table = self.ram.view(gpa, PDESC_SIZE * len(entries)).view(PDESC_DTYPE)
        for j, (g, n, f) in enumerate(entries):
            table[j] = (g, n, 0, f)
        return gpa

    def post_malformed(self, kind: PackedMalformed) -> int:
        """Post one chain of ``kind``; return the buffer id the device will see."""
        ram = self.ram
        buf = ram.alloc(256)
        nx, wr, ind = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
        descs: list[tuple[int, int, int]]
        extra: list[int] = []
        buf_id = self._new_id()
        if kind is PackedMalformed.UNENDED:
            if self._free_slots != self.size:
                raise ValueError("an unended chain needs the whole ring free")
            descs = [(buf, 64, nx)] * self.size
        elif kind is PackedMalformed.INDIRECT_IN_CHAIN:
            table = self._table([(buf, 64, 0)])
            extra.append(table)
            descs = [(buf, 64, nx), (table, PDESC_SIZE, ind)]
        elif kind in (PackedMalformed.INDIRECT_EMPTY, PackedMalformed.INDIRECT_MISALIGNED):
            descs = [(buf, 0 if kind is PackedMalformed.INDIRECT_EMPTY else 20, ind)]
        elif kind is PackedMalformed.INDIRECT_TOO_LONG:
            table = self._table([(buf, 8, 0)] * (self.size + 1))
            extra.append(table)
            descs = [(table, PDESC_SIZE * (self.size + 1), ind)]
        elif kind is PackedMalformed.INDIRECT_OUTSIDE_MEMORY:
            descs = [(ram.end + 0x1000, 2 * PDESC_SIZE, ind)]
        elif kind is PackedMalformed.TABLE_FLAGS_IGNORED:
            table = self._table([(buf, 64, nx | ind), (buf + 64, 64, wr | nx)])
            extra.append(table)
            descs = [(table, 2 * PDESC_SIZE, ind)]
        elif kind is PackedMalformed.CHAIN_TOO_LONG:
            descs = [(buf, 0xFFFF_FFFF, nx), (buf, 2, 0)]
        elif kind is PackedMalformed.READ_AFTER_WRITE:
            descs = [(buf, 64, nx), (buf + 64, 64, wr | nx), (buf + 128, 64, 0)]
        elif kind is PackedMalformed.OUTSIDE_MEMORY:
            descs = [(buf, 64, nx), (ram.end + 0x10_0000, 64, 0)]
        elif kind is PackedMalformed.SPANS_REGIONS:
            descs = [(ram.regions[0].end - 32, 64, 0)]
        elif kind is PackedMalformed.ADDRESS_OVERFLOW:
            descs = [((1 << 64) - 16, 64, 0)]
        elif kind is PackedMalformed.ZERO_LENGTH_WILD:
            descs = [(buf, 64, nx), (0xDEAD_BEEF_0000_0000, 0, nx), (buf + 64, 64, 0)]
        elif kind is PackedMalformed.ID_BEYOND_SIZE:
            self._free_ids.append(buf_id)
            buf_id = self.size + 7
            while buf_id in self._inflight:
                buf_id += 1
            descs = [(buf, 64, 0)]
        else:  # pragma: no cover - every kind is handled above
            raise ValueError(kind)
        return self._write(descs, buf_id, _Posted(len(descs), [buf, *extra], []))

    # -- notifications --------------------------------------------------------------------------------

    def should_kick(self) -> bool:
        """Linux ``virtqueue_kick_prepare_packed``: notify the device about descriptors added since the
        last call? The device event suppression structure: DISABLE no, ENABLE yes, DESC (EVENT_IDX)
        when the descriptor it names is among those added (§2.8.10)."""
        moved = (self._added - self._kick_old) & U16_MASK
        self._kick_old = self._added
        if moved == 0:
            return False
        kind = int(self._device_event[EVENT_FLAGS]) & RING_EVENT_FLAGS_MASK
        if kind == RING_EVENT_FLAGS_DISABLE:
            return False
        if kind == RING_EVENT_FLAGS_DESC and self.event_idx:
            event = int(self._device_event[EVENT_OFF_WRAP])
            return packed_need_event(event, self.next_avail, self.avail_wrap, moved, self.size)
        return True

    def disable_interrupts(self) -> None:
        self.interrupts_enabled = False
        self._driver_event[EVENT_FLAGS] = RING_EVENT_FLAGS_DISABLE

    def enable_interrupts(self, *, after: int = 0) -> bool:
        """Ask for an interrupt again; with EVENT_IDX once the descriptor ``after`` past the next used
        position is used (Linux ``virtqueue_enable_cb_delayed_packed`` for ``after`` > 0). Returns True
        if used descriptors are already pending."""
        self.interrupts_enabled = True
        if self.event_idx:
            pos, wrap = advance(self.next_used, self.used_wrap, after % self.size, self.size)
            self._driver_event[EVENT_OFF_WRAP] = off_wrap(pos, wrap)
            self._driver_event[EVENT_FLAGS] = RING_EVENT_FLAGS_DESC
        else:
            self._driver_event[EVENT_FLAGS] = RING_EVENT_FLAGS_ENABLE
        return self._is_used(self.next_used, self.used_wrap)

    @property
    def device_event(self) -> tuple[int, int]:
        """The device event suppression structure: (off_wrap, flags)."""
        return int(self._device_event[EVENT_OFF_WRAP]), int(self._device_event[EVENT_FLAGS])

    # -- reaping --------------------------------------------------------------------------------------

    def _is_used(self, pos: int, wrap: int) -> bool:
        return (int(self._ring["flags"][pos]) & AVAIL_USED_MASK) == used_flags(wrap)

    def _scan_used(self) -> tuple[int, int, int]:
        """From the next one to reap, over the used buffers the device has written: the position and
        wrap counter past them, and how many there are."""
        pos, wrap, n = self.next_used, self.used_wrap, 0
        while n < len(self._inflight) and self._is_used(pos, wrap):
            posted = self._inflight.get(int(self._ring["id"][pos]))
            if posted is None:
                break
            pos, wrap = advance(pos, wrap, posted.ndesc, self.size)
            n += 1
        return pos, wrap, n

    def used_pending(self) -> int:
        """Used buffers the device has written that we have not reaped."""
        return self._scan_used()[2]

    def device_used_position(self) -> tuple[int, int]:
        """The device's used position and wrap counter as the ring shows them: past the used
        descriptors written since the last one reaped (what a frontend restores a packed ring's
        SET_VRING_BASE from after its backend died, as it reads ``used.idx`` on a split ring)."""
        pos, wrap, _ = self._scan_used()
        return pos, wrap

    def reap(self, max_count: int | None = None) -> list[Completion]:
        """Take used descriptors (Linux ``virtqueue_get_buf_ctx_packed``): check the id is in flight
        and the length within what was writable, skip the chain's descriptors, free its id and
        buffers; with EVENT_IDX and interrupts enabled, move the event to the next used position."""
        out: list[Completion] = []
        while (max_count is None or len(out) < max_count) and self._inflight:
            pos, wrap = self.next_used, self.used_wrap
            if not self._is_used(pos, wrap):
                break
            d = self._ring[pos]
            buf_id, length, flags = int(d["id"]), int(d["len"]), int(d["flags"])
            posted = self._inflight.pop(buf_id, None)
            if posted is None:
                raise DeviceError(f"used id {buf_id} was not in flight", queue=self.index, descriptor=buf_id)
            if not flags & VIRTQ_DESC_F_WRITE:
                length = 0  # §2.8.4: len is reserved in a used descriptor without WRITE
            total = sum(n for _, n in posted.writable)
            if length > total:
                raise DeviceError(
                    f"used len {length} exceeds the {total} writable bytes posted",
                    queue=self.index, descriptor=buf_id,
                )  # fmt: skip
            data: bytes | None = None
            if posted.writable:
                parts, left = [], length
                for g, n in posted.writable:
                    take = min(n, left)
                    if take:
                        parts.append(self.ram.read(g, take))
                    left -= take
                data = b"".join(parts)
            self.next_used, self.used_wrap = advance(pos, wrap, posted.ndesc, self.size)
            self._free_slots += posted.ndesc
            if buf_id < self.size:
                self._free_ids.append(buf_id)
            for b in posted.buffers:
                self.ram.free(b)
            out.append(Completion(id=buf_id, len=length, data=data))
        if self.event_idx and self.interrupts_enabled and out:
            self._driver_event[EVENT_OFF_WRAP] = off_wrap(self.next_used, self.used_wrap)
        return out

    def recycle(self, max_count: int | None = None) -> int:
        """Benchmark helper: take used buffers and post each again unchanged (same id, descriptors and
        buffers) at the next available position. Returns how many were reposted. One Python step per
        descriptor (unlike the split model's vectorised recycle)."""
        n = 0
        while (max_count is None or n < max_count) and self._is_used(self.next_used, self.used_wrap):
            buf_id = int(self._ring["id"][self.next_used])
            posted = self._inflight.pop(buf_id, None)
            if posted is None:
                raise DeviceError(f"used id {buf_id} was not in flight", queue=self.index, descriptor=buf_id)
            self.next_used, self.used_wrap = advance(self.next_used, self.used_wrap, posted.ndesc, self.size)
            self._free_slots += posted.ndesc
            self._write(posted.descs, buf_id, posted)
            n += 1
        if self.event_idx and self.interrupts_enabled and n:
            self._driver_event[EVENT_OFF_WRAP] = off_wrap(self.next_used, self.used_wrap)
        return n

    def flags_at(self, pos: int) -> int:
        """The flags word of ring descriptor ``pos`` (for tests)."""
        return int(self._ring["flags"][pos])

    def ring_copy(self) -> npt.NDArray[np.void]:
        """A copy of the descriptor ring (for tests)."""
        return self._ring.copy()
