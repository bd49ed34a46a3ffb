"""The seam between the I/O-free backend core and the asyncio shell: what the core asks the shell to do.

This module owns the actions :class:`~nicsim.vhost.backend_core.BackendCore` returns (small frozen
dataclasses named as orders: map this table, start this ring's pump, close these fds) and the two
interfaces the core calls on things only the shell can make: the inflight buffer (``InflightStorage``)
and the function that creates one for GET_INFLIGHT_FD (``InflightFactory``, called synchronously
because the reply is built while the message is parsed). The shell carries each action out in order.
An action that produces something the core needs (a mapped memory table, an adopted inflight buffer)
is answered with the core's matching method, or with ``BackendCore.action_failed`` when it cannot be
done; the same goes for any action that fails. ``cause`` is the event the action serves: a failure
refuses that event (its REPLY_ACK says so). **Fd ownership**: an fd in an action passes to the shell.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from nicsim.errors import RemoteError
from nicsim.vhost import events as ev
from nicsim.virtio.inflight import InflightHooks
from rings.dirty_log import DirtyLog
from rings.inflight import Recovery
from rings.inflight_packed import PackedRecovery
from rings.memory import GuestMemory


class InflightError(RemoteError):
    """The frontend's inflight request cannot be honoured. ``reason`` is a short key (``"size"``,
    ``"queues"``, ``"fd"``, ``"mmap"``), ``num_queues`` / ``queue_size`` what it asked for."""

    def __init__(self, message: str, *, reason: str, num_queues: int, queue_size: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.num_queues = num_queues
        self.queue_size = queue_size


class InflightStorage(InflightHooks, Protocol):
    """A mapped inflight buffer (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), as the core uses it.

    ``fd`` is the memfd to send with GET_INFLIGHT_FD's reply (None for a buffer adopted with
    SET_INFLIGHT_FD); ``mmap_size`` its size; ``packed`` whether it has the packed layout
    (QueueRegionPacked, for VIRTIO_F_RING_PACKED) rather than the split one.
    """

    fd: int | None
    mmap_size: int
    packed: bool

    def tracks(self, index: int, queue_size: int) -> bool:
        """Whether the buffer has a queue ``index`` of ``queue_size`` entries."""
        ...

    def recover(self, index: int, ring_used_idx: int) -> Recovery:
        """rings.inflight's reconciliation of queue ``index`` with the used index in guest memory."""
        ...

    def recover_packed(
        self, index: int, mem: GuestMemory, desc_addr: int, *, used_pos: int, used_wrap: int
    ) -> PackedRecovery:
        """rings.inflight_packed's reconciliation of packed queue ``index`` with its descriptor ring."""
        ...

    def close(self) -> None:
        """Unmap and close (the shell does, on ``ReleaseInflight``; the core never calls it)."""
        ...


class InflightFactory(Protocol):
    """Makes a zeroed inflight buffer (in the packed layout when ``packed``); raises InflightError (or
    OSError) when it cannot."""

    def __call__(self, *, num_queues: int, queue_size: int, packed: bool = False) -> InflightStorage: ...


class RingFd(enum.Enum):
    """Which eventfd of a ring (SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR)."""

    KICK = "kick"
    CALL = "call"
    ERR = "err"


@dataclass(frozen=True, kw_only=True, slots=True)
class Action:
    """Base class of every action; ``cause``: the event it serves (None: the core's own bookkeeping)."""

    cause: ev.Event | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class MapMemoryTable(Action):
    """Map every region (closing each fd), then make them the whole table; answer ``memory_mapped``
    with the new table, or ``action_failed`` (every fd closed, the old table kept)."""

    regions: tuple[ev.MemoryRegion, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class MapMemoryRegion(Action):
    """Map one more region (closing its fd) into the table; answer ``memory_mapped`` or ``action_failed``."""

    region: ev.MemoryRegion


@dataclass(frozen=True, kw_only=True, slots=True)
class UnmapMemoryRegion(Action):
    """Take the region named by (guest address, user address, size) out of the table and unmap it;
    answer ``memory_mapped`` with what is left (None when nothing is)."""

    key: tuple[int, int, int]


@dataclass(frozen=True, kw_only=True, slots=True)
class AdoptInflight(Action):
    """Map the inflight buffer SET_INFLIGHT_FD brought (closing ``fd``), in the packed layout when
    ``packed`` (VIRTIO_F_RING_PACKED was negotiated); answer ``inflight_adopted`` or ``action_failed``."""

    fd: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    packed: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class ReleaseInflight(Action):
    """Unmap ``storage`` and close its memfd, once no reply still to be written carries that fd."""

    storage: InflightStorage


class DirtyLogStorage(Protocol):
    """A mapped dirty log (SET_LOG_BASE with VHOST_USER_PROTOCOL_F_LOG_SHMFD), as the core uses it."""

    log: DirtyLog

    def close(self) -> None:
        """Unmap it (the shell does, on ``ReleaseDirtyLog``; the core never calls it)."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class MapDirtyLog(Action):
    """Map the dirty log QEMU shares for a migration (closing ``fd``); answer ``dirty_log_mapped``
    or ``action_failed``."""

    fd: int
    mmap_size: int
    mmap_offset: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ReleaseDirtyLog(Action):
    """Unmap a dirty log nobody writes any more (the device let go of it first)."""

    storage: DirtyLogStorage


@dataclass(frozen=True, kw_only=True, slots=True)
class SetRingFd(Action):
    """Give ring ``index`` this kick, call or err eventfd (None: none), closing the one it replaces."""

    index: int
    kind: RingFd
    fd: int | None


@dataclass(frozen=True, kw_only=True, slots=True)
class StartPump(Action):
    """Ring ``index`` runs (device queue started, memory mapped, and enabled unless it is a TX ring,
    whose chains the device discards while it is disabled): watch its kicks."""

    index: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StopPump(Action):
    """Ring ``index`` must not run: stop watching its kicks and polling it."""

    index: int


@dataclass(frozen=True, kw_only=True, slots=True)
class CloseFds(Action):
    """Close these fds (given to the core and not used)."""

    fds: tuple[int, ...]
