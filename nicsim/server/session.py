"""One vhost-user connection: the socket, SCM_RIGHTS, memory maps and eventfds around the I/O-free core.

Each connection is a ``Session``: a :class:`~nicsim.vhost.BackendConnection` fed
with the bytes and fds ``recvmsg`` returns, a fresh :class:`~nicsim.virtio.device.VirtioNetDevice` (one
device per connection), the mapped guest memory (:mod:`nicsim.server.guestmem`) and one
:class:`~nicsim.server.pump.RingPump` per ring. The session answers the connection's synchronous
questions (``DeviceQueries``): GET_VRING_BASE stops the device queue and returns its index. A ring
runs once it is started (SET_VRING_KICK), enabled and memory exists. Closing a session stops every
queue (each guest buffer goes back on its used ring and its pool descriptor is freed), closes the
pool, releases the memory views, unmaps, and closes every fd it was given; a second close is harmless.
The endpoints that accept or make connections are :mod:`nicsim.server.endpoint`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nicsim.server.guestmem import MappedMemory, MappedRegion, MemoryMapError, close_fds
from nicsim.server.inflight_fd import InflightStore
from nicsim.server.pump import RingPump
from nicsim.vhost import BackendConnection, ConnectionState, InflightBuffer
from nicsim.vhost import events as ev
from nicsim.vhost import features as vf
from nicsim.vhost.actions import InflightError
from nicsim.virtio.device import DeviceStateError, VirtioNetDevice
from rings.errors import RingsError
from rings.layout import split_ring_sizes
from rings.split import SplitQueue

log = logging.getLogger("nicsim.server")

MAX_FDS = 16  # more than any message carries (SET_MEM_TABLE: 8); extra ones are refused by the core
DEFAULT_MAX_QUEUE_SIZE = 1024
_UCRED = struct.Struct("3i")


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"



def _peer_pid(sock: socket.socket) -> int | None:
    try:
        pid, _, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return None
    return pid or None


def net_config(mac: bytes, *, status: int, pairs: int, mtu: int) -> bytes:
    """virtio-net config space (virtio 1.2 §5.1.4): mac, status, max_virtqueue_pairs, mtu."""
    return mac + struct.pack("<HHH", status, pairs, mtu)


class Session:
    """One vhost-user connection and the device it drives. Implements ``DeviceQueries``."""

    def __init__(
        self,
        sock: socket.socket,
        device: VirtioNetDevice,
        *,
        name: str = "session",
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        on_closed: Callable[[Session], None] | None = None,
        mac: bytes = b"\x52\x54\x00\x12\x34\x56",
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.device = device
        self.name = name
        self.state = SessionState.OPEN
        self.peer_pid = _peer_pid(sock)
        self.memory = MappedMemory()
        self.final_snapshot: dict[str, Any] | None = None
        self.errors: list[str] = []  # what the frontend did wrong, newest last (bounded)
        self._on_closed = on_closed
        self._closed = self.loop.create_future()
        self._config = net_config(mac, status=1, pairs=device.pairs, mtu=1500)
        features = device.device_features() | vf.bit(vf.VHOST_USER_F_PROTOCOL_FEATURES)
        self.conn = BackendConnection(
            device=self, features=features, queue_pairs=device.pairs, max_queue_size=max_queue_size,
            inflight_shmfd=True,
        )
        # VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: the buffer, and memfds of replaced buffers whose
        # GET_INFLIGHT_FD reply is still queued (closed once written: CVE-2020-10726, no leak).
        self.inflight: InflightStore | None = None
        self._retired: list[InflightStore] = []
        n = device.num_queues
        self.pumps = [RingPump(self.loop, device, i, after_tx=self._after_tx) for i in range(n)]
        self._started = [False] * n  # by the protocol (SET_VRING_KICK ... GET_VRING_BASE)
        self._running = [False] * n  # the device queue exists
        self._wbuf: deque[tuple[bytes, tuple[int, ...]]] = deque()
        self._writing = False
        device.on_wakeup = self._on_wakeup
        device.port.start_io(self.loop)  # a port with an fd (tap) watches it here; close() unwatches
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._on_readable)

    # -- DeviceQueries ----------------------------------------------------------------------------

    def stop_vring(self, index: int, *, base: int) -> int:
        self.pumps[index].deactivate()
        self._started[index] = False
        if not self._running[index]:
            return base
        self._running[index] = False
        try:
            return self.device.stop_queue(index)
        except (DeviceStateError, RingsError) as err:
            self._note(f"ring {index}: stop failed: {err}")
            return base

    def read_config(self, offset: int, size: int) -> bytes | None:
        if offset + size > len(self._config):
            return None
        return self._config[offset : offset + size]

    def get_status(self, *, driver_status: int) -> int:
        return driver_status

    def get_inflight_fd(self, *, num_queues: int, queue_size: int) -> InflightBuffer | None:
        """A fresh zeroed buffer; a repeated request replaces (and frees) the previous one."""
        if any(self._running):
            self._note("GET_INFLIGHT_FD refused: rings are running")
            return None
        try:
            store = InflightStore.create(num_queues=num_queues, queue_size=queue_size)
        except (InflightError, OSError) as err:
            self._note(f"GET_INFLIGHT_FD refused: {err}")
            return None
        self._set_inflight(store)
        assert store.fd is not None
        return InflightBuffer(fd=store.fd, mmap_size=store.mmap_size)

    def _set_inflight(self, store: InflightStore | None) -> None:
        old, self.inflight = self.inflight, store
        self.device.inflight = store
        if old is not None:
            if old.fd is not None and any(old.fd in fds for _, fds in self._wbuf):
                self._retired.append(old)  # its fd is in a reply not yet written
            else:
                old.close()

    # -- socket I/O -------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, self.conn.bytes_wanted, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.info("%s: connection lost: %s", self.name, err)
            self.close()
            return
        if flags & socket.MSG_CTRUNC:
            # Some fds were dropped by the kernel: the message cannot be honoured as sent, and taking it
            # without them would act on a request the frontend never made (libvhost-user and DPDK drop
            # the connection on a truncated message too; CVE-2022-0669: every fd that came is closed).
            self._note(f"control data truncated (more than {MAX_FDS} fds): closed the {len(fds)} that "
                       "came and the connection")  # fmt: skip
            close_fds(fds)
            self.close()
            return
        if not data:
            close_fds(fds)
            log.info("%s: frontend disconnected", self.name)
            self.close()
            return
        try:
            events = self.conn.receive_data(data, fds)
        except Exception:
            # A bug on our side, not the frontend's: drop this connection, keep the server serving.
            log.exception("%s: protocol core failed; closing the connection", self.name)
            self.close()
            return
        for event in events:
            self._apply(event)
        self._flush()
        if self.conn.state is ConnectionState.CLOSED:
            self.close()

    def _flush(self) -> None:
        for out in self.conn.data_to_send():
            self._wbuf.append((out.data, out.fds))
        close_fds(self.conn.fds_to_close())
        self._write()

    def _write(self) -> None:
        while self._wbuf:
            data, fds = self._wbuf[0]
            try:
                sent = socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as err:
                log.info("%s: send failed: %s", self.name, err)
                self.loop.call_soon(self.close)
                return
            if sent < len(data):
                self._wbuf[0] = (data[sent:], () if sent else fds)
                if not self._writing:
                    self.loop.add_writer(self.sock.fileno(), self._write)
                    self._writing = True
                return
            self._wbuf.popleft()
        for store in self._retired:
            store.close()
        self._retired.clear()
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False

    # -- events -----------------------------------------------------------------------------------

    def _apply(self, event: ev.Event) -> None:
        try:
            self._dispatch(event)
        except (MemoryMapError, DeviceStateError, RingsError, ValueError, OSError) as err:
            self._note(f"{type(event).__name__}: {err}")
            self.conn.reject(event, str(err))

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.ProtocolErrorOccurred):
            self._note(f"{event.request} refused in state {event.state}: {event.reason}"
                       + (" (fatal)" if event.fatal else ""))  # fmt: skip
        elif isinstance(event, ev.FeaturesSet):
            self.device.set_features(event.features & self.device.device_features())
        elif isinstance(event, ev.MemoryTableSet):
            self._set_table(event.regions)
        elif isinstance(event, ev.MemoryRegionAdded):
            self._add_region(event.region)
        elif isinstance(event, ev.MemoryRegionRemoved):
            self.device.set_memory(None)
            key = (event.guest_phys_addr, event.user_addr, event.size)
            self.device.set_memory(self.memory.remove(key))
        elif isinstance(event, ev.VringKickSet):
            self.pumps[event.index].set_kick(event.fd)
        elif isinstance(event, ev.VringCallSet):
            self.pumps[event.index].set_call(event.fd)
        elif isinstance(event, ev.VringErrSet):
            self.pumps[event.index].set_err(event.fd)
        elif isinstance(event, ev.VringStarted):
            self._started[event.index] = True
            self._sync(event.index)
        elif isinstance(event, ev.VringEnabled):
            self._sync(event.index)
        elif isinstance(event, ev.InflightFdSet):
            self._adopt_inflight(event)
        elif isinstance(event, ev.LogBaseSet | ev.LogFdSet | ev.BackendReqFdSet):
            close_fds([event.fd])  # features we never offer; the fd is ours to close
            self._note(f"{type(event).__name__} ignored: not offered")

    def _adopt_inflight(self, event: ev.InflightFdSet) -> None:
        """SET_INFLIGHT_FD: map the buffer a frontend kept across our restart; rings started from now
        on resubmit what it says was in flight."""
        try:
            if any(self._running):
                raise InflightError("SET_INFLIGHT_FD while rings are running", reason="state",
                                    num_queues=event.num_queues, queue_size=event.queue_size)  # fmt: skip
            store = InflightStore.adopt(
                event.fd, mmap_size=event.mmap_size, mmap_offset=event.mmap_offset,
                num_queues=event.num_queues, queue_size=event.queue_size,
            )  # fmt: skip
        except InflightError as err:
            raise ValueError(str(err)) from err
        finally:
            close_fds([event.fd])  # the mapping, if any, keeps the buffer
        self._set_inflight(store)

    def _map(self, region: ev.MemoryRegion) -> MappedRegion:
        try:
            return MappedRegion.map(
                fd=region.fd, guest_phys_addr=region.guest_phys_addr, size=region.size,
                user_addr=region.user_addr, mmap_offset=region.mmap_offset, peer_pid=self.peer_pid,
            )  # fmt: skip
        finally:
            close_fds([region.fd])  # the mapping, if any, keeps the memory

    def _set_table(self, regions: Sequence[ev.MemoryRegion]) -> None:
        mapped: list[MappedRegion] = []
        try:
            for i, r in enumerate(regions):
                try:
                    mapped.append(self._map(r))
                except MemoryMapError:
                    close_fds(x.fd for x in regions[i + 1 :])
                    raise
        except MemoryMapError:
            for m in mapped:
                m.close()
            raise
        # The device lets go of the old table before it is released and unmapped.
        self.device.set_memory(None)
        try:
            self.device.set_memory(self.memory.replace(mapped))
        finally:
            for i in range(self.device.num_queues):
                self._sync(i)

    def _add_region(self, region: ev.MemoryRegion) -> None:
        m = self._map(region)
        self.device.set_memory(None)
        try:
            self.device.set_memory(self.memory.add(m))
        except ValueError:
            m.close()
            self.device.set_memory(self.memory.memory)
            raise
        for i in range(self.device.num_queues):
            self._sync(i)

    def _sync(self, index: int) -> None:
        """Bring the device queue and the pump in line with started / enabled / memory."""
        ring = self.conn.rings[index]
        mem = self.memory.memory
        if self._started[index] and not self._running[index] and mem is not None:
            assert ring.addr is not None
            dsize, asize, usize = split_ring_sizes(ring.num)
            a = ring.addr
            used = mem.uva_to_gpa(a.used_user_addr, usize)
            # Start from the used index the ring holds (libvhost-user does the same): after a stop
            # every chain was returned, so it equals the base; after a driver reset both are 0.
            used_idx = int(mem.view_as(used + 2, np.dtype("<u2"), 1)[0])
            last_avail, resubmit = ring.base & 0xFFFF, np.zeros(0, np.uint16)
            if self.inflight is not None and self.inflight.tracks(index, ring.num):
                # vhost-user spec "Inflight I/O tracking", when reconnecting: heads the previous
                # backend took and never returned are processed again, the avail ring resumes after.
                rec = self.inflight.recover(index, used_idx)
                if not rec.fresh:
                    last_avail, resubmit = rec.last_avail_idx, rec.resubmit
                    if resubmit.shape[0]:
                        log.info("%s: ring %d: resubmitting %d chains in flight at the last disconnect",
                                 self.name, index, resubmit.shape[0])  # fmt: skip
            q = SplitQueue(
                index=index, size=ring.num, desc_addr=mem.uva_to_gpa(a.desc_user_addr, dsize),
                avail_addr=mem.uva_to_gpa(a.avail_user_addr, asize), used_addr=used,
                last_avail_idx=last_avail, used_idx=used_idx,
            )  # fmt: skip
            self.device.start_queue(index, q, resubmit=resubmit)
            self._running[index] = True
        if self._running[index] and ring.enabled and mem is not None:
            self.pumps[index].activate()
        else:
            self.pumps[index].deactivate()

    def _on_wakeup(self, index: int) -> None:
        if self.state is SessionState.OPEN:
            self.pumps[index].wake()

    def _after_tx(self, pair: int) -> None:
        if self.device.rx_backlog(pair):
            self.pumps[2 * pair].wake()

    def _note(self, message: str) -> None:
        log.warning("%s: %s", self.name, message)
        self.errors.append(message)
        del self.errors[:-50]

    # -- lifecycle --------------------------------------------------------------------------------

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def snapshot(self) -> dict[str, Any]:
        if self.final_snapshot is not None:
            return self.final_snapshot
        snap = self.device.snapshot()
        snap["pumps"] = [p.snapshot() for p in self.pumps]
        snap["requests"] = list(self.conn.request_log)
        return snap

    def close(self) -> None:
        """Stop every ring, close the pool, unmap memory and close every fd. Idempotent."""
        if self.state is SessionState.CLOSED:
            return
        self.state = SessionState.CLOSED
        try:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.sock.fileno())
                if self._writing:
                    self.loop.remove_writer(self.sock.fileno())
            for i, pump in enumerate(self.pumps):
                pump.deactivate()
                if self._running[i]:
                    self._running[i] = False
                    try:
                        self.device.stop_queue(i)
                    except (DeviceStateError, RingsError) as err:
                        log.error("%s: ring %d: stop failed: %s", self.name, i, err)
            self.final_snapshot = self.device.snapshot()
            self.final_snapshot["pumps"] = [p.snapshot() for p in self.pumps]
            self.final_snapshot["requests"] = list(self.conn.request_log)
            try:
                self.device.shutdown()
            except Exception:
                log.exception("%s: device shutdown failed", self.name)
        finally:
            for pump in self.pumps:
                pump.close()
            self._set_inflight(None)
            for store in self._retired:
                store.close()
            self._retired.clear()
            self.device.set_memory(None)
            self.memory.close()
            self.conn.close()
            close_fds(self.conn.fds_to_close())
            self.sock.close()
            if not self._closed.done():
                self._closed.set_result(None)
            if self._on_closed is not None:
                self._on_closed(self)
