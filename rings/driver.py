"""The guest's side of split virtqueues, for tests and benchmarks without a VM (like vm-virtio's
``mock.rs``): guest RAM with a buffer allocator, queue layout, posting TX chains and RX buffers the way
Linux ``virtio_net`` does, the kick decision, reaping used entries, and malformed chains on request.

It owns a numpy buffer laid out as guest memory in two regions whose GPAs are adjacent but whose
backing bytes and frontend addresses are not, so a device that translates with the wrong region, or
lets a buffer straddle two regions, reads the wrong bytes. It builds the :class:`GuestMemory` the
device side uses. It is the only "fake" the project allows: tests drive the real device code with it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import DeviceError
from .layout import (
    DESC_DTYPE,
    DESC_SIZE,
    U16_MASK,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    is_valid_queue_size,
    split_ring_sizes,
    vring_need_event,
)
from .memory import GuestMemory, MemoryRegion
from .split import SplitQueue

VIRTIO_NET_HDR_SIZE = 12
"""struct virtio_net_hdr_v1 (virtio 1.2 §5.1.6): what a modern Linux guest puts before every frame."""

DEFAULT_REGION_SIZES = (4 << 20, 4 << 20)
_USER_ADDRS = (0x7F12_0000_0000, 0x7F34_5600_0000)  # frontend VAs: unrelated to GPAs and to each other
_GAP = 4096  # bytes of backing between the regions, never part of guest memory


class GuestRam:
    """Guest RAM: one backing ``uint8`` buffer carved into regions, and a simple allocator.

    Region 1 follows region 0 in GPA, but its backing bytes lie *before* region 0's (after a gap),
    and the frontend addresses are unrelated. ``alloc`` alternates regions unless told which.
    ``backing`` lays the regions over a buffer the caller owns (e.g. a shared memfd mapping a
    vhost-user frontend hands to a backend) of at least ``backing_size(region_sizes)`` bytes;
    ``offsets[i]`` is region i's offset in it (SET_MEM_TABLE's ``mmap_offset``).
    """

    @staticmethod
    def backing_size(region_sizes: Sequence[int] = DEFAULT_REGION_SIZES) -> int:
        """Bytes of backing buffer the regions need (regions plus the guard gaps between them)."""
        return sum(region_sizes) + _GAP * len(region_sizes)

    def __init__(
        self,
        region_sizes: Sequence[int] = DEFAULT_REGION_SIZES,
        *,
        gpa_base: int = 0x4000_0000,
        backing: npt.NDArray[np.uint8] | None = None,
    ) -> None:
        sizes = list(region_sizes)
        if not 1 <= len(sizes) <= 2:
            raise ValueError("GuestRam models one or two regions")
        need = self.backing_size(sizes)
        if backing is None:
            backing = np.zeros(need, dtype=np.uint8)
        elif backing.dtype != np.uint8 or backing.ndim != 1 or backing.shape[0] < need:
            raise ValueError(f"backing must be a 1-D uint8 buffer of at least {need} bytes")
        self.backing = backing
        regions = []
        offsets = []
        gpa = gpa_base
        backing_off = need
        for i, size in enumerate(sizes):
            backing_off -= size + _GAP  # later regions sit earlier in the backing buffer
            offsets.append(backing_off)
            regions.append(
                MemoryRegion(
                    guest_phys_addr=gpa,
                    size=size,
                    user_addr=_USER_ADDRS[i],
                    data=self.backing[backing_off : backing_off + size],
                )
            )
            gpa += size
        self.regions: tuple[MemoryRegion, ...] = tuple(regions)
        self.offsets: tuple[int, ...] = tuple(offsets)
        # The driver reads and writes through its own table, so the device's table (``memory``) can
        # be released and replaced (SET_MEM_TABLE) while the guest keeps running.
        self._own = GuestMemory(regions)
        self.memory = GuestMemory(regions)
        self._next = [r.guest_phys_addr for r in regions]
        self._free: dict[int, list[int]] = {}
        self._sizes: dict[int, int] = {}
        self._turn = 0

    @property
    def end(self) -> int:
        """One past the last GPA of guest RAM (addresses from here on are outside it)."""
        return self.regions[-1].end

    def alloc(self, nbytes: int, *, align: int = 64, region: int | None = None) -> int:
        """GPA of ``nbytes`` (> 0) of zeroed guest RAM inside one region."""
        if nbytes <= 0:
            raise ValueError("alloc needs a positive size")
        rounded = -(-nbytes // align) * align
        free = self._free.get(rounded)
        if region is None and free:
            gpa = free.pop()
            self.view(gpa, rounded)[:] = 0
            return gpa
        if region is None:
            region = self._turn
            self._turn = (self._turn + 1) % len(self.regions)
        order = [region] + [i for i in range(len(self.regions)) if i != region]
        for i in order:
            r = self.regions[i]
            gpa = -(-self._next[i] // align) * align
            if gpa + rounded <= r.end:
                self._next[i] = gpa + rounded
                self._sizes[gpa] = rounded
                return gpa
        raise MemoryError(f"guest RAM exhausted allocating {nbytes} bytes")

    def free(self, gpa: int) -> None:
        """Return a buffer from ``alloc`` for reuse."""
        self._free.setdefault(self._sizes[gpa], []).append(gpa)

    def release(self) -> None:
        """Drop every view the driver's and the device's tables made (before the backing goes away)."""
        self._own.release()
        self.memory.release()

    def new_memory_table(self) -> GuestMemory:
        """Replace the device's table with a fresh one over the same RAM (as after SET_MEM_TABLE),
        releasing the old one first, and return it."""
        self.memory.release()
        self.memory = GuestMemory(self.regions)
        return self.memory

    def view(self, gpa: int, nbytes: int) -> npt.NDArray[np.uint8]:
        return self._own.view(gpa, nbytes)

    def write(self, gpa: int, data: bytes | npt.NDArray[np.uint8]) -> None:
        self._own.view(gpa, len(data))[:] = np.frombuffer(bytes(data), dtype=np.uint8)

    def read(self, gpa: int, nbytes: int) -> bytes:
        return self._own.view(gpa, nbytes).tobytes()

    def gpa_to_uva(self, gpa: int) -> int:
        return self._own.gpa_to_uva(gpa, 1)


class TxLayout(enum.Enum):
    """How a TX packet is laid out, as Linux virtio_net does depending on features."""

    ONE = "one"  # header and frame in one descriptor (VIRTIO_F_ANY_LAYOUT / VERSION_1)
    TWO = "two"  # header, then frame: two chained descriptors
    INDIRECT = "indirect"  # header and frame in a two-entry indirect table


class Malformed(enum.Enum):
    """Broken chains the driver model can post (``DriverQueue.post_malformed``).

    ``ZERO_LENGTH_WILD`` is legal and must *not* be an error: a zero-length descriptor whose address
    is nowhere in guest memory, which a device must not translate (CVE-2020-10725)."""

    LOOP = "loop"  # two descriptors chained to each other (DescriptorLoopError)
    HEAD_OUT_OF_RANGE = "head_out_of_range"  # avail entry >= queue size (DescriptorIndexError)
    NEXT_OUT_OF_RANGE = "next_out_of_range"  # next >= queue size (DescriptorIndexError)
    NESTED_INDIRECT = "nested_indirect"  # INDIRECT inside an indirect table (NestedIndirectError)
    INDIRECT_EMPTY = "indirect_empty"  # indirect table of length 0 (IndirectLengthError)
    INDIRECT_MISALIGNED = "indirect_misaligned"  # indirect length not a multiple of 16 (IndirectLengthError)
    INDIRECT_LOOP = "indirect_loop"  # entries in a table chained to each other (DescriptorLoopError)
    INDIRECT_NEXT_OUT_OF_RANGE = "indirect_next_out_of_range"  # next past the table (DescriptorIndexError)
    INDIRECT_OUTSIDE_MEMORY = "indirect_outside_memory"  # the table itself is not in RAM (GuestMemoryError)
    CHAIN_TOO_LONG = "chain_too_long"  # lengths summing over 2^32 - 1 (ChainTooLongError)
    READ_AFTER_WRITE = "read_after_write"  # readable after writable (DescriptorOrderError)
    OUTSIDE_MEMORY = "outside_memory"  # a buffer past the end of guest RAM (GuestMemoryError)
    SPANS_REGIONS = "spans_regions"  # a buffer across the boundary of two regions (GuestMemoryError)
    ADDRESS_OVERFLOW = "address_overflow"  # addr + len wraps the u64 space (GuestMemoryError)
    ZERO_LENGTH_WILD = "zero_length_wild"  # legal: len 0 at a wild address, must not be translated


@dataclass(frozen=True, kw_only=True)
class QueueAddresses:
    """Where a queue's rings are: guest-physical and frontend-virtual (SET_VRING_ADDR) addresses."""

    desc_gpa: int
    avail_gpa: int
    used_gpa: int
    desc_uva: int
    avail_uva: int
    used_uva: int


