"""One vhost-user connection's I/O: the socket, SCM_RIGHTS, and the actions of the I/O-free backend core.

This module owns ``Session`` (aioquic's ``asyncio/protocol.py`` is the model): it reads the socket
with ``recvmsg`` (at most one message per read, with its fds; a read whose control data was truncated
closes every fd that came and the connection), feeds a
:class:`~nicsim.vhost.backend_core.BackendCore` with it, carries out the actions the core returns
with the guest memory mapping (:mod:`nicsim.server.guestmem`), one
:class:`~nicsim.server.pump.RingPump` per ring and the inflight memfd
(:mod:`nicsim.server.inflight_fd`), and writes the replies. Closing a session stops every queue (each
guest buffer goes back on its used ring and its pool descriptor is freed), closes the pool, releases
the memory views, unmaps, and closes every fd it was given; a second close is harmless. The endpoints
that accept or make connections are :mod:`nicsim.server.endpoint`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from nicsim.server.dirty_log_map import MappedDirtyLog
from nicsim.server.guestmem import MappedMemory, MappedRegion, MemoryMapError, close_fds
from nicsim.server.inflight_fd import InflightStore
from nicsim.server.lane import RequestLane
from nicsim.server.pump import RingPump
from nicsim.vhost import actions as act
from nicsim.vhost import events as ev
from nicsim.vhost.backend_core import DEFAULT_MAC, DEFAULT_MAX_QUEUE_SIZE, BackendCore
from nicsim.virtio.device import VirtioNetDevice

log = logging.getLogger("nicsim.server")

MAX_FDS = 16  # more than any message carries (SET_MEM_TABLE: 8); extra ones are refused by the core
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


class Session:
    """One vhost-user connection and the device it drives (through a ``BackendCore``). ``config_space``:
    offer VHOST_USER_PROTOCOL_F_CONFIG (see ``BackendCore``)."""

    def __init__(
        self,
        sock: socket.socket,
        device: VirtioNetDevice,
        *,
        name: str = "session",
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        on_closed: Callable[[Session], None] | None = None,
        mac: bytes = DEFAULT_MAC,
        config_space: bool = False,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.device = device
        self.name = name
        self.state = SessionState.OPEN
        self.peer_pid = _peer_pid(sock)
        self.memory = MappedMemory()
        self.final_snapshot: dict[str, Any] | None = None
        self.core = BackendCore(device, create_inflight=InflightStore.create, max_queue_size=max_queue_size,
                                mac=mac, config_space=config_space, name=name)  # fmt: skip
        self._on_closed = on_closed
        self._closed = self.loop.create_future()
        # Replaced inflight buffers whose fd is in a reply not yet written: closed once it is
        # (CVE-2020-10726: a repeated GET_INFLIGHT_FD leaks nothing).
        self._retired: list[act.ReleaseInflight] = []
        n = device.num_queues
        self.pumps = [RingPump(self.loop, device, i, after_tx=self._after_tx) for i in range(n)]
        for rx, tx in zip(self.pumps[0::2], self.pumps[1::2], strict=False):
            rx.pair_with(tx)
        # One queue pair: its requests may be served by a request lane (policy.lane_idle_ms).
        self.lanes = [RequestLane(self.loop, device, self.pumps[0], self.pumps[1])] if n == 2 else []
        for lane in self.lanes:
            lane.tx.offer_lane = lane.offer
        self._wbuf: deque[tuple[bytes, tuple[int, ...]]] = deque()
        self._writing = False
        device.on_wakeup = self._on_wakeup
        device.on_delivered = self._on_delivered
        device.port.start_io(self.loop)  # a port with an fd (tap) watches it here; close() unwatches
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def errors(self) -> list[str]:
        """What the frontend did wrong, newest last (bounded)."""
        return self.core.errors

    # -- socket I/O -------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, self.core.bytes_wanted, MAX_FDS)
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
            self.core.note(f"control data truncated (more than {MAX_FDS} fds): closed the {len(fds)} "
                           "that came and the connection")  # fmt: skip
            close_fds(fds)
            self.close()
            return
        if not data:
            close_fds(fds)
            log.info("%s: frontend disconnected", self.name)
            self.close()
            return
        self.stop_lanes()  # a message may change the rings: the loop owns them while it is handled
        try:
            self._carry_out(self.core.receive_data(data, fds))
        except Exception:
            # A bug on our side, not the frontend's: drop this connection, keep the server serving.
            log.exception("%s: backend core failed; closing the connection", self.name)
            self.close()
            return
        self._flush()
        if self.core.closed:
            self.close()

    def _flush(self) -> None:
        for out in self.core.data_to_send():
            self._wbuf.append((out.data, out.fds))
        close_fds(self.core.fds_to_close())
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
        for retired in self._retired:
            retired.storage.close()
        self._retired.clear()
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False

    # -- the core's actions -----------------------------------------------------------------------

    def _carry_out(self, actions: list[act.Action]) -> None:
        """Each action in order; what an answer to the core returns runs next."""
        todo = deque(actions)
        while todo:
            todo.extendleft(reversed(self._do(todo.popleft())))

    def _do(self, action: act.Action) -> list[act.Action]:
        match action:
            case act.StartPump():
                return self._pump(action, self.pumps[action.index].activate)
            case act.StopPump():
                self.pumps[action.index].deactivate()
            case act.SetRingFd():
                return self._pump(action, lambda: self._set_ring_fd(action))
            case act.MapMemoryTable():
                return self._map_table(action)
            case act.MapMemoryRegion():
                return self._add_region(action)
            case act.UnmapMemoryRegion():
                return self.core.memory_mapped(action, self.memory.remove(action.key))
            case act.AdoptInflight():
                return self._adopt_inflight(action)
            case act.ReleaseInflight():
                self._release_inflight(action)
            case act.MapDirtyLog():
                return self._map_dirty_log(action)
            case act.ReleaseDirtyLog():
                action.storage.close()
            case act.CloseFds():
                close_fds(action.fds)
        return []

    def _pump(self, action: act.Action, call: Callable[[], None]) -> list[act.Action]:
        try:
            call()
        except OSError as err:  # e.g. a kick "eventfd" the event loop cannot watch
            return self.core.action_failed(action, str(err))
        return []

    def _set_ring_fd(self, action: act.SetRingFd) -> None:
        pump = self.pumps[action.index]
        if action.kind is act.RingFd.KICK:
            pump.set_kick(action.fd)
        elif action.kind is act.RingFd.CALL:
            pump.set_call(action.fd)
        else:
            pump.set_err(action.fd)

    def _map(self, region: ev.MemoryRegion) -> MappedRegion:
        try:
            return MappedRegion.map(
                fd=region.fd, guest_phys_addr=region.guest_phys_addr, size=region.size,
                user_addr=region.user_addr, mmap_offset=region.mmap_offset, peer_pid=self.peer_pid,
            )  # fmt: skip
        finally:
            close_fds([region.fd])  # the mapping, if any, keeps the memory

    def _map_table(self, action: act.MapMemoryTable) -> list[act.Action]:
        mapped: list[MappedRegion] = []
        try:
            for i, r in enumerate(action.regions):
                try:
                    mapped.append(self._map(r))
                except MemoryMapError:
                    close_fds(x.fd for x in action.regions[i + 1 :])
                    raise
            memory = self.memory.replace(mapped)
        except (MemoryMapError, ValueError) as err:  # ValueError: regions overlap in user addresses
            for m in mapped:
                m.close()
            return self.core.action_failed(action, str(err))
        return self.core.memory_mapped(action, memory)

    def _add_region(self, action: act.MapMemoryRegion) -> list[act.Action]:
        try:
            m = self._map(action.region)
        except MemoryMapError as err:
            return self.core.action_failed(action, str(err))
        try:
            memory = self.memory.add(m)
        except ValueError as err:  # it overlaps a region of the table
            m.close()
            return self.core.action_failed(action, str(err))
        return self.core.memory_mapped(action, memory)

    def _adopt_inflight(self, action: act.AdoptInflight) -> list[act.Action]:
        """SET_INFLIGHT_FD: map the buffer a frontend kept across our restart."""
        try:
            store = InflightStore.adopt(
                action.fd, mmap_size=action.mmap_size, mmap_offset=action.mmap_offset,
                num_queues=action.num_queues, queue_size=action.queue_size, packed=action.packed,
            )  # fmt: skip
        except act.InflightError as err:
            return self.core.action_failed(action, str(err))
        finally:
            close_fds([action.fd])  # the mapping, if any, keeps the buffer
        return self.core.inflight_adopted(action, store)

    def _map_dirty_log(self, action: act.MapDirtyLog) -> list[act.Action]:
        try:
            storage = MappedDirtyLog.map(action.fd, action.mmap_size, action.mmap_offset)
        except (OSError, ValueError) as err:
            return self.core.action_failed(action, f"SET_LOG_BASE: cannot map the log: {err}")
        finally:
            close_fds([action.fd])  # the mapping keeps the memory
        return self.core.dirty_log_mapped(action, storage)

    def _release_inflight(self, action: act.ReleaseInflight) -> None:
        fd = action.storage.fd
        if fd is not None and any(fd in fds for _, fds in self._wbuf):
            self._retired.append(action)  # its fd is in a reply not yet written
        else:
            action.storage.close()

    # -- pumps ------------------------------------------------------------------------------------

    def _on_wakeup(self, index: int) -> None:
        # The round runs in this call (a TAP's readable callback, another guest's TX round through the
        # switch): a loop turn less before the frame is in the guest's ring and its interrupt sent.
        if self.state is SessionState.OPEN:
            self.pumps[index].wake(now=True)

    def _on_delivered(self, index: int) -> None:
        if self.state is SessionState.OPEN:
            self.pumps[index].delivered()

    def _after_tx(self, pair: int) -> None:
        if self.device.rx_backlog(pair):
            self.pumps[2 * pair].wake()

    # -- lifecycle --------------------------------------------------------------------------------

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def stop_lanes(self) -> None:
        """Take every ring a request lane holds back onto the event loop (see nicsim.server.lane)."""
        for lane in self.lanes:
            lane.stop()

    def snapshot(self) -> dict[str, Any]:
        if self.final_snapshot is not None:
            return self.final_snapshot
        self.stop_lanes()  # what a lane did is booked when it returns
        snap = self.device.snapshot()
        snap["pumps"] = [p.snapshot() for p in self.pumps]
        snap["lanes"] = [lane.snapshot() for lane in self.lanes]
        snap["requests"] = self.core.requests
        return snap

    def close(self) -> None:
        """Stop every ring, close the pool, unmap memory and close every fd. Idempotent."""
        if self.state is SessionState.CLOSED:
            return
        self.state = SessionState.CLOSED
        for lane in self.lanes:
            lane.close()
        try:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.sock.fileno())
                if self._writing:
                    self.loop.remove_writer(self.sock.fileno())
            self._carry_out(self.core.stop_rings())
            self.final_snapshot = self.snapshot()
        finally:
            for pump in self.pumps:
                pump.close()
            self._carry_out(self.core.close())
            for retired in self._retired:
                retired.storage.close()
            self._retired.clear()
            self.memory.close()
            self.sock.close()
            if not self._closed.done():
                self._closed.set_result(None)
            if self._on_closed is not None:
                self._on_closed(self)
