"""A vhost-user frontend in Python: what QEMU does to a backend, over a real socket, with no VM.

This module owns ``VhostUserFrontend``: it connects to a backend's Unix socket and, through the
I/O-free :class:`~nicsim.vhost.FrontendConnection`, runs QEMU 7.2's handshake (features, protocol
features, queue count, owner, call eventfds, memory table, rings, kick eventfds, enable), moves traffic
both ways with the driver model of :mod:`rings.driver` laid over guest RAM in a memfd shared with the
backend (``SharedGuestRam``), stops and restarts rings (GET_VRING_BASE, then SET_VRING_BASE ...),
replaces the memory table, and sends malformed messages on request (``Malformed``). It is product
code: use it to test a port or a backend without booting a guest. Every fd it creates it closes in
:meth:`VhostUserFrontend.close` (idempotent).

Like a guest driver, it sleeps until the backend interrupts it: :meth:`VhostUserFrontend.wait_used`
looks at a used ring only when the ring's call eventfd fires, so a backend that owes an interrupt and
withholds it fails with :class:`CompletionTimeout` (which says so) instead of being rescued by a poll.
Polling is opt-in, per wait (``poll_interval``), for a backend that is not meant to interrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import mmap
import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from nicsim.errors import RemoteError
from nicsim.vhost import FrontendConnection, Outgoing, Reply, Request
from nicsim.vhost import features as vf
from nicsim.vhost import payloads as p
from nicsim.vhost.protocol import FLAG_NEED_REPLY, HEADER, VERSION
from nicsim.virtio.features import VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED, VIRTIO_NET_F_MRG_RXBUF
from rings.driver import DEFAULT_REGION_SIZES, Completion, DriverQueue, GuestRam, TxLayout
from rings.driver_packed import PackedDriverQueue
from rings.packed_layout import off_wrap

RECV_SIZE = 4096
_ONE = struct.pack("=Q", 1)


class FrontendError(RemoteError):
    """The backend refused a request or broke the protocol; ``reply`` is the refusal, if one came."""

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class CompletionTimeout(FrontendError, TimeoutError):
    """:meth:`VhostUserFrontend.wait_used` gave up: fewer than ``wanted`` used entries of ring ``index``
    came within ``timeout`` seconds; ``completions`` are the ones reaped before it gave up.
    ``unsignalled`` counts used entries the backend had published but not interrupted for (the wait
    never saw them): more than 0 means a missing interrupt (unless the ring had interrupts turned off,
    ``interrupts_enabled``), 0 that the backend did not complete the buffers at all.
    """

    def __init__(
        self, *, index: int, wanted: int, completions: list[Completion], unsignalled: int, timeout: float,
        interrupts_enabled: bool = True,
    ) -> None:  # fmt: skip
        got = len(completions)
        if unsignalled and not interrupts_enabled:
            why = (f"the backend published {unsignalled} more used entries; the ring has interrupts "
                   "turned off, so only a wait with poll_interval sees them")  # fmt: skip
        elif unsignalled:
            why = (f"the backend published {unsignalled} more used entries but sent no interrupt for them "
                   "(a missing interrupt)")  # fmt: skip
        else:
            why = "the backend published no more used entries"
        super().__init__(f"ring {index}: {got} of {wanted} used entries within {timeout:g} s: {why}")
        self.index = index
        self.wanted = wanted
        self.completions = completions
        self.unsignalled = unsignalled
        self.timeout = timeout
        self.interrupts_enabled = interrupts_enabled


class SharedGuestRam(GuestRam):
    """``GuestRam`` whose backing bytes live in a memfd, so a backend can map them (``share=on``).

    The regions are laid, at the offsets ``GuestRam`` chooses, over a ``MAP_SHARED`` mmap of a memfd;
    ``offsets`` are the ``mmap_offset`` values of SET_MEM_TABLE.
    """

    def __init__(self, region_sizes: Sequence[int] = DEFAULT_REGION_SIZES) -> None:
        total = GuestRam.backing_size(region_sizes)
        self.fd = os.memfd_create("nicsim-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, total)
            self.mm: mmap.mmap | None = mmap.mmap(self.fd, total, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        super().__init__(region_sizes, backing=np.frombuffer(self.mm, dtype=np.uint8))

    def guard_spans(self) -> list[tuple[int, int]]:
        """(offset, length) of the memfd's bytes that belong to no region (the gaps ``GuestRam`` leaves
        between and after regions): a backend that writes there wrote outside guest memory."""
        spans, pos = [], 0
        for off, r in sorted(zip(self.offsets, self.regions, strict=True)):
            if off > pos:
                spans.append((pos, off - pos))
            pos = off + r.size
        if pos < self.backing.shape[0]:
            spans.append((pos, self.backing.shape[0] - pos))
        return spans

    def fill_guards(self, value: int = 0xA5) -> None:
        for off, n in self.guard_spans():
            self.backing[off : off + n] = value

    def guards_intact(self, value: int = 0xA5) -> bool:
        return all(bool((self.backing[off : off + n] == value).all()) for off, n in self.guard_spans())

    def region_descs(self) -> list[p.MemoryRegionDesc]:
        return [
            p.MemoryRegionDesc(guest_phys_addr=r.guest_phys_addr, size=r.size, user_addr=r.user_addr,
                               mmap_offset=off)
            for r, off in zip(self.regions, self.offsets, strict=True)
        ]

    def close(self) -> None:
        """Drop the views and unmap (views still held elsewhere delay the unmap); close the memfd."""
        self.release()
        self.regions = ()
        self.backing = np.zeros(0, np.uint8)
        mm, self.mm = self.mm, None
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Malformed(enum.Enum):
    """Broken messages ``VhostUserFrontend.send_malformed`` can send (the backend must keep serving)."""

    UNKNOWN_REQUEST = "unknown_request"  # request number 99
    SHORT_PAYLOAD = "short_payload"  # SET_VRING_NUM with 3 payload bytes, NEED_REPLY
    BAD_RING_INDEX = "bad_ring_index"  # SET_VRING_NUM for ring 200, NEED_REPLY
    STRAY_FD = "stray_fd"  # GET_QUEUE_NUM with an fd attached (the backend must close it)
    UNSHARED_MEMORY = "unshared_memory"  # SET_MEM_TABLE whose fd is a pipe, not shareable memory
    BAD_VERSION = "bad_version"  # header version 2: fatal, the backend drops the connection


class VhostUserFrontend:
    """One connection to a vhost-user net backend, driving ``pairs`` queue pairs (ring 0 RX, 1 TX...)."""

    def __init__(
        self, sock: socket.socket, *, queue_size: int = 256, pairs: int = 1,
        region_sizes: Sequence[int] = DEFAULT_REGION_SIZES,
    ) -> None:  # fmt: skip
        self.sock = sock
        sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.conn = FrontendConnection()
        self.queue_size = queue_size
        self.pairs = pairs
        self.ram = SharedGuestRam(region_sizes)
        self.features = 0
        self.protocol_features = 0
        self.queues: dict[int, DriverQueue | PackedDriverQueue] = {}
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self._replies: asyncio.Queue[Reply | Exception] = asyncio.Queue()
        self._interrupted = [asyncio.Event() for _ in range(2 * pairs)]  # set by each ring's call fd
        self.interrupts = [0] * (2 * pairs)
        self._closed = False
        self._received = 0  # replies decoded so far
        self._claimed = 0  # replies expected so far (a call() that sends a request claims one)
        self.inflight: tuple[int, p.InflightDesc] | None = None  # kept across backend restarts
        self._log_mm: mmap.mmap | None = None  # the dirty log shared with start_dirty_log
        self.loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def connect(cls, path: str | Path, **kwargs: object) -> VhostUserFrontend:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(path))
            return cls(sock, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            sock.close()
            raise

    # -- transport --------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, RECV_SIZE, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._replies.put_nowait(err)
            return
        if not data:
            for fd in fds:
                os.close(fd)
            self.loop.remove_reader(self.sock.fileno())
            self._replies.put_nowait(ConnectionResetError("the backend closed the connection"))
            return
        try:
            for reply in self.conn.receive_data(data, fds):
                self._received += 1
                self._replies.put_nowait(reply)
        except Exception as err:
            self._replies.put_nowait(err)
        for fd in self.conn.fds_to_close():
            os.close(fd)

    async def send(self, out: Outgoing) -> None:
        """Send one message with its fds (duplicated into the backend; ours stay open)."""
        if out.fds:
            socket.send_fds(self.sock, [out.data], list(out.fds))
        else:
            await self.loop.sock_sendall(self.sock, out.data)

    async def reply(self, timeout: float = 10.0) -> Reply:
        item = await asyncio.wait_for(self._replies.get(), timeout)
        if isinstance(item, Exception):
            raise item
        return item

    async def call(self, out: Outgoing, *, check: bool = True) -> Reply | None:
        """Send a request; return its reply (or REPLY_ACK) if one is due, raising FrontendError on refusal."""
        # The request method already registered the reply it expects (if any): claim it.
        expected = self.conn.replies_pending + self._received
        await self.send(out)
        if expected == self._claimed:
            return None
        self._claimed = expected
        reply = await self.reply()
        if check and not reply.ok:
            raise FrontendError(f"the backend refused {reply.request.name}", reply)
        return reply

    # -- the handshake (QEMU 7.2's order) ---------------------------------------------------------

    async def handshake(
        self, *, event_idx: bool = True, mrg_rxbuf: bool = True, inflight: bool = False, log: bool = False,
        protocol: Sequence[int] = (), packed: bool = False,
    ) -> int:  # fmt: skip
        """GET/SET features and protocol features, queue count, owner, call fds; returns the features.
        ``packed``: negotiate VIRTIO_F_RING_PACKED when offered (``start`` then lays out packed rings,
        :class:`~rings.driver_packed.PackedDriverQueue`); without it the bit is dropped, as QEMU drops
        it without ``packed=on``.
        ``inflight``: also negotiate INFLIGHT_SHMFD (then call :meth:`setup_inflight` before ``start``);
        ``log``: LOG_SHMFD, for :meth:`start_dirty_log` (a migration); ``protocol``: further protocol
        feature bits to negotiate when offered (NET_MTU, RARP...)."""
        offered = (await self._u64(self.conn.get_features()))
        offered_protocol = await self._u64(self.conn.get_protocol_features())
        wanted = [vf.VHOST_USER_PROTOCOL_F_MQ, vf.VHOST_USER_PROTOCOL_F_REPLY_ACK, *protocol]
        if inflight:
            wanted.append(vf.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)
        if log:
            wanted.append(vf.VHOST_USER_PROTOCOL_F_LOG_SHMFD)
        want_protocol = offered_protocol & vf.mask(wanted)
        await self.call(self.conn.set_protocol_features(want_protocol))
        self.protocol_features = want_protocol
        queues = await self._u64(self.conn.get_queue_num())
        if queues < self.pairs:
            raise FrontendError(f"the backend offers {queues} queue pairs, {self.pairs} wanted")
        await self.call(self.conn.set_owner())
        for i in range(2 * self.pairs):
            self._new_call_fd(i)
            await self.call(self.conn.set_vring_call(i, self.call_fds[i]))
        drop = 0 if event_idx else vf.bit(VIRTIO_F_EVENT_IDX)
        drop |= 0 if mrg_rxbuf else vf.bit(VIRTIO_NET_F_MRG_RXBUF)
        drop |= vf.bit(vf.VHOST_F_LOG_ALL)  # QEMU sets it only while it migrates (start_dirty_log)
        drop |= 0 if packed else vf.bit(VIRTIO_F_RING_PACKED)
        self.features = offered & ~drop
        return self.features

    async def start(self, *, base: int = 0) -> None:
        """SET_FEATURES, the memory table, then every ring (NUM, BASE, ADDR, KICK, CALL, ENABLE)."""
        await self.call(self.conn.set_features(self.features), check=True)
        await self.set_memory_table()
        event_idx = vf.has(self.features, VIRTIO_F_EVENT_IDX)
        for i in range(2 * self.pairs):
            if self.packed:
                # ``base`` is the ring position both sides start at, with wrap counters 1 (§2.8.1).
                self.queues[i] = PackedDriverQueue(self.ram, index=i, size=self.queue_size,
                                                   event_idx=event_idx, start_pos=base)  # fmt: skip
                await self.start_ring(i, base=off_wrap(base, 1) | off_wrap(base, 1) << 16)
                continue
            self.queues[i] = DriverQueue(self.ram, index=i, size=self.queue_size, event_idx=event_idx,
                                         start_idx=base)  # fmt: skip
            await self.start_ring(i, base=base)

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED was negotiated (``handshake(packed=True)``): the rings are packed."""
        return vf.has(self.features, VIRTIO_F_RING_PACKED)

    async def start_dirty_log(self) -> npt.NDArray[np.uint8]:
        """What QEMU does when a migration starts: share a dirty log (one bit per 4 KiB page of guest
        memory, in a memfd; SET_LOG_BASE), then set VHOST_F_LOG_ALL. Returns the bitmap, which the
        backend fills while logging (``handshake(log=True)`` first)."""
        pages = -(-max(r.guest_phys_addr + r.size for r in self.ram.regions) // 4096)
        size = -(-pages // 64) * 8  # whole u64 words, as QEMU sizes it
        fd = os.memfd_create("nicsim-dirty-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._log_mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            await self.call(self.conn.set_log_base(size, 0, fd))
        finally:
            os.close(fd)
        logging = self.features | vf.bit(vf.VHOST_F_LOG_ALL)
        await self.call(self.conn.set_features(logging, need_reply=self._ack))
        return np.frombuffer(self._log_mm, dtype=np.uint8)

    async def stop_dirty_log(self) -> None:
        """A cancelled migration: VHOST_F_LOG_ALL cleared (the log stays shared)."""
        await self.call(self.conn.set_features(self.features, need_reply=self._ack))

    async def set_memory_table(self) -> None:
        """Send (or re-send: a replacement) the memory table with the memfd; acked when REPLY_ACK."""
        descs = self.ram.region_descs()
        await self.call(self.conn.set_mem_table(descs, [self.ram.fd] * len(descs), need_reply=self._ack))

    async def start_ring(self, index: int, *, base: int) -> None:
        """SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK (a new eventfd), CALL, ENABLE."""
        q = self.queues[index]
        a = q.addresses
        ack = self._ack
        await self.call(self.conn.set_vring_num(index, q.size, need_reply=ack))
        await self.call(self.conn.set_vring_base(index, base, need_reply=ack))
        await self.call(self.conn.set_vring_addr(index, desc=a.desc_uva, used=a.used_uva, avail=a.avail_uva,
                                                 need_reply=ack))  # fmt: skip
        old = self.kick_fds.pop(index, None)
        if old is not None:
            os.close(old)
        self.kick_fds[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        await self.call(self.conn.set_vring_kick(index, self.kick_fds[index], need_reply=ack))
        await self.call(self.conn.set_vring_call(index, self.call_fds[index], need_reply=ack))
        if self.protocol_features:
            await self.call(self.conn.set_vring_enable(index, True, need_reply=ack))

    async def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, p.InflightDesc]:
        """GET_INFLIGHT_FD: the backend's buffer (an fd now ours) and its description."""
        reply = await self.call(self.conn.get_inflight_fd(num_queues, queue_size))
        assert reply is not None
        if not isinstance(reply.payload, p.InflightDesc) or len(reply.fds) != 1:
            for fd in reply.fds:
                os.close(fd)
            raise FrontendError("GET_INFLIGHT_FD refused", reply)
        return reply.fds[0], reply.payload

    async def setup_inflight(self) -> None:
        """As QEMU's vhost_dev_prepare_inflight / vhost_dev_set_inflight: get the buffer once, keep it,
        and hand it (SET_INFLIGHT_FD) to this and every later backend connection. Features first: the
        buffer is a negotiated-device request (QEMU sends SET_FEATURES before it, too)."""
        await self.call(self.conn.set_features(self.features), check=True)
        if self.inflight is None:
            self.inflight = await self.get_inflight_fd(2 * self.pairs, self.queue_size)
        fd, desc = self.inflight
        await self.call(self.conn.set_inflight_fd(desc, fd))

    def used_idx(self, index: int) -> int:
        """The ``idx`` field of ring ``index``'s used ring, as guest memory holds it now."""
        gpa = self.queues[index].addresses.used_gpa
        return int.from_bytes(self.ram.read(gpa + 2, 2), "little")

    async def reconnect(self, path: str | Path) -> None:
        """What QEMU does when the backend went away (``reconnect=N``): a new connection, the whole
        handshake again, the inflight buffer back (if any), the same memory and rings, each ring's base
        being its used index (QEMU's virtio_queue_restore_last_avail_idx after a failed GET_VRING_BASE);
        on a packed ring both halves of the base are the device's used position and wrap counter as
        the ring shows them. A backend with the inflight buffer resumes from the buffer instead."""
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for fd in self.conn.fds_to_close():
            os.close(fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await self.loop.sock_connect(sock, str(path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.conn = FrontendConnection()
        self._replies = asyncio.Queue()
        self._received = self._claimed = 0
        self.loop.add_reader(sock.fileno(), self._on_readable)
        features = self.features
        await self.handshake(inflight=self.inflight is not None)
        self.features = features
        if self.inflight is not None:
            await self.setup_inflight()
        else:
            await self.call(self.conn.set_features(self.features), check=True)
        await self.set_memory_table()
        for i, q in self.queues.items():
            if isinstance(q, PackedDriverQueue):
                pos, wrap = q.device_used_position()
                await self.start_ring(i, base=off_wrap(pos, wrap) | off_wrap(pos, wrap) << 16)
            else:
                await self.start_ring(i, base=self.used_idx(i))

    async def stop_ring(self, index: int) -> int:
        """GET_VRING_BASE: the backend stops the ring and says where the next avail entry is."""
        reply = await self.call(self.conn.get_vring_base(index))
        assert reply is not None and isinstance(reply.payload, p.VringState)
        return reply.payload.num

    async def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (QEMU sends it before SET_FEATURES, for a guest that acked VIRTIO_NET_F_MTU);
        acked when REPLY_ACK was negotiated, raising FrontendError if the backend refused it."""
        await self.call(self.conn.net_set_mtu(mtu, need_reply=self._ack))

    async def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: ask the backend to announce ``mac`` (what QEMU does after a migration for a guest
        without GUEST_ANNOUNCE). The spec gives it no reply."""
        await self.send(self.conn.send_rarp(mac))

    async def get_features(self) -> int:
        return await self._u64(self.conn.get_features())

    # -- traffic ----------------------------------------------------------------------------------

    def kick(self, index: int, *, force: bool = False) -> bool:
        """Notify the backend if the ring asks for it (EVENT_IDX / NO_NOTIFY); True if kicked."""
        if self.queues[index].should_kick() or force:
            os.write(self.kick_fds[index], _ONE)
            return True
        return False

    def transmit(self, frames: Sequence[bytes], *, pair: int = 0, layout: TxLayout = TxLayout.ONE) -> int:
        """Post frames on TX ring ``2*pair+1`` (each after a virtio_net_hdr_v1) and kick; returns how many."""
        q = self.queues[2 * pair + 1]
        for frame in frames:
            q.post_tx(frame, layout=layout)
        self.kick(2 * pair + 1)
        return len(frames)

    def post_rx(self, count: int, *, pair: int = 0, buf_size: int = 12 + 1514) -> None:
        self.queues[2 * pair].post_rx(buf_size, count=count)
        self.kick(2 * pair)

    async def wait_used(
        self, index: int, count: int, *, timeout: float = 10.0, poll_interval: float | None = None
    ) -> list[Completion]:
        """Reap used entries of ring ``index`` until ``count`` came, sleeping on the ring's call eventfd
        in between, as a guest driver does: the backend must interrupt for what it completes (when the
        ring asks for it; the driver model leaves interrupts on). Raises :class:`CompletionTimeout` after
        ``timeout`` seconds. ``poll_interval``: also look every that many seconds without an interrupt
        (opt-in, for a backend that is not meant to interrupt; it hides a missing interrupt)."""
        q = self.queues[index]
        interrupted = self._interrupted[index]
        out: list[Completion] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    out.extend(q.reap(count - len(out)))
                    if len(out) >= count:
                        return out
                    # reap() asked for an interrupt at the next entry (used_event, §2.7.10); one the
                    # backend published before seeing that would not interrupt: look once more, as
                    # Linux's virtqueue_enable_cb() does, before sleeping.
                    if q.used_pending():
                        continue
                    interrupted.clear()
                    if poll_interval is None:
                        await interrupted.wait()
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(interrupted.wait(), poll_interval)
        except TimeoutError as err:
            raise CompletionTimeout(
                index=index, wanted=count, completions=out, unsignalled=q.used_pending(), timeout=timeout,
                interrupts_enabled=q.interrupts_enabled,
            ) from err

    def _new_call_fd(self, index: int) -> None:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        old = self.call_fds.pop(index, None)
        if old is not None:
            self.loop.remove_reader(old)
            os.close(old)
        self.call_fds[index] = fd
        self.loop.add_reader(fd, self._on_call, index, fd)

    def _on_call(self, index: int, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 8)
            self.interrupts[index] += 1
        self._interrupted[index].set()

    # -- misbehaving on purpose ---------------------------------------------------------------------

    async def send_malformed(self, kind: Malformed) -> Reply | None:
        """Send one broken message; return the backend's refusal when the message asked for one."""
        if kind is Malformed.UNKNOWN_REQUEST:
            await self.send(Outgoing(data=HEADER.pack(99, VERSION, 0)))
            return None
        if kind is Malformed.SHORT_PAYLOAD:
            out = self.conn.set_vring_num(0, self.queue_size, need_reply=self._ack)
            body = out.data[HEADER.size : HEADER.size + 3]
            data = HEADER.pack(int(Request.SET_VRING_NUM), VERSION | FLAG_NEED_REPLY, len(body)) + body
            return await self._refusal(Outgoing(data=data))
        if kind is Malformed.BAD_RING_INDEX:
            return await self._refusal(self.conn.set_vring_num(200, self.queue_size, need_reply=self._ack))
        if kind is Malformed.STRAY_FD:
            r, w = os.pipe()
            try:
                return await self.call(self.conn.request(Request.GET_QUEUE_NUM, fds=(r,)), check=False)
            finally:
                os.close(r)
                os.close(w)
        if kind is Malformed.UNSHARED_MEMORY:
            r, w = os.pipe()
            try:
                descs = self.ram.region_descs()[:1]
                return await self._refusal(self.conn.set_mem_table(descs, [r], need_reply=self._ack))
            finally:
                os.close(r)
                os.close(w)
        assert kind is Malformed.BAD_VERSION
        await self.send(Outgoing(data=HEADER.pack(int(Request.GET_FEATURES), 2, 0)))
        return None

    async def _refusal(self, out: Outgoing) -> Reply | None:
        return await self.call(out, check=False)

    # -- helpers and lifecycle ------------------------------------------------------------------------

    @property
    def _ack(self) -> bool:
        return vf.has(self.protocol_features, vf.VHOST_USER_PROTOCOL_F_REPLY_ACK)

    async def _u64(self, out: Outgoing) -> int:
        reply = await self.call(out)
        assert reply is not None
        return reply.value

    async def close(self) -> None:
        """Disconnect and close every fd and the shared RAM; idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for fd in self.call_fds.values():
            self.loop.remove_reader(fd)
            os.close(fd)
        for fd in self.kick_fds.values():
            os.close(fd)
        self.call_fds.clear()
        self.kick_fds.clear()
        if self.inflight is not None:
            os.close(self.inflight[0])
            self.inflight = None
        self.conn.close()
        for fd in self.conn.fds_to_close():
            os.close(fd)
        self.queues.clear()
        self.ram.close()
        if self._log_mm is not None:
            with contextlib.suppress(BufferError):  # the caller still holds the bitmap: the GC unmaps it
                self._log_mm.close()
            self._log_mm = None

    async def __aenter__(self) -> VhostUserFrontend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