@dataclass(frozen=True, kw_only=True)
class Completion:
    """One reaped used entry: the head ``id``, the ``len`` the device wrote, and for chains with
    writable buffers the first ``len`` bytes of them (``data``), else None."""

    id: int
    len: int
    data: bytes | None


@dataclass
class _Posted:
    descs: list[int]  # main-table descriptors to free
    buffers: list[int]  # guest buffers to free
    writable: list[tuple[int, int]]  # (gpa, len) of writable buffers, in chain order


class FramePosting:
    """Frames posted the way Linux's virtio_net posts them, on top of a queue's ``post_chain``: what the
    split (:class:`DriverQueue`) and packed (``rings.driver_packed``) driver queues share."""

    ram: GuestRam

    def post_chain(
        self,
        segments: Sequence[tuple[int, int, bool]],
        *,
        indirect: bool = False,
        buffers: Sequence[int] = (),
    ) -> int:
        """Post one chain of ``(gpa, len, writable)`` segments; each queue kind has its own."""
        raise NotImplementedError

    def post_tx(
        self, frame: bytes, *, layout: TxLayout = TxLayout.ONE, header: bytes = bytes(VIRTIO_NET_HDR_SIZE)
    ) -> int:
        """Post one frame for the device to transmit, preceded by a virtio_net_hdr_v1."""
        if layout is TxLayout.ONE:
            buf = self.ram.alloc(len(header) + len(frame))
            self.ram.write(buf, header + frame)
            return self.post_chain([(buf, len(header) + len(frame), False)], buffers=[buf])
        hdr_buf = self.ram.alloc(len(header))
        frame_buf = self.ram.alloc(max(len(frame), 1))
        self.ram.write(hdr_buf, header)
        self.ram.write(frame_buf, frame)
        return self.post_chain(
            [(hdr_buf, len(header), False), (frame_buf, len(frame), False)],
            indirect=layout is TxLayout.INDIRECT,
            buffers=[hdr_buf, frame_buf],
        )

    def post_rx(
        self, buf_size: int = VIRTIO_NET_HDR_SIZE + 1514, *, count: int = 1, layout: TxLayout = TxLayout.ONE
    ) -> list[int]:
        """Post ``count`` device-writable receive buffers of ``buf_size`` bytes (header included)."""
        heads = []
        for _ in range(count):
            if layout is TxLayout.ONE:
                buf = self.ram.alloc(buf_size)
                heads.append(self.post_chain([(buf, buf_size, True)], buffers=[buf]))
            else:
                hdr = self.ram.alloc(VIRTIO_NET_HDR_SIZE)
                body = self.ram.alloc(buf_size - VIRTIO_NET_HDR_SIZE)
                heads.append(
                    self.post_chain(
                        [(hdr, VIRTIO_NET_HDR_SIZE, True), (body, buf_size - VIRTIO_NET_HDR_SIZE, True)],
                        indirect=layout is TxLayout.INDIRECT,
                        buffers=[hdr, body],
                    )
                )
        return heads



