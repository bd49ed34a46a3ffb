"""The events a ``BackendConnection`` returns: one small frozen dataclass per thing that happened.

This module owns the event vocabulary between the I/O-free protocol and the server/device. Every
event is keyword-only, frozen and named in the past tense. **Fd ownership**: an fd field of an
event (``fd``, ``MemoryRegion.fd``) hands that fd to whoever receives the event, who must close it
when done (including the old fd when a later event replaces it, e.g. a second ``VringCallSet`` for
the same ring). The connection itself never keeps an fd it has handed over in an event.
"""

from __future__ import annotations

from dataclasses import dataclass

from nicsim.vhost.payloads import VringAddr


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """Base class of every connection event."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryRegion:
    """A guest memory region with the fd to map (``mmap(fd, mmap_offset + size)``; region at offset)."""

    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    fd: int


@dataclass(frozen=True, kw_only=True, slots=True)
class OwnerSet(Event):
    """SET_OWNER: the session started."""


@dataclass(frozen=True, kw_only=True, slots=True)
class OwnerReset(Event):
    """RESET_OWNER (deprecated): every ring was stopped and disabled; negotiated state is kept."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FeaturesSet(Event):
    """SET_FEATURES: the virtio features the driver acked (plus bit 30 if negotiated)."""

    features: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ProtocolFeaturesSet(Event):
    """SET_PROTOCOL_FEATURES: the vhost-user protocol features in force from now on."""

    features: int


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryTableSet(Event):
    """SET_MEM_TABLE: replaces the whole memory table. Each region carries its fd."""

    regions: tuple[MemoryRegion, ...]

    @property
    def fds(self) -> tuple[int, ...]:
        """The region fds, in region order (the same fds, not extra ones)."""
        return tuple(r.fd for r in self.regions)


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryRegionAdded(Event):
    """ADD_MEM_REG: one more region, with its fd."""

    region: MemoryRegion


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryRegionRemoved(Event):
    """REM_MEM_REG: unmap the region with these guest address, user address and size."""

    guest_phys_addr: int
    size: int
    user_addr: int


@dataclass(frozen=True, kw_only=True, slots=True)
class LogBaseSet(Event):
    """SET_LOG_BASE (with LOG_SHMFD): the dirty log lives in ``fd`` at ``mmap_offset``."""

    mmap_size: int
    mmap_offset: int
    fd: int


@dataclass(frozen=True, kw_only=True, slots=True)
class LogFdSet(Event):
    """SET_LOG_FD: an eventfd to signal after writing the dirty log."""

    fd: int


@dataclass(frozen=True, kw_only=True, slots=True)
class VringNumSet(Event):
    """SET_VRING_NUM: the ring's size."""

    index: int
    num: int


@dataclass(frozen=True, kw_only=True, slots=True)
class VringAddrSet(Event):
    """SET_VRING_ADDR: the ring's addresses as the frontend sent them (``addr``: ring addresses as
    frontend (QEMU) virtual addresses, the log as a guest address, and the flags)."""

    index: int
    addr: VringAddr


@dataclass(frozen=True, kw_only=True, slots=True)
class VringBaseSet(Event):
    """SET_VRING_BASE: the next avail index to read (packed: wrap counters in bits 15 and 31)."""

    index: int
    base: int


@dataclass(frozen=True, kw_only=True, slots=True)
class VringKickSet(Event):
    """SET_VRING_KICK: the kick eventfd, or None (bit 8: the backend must poll)."""

    index: int
    fd: int | None


@dataclass(frozen=True, kw_only=True, slots=True)
class VringCallSet(Event):
    """SET_VRING_CALL: the call eventfd, or None (no interrupts: the frontend polls)."""

    index: int
    fd: int | None


@dataclass(frozen=True, kw_only=True, slots=True)
class VringErrSet(Event):
    """SET_VRING_ERR: the error eventfd, or None."""

    index: int
    fd: int | None


@dataclass(frozen=True, kw_only=True, slots=True)
class VringStarted(Event):
    """The ring started (spec, "Ring states": on SET_VRING_KICK). Follows its VringKickSet."""

    index: int


@dataclass(frozen=True, kw_only=True, slots=True)
class VringStopped(Event):
    """The ring stopped (GET_VRING_BASE or RESET_OWNER); ``base`` is what the device reported."""

    index: int
    base: int


@dataclass(frozen=True, kw_only=True, slots=True)
class VringEnabled(Event):
    """SET_VRING_ENABLE, or the implicit enable at start when protocol features are not in use."""

    index: int
    enabled: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class VringEndianSet(Event):
    """SET_VRING_ENDIAN (legacy devices): big_endian or little-endian ring."""

    index: int
    big_endian: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class BackendReqFdSet(Event):
    """SET_BACKEND_REQ_FD: the socket for backend-initiated requests."""

    fd: int


@dataclass(frozen=True, kw_only=True, slots=True)
class InflightFdSet(Event):
    """SET_INFLIGHT_FD: the inflight-tracking buffer handed back after a reconnect."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    fd: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ConfigSet(Event):
    """SET_CONFIG: the driver wrote ``data`` at ``offset`` (``migration``: the live-migration flag)."""

    offset: int
    data: bytes
    migration: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class IotlbMsgReceived(Event):
    """IOTLB_MSG: an IOTLB update or invalidation (only with ACCESS_PLATFORM negotiated)."""

    iova: int
    size: int
    user_addr: int
    perm: int
    type: int


@dataclass(frozen=True, kw_only=True, slots=True)
class RarpRequested(Event):
    """SEND_RARP: broadcast a RARP for ``mac`` (6 bytes) after a migration."""

    mac: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class MtuSet(Event):
    """NET_SET_MTU: the host MTU exposed to the guest."""

    mtu: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StatusSet(Event):
    """SET_STATUS: the virtio device status byte the driver wrote (0 means device reset)."""

    status: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ProtocolErrorOccurred(Event):
    """A message was refused (or, if ``fatal``, the stream is lost and the connection closed).

    ``request`` is the request name (``"UNKNOWN(99)"`` if the number is not in the spec), ``code``
    the number, ``state`` the connection state when it arrived, ``reason`` the rule it broke.
    Any fds that came with the message went to ``fds_to_close()``.
    """

    request: str
    code: int
    state: str
    reason: str
    fatal: bool
