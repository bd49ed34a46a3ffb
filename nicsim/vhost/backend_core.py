"""The backend core, I/O-free: applies vhost-user events to guest memory and the virtio-net device.

This module owns ``BackendCore``, the role rust-vmm's vhost-user-backend ``handler.rs`` plays: it feeds
a :class:`~nicsim.vhost.BackendConnection` the bytes and fds the shell received, answers the
connection's device queries (``DeviceQueries``: GET_VRING_BASE stops the device queue and reports its
index; GET_CONFIG; GET_STATUS, the driver's status plus DEVICE_NEEDS_RESET once a ring broke;
GET_INFLIGHT_FD), applies each event to the :class:`~nicsim.virtio.device.VirtioNetDevice` (features,
memory table, inflight buffer, a reset, the host MTU, the RARP SEND_RARP asks for) and brings rings up:
a ring's device queue starts once the protocol started it (SET_VRING_KICK) and memory exists, at the
addresses translated from the frontend's, from the used index in guest memory and what the inflight
buffer says was in flight (a packed ring, VIRTIO_F_RING_PACKED, from SET_VRING_BASE's positions
and wrap counters, or from the packed inflight buffer's, with the chains it saved); its pump runs
while it is also enabled, and a TX ring's also while it is disabled (its chains are then
discarded, as the spec's "Ring states" asks). It opens, maps and closes nothing and knows no event
loop: what needs the operating system is returned as :mod:`nicsim.vhost.actions` for the shell to
carry out, and the shell hands back what it made (``memory_mapped``, ``inflight_adopted``) or
reports that it could not (``action_failed``).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from nicsim.vhost import events as ev
from nicsim.vhost import features as vf
from nicsim.vhost.actions import (
    Action,
    AdoptInflight,
    CloseFds,
    DirtyLogStorage,
    InflightError,
    InflightFactory,
    InflightStorage,
    MapDirtyLog,
    MapMemoryRegion,
    MapMemoryTable,
    ReleaseDirtyLog,
    ReleaseInflight,
    RingFd,
    SetRingFd,
    StartPump,
    StopPump,
    UnmapMemoryRegion,
)
from nicsim.vhost.connection import BackendConnection, Outgoing, RingStatus
from nicsim.vhost.queries import InflightBuffer
from nicsim.vhost.state import ConnectionState
from nicsim.virtio.device import DEVICE_NEEDS_RESET, DeviceStateError, VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_RING_PACKED
from nicsim.virtio.features import VIRTIO_NET_F_GUEST_ANNOUNCE as GUEST_ANNOUNCE
from nicsim.virtio.queues import DeviceQueue
from rings.errors import QueueConfigError, RingsError
from rings.layout import split_ring_sizes
from rings.memory import GuestMemory
from rings.packed import PackedQueue
from rings.packed_layout import EVENT_SIZE, PDESC_SIZE
from rings.packed_walk import EMPTY_SAVED, SavedChains
from rings.split import SplitQueue

log = logging.getLogger("nicsim.vhost.backend")

DEFAULT_MAX_QUEUE_SIZE = 1024
DEFAULT_MAC = b"\x52\x54\x00\x12\x34\x56"
MAX_ERRORS = 50  # BackendCore.errors keeps the newest
_MEMORY_ACTIONS = (MapMemoryTable, MapMemoryRegion, UnmapMemoryRegion)
_RING_FDS = {ev.VringKickSet: RingFd.KICK, ev.VringCallSet: RingFd.CALL, ev.VringErrSet: RingFd.ERR}


def net_config(mac: bytes, *, status: int, pairs: int, mtu: int) -> bytes:
    """virtio-net config space (virtio 1.2 §5.1.4): mac, status, max_virtqueue_pairs, mtu."""
    return mac + struct.pack("<HHH", status, pairs, mtu)


class BackendCore:
    """One connection's protocol state applied to one device. Implements ``DeviceQueries``.

    ``create_inflight`` makes the buffer GET_INFLIGHT_FD hands out (the shell's memfd). ``config_space``
    offers VHOST_USER_PROTOCOL_F_CONFIG (GET_CONFIG reads the virtio-net config space): only for a
    frontend that uses it, since QEMU's net device does not and warns when it is offered. ``name``
    prefixes what is logged. ``errors`` lists what the frontend did wrong, newest last (bounded).
    """

    def __init__(
        self,
        device: VirtioNetDevice,
        *,
        create_inflight: InflightFactory,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        mac: bytes = DEFAULT_MAC,
        config_space: bool = False,
        name: str = "backend",
    ) -> None:
        self.device = device
        self.name = name
        self.errors: list[str] = []
        self._create_inflight = create_inflight
        self._mac = mac
        self._config = net_config(mac, status=1, pairs=device.pairs, mtu=1500)
        # GUEST_ANNOUNCE is the frontend's to implement (QEMU: config status bit, control queue), and
        # ours only to allow: offering it lets a guest announce itself after a migration instead of
        # QEMU asking for SEND_RARP (nicsim.virtio.announce says who does what). VHOST_F_LOG_ALL (with
        # LOG_SHMFD): QEMU migrates a guest whose NIC is on vhost-user only with both (the dirty log of
        # every page the backend writes; see rings.dirty_log). The device sees neither (SET_FEATURES
        # hands it only the bits it offers).
        vhost_bits = vf.mask((vf.VHOST_USER_F_PROTOCOL_FEATURES, vf.VHOST_F_LOG_ALL, GUEST_ANNOUNCE))
        features = device.device_features() | vhost_bits
        self.conn = BackendConnection(
            device=self, features=features, queue_pairs=device.pairs, max_queue_size=max_queue_size,
            protocol_features=vf.DEFAULT_PROTOCOL_FEATURES | vf.bit(vf.VHOST_USER_PROTOCOL_F_LOG_SHMFD),
            inflight_shmfd=True, config_space=config_space,
        )  # fmt: skip
        self.dirty_log: DirtyLogStorage | None = None
        self.memory: GuestMemory | None = None  # the table the shell mapped last
        self.inflight: InflightStorage | None = None
        n = device.num_queues
        self._started = [False] * n  # by the protocol (SET_VRING_KICK ... GET_VRING_BASE)
        self._running = [False] * n  # the device queue exists
        # What the queries did while the connection parsed a message, returned ahead of its events.
        self._query_actions: list[Action] = []

    # -- bytes in, actions and replies out --------------------------------------------------------

    @property
    def bytes_wanted(self) -> int:
        """Read at most this many bytes next (the rest of one header or one message)."""
        return self.conn.bytes_wanted

    @property
    def closed(self) -> bool:
        """The stream is broken (or ``close`` was called): drop the connection."""
        return self.conn.state is ConnectionState.CLOSED

    @property
    def requests(self) -> list[str]:
        """The names of the latest requests, oldest first."""
        return list(self.conn.request_log)

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> list[Action]:
        """Feed what one ``recvmsg`` returned; return what the shell must do, in order. Carry the
        actions out (answering those that ask) before the next ``data_to_send``."""
        events = self.conn.receive_data(data, fds)
        out, self._query_actions = self._query_actions, []
        for event in events:
            out.extend(self._apply(event))
        return out

    def data_to_send(self) -> list[Outgoing]:
        """Replies to write, in request order (their fds stay the core's: never close them)."""
        return self.conn.data_to_send()

    def fds_to_close(self) -> list[int]:
        """Fds of refused messages: the shell closes each one once."""
        return self.conn.fds_to_close()

    # -- what the shell reports back ----------------------------------------------------------------

    def memory_mapped(self, action: Action, memory: GuestMemory | None) -> list[Action]:
        """The shell carried out a memory action: ``memory`` is the table now (None: no region)."""
        self.memory = memory
        self.device.set_memory(memory)
        if isinstance(action, UnmapMemoryRegion):
            return []  # less memory cannot let a ring start
        return self._sync_rings(action.cause, range(self.device.num_queues))

    def dirty_log_mapped(self, action: MapDirtyLog, storage: DirtyLogStorage) -> list[Action]:
        """SET_LOG_BASE's log is mapped: the device logs into it while VHOST_F_LOG_ALL is on."""
        return self._set_dirty_log(storage)

    def _set_dirty_log(self, storage: DirtyLogStorage | None) -> list[Action]:
        old, self.dirty_log = self.dirty_log, storage
        self.device.set_dirty_log(None if storage is None else storage.log)
        return [] if old is None else [ReleaseDirtyLog(storage=old)]

    def inflight_adopted(self, action: AdoptInflight, storage: InflightStorage) -> list[Action]:
        """SET_INFLIGHT_FD's buffer is mapped: rings started from now on resubmit what it says."""
        return self._set_inflight(storage)

    def action_failed(self, action: Action, reason: str) -> list[Action]:
        """The shell could not carry ``action`` out: refuse the event it served."""
        if isinstance(action, _MEMORY_ACTIONS):
            self.device.set_memory(self.memory)  # the table did not change
        if action.cause is None:
            self.note(reason)
        else:
            self._refuse(action.cause, reason)
        return []

    def note(self, message: str) -> None:
        """Record (and log) something the frontend did wrong."""
        log.warning("%s: %s", self.name, message)
        self.errors.append(message)
        del self.errors[:-MAX_ERRORS]

    # -- DeviceQueries ----------------------------------------------------------------------------

    def stop_vring(self, index: int, *, base: int) -> int:
        self._query_actions.append(StopPump(index=index))
        self._started[index] = False
        if not self._running[index]:
            return base
        self._running[index] = False
        try:
            return self.device.stop_queue(index)
        except (DeviceStateError, RingsError) as err:
            self.note(f"ring {index}: stop failed: {err}")
            return base

    def read_config(self, offset: int, size: int) -> bytes | None:
        if offset + size > len(self._config):
            return None
        return self._config[offset : offset + size]

    def get_status(self, *, driver_status: int) -> int:
        # The driver's bits, and the one the device sets itself: a broken ring needs a reset.
        return driver_status | (DEVICE_NEEDS_RESET if self.device.needs_reset else 0)

    def get_inflight_fd(self, *, num_queues: int, queue_size: int) -> InflightBuffer | None:
        """A fresh zeroed buffer; a repeated request replaces (and frees) the previous one."""
        if any(self._running):
            self.note("GET_INFLIGHT_FD refused: rings are running")
            return None
        try:
            if self._packed():  # the layout follows the features (QEMU sends SET_FEATURES first)
                storage = self._create_inflight(num_queues=num_queues, queue_size=queue_size, packed=True)
            else:
                storage = self._create_inflight(num_queues=num_queues, queue_size=queue_size)
        except (InflightError, OSError) as err:
            self.note(f"GET_INFLIGHT_FD refused: {err}")
            return None
        self._query_actions.extend(self._set_inflight(storage))
        assert storage.fd is not None
        return InflightBuffer(fd=storage.fd, mmap_size=storage.mmap_size)

    # -- events -----------------------------------------------------------------------------------

    def _apply(self, event: ev.Event) -> list[Action]:
        match event:
            case ev.ProtocolErrorOccurred():
                self.note(f"{event.request} refused in state {event.state}: {event.reason}"
                          + (" (fatal)" if event.fatal else ""))  # fmt: skip
            case ev.FeaturesSet():
                self.device.set_log_all(vf.has(event.features, vf.VHOST_F_LOG_ALL))
                try:
                    self.device.set_features(event.features & self.device.device_features())
                except (DeviceStateError, OSError) as err:  # OSError: the port refused (a tap's ioctl)
                    self._refuse(event, str(err))
            case ev.MemoryTableSet():
                self.device.set_memory(None)  # the device lets go of the old table before it is unmapped
                return [MapMemoryTable(cause=event, regions=event.regions)]
            case ev.MemoryRegionAdded():
                self.device.set_memory(None)
                return [MapMemoryRegion(cause=event, region=event.region)]
            case ev.MemoryRegionRemoved():
                self.device.set_memory(None)
                key = (event.guest_phys_addr, event.user_addr, event.size)
                return [UnmapMemoryRegion(cause=event, key=key)]
            case ev.VringKickSet() | ev.VringCallSet() | ev.VringErrSet():
                return [SetRingFd(cause=event, index=event.index, kind=_RING_FDS[type(event)], fd=event.fd)]
            case ev.VringStarted():
                self._started[event.index] = True
                return self._sync_rings(event, [event.index])
            case ev.VringEnabled():
                return self._sync_rings(event, [event.index])
            case ev.InflightFdSet():
                return self._adopt_inflight(event)
            case ev.MtuSet():
                # QEMU sends it before SET_FEATURES on every start of a guest that acked
                # VIRTIO_NET_F_MTU; refused (a failure REPLY_ACK), QEMU does not start the device.
                try:
                    self.device.set_mtu(event.mtu)
                except OSError as err:  # the port could not follow (a tap's SIOCSIFMTU)
                    self._refuse(event, f"MTU {event.mtu}: {err}")
                else:
                    self._config = net_config(self._mac, status=1, pairs=self.device.pairs, mtu=event.mtu)
            case ev.RarpRequested():
                if not self.device.announce(event.mac):
                    self.note(f"SEND_RARP for {event.mac.hex(':')}: the port failed to send it")
            case ev.StatusSet() if event.status == 0:
                self.device.driver_reset()  # virtio 1.2 §2.4: writing 0 resets the device
            case ev.LogBaseSet():
                return [MapDirtyLog(cause=event, fd=event.fd, mmap_size=event.mmap_size,
                                    mmap_offset=event.mmap_offset)]  # fmt: skip
            case ev.LogFdSet() | ev.BackendReqFdSet():
                self.note(f"{type(event).__name__} ignored: not offered")
                return [CloseFds(cause=event, fds=(event.fd,))]  # features we never offer; the fd is ours
        return []

    def _refuse(self, event: ev.Event, reason: str) -> None:
        self.note(f"{type(event).__name__}: {reason}")
        self.conn.reject(event, reason)

    def _adopt_inflight(self, event: ev.InflightFdSet) -> list[Action]:
        if any(self._running):
            self._refuse(event, "SET_INFLIGHT_FD while rings are running")
            return [CloseFds(cause=event, fds=(event.fd,))]
        return [AdoptInflight(cause=event, fd=event.fd, mmap_size=event.mmap_size,
                              mmap_offset=event.mmap_offset, num_queues=event.num_queues,
                              queue_size=event.queue_size, packed=self._packed())]  # fmt: skip

    def _set_inflight(self, storage: InflightStorage | None) -> list[Action]:
        old, self.inflight = self.inflight, storage
        self.device.inflight = storage
        return [] if old is None else [ReleaseInflight(storage=old)]

    # -- bringing rings up ------------------------------------------------------------------------

    def _sync_rings(self, cause: ev.Event | None, indices: Iterable[int]) -> list[Action]:
        """Bring each ring's device queue and pump in line with started / enabled / memory; the first
        ring that cannot start refuses ``cause`` (the rings after it are left as they were)."""
        out: list[Action] = []
        try:
            for index in indices:
                out.append(self._sync(index))
        except (DeviceStateError, RingsError) as err:
            if cause is not None:
                self._refuse(cause, str(err))
        return out

    def _sync(self, index: int) -> Action:
        ring = self.conn.rings[index]
        mem = self.memory
        self.device.set_enabled(index, ring.enabled)
        if self._started[index] and not self._running[index] and mem is not None:
            queue, resubmit = self._queue(ring, mem)
            self.device.start_queue(index, queue, resubmit=resubmit)
            self._running[index] = True
        # vhost-user "Ring states": a started ring is processed even while disabled. A disabled TX ring
        # still has its chains taken (and discarded, by the device), so its pump runs; a disabled RX
        # ring supplies nothing, so its pump sleeps until SET_VRING_ENABLE 1.
        if self._running[index] and mem is not None and (ring.enabled or index % 2 == 1):
            return StartPump(index=index)
        return StopPump(index=index)

    def _packed(self) -> bool:
        return vf.has(self.conn.acked_features or 0, VIRTIO_F_RING_PACKED)

    def _queue(
        self, ring: RingStatus, mem: GuestMemory
    ) -> tuple[DeviceQueue, npt.NDArray[np.uint16] | SavedChains]:
        """The device side of ``ring`` and what to resubmit (inflight recovery)."""
        assert ring.addr is not None
        if self._packed():
            return self._packed_queue(ring, mem)
        index = ring.index
        dsize, asize, usize = split_ring_sizes(ring.num)
        a = ring.addr
        used = mem.uva_to_gpa(a.used_user_addr, usize)
        # Start from the used index the ring holds (libvhost-user does the same): after a stop
        # every chain was returned, so it equals the base; after a driver reset both are 0.
        used_idx = int(mem.view_as(used + 2, np.dtype("<u2"), 1)[0])
        last_avail, resubmit = ring.base & 0xFFFF, np.zeros(0, np.uint16)
        if self.inflight is not None and self.inflight.tracks(index, ring.num):
            if self.inflight.packed:
                raise QueueConfigError("the inflight buffer has the packed layout, the rings are split",
                                       queue=index)  # fmt: skip
            # vhost-user spec "Inflight I/O tracking", when reconnecting: heads the previous
            # backend took and never returned are processed again, the avail ring resumes after.
            rec = self.inflight.recover(index, used_idx)
            if not rec.fresh:
                last_avail, resubmit = rec.last_avail_idx, rec.resubmit
                if resubmit.shape[0]:
                    log.info("%s: ring %d: resubmitting %d chains in flight at the last disconnect",
                             self.name, index, resubmit.shape[0])  # fmt: skip
        queue = SplitQueue(
            index=index, size=ring.num, desc_addr=mem.uva_to_gpa(a.desc_user_addr, dsize),
            avail_addr=mem.uva_to_gpa(a.avail_user_addr, asize), used_addr=used,
            last_avail_idx=last_avail, used_idx=used_idx,
        )  # fmt: skip
        return queue, resubmit

    def _packed_queue(self, ring: RingStatus, mem: GuestMemory) -> tuple[PackedQueue, SavedChains]:
        """A packed ring (VIRTIO_F_RING_PACKED negotiated): SET_VRING_ADDR's desc, avail and used
        addresses are the descriptor ring, the driver area and the device area (virtio 1.2 §2.8.10),
        SET_VRING_BASE holds both positions and wrap counters. With a packed inflight buffer that
        tracks the ring (rings.inflight_packed), a region that is not fresh says instead where both
        sides are and which chains the previous backend had in flight, with their descriptors."""
        assert ring.addr is not None
        a = ring.addr
        index = ring.index
        queue = PackedQueue.from_vring_base(
            ring.base, index=index, size=ring.num,
            desc_addr=mem.uva_to_gpa(a.desc_user_addr, PDESC_SIZE * ring.num),
            driver_addr=mem.uva_to_gpa(a.avail_user_addr, EVENT_SIZE),
            device_addr=mem.uva_to_gpa(a.used_user_addr, EVENT_SIZE),
        )  # fmt: skip
        if self.inflight is None or not self.inflight.tracks(index, ring.num):
            return queue, EMPTY_SAVED
        if not self.inflight.packed:
            raise QueueConfigError("the inflight buffer has the split layout, the rings are packed",
                                   queue=index)  # fmt: skip
        # vhost-user spec "Inflight I/O tracking", when reconnecting (packed): commit or roll back an
        # interrupted completion, resubmit the chains still in flight, resume both sides from there.
        rec = self.inflight.recover_packed(index, mem, queue.desc_addr, used_pos=queue.used_pos,
                                           used_wrap=queue.used_wrap)  # fmt: skip
        if rec.fresh:
            return queue, EMPTY_SAVED
        if rec.lost:
            self.note(f"ring {index}: {rec.lost} older chains of buffer ids reused while in flight "
                      "are not resubmitted")  # fmt: skip
        n = int(rec.resubmit.ids.shape[0])
        if n:
            log.info("%s: ring %d: resubmitting %d chains in flight at the last disconnect%s", self.name,
                     index, n, " (an interrupted completion was kept)" if rec.committed else "")  # fmt: skip
        resumed = PackedQueue(
            index=index, size=ring.num, desc_addr=queue.desc_addr, driver_addr=queue.driver_addr,
            device_addr=queue.device_addr, avail_pos=rec.avail_pos, avail_wrap=rec.avail_wrap,
            used_pos=rec.used_pos, used_wrap=rec.used_wrap,
        )  # fmt: skip
        return resumed, rec.resubmit

    # -- lifecycle --------------------------------------------------------------------------------

    def stop_rings(self) -> list[Action]:
        """Stop every ring (each guest buffer goes back on its used ring, its descriptor is freed)."""
        out: list[Action] = []
        for i in range(self.device.num_queues):
            out.append(StopPump(index=i))
            if self._running[i]:
                self._running[i] = False
                try:
                    self.device.stop_queue(i)
                except (DeviceStateError, RingsError) as err:
                    log.error("%s: ring %d: stop failed: %s", self.name, i, err)
        return out

    def close(self) -> list[Action]:
        """Shut the device down (its pool closes), let go of memory and the inflight buffer, close the
        connection. Idempotent. The shell unmaps after carrying the actions out."""
        try:
            self.device.shutdown()
        except Exception:
            log.exception("%s: device shutdown failed", self.name)
        out = self._set_inflight(None) + self._set_dirty_log(None)
        self.device.set_memory(None)
        self.memory = None
        self.conn.close()
        leftover = tuple(self.conn.fds_to_close())
        if leftover:
            out.append(CloseFds(fds=leftover))
        return out