class DriverQueue(FramePosting):
    """One split virtqueue, driver side: the rings laid out in :class:`GuestRam`, Linux-style posting.

    ``start_idx`` starts every index there (the device then gets it via SET_VRING_BASE), to exercise
    u16 wraparound.
    """

    def __init__(self, ram: GuestRam, *, index: int, size: int, event_idx: bool = False, start_idx: int = 0):
        if not is_valid_queue_size(size):
            raise ValueError(f"queue size {size} is not a power of 2 in 1..32768")
        self.ram = ram
        self.index = index
        self.size = size
        self.event_idx = event_idx
        dsize, asize, usize = split_ring_sizes(size)
        # Spread the three parts over both regions so ring translation is exercised.
        self.desc_addr = ram.alloc(dsize, align=4096, region=0)
        self.avail_addr = ram.alloc(asize, align=4096, region=len(ram.regions) - 1)
        self.used_addr = ram.alloc(usize, align=4096, region=0)
        mem = ram._own
        self._desc = mem.view(self.desc_addr, dsize).view(DESC_DTYPE)
        self._avail = mem.view(self.avail_addr, asize).view("<u2")  # flags, idx, ring[size], used_event
        self._used16 = mem.view(self.used_addr, usize).view("<u2")  # flags, idx, ..., avail_event
        self._used32 = mem.view(self.used_addr + 4, 8 * size).view("<u4").reshape(size, 2)
        self._free_descs = list(range(size - 1, -1, -1))
        self.start_idx = start_idx & U16_MASK
        self.avail_idx = start_idx & U16_MASK
        self.last_used_idx = start_idx & U16_MASK
        self._kick_old = self.avail_idx
        self._avail[1] = self.avail_idx
        self._used16[1] = self.avail_idx
        self._inflight: dict[int, _Posted] = {}
        self._bogus_head = size
        self.interrupts_enabled = True
        if event_idx:
            self._avail[2 + size] = self.last_used_idx

    # -- addresses ------------------------------------------------------------------------------------

    @property
    def addresses(self) -> QueueAddresses:
        uva = self.ram.gpa_to_uva
        return QueueAddresses(
            desc_gpa=self.desc_addr,
            avail_gpa=self.avail_addr,
            used_gpa=self.used_addr,
            desc_uva=uva(self.desc_addr),
            avail_uva=uva(self.avail_addr),
            used_uva=uva(self.used_addr),
        )

    def device_queue(self) -> SplitQueue:
        """The device side of this queue as a backend would configure it (SET_VRING_* messages), with
        both indices at ``start_idx`` (SET_VRING_BASE): call it before the device has run."""
        return SplitQueue(
            index=self.index,
            size=self.size,
            desc_addr=self.desc_addr,
            avail_addr=self.avail_addr,
            used_addr=self.used_addr,
            last_avail_idx=self.start_idx,
            used_idx=self.start_idx,
        )

    @property
    def num_free(self) -> int:
        """Descriptors in the main table not in use."""
        return len(self._free_descs)

    @property
    def in_flight(self) -> int:
        """Chains posted and not yet reaped."""
        return len(self._inflight)

    # -- posting --------------------------------------------------------------------------------------

    def _take(self, k: int) -> list[int]:
        if k > len(self._free_descs):
            raise MemoryError(f"queue {self.index}: {k} descriptors wanted, {len(self._free_descs)} free")
        return [self._free_descs.pop() for _ in range(k)]

    def _publish(self, head: int, posted: _Posted) -> int:
        if head in self._inflight:
            raise ValueError(f"head {head} is already in flight")
        self._inflight[head] = posted
        self._avail[2 + (self.avail_idx & (self.size - 1))] = head
        # Linux writes the ring entry, then (after a write barrier) the index that exposes it.
        self.avail_idx = (self.avail_idx + 1) & U16_MASK
        self._avail[1] = self.avail_idx
        return head

    def post_chain(
        self,
        segments: Sequence[tuple[int, int, bool]],
        *,
        indirect: bool = False,
        buffers: Sequence[int] = (),
    ) -> int:
        """Post one chain of ``(gpa, len, writable)`` segments; return its head. ``buffers`` are
        ``GuestRam`` allocations freed when the chain is reaped."""
        if not segments:
            raise ValueError("a chain needs at least one segment")
        writable = [(g, n) for g, n, w in segments if w]
        if indirect:
            if len(segments) > self.size:
                # §2.7.5.3.1: a driver MUST NOT create an indirect table longer than the queue size.
                raise ValueError(
                    f"an indirect table of {len(segments)} entries exceeds queue size {self.size}"
                )
            table_gpa = self.ram.alloc(DESC_SIZE * len(segments), align=16)
            table = self.ram.view(table_gpa, DESC_SIZE * len(segments)).view(DESC_DTYPE)
            for j, (g, n, w) in enumerate(segments):
                last = j == len(segments) - 1
                table[j] = (
                    g,
                    n,
                    (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if w else 0),
                    0 if last else j + 1,
                )
            (head,) = self._take(1)
            self._desc[head] = (table_gpa, DESC_SIZE * len(segments), VIRTQ_DESC_F_INDIRECT, 0)
            return self._publish(head, _Posted([head], [*buffers, table_gpa], writable))
        descs = self._take(len(segments))
        for j, (g, n, w) in enumerate(segments):
            last = j == len(segments) - 1
            self._desc[descs[j]] = (
                g,
                n,
                (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if w else 0),
                0 if last else descs[j + 1],
            )
        return self._publish(descs[0], _Posted(descs, list(buffers), writable))

    def post_malformed(self, kind: Malformed) -> int:
        """Post one broken chain of ``kind``; return the head the device will see in the avail ring."""
        ram = self.ram
        buf = ram.alloc(256)
        ro, wr = False, True
        if kind is Malformed.LOOP:
            a, b = self._take(2)
            self._desc[a] = (buf, 64, VIRTQ_DESC_F_NEXT, b)
            self._desc[b] = (buf, 64, VIRTQ_DESC_F_NEXT, a)
            return self._publish(a, _Posted([a, b], [buf], []))
        if kind is Malformed.HEAD_OUT_OF_RANGE:
            head = self._bogus_head
            self._bogus_head = self._bogus_head + 1 if self._bogus_head < U16_MASK else self.size
            return self._publish(head, _Posted([], [buf], []))
        if kind is Malformed.NEXT_OUT_OF_RANGE:
            (a,) = self._take(1)
            self._desc[a] = (buf, 64, VIRTQ_DESC_F_NEXT, self.size + 3)
            return self._publish(a, _Posted([a], [buf], []))
        if kind in (Malformed.NESTED_INDIRECT, Malformed.INDIRECT_LOOP, Malformed.INDIRECT_NEXT_OUT_OF_RANGE):
            table = ram.alloc(2 * DESC_SIZE, align=16)
            t = ram.view(table, 2 * DESC_SIZE).view(DESC_DTYPE)
            t[0] = (buf, 64, VIRTQ_DESC_F_NEXT, 1)
            if kind is Malformed.NESTED_INDIRECT:
                t[1] = (buf, 32, VIRTQ_DESC_F_INDIRECT, 0)
            elif kind is Malformed.INDIRECT_LOOP:
                t[1] = (buf, 64, VIRTQ_DESC_F_NEXT, 0)
            else:
                t[1] = (buf, 64, VIRTQ_DESC_F_NEXT, 2)
            (a,) = self._take(1)
            self._desc[a] = (table, 2 * DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0)
            return self._publish(a, _Posted([a], [buf, table], []))
        if kind in (
            Malformed.INDIRECT_EMPTY,
            Malformed.INDIRECT_MISALIGNED,
            Malformed.INDIRECT_OUTSIDE_MEMORY,
        ):
            (a,) = self._take(1)
            if kind is Malformed.INDIRECT_EMPTY:
                self._desc[a] = (buf, 0, VIRTQ_DESC_F_INDIRECT, 0)
            elif kind is Malformed.INDIRECT_MISALIGNED:
                self._desc[a] = (buf, 20, VIRTQ_DESC_F_INDIRECT, 0)
            else:
                self._desc[a] = (ram.end + 0x1000, 2 * DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0)
            return self._publish(a, _Posted([a], [buf], []))
        segs: list[tuple[int, int, bool]]
        if kind is Malformed.CHAIN_TOO_LONG:
            segs = [(buf, 0xFFFF_FFFF, ro), (buf, 2, ro)]
        elif kind is Malformed.READ_AFTER_WRITE:
            segs = [(buf, 64, ro), (buf + 64, 64, wr), (buf + 128, 64, ro)]
        elif kind is Malformed.OUTSIDE_MEMORY:
            segs = [(buf, 64, ro), (ram.end + 0x10_0000, 64, ro)]
        elif kind is Malformed.SPANS_REGIONS:
            segs = [(self.ram.regions[0].end - 32, 64, ro)]
        elif kind is Malformed.ADDRESS_OVERFLOW:
            segs = [((1 << 64) - 16, 64, ro)]
        elif kind is Malformed.ZERO_LENGTH_WILD:
            segs = [(buf, 64, ro), (0xDEAD_BEEF_0000_0000, 0, ro), (buf + 64, 64, ro)]
        else:  # pragma: no cover - every kind is handled above
            raise ValueError(kind)
        descs = self._take(len(segs))
        for j, (g, n, w) in enumerate(segs):
            last = j == len(segs) - 1
            self._desc[descs[j]] = (
                g,
                n,
                (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if w else 0),
                0 if last else descs[j + 1],
            )
        return self._publish(descs[0], _Posted(descs, [buf], []))

    def overrun_avail_idx(self, ahead: int | None = None) -> None:
        """Corrupt avail.idx: move it ``ahead`` (default size + 1) past the device's position, which
        virtio 1.2 §2.7.6 forbids (the device must raise AvailIndexError)."""
        step = self.size + 1 if ahead is None else ahead
        self._avail[1] = (self.avail_idx + step) & U16_MASK

    # -- notifications --------------------------------------------------------------------------------

    def should_kick(self) -> bool:
        """Linux ``virtqueue_kick_prepare``: notify the device about entries added since the last call?

        EVENT_IDX: §2.7.10 ``vring_need_event(avail_event, new, old)``; else the device's
        VIRTQ_USED_F_NO_NOTIFY flag (§2.7.7)."""
        old, new = self._kick_old, self.avail_idx
        self._kick_old = new
        if old == new:
            return False
        if self.event_idx:
            avail_event = int(self._used16[2 + 4 * self.size])
            return vring_need_event(avail_event, new, old)
        return not (int(self._used16[0]) & VIRTQ_USED_F_NO_NOTIFY)

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (NO_INTERRUPT flag, or an unreachable used_event)."""
        self.interrupts_enabled = False
        if self.event_idx:
            self._avail[2 + self.size] = (self.last_used_idx - 1) & U16_MASK
        else:
            self._avail[0] = VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self, *, after: int = 0) -> bool:
        """Ask for an interrupt again; with EVENT_IDX once ``after + 1`` more entries are used (Linux
        ``virtqueue_enable_cb_delayed`` for ``after`` > 0). Returns True if used entries are already
        pending (the caller must reap instead of waiting)."""
        self.interrupts_enabled = True
        if self.event_idx:
            self._avail[2 + self.size] = (self.last_used_idx + after) & U16_MASK
        else:
            self._avail[0] = 0
        return int(self._used16[1]) != self.last_used_idx

    @property
    def used_event(self) -> int:
        return int(self._avail[2 + self.size])

    @property
    def avail_event(self) -> int:
        return int(self._used16[2 + 4 * self.size])

    # -- reaping --------------------------------------------------------------------------------------

    def used_pending(self) -> int:
        return (int(self._used16[1]) - self.last_used_idx) & U16_MASK

    def reap(self, max_count: int | None = None) -> list[Completion]:
        """Take used entries (Linux ``virtqueue_get_buf``), free their descriptors and buffers, and
        with EVENT_IDX and interrupts enabled write ``used_event = last_used_idx`` (§2.7.10)."""
        pending = self.used_pending()
        if pending > self.size:
            raise DeviceError(f"used.idx moved {pending} entries, more than the queue size", queue=self.index)
        k = pending if max_count is None else min(pending, max_count)
        out: list[Completion] = []
        for _ in range(k):
            slot = self.last_used_idx & (self.size - 1)
            head, length = (int(x) for x in self._used32[slot])
            posted = self._inflight.pop(head, None)
            if posted is None:
                raise DeviceError(f"used id {head} was not in flight", queue=self.index, descriptor=head)
            data: bytes | None = None
            if posted.writable:
                total = sum(n for _, n in posted.writable)
                if length > total:
                    raise DeviceError(
                        f"used len {length} exceeds the {total} writable bytes posted",
                        queue=self.index,
                        descriptor=head,
                    )
                parts, left = [], length
                for g, n in posted.writable:
                    take = min(n, left)
                    if take:
                        parts.append(self.ram.read(g, take))
                    left -= take
                data = b"".join(parts)
            self._free_descs.extend(reversed(posted.descs))
            for b in posted.buffers:
                self.ram.free(b)
            self.last_used_idx = (self.last_used_idx + 1) & U16_MASK
            out.append(Completion(id=head, len=length, data=data))
        if self.event_idx and self.interrupts_enabled:
            self._avail[2 + self.size] = self.last_used_idx
        return out

    def recycle(self, max_count: int | None = None) -> int:
        """Benchmark helper: reap used entries and post each chain again unchanged (same descriptors,
        same buffers), vectorised. Returns how many were reposted."""
        pending = self.used_pending()
        k = pending if max_count is None else min(pending, max_count)
        if k == 0:
            return 0
        slots = (self.last_used_idx + np.arange(k)) & (self.size - 1)
        heads = self._used32[slots, 0].astype(np.uint16)
        self.last_used_idx = (self.last_used_idx + k) & U16_MASK
        pos = 2 + ((self.avail_idx + np.arange(k)) & (self.size - 1))
        self._avail[pos] = heads
        self.avail_idx = (self.avail_idx + k) & U16_MASK
        self._avail[1] = self.avail_idx
        if self.event_idx and self.interrupts_enabled:
            self._avail[2 + self.size] = self.last_used_idx
        return k


class GuestDriver:
    """A guest with RAM and virtqueues: the whole driver side in one object."""

    def __init__(self, region_sizes: Sequence[int] = DEFAULT_REGION_SIZES) -> None:
        self.ram = GuestRam(region_sizes)
        self.queues: dict[int, DriverQueue] = {}

    @property
    def memory(self) -> GuestMemory:
        return self.ram.memory

    def add_queue(self, index: int, size: int, *, event_idx: bool = False, start_idx: int = 0) -> DriverQueue:
        q = DriverQueue(self.ram, index=index, size=size, event_idx=event_idx, start_idx=start_idx)
        self.queues[index] = q
        return q
