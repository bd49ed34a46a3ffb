"""The payload layouts of vhost-user messages: one frozen dataclass per layout, each with its codec.

This module owns the byte layout of every payload the vhost-user spec defines ("Message
Specification" / "Payload"): u64, vring state, vring address, memory table, single memory region,
log description, IOTLB message, config space, inflight description and device-state transfer.
Each class validates its *own* syntax when decoding (sizes, reserved bits, zero-sized regions,
64-bit overflow of address + size) and raises ``FrontendProtocolError`` without a state; which
payload belongs to which request, and what is legal when, live in ``protocol`` and ``state``.
Numbers are in the machine's native byte order, as the spec says, with standard sizes (``=``).
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from nicsim.vhost.errors import FrontendProtocolError

U64_MAX = (1 << 64) - 1
VHOST_MEMORY_BASELINE_NREGIONS = 8
"""SET_MEM_TABLE carries at most this many regions (and fds), whatever the slot count."""
VHOST_USER_MAX_CONFIG_SIZE = 256
"""The largest config-space access in GET_CONFIG / SET_CONFIG (the virtio config space limit)."""


def _need(data: bytes, sizes: tuple[int, ...], what: str) -> None:
    if len(data) not in sizes:
        want = " or ".join(str(s) for s in sizes)
        raise FrontendProtocolError(f"{what} payload is {len(data)} bytes, expected {want}")


def _check_range(start: int, size: int, what: str) -> None:
    if start + size - 1 > U64_MAX:
        raise FrontendProtocolError(f"{what} {start:#x} + size {size:#x} overflows 64 bits")


@dataclass(frozen=True, kw_only=True, slots=True)
class U64:
    """A single 64-bit integer."""

    value: int
    SIZE: ClassVar[int] = 8

    def encode(self) -> bytes:
        return struct.pack("=Q", self.value)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, (cls.SIZE,), "u64")
        return cls(value=struct.unpack("=Q", data)[0])


@dataclass(frozen=True, kw_only=True, slots=True)
class VringState:
    """A vring state description: 32-bit index and 32-bit number."""

    index: int
    num: int
    SIZE: ClassVar[int] = 8

    def encode(self) -> bytes:
        return struct.pack("=II", self.index, self.num)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, (cls.SIZE,), "vring state")
        index, num = struct.unpack("=II", data)
        return cls(index=index, num=num)


VHOST_VRING_F_LOG = 0
"""Bit number in SET_VRING_ADDR flags: log writes to the used ring (spec, "Migration")."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VringAddr:
    """A vring address description. Ring addresses are frontend (QEMU) virtual addresses."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    SIZE: ClassVar[int] = 40

    def encode(self) -> bytes:
        return struct.pack(
            "=IIQQQQ",
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, (cls.SIZE,), "vring address")
        index, flags, desc, used, avail, log = struct.unpack("=IIQQQQ", data)
        if flags & ~(1 << VHOST_VRING_F_LOG):
            raise FrontendProtocolError(f"vring address flags {flags:#x} has unknown bits")
        # virtio 1.2 §2.7 alignment: descriptor table 16, available ring 2, used ring 4 bytes.
        # QEMU's virtual addresses of guest memory keep the guest-physical alignment.
        for name, addr, align in (("descriptor", desc, 16), ("available", avail, 2), ("used", used, 4)):
            if addr % align:
                raise FrontendProtocolError(f"{name} ring address {addr:#x} is not {align}-byte aligned")
        return cls(
            index=index,
            flags=flags,
            desc_user_addr=desc,
            used_user_addr=used,
            avail_user_addr=avail,
            log_guest_addr=log,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryRegionDesc:
    """One memory region as the frontend describes it (no fd: fds travel out of band)."""

    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    SIZE: ClassVar[int] = 32

    def encode(self) -> bytes:
        return struct.pack("=QQQQ", self.guest_phys_addr, self.size, self.user_addr, self.mmap_offset)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, (cls.SIZE,), "memory region")
        gpa, size, uva, offset = struct.unpack("=QQQQ", data)
        region = cls(guest_phys_addr=gpa, size=size, user_addr=uva, mmap_offset=offset)
        region.validate()
        return region

    def validate(self) -> None:
        if self.size == 0:
            raise FrontendProtocolError(
                f"memory region at guest address {self.guest_phys_addr:#x} has size 0"
            )
        _check_range(self.guest_phys_addr, self.size, "guest address")
        _check_range(self.user_addr, self.size, "user address")
        _check_range(self.mmap_offset, self.size, "mmap offset")

    def overlaps(self, other: MemoryRegionDesc) -> bool:
        """Whether the guest-physical ranges intersect."""
        return (
            self.guest_phys_addr < other.guest_phys_addr + other.size
            and other.guest_phys_addr < self.guest_phys_addr + self.size
        )


def check_no_overlap(regions: tuple[MemoryRegionDesc, ...]) -> None:
    """Refuse a table where two regions share guest-physical addresses."""
    ordered = sorted(regions, key=lambda r: r.guest_phys_addr)
    for a, b in itertools.pairwise(ordered):
        if a.overlaps(b):
            raise FrontendProtocolError(
                f"memory regions at {a.guest_phys_addr:#x} and {b.guest_phys_addr:#x} overlap"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryTable:
    """A memory regions description: u32 count, u32 padding, then up to 8 regions."""

    regions: tuple[MemoryRegionDesc, ...]
    HEADER: ClassVar[int] = 8

    def encode(self) -> bytes:
        return struct.pack("=II", len(self.regions), 0) + b"".join(r.encode() for r in self.regions)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        if len(data) < cls.HEADER:
            raise FrontendProtocolError(f"memory table payload is {len(data)} bytes, shorter than its header")
        (count,) = struct.unpack_from("=I", data)
        if count == 0 or count > VHOST_MEMORY_BASELINE_NREGIONS:
            raise FrontendProtocolError(
                f"memory table has {count} regions, expected 1..{VHOST_MEMORY_BASELINE_NREGIONS}"
            )
        exact = cls.HEADER + count * MemoryRegionDesc.SIZE
        full = cls.HEADER + VHOST_MEMORY_BASELINE_NREGIONS * MemoryRegionDesc.SIZE
        # QEMU sends exactly `count` regions; some older frontends send the whole fixed-size array.
        _need(data, (exact, full) if exact != full else (exact,), f"memory table with {count} regions")
        regions = tuple(
            MemoryRegionDesc.decode(data[off : off + MemoryRegionDesc.SIZE])
            for off in range(cls.HEADER, exact, MemoryRegionDesc.SIZE)
        )
        check_no_overlap(regions)
        return cls(regions=regions)


@dataclass(frozen=True, kw_only=True, slots=True)
class SingleMemoryRegion:
    """A single memory region description: u64 padding, then one region (ADD/REM_MEM_REG)."""

    region: MemoryRegionDesc
    SIZE: ClassVar[int] = 40

    def encode(self) -> bytes:
        return struct.pack("=Q", 0) + self.region.encode()

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, (cls.SIZE,), "single memory region")
        return cls(region=MemoryRegionDesc.decode(data[8:]))


@dataclass(frozen=True, kw_only=True, slots=True)
class LogDesc:
    """A log description: size and offset of the dirty log in the fd that comes with it."""

    mmap_size: int
    mmap_offset: int
    SIZE: ClassVar[int] = 16

    def encode(self) -> bytes:
        return struct.pack("=QQ", self.mmap_size, self.mmap_offset)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, (cls.SIZE,), "log description")
        size, offset = struct.unpack("=QQ", data)
        if size == 0:
            raise FrontendProtocolError("log area has size 0")
        _check_range(offset, size, "log offset")
        return cls(mmap_size=size, mmap_offset=offset)


IOTLB_MISS, IOTLB_UPDATE, IOTLB_INVALIDATE, IOTLB_ACCESS_FAIL = 1, 2, 3, 4


@dataclass(frozen=True, kw_only=True, slots=True)
class IotlbMsg:
    """struct vhost_iotlb_msg: iova, size, user address, u8 permissions, u8 type (padded to 32)."""

    iova: int
    size: int
    user_addr: int
    perm: int
    type: int
    SIZE: ClassVar[int] = 32

    def encode(self) -> bytes:
        return struct.pack("=QQQBB6x", self.iova, self.size, self.user_addr, self.perm, self.type)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, (cls.SIZE,), "IOTLB message")
        iova, size, uva, perm, kind = struct.unpack("=QQQBB6x", data)
        if perm > 3:
            raise FrontendProtocolError(f"IOTLB permissions {perm} not in 0..3")
        if kind not in (IOTLB_MISS, IOTLB_UPDATE, IOTLB_INVALIDATE, IOTLB_ACCESS_FAIL):
            raise FrontendProtocolError(f"IOTLB message type {kind} unknown")
        _check_range(iova, size, "IOVA")
        _check_range(uva, size, "user address")
        return cls(iova=iova, size=size, user_addr=uva, perm=perm, type=kind)


VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION = 0, 1


@dataclass(frozen=True, kw_only=True, slots=True)
class ConfigSpace:
    """Virtio device config space: u32 offset, u32 size, u32 flags, then ``size`` bytes."""

    offset: int
    size: int
    flags: int
    payload: bytes
    HEADER: ClassVar[int] = 12

    def encode(self) -> bytes:
        return struct.pack("=III", self.offset, self.size, self.flags) + self.payload

    @classmethod
    def decode(cls, data: bytes) -> Self:
        if len(data) < cls.HEADER:
            raise FrontendProtocolError(f"config payload is {len(data)} bytes, shorter than its header")
        offset, size, flags = struct.unpack_from("=III", data)
        if size > VHOST_USER_MAX_CONFIG_SIZE or offset + size > VHOST_USER_MAX_CONFIG_SIZE:
            raise FrontendProtocolError(
                f"config access offset {offset} size {size} beyond {VHOST_USER_MAX_CONFIG_SIZE} bytes"
            )
        if flags not in (VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION):
            raise FrontendProtocolError(f"config flags {flags:#x} unknown")
        _need(data, (cls.HEADER + size,), f"config access of {size} bytes")
        return cls(offset=offset, size=size, flags=flags, payload=bytes(data[cls.HEADER :]))


@dataclass(frozen=True, kw_only=True, slots=True)
class InflightDesc:
    """Inflight description: u64 mmap size, u64 mmap offset, u16 queues, u16 queue size (padded to 24)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    SIZE: ClassVar[int] = 24

    def encode(self) -> bytes:
        return struct.pack("=QQHH4x", self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, (cls.SIZE,), "inflight description")
        size, offset, queues, qsize = struct.unpack("=QQHH4x", data)
        _check_range(offset, size, "inflight mmap offset")
        return cls(mmap_size=size, mmap_offset=offset, num_queues=queues, queue_size=qsize)


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceStateTransfer:
    """SET_DEVICE_STATE_FD request: u32 direction, u32 phase."""

    direction: int
    phase: int
    SIZE: ClassVar[int] = 8

    def encode(self) -> bytes:
        return struct.pack("=II", self.direction, self.phase)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, (cls.SIZE,), "device state transfer")
        direction, phase = struct.unpack("=II", data)
        return cls(direction=direction, phase=phase)


@dataclass(frozen=True, kw_only=True, slots=True)
class Empty:
    """No payload."""

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _need(data, (0,), "empty")
        return cls()


@dataclass(frozen=True, kw_only=True, slots=True)
class Opaque:
    """Bytes this backend does not interpret (payloads of requests it never supports)."""

    data: bytes

    def encode(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(data=bytes(data))


Payload = (
    U64
    | VringState
    | VringAddr
    | MemoryTable
    | SingleMemoryRegion
    | LogDesc
    | IotlbMsg
    | ConfigSpace
    | InflightDesc
    | DeviceStateTransfer
    | Empty
    | Opaque
)
