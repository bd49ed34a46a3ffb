"""The backend side of one vhost-user connection, I/O-free: bytes and fds in, events and replies out.

This module owns ``BackendConnection``: per-connection negotiated state (features, protocol
features, memory-region bookkeeping, ring phases), the dispatch table ``ROUTES`` (each supported
request's payload type and handler) and the handlers, which return what they produce (``Handled``:
events and reply). New states and ring phases come only from the tables in ``state``. Usage::

    conn = BackendConnection(device=my_device)
    events = conn.receive_data(data, fds)   # fds received with `data` (SCM_RIGHTS)
    for ev in events: ...                   # apply; on failure call conn.reject(ev, reason)
    for out in conn.data_to_send(): sock.sendmsg([out.data], fds=out.fds)
    for fd in conn.fds_to_close(): os.close(fd)

**Fd ownership**: every fd given to ``receive_data`` ends in exactly one place: in the one event
that carries it (the receiver owns it from then on), in ``fds_to_close()`` (message refused, REM_MEM_REG's
stray fd, anything left at ``close()``), or - while its message is still incomplete - held by the
connection until the message completes or ``close()`` moves it to ``fds_to_close()``.
Fds in ``Outgoing.fds`` (only GET_INFLIGHT_FD's) belong to the device and are never closed by the server.

A refused message yields ``ProtocolErrorOccurred`` and, as the spec asks, a failure REPLY_ACK when
one was requested, or an error form of the explicit reply; the connection carries on. Only a
broken stream (bad version, oversize length) is fatal: the connection goes to ``CLOSED``.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic

from nicsim.vhost import events as ev
from nicsim.vhost import features as f
from nicsim.vhost import payloads as p
from nicsim.vhost.errors import FrontendProtocolError, LocalProtocolError
from nicsim.vhost.protocol import (
    FLAG_NEED_REPLY,
    MAX_MEM_SLOTS,
    SPECS,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    Outgoing,
    PayloadT,
    RawMessage,
    ReplyKind,
    Request,
    empty_or_placeholder,
    extract_body,
    parse_request,
)
from nicsim.vhost.queries import DeviceQueries, IdleDevice
from nicsim.vhost.reader import MessageReader
from nicsim.vhost.replies import ReplyQueue
from nicsim.vhost.state import (
    EVERY_RING,
    RING_REQUESTS,
    ConnectionState,
    RingPhase,
    Trigger,
    gate_failure,
    next_phase,
    next_state,
)
from nicsim.virtio.features import VIRTIO_F_RING_PACKED

__all__ = ["ROUTES", "BackendConnection", "Handled", "Outgoing", "RingStatus", "Route"]

MAX_QUEUE_SIZE = 32768  # virtio 1.2 §2.6: Queue Size is at most 32768
REQUEST_LOG_SIZE = 256  # names kept in BackendConnection.request_log
MIN_MTU, MAX_MTU = 68, 65535  # IPv4 minimum; virtio-net config mtu is a u16


@dataclass(kw_only=True)
class RingStatus:
    """What the connection knows about one ring (read it; the connection updates it)."""

    index: int
    phase: RingPhase = RingPhase.STOPPED
    enabled: bool = False
    num: int = 0
    base: int = 0
    addr: p.VringAddr | None = None


@dataclass(frozen=True, kw_only=True)
class Handled:
    """What one handler produced: its events, its explicit reply if the spec gives it one (payload
    and the fds that go with it, which stay the device's), and a ``Trigger`` its request leaves
    behind, which moves the connection state after the request's own move."""

    events: tuple[ev.Event, ...] = ()
    reply: p.Payload | None = None
    reply_fds: tuple[int, ...] = ()
    trigger: Trigger | None = None


@dataclass(frozen=True)
class Route(Generic[PayloadT]):
    """One supported request: the decoder of its payload type and the handler that takes that type.

    Both name ``PayloadT``; built by ``_route``, a route whose decoder and handler disagree is a
    mypy error. The handler pops from ``fds`` the fds it hands over in an event; the connection
    closes the rest.
    """

    decode: Callable[[bytes], PayloadT]
    handler: Callable[[BackendConnection, PayloadT, list[int]], Handled]


class BackendConnection:
    """The vhost-user backend protocol for one socket connection (a reconnect gets a new object).

    ``features`` / ``protocol_features``: what GET_FEATURES / GET_PROTOCOL_FEATURES offer;
    ``inflight_shmfd`` adds VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, ``config_space``
    VHOST_USER_PROTOCOL_F_CONFIG (GET/SET_CONFIG; off by default, see ``features``).
    ``queue_pairs``: GET_QUEUE_NUM's answer (virtio-net counts queue pairs); rings are numbered
    ``0 .. 2 * queue_pairs - 1``.
    """

    def __init__(
        self,
        *,
        device: DeviceQueries | None = None,
        features: int = f.DEFAULT_VIRTIO_FEATURES,
        protocol_features: int = f.DEFAULT_PROTOCOL_FEATURES,
        inflight_shmfd: bool = False,
        config_space: bool = False,
        queue_pairs: int = 1,
        max_queue_size: int = MAX_QUEUE_SIZE,
        max_mem_slots: int = MAX_MEM_SLOTS,
    ) -> None:
        if not 1 <= queue_pairs <= (VRING_IDX_MASK + 1) // 2:
            raise LocalProtocolError(f"queue_pairs {queue_pairs} not in 1..{(VRING_IDX_MASK + 1) // 2}")
        if not 1 <= max_queue_size <= MAX_QUEUE_SIZE:
            raise LocalProtocolError(f"max_queue_size {max_queue_size} not in 1..{MAX_QUEUE_SIZE}")
        self.device: DeviceQueries = device if device is not None else IdleDevice()
        self.offered_features = features
        self.offered_protocol_features = (
            protocol_features
            | (f.bit(f.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) if inflight_shmfd else 0)
            | (f.bit(f.VHOST_USER_PROTOCOL_F_CONFIG) if config_space else 0)
        )
        self.queue_pairs = queue_pairs
        self.max_queue_size = max_queue_size
        self.max_mem_slots = max_mem_slots
        self.state = ConnectionState.CONNECTED
        self.acked_features: int | None = None
        self.acked_protocol_features: int | None = None
        self.regions: list[p.MemoryRegionDesc] = []
        # ADD_MEM_REG of a region identical to one held: QEMU sends one per vhost device, and with
        # multiqueue every queue pair is a device on this one connection. Counted, so that the region
        # goes only with its last REM_MEM_REG (libvhost-user, "handle removal of identical regions").
        self._region_refs: dict[tuple[int, int, int], int] = {}
        self.rings = tuple(RingStatus(index=i) for i in range(2 * queue_pairs))
        self.driver_status = 0
        self._reader = MessageReader()
        self._replies = ReplyQueue()
        self._close: list[int] = []
        # The names of the latest requests, oldest first (what a frontend really sends is worth seeing:
        # e.g. which requests QEMU replays on reconnect). Bounded: a long session keeps the newest.
        self.request_log: deque[str] = deque(maxlen=REQUEST_LOG_SIZE)

    # --- public API ---------------------------------------------------------------------------

    @property
    def num_vrings(self) -> int:
        return len(self.rings)

    @property
    def reply_ack(self) -> bool:
        """Whether REPLY_ACK was negotiated (NEED_REPLY is honoured only then)."""
        return f.has(self.acked_protocol_features or 0, f.VHOST_USER_PROTOCOL_F_REPLY_ACK)

    @property
    def bytes_wanted(self) -> int:
        """Bytes that complete the current header or message: read at most this many per recvmsg."""
        return self._reader.bytes_wanted

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> list[ev.Event]:
        """Feed bytes and the fds that came with them; return the events of every complete message.

        Raises ``LocalProtocolError`` if the connection is closed (the fds go to ``fds_to_close()``
        first, so nothing leaks).
        """
        if self.state is ConnectionState.CLOSED:
            self._close.extend(fds)
            raise LocalProtocolError("receive_data on a closed connection", state=self.state.name)
        self._reader.feed(data, fds)
        out: list[ev.Event] = []
        while True:
            try:
                msg = self._reader.next_message()
            except FrontendProtocolError as err:
                out.append(self._error_event(err.request or "", err.code or 0, err.reason, fatal=True))
                self.close()
                return out
            if msg is None:
                return out
            out.extend(self._handle(msg))

    def data_to_send(self) -> list[Outgoing]:
        """Replies queued so far, in request order (acks resolved now, after any ``reject``)."""
        return self._replies.flush()

    def fds_to_close(self) -> list[int]:
        """Fds the connection will not hand over in an event; the caller closes each one once."""
        out, self._close = self._close, []
        return out

    def reject(self, event: ev.Event, reason: str) -> bool:
        """The server could not apply ``event`` (e.g. mmap failed): make its REPLY_ACK a failure.

        Call before the next ``data_to_send()``. Returns whether an ack was changed (False when
        the frontend asked for none). State already updated by the message is kept. Raises
        ``LocalProtocolError`` for an event this connection did not return since the last flush.
        """
        changed = self._replies.reject(event)
        if changed is None:
            raise LocalProtocolError(
                f"reject({type(event).__name__}): not an event returned since the last data_to_send()",
                state=self.state.name,
            )
        return changed

    def close(self) -> None:
        """Stop: any fds still held for an incomplete message move to ``fds_to_close()``. Idempotent."""
        self._close.extend(self._reader.close())
        if self.state is not ConnectionState.CLOSED:
            self.state = next_state(self.state, Trigger.CLOSED)

    # --- dispatch ------------------------------------------------------------------------------

    def _handle(self, msg: RawMessage) -> list[ev.Event]:
        fds = list(msg.fds)
        wants_ack = bool(msg.flags & FLAG_NEED_REPLY) and self.reply_ack
        state = self.state
        self.request_log.append(msg.name)
        try:
            req = parse_request(msg)
            route = ROUTES.get(req)
            if route is None:
                extract_body(req, msg, SPECS[req].decode)  # a malformed message is refused for that first
                raise FrontendProtocolError("not supported by this backend")
            handled = self._run(req, route, msg, fds)
        except FrontendProtocolError as err:
            self._close.extend(fds)
            error = self._error_event(msg.name, msg.code, err.reason, fatal=False, state=state)
            self._replies.refuse(msg.code, error, wants_ack=wants_ack)
            return [error]
        self._close.extend(fds)  # handlers pop the fds they hand over; check_fds left no others
        self._replies.answer(
            msg.code,
            handled.events,
            reply=handled.reply,
            reply_fds=handled.reply_fds,
            ack=wants_ack and SPECS[req].reply is ReplyKind.NONE,
        )
        return list(handled.events)

    def _run(self, req: Request, route: Route[PayloadT], msg: RawMessage, fds: list[int]) -> Handled:
        """Decode as the route says, check the move is legal, handle, then make the move."""
        payload = extract_body(req, msg, route.decode)
        nxt = self._check_legal(req, payload)
        handled = route.handler(self, payload, fds)
        if handled.trigger is not None:
            nxt = next_state(nxt, handled.trigger)
        self.state = nxt
        return handled

    def _check_legal(self, req: Request, payload: p.Payload) -> ConnectionState:
        """The state ``req`` leads to; raises if the state, a gate or a ring's phase forbids it."""
        nxt = next_state(self.state, req)
        why = gate_failure(
            req,
            offered=self.offered_features,
            acked=self.acked_features,
            offered_protocol=self.offered_protocol_features,
            acked_protocol=self.acked_protocol_features,
        )
        if why:
            raise FrontendProtocolError(why)
        if req in RING_REQUESTS or req in EVERY_RING:
            rings = self.rings if req in EVERY_RING else (self.rings[self._ring_index(payload)],)
            for ring in rings:
                next_phase(ring.phase, req, ring.index)  # raises if that phase does not allow req
        return nxt

    def _ring_index(self, payload: p.Payload) -> int:
        if isinstance(payload, p.U64):
            index = payload.value & VRING_IDX_MASK
        elif isinstance(payload, p.VringState | p.VringAddr):
            index = payload.index
        else:  # pragma: no cover - every ring request has one of the layouts above
            raise FrontendProtocolError("ring request without a ring index")
        if index >= self.num_vrings:
            raise FrontendProtocolError(f"vring index {index} out of range ({self.num_vrings} vrings)")
        return index

    def _move_ring(self, ring: RingStatus, req: Request) -> tuple[ev.Event, ...]:
        """Move ``ring`` to the phase the ring table gives for ``req``; return what the move means.

        The one place a phase changes. Starting needs the ring's size and addresses; stopping asks
        the device for the next avail index, which GET_VRING_BASE replies and SET_VRING_BASE restores.
        """
        nxt = next_phase(ring.phase, req, ring.index)
        if nxt is ring.phase:
            return ()
        if nxt is RingPhase.STARTED:
            if ring.num == 0 or ring.addr is None:
                raise FrontendProtocolError(
                    f"vring {ring.index} cannot start before SET_VRING_NUM and SET_VRING_ADDR"
                )
            ring.phase = nxt
            return (ev.VringStarted(index=ring.index),)
        ring.base = self.device.stop_vring(ring.index, base=ring.base)
        ring.phase = nxt
        return (ev.VringStopped(index=ring.index, base=ring.base),)

    def _error_event(
        self, request: str, code: int, reason: str, *, fatal: bool, state: ConnectionState | None = None
    ) -> ev.ProtocolErrorOccurred:
        return ev.ProtocolErrorOccurred(
            request=request, code=code, state=(state or self.state).name, reason=reason, fatal=fatal
        )

    def _packed(self) -> bool:
        return f.has(self.acked_features or 0, VIRTIO_F_RING_PACKED)

    # --- handlers: validate everything first, then change state, then build events ------------
    # Each takes the payload type its route decodes and returns what it produced.

    def _get_features(self, payload: p.Empty, fds: list[int]) -> Handled:
        return Handled(reply=p.U64(value=self.offered_features))

    def _set_features(self, payload: p.U64, fds: list[int]) -> Handled:
        extra = payload.value & ~self.offered_features
        if extra:
            raise FrontendProtocolError(f"features not offered: {', '.join(f.feature_names(extra))}")
        started = [r.index for r in self.rings if r.phase is RingPhase.STARTED]
        # VHOST_F_LOG_ALL is not a ring's business: QEMU sets it while the rings run, when a migration
        # starts (and clears it when one is cancelled), to turn the dirty log on and off.
        moved = (payload.value ^ (self.acked_features or 0)) & ~f.bit(f.VHOST_F_LOG_ALL)
        if started and (self.acked_features is None or moved):
            # A started ring reads its layout, header size and notification scheme from the
            # features; they cannot change under it. The same bits again are no change: QEMU sends
            # SET_FEATURES once per queue pair (one vhost_dev each) while the first pair runs.
            changed = f.feature_names(moved)
            raise FrontendProtocolError(
                f"features cannot change while vring {started[0]} is started ({', '.join(changed)})"
            )
        self.acked_features = payload.value
        out: list[ev.Event] = [ev.FeaturesSet(features=payload.value)]
        if not f.has(payload.value, f.VHOST_USER_F_PROTOCOL_FEATURES):
            # Spec "Ring states": without protocol features the rings start directly enabled.
            for ring in self.rings:
                if not ring.enabled:
                    ring.enabled = True
                    out.append(ev.VringEnabled(index=ring.index, enabled=True))
        return Handled(events=tuple(out))

    def _set_owner(self, payload: p.Empty, fds: list[int]) -> Handled:
        return Handled(events=(ev.OwnerSet(),))

    def _reset_owner(self, payload: p.Empty, fds: list[int]) -> Handled:
        out: list[ev.Event] = []
        for ring in self.rings:
            out.extend(self._move_ring(ring, Request.RESET_OWNER))
            if ring.enabled:
                ring.enabled = False
                out.append(ev.VringEnabled(index=ring.index, enabled=False))
        out.append(ev.OwnerReset())
        return Handled(events=tuple(out))

    def _set_mem_table(self, payload: p.MemoryTable, fds: list[int]) -> Handled:
        regions = tuple(
            ev.MemoryRegion(
                guest_phys_addr=r.guest_phys_addr,
                size=r.size,
                user_addr=r.user_addr,
                mmap_offset=r.mmap_offset,
                fd=fd,
            )
            for r, fd in zip(payload.regions, fds, strict=True)
        )
        self.regions = list(payload.regions)
        self._region_refs = {}
        fds.clear()
        return Handled(events=(ev.MemoryTableSet(regions=regions),))

    def _add_mem_reg(self, payload: p.SingleMemoryRegion, fds: list[int]) -> Handled:
        r = payload.region
        key = (r.guest_phys_addr, r.user_addr, r.size)
        if r in self.regions:
            # The same region again (another queue pair): nothing to map; its fd stays in ``fds``,
            # which the connection closes.
            self._region_refs[key] = self._region_refs.get(key, 1) + 1
            return Handled()
        if len(self.regions) >= self.max_mem_slots:
            raise FrontendProtocolError(f"all {self.max_mem_slots} memory slots are in use")
        for old in self.regions:
            if r.overlaps(old):
                raise FrontendProtocolError(
                    f"region at {r.guest_phys_addr:#x} overlaps the region at {old.guest_phys_addr:#x}"
                )
        self.regions.append(r)
        region = ev.MemoryRegion(
            guest_phys_addr=r.guest_phys_addr,
            size=r.size,
            user_addr=r.user_addr,
            mmap_offset=r.mmap_offset,
            fd=fds.pop(),
        )
        return Handled(events=(ev.MemoryRegionAdded(region=region),))

    def _rem_mem_reg(self, payload: p.SingleMemoryRegion, fds: list[int]) -> Handled:
        r = payload.region
        # Spec: identified by guest address, user address and size; the mmap offset is ignored.
        key = (r.guest_phys_addr, r.user_addr, r.size)
        match = [old for old in self.regions if (old.guest_phys_addr, old.user_addr, old.size) == key]
        if not match:
            raise FrontendProtocolError(f"no memory region at guest address {r.guest_phys_addr:#x}")
        refs = self._region_refs.pop(key, 1)
        if refs > 1:
            self._region_refs[key] = refs - 1  # another queue pair still holds it
            return Handled()
        self.regions.remove(match[0])
        # Spec: an fd sent with REM_MEM_REG MUST be closed without being used: it stays in fds.
        gone = ev.MemoryRegionRemoved(guest_phys_addr=r.guest_phys_addr, size=r.size, user_addr=r.user_addr)
        return Handled(events=(gone,), trigger=None if self.regions else Trigger.MEMORY_EMPTIED)

    def _set_log_base(self, payload: p.LogDesc, fds: list[int]) -> Handled:
        log = ev.LogBaseSet(mmap_size=payload.mmap_size, mmap_offset=payload.mmap_offset, fd=fds.pop())
        return Handled(events=(log,), reply=p.U64(value=0))

    def _set_log_fd(self, payload: p.Empty | p.U64, fds: list[int]) -> Handled:
        return Handled(events=(ev.LogFdSet(fd=fds.pop()),))

    def _set_vring_num(self, payload: p.VringState, fds: list[int]) -> Handled:
        num = payload.num
        if not 1 <= num <= self.max_queue_size:
            raise FrontendProtocolError(f"vring size {num} not in 1..{self.max_queue_size}")
        if not self._packed() and num & (num - 1):
            raise FrontendProtocolError(f"split vring size {num} is not a power of 2 (virtio 1.2 §2.7)")
        self.rings[payload.index].num = num
        return Handled(events=(ev.VringNumSet(index=payload.index, num=num),))

    def _set_vring_addr(self, payload: p.VringAddr, fds: list[int]) -> Handled:
        self.rings[payload.index].addr = payload
        return Handled(events=(ev.VringAddrSet(index=payload.index, addr=payload),))

    def _set_vring_base(self, payload: p.VringState, fds: list[int]) -> Handled:
        if not self._packed() and payload.num > 0xFFFF:
            raise FrontendProtocolError(f"split vring base {payload.num:#x} exceeds 16 bits")
        self.rings[payload.index].base = payload.num
        return Handled(events=(ev.VringBaseSet(index=payload.index, base=payload.num),))

    def _get_vring_base(self, payload: p.VringState, fds: list[int]) -> Handled:
        ring = self.rings[payload.index]
        stopped = self._move_ring(ring, Request.GET_VRING_BASE)
        return Handled(events=stopped, reply=p.VringState(index=ring.index, num=ring.base))

    @staticmethod
    def _vring_fd(payload: p.U64, fds: list[int]) -> int | None:
        """The eventfd of SET_VRING_KICK/CALL/ERR, or None with bit 8 set ("no fd": poll instead)."""
        return None if payload.value & VRING_NOFD_MASK else fds.pop()

    def _set_vring_kick(self, payload: p.U64, fds: list[int]) -> Handled:
        ring = self.rings[payload.value & VRING_IDX_MASK]
        started = self._move_ring(ring, Request.SET_VRING_KICK)  # spec: the ring starts on its kick fd
        return Handled(events=(ev.VringKickSet(index=ring.index, fd=self._vring_fd(payload, fds)), *started))

    def _set_vring_call(self, payload: p.U64, fds: list[int]) -> Handled:
        index = payload.value & VRING_IDX_MASK
        return Handled(events=(ev.VringCallSet(index=index, fd=self._vring_fd(payload, fds)),))

    def _set_vring_err(self, payload: p.U64, fds: list[int]) -> Handled:
        index = payload.value & VRING_IDX_MASK
        return Handled(events=(ev.VringErrSet(index=index, fd=self._vring_fd(payload, fds)),))

    def _get_protocol_features(self, payload: p.Empty, fds: list[int]) -> Handled:
        return Handled(reply=p.U64(value=self.offered_protocol_features))

    def _set_protocol_features(self, payload: p.U64, fds: list[int]) -> Handled:
        extra = payload.value & ~self.offered_protocol_features
        if extra:
            names = ", ".join(f.feature_names(extra, protocol=True))
            raise FrontendProtocolError(f"protocol features not offered: {names}")
        self.acked_protocol_features = payload.value
        return Handled(events=(ev.ProtocolFeaturesSet(features=payload.value),))

    def _get_queue_num(self, payload: p.Empty, fds: list[int]) -> Handled:
        return Handled(reply=p.U64(value=self.queue_pairs))

    def _set_vring_enable(self, payload: p.VringState, fds: list[int]) -> Handled:
        if payload.num not in (0, 1):
            raise FrontendProtocolError(f"vring enable value {payload.num} is not 0 or 1")
        self.rings[payload.index].enabled = bool(payload.num)
        return Handled(events=(ev.VringEnabled(index=payload.index, enabled=bool(payload.num)),))

    def _send_rarp(self, payload: p.U64, fds: list[int]) -> Handled:
        # Spec: "The first 6 bytes of the payload contain the mac address".
        return Handled(events=(ev.RarpRequested(mac=struct.pack("=Q", payload.value)[:6]),))

    def _net_set_mtu(self, payload: p.U64, fds: list[int]) -> Handled:
        # Spec: with REPLY_ACK the backend answers non-zero for an invalid MTU.
        if not MIN_MTU <= payload.value <= MAX_MTU:
            raise FrontendProtocolError(f"MTU {payload.value} not in {MIN_MTU}..{MAX_MTU}")
        return Handled(events=(ev.MtuSet(mtu=payload.value),))

    def _set_backend_req_fd(self, payload: p.Empty | p.U64, fds: list[int]) -> Handled:
        return Handled(events=(ev.BackendReqFdSet(fd=fds.pop()),))

    def _iotlb_msg(self, payload: p.IotlbMsg, fds: list[int]) -> Handled:
        msg = ev.IotlbMsgReceived(
            iova=payload.iova,
            size=payload.size,
            user_addr=payload.user_addr,
            perm=payload.perm,
            type=payload.type,
        )
        return Handled(events=(msg,), reply=p.U64(value=0))

    def _set_vring_endian(self, payload: p.VringState, fds: list[int]) -> Handled:
        if payload.num not in (0, 1):
            raise FrontendProtocolError(f"vring endianness {payload.num} is not 0 (little) or 1 (big)")
        return Handled(events=(ev.VringEndianSet(index=payload.index, big_endian=bool(payload.num)),))

    def _get_config(self, payload: p.ConfigSpace, fds: list[int]) -> Handled:
        data = self.device.read_config(payload.offset, payload.size)
        if data is None or len(data) != payload.size:
            raise FrontendProtocolError(
                f"config range offset {payload.offset} size {payload.size} not readable"
            )
        return Handled(
            reply=p.ConfigSpace(offset=payload.offset, size=payload.size, flags=payload.flags, payload=data)
        )

    def _set_config(self, payload: p.ConfigSpace, fds: list[int]) -> Handled:
        migration = payload.flags == p.VHOST_SET_CONFIG_TYPE_MIGRATION
        config = ev.ConfigSet(offset=payload.offset, data=payload.payload, migration=migration)
        return Handled(events=(config,))

    def _get_inflight_fd(self, payload: p.InflightDesc, fds: list[int]) -> Handled:
        buf = self.device.get_inflight_fd(num_queues=payload.num_queues, queue_size=payload.queue_size)
        if buf is None:
            raise FrontendProtocolError("the device has no inflight buffer to offer")
        desc = p.InflightDesc(
            mmap_size=buf.mmap_size,
            mmap_offset=buf.mmap_offset,
            num_queues=payload.num_queues,
            queue_size=payload.queue_size,
        )
        return Handled(reply=desc, reply_fds=(buf.fd,))

    def _set_inflight_fd(self, payload: p.InflightDesc, fds: list[int]) -> Handled:
        inflight = ev.InflightFdSet(
            mmap_size=payload.mmap_size,
            mmap_offset=payload.mmap_offset,
            num_queues=payload.num_queues,
            queue_size=payload.queue_size,
            fd=fds.pop(),
        )
        return Handled(events=(inflight,))

    def _get_max_mem_slots(self, payload: p.Empty, fds: list[int]) -> Handled:
        return Handled(reply=p.U64(value=self.max_mem_slots))

    def _set_status(self, payload: p.U64, fds: list[int]) -> Handled:
        if payload.value > 0xFF:
            raise FrontendProtocolError(f"device status {payload.value:#x} exceeds 8 bits")
        self.driver_status = payload.value
        return Handled(events=(ev.StatusSet(status=payload.value),))

    def _get_status(self, payload: p.Empty, fds: list[int]) -> Handled:
        return Handled(reply=p.U64(value=self.device.get_status(driver_status=self.driver_status)))


R = Request
C = BackendConnection
_EMPTY, _U64, _STATE = p.Empty.decode, p.U64.decode, p.VringState.decode


def _route(
    decode: Callable[[bytes], PayloadT], handler: Callable[[BackendConnection, PayloadT, list[int]], Handled]
) -> Route[Any]:
    # Solving PayloadT here, where nothing else gives it a type, is what makes mypy compare the two.
    return Route(decode, handler)


ROUTES: dict[Request, Route[Any]] = {
    R.GET_FEATURES: _route(_EMPTY, C._get_features),
    R.SET_FEATURES: _route(_U64, C._set_features),
    R.SET_OWNER: _route(_EMPTY, C._set_owner),
    R.RESET_OWNER: _route(_EMPTY, C._reset_owner),
    R.SET_MEM_TABLE: _route(p.MemoryTable.decode, C._set_mem_table),
    R.SET_LOG_BASE: _route(p.LogDesc.decode, C._set_log_base),
    R.SET_LOG_FD: _route(empty_or_placeholder, C._set_log_fd),
    R.SET_VRING_NUM: _route(_STATE, C._set_vring_num),
    R.SET_VRING_ADDR: _route(p.VringAddr.decode, C._set_vring_addr),
    R.SET_VRING_BASE: _route(_STATE, C._set_vring_base),
    R.GET_VRING_BASE: _route(_STATE, C._get_vring_base),
    R.SET_VRING_KICK: _route(_U64, C._set_vring_kick),
    R.SET_VRING_CALL: _route(_U64, C._set_vring_call),
    R.SET_VRING_ERR: _route(_U64, C._set_vring_err),
    R.GET_PROTOCOL_FEATURES: _route(_EMPTY, C._get_protocol_features),
    R.SET_PROTOCOL_FEATURES: _route(_U64, C._set_protocol_features),
    R.GET_QUEUE_NUM: _route(_EMPTY, C._get_queue_num),
    R.SET_VRING_ENABLE: _route(_STATE, C._set_vring_enable),
    R.SEND_RARP: _route(_U64, C._send_rarp),
    R.NET_SET_MTU: _route(_U64, C._net_set_mtu),
    R.SET_BACKEND_REQ_FD: _route(empty_or_placeholder, C._set_backend_req_fd),
    R.IOTLB_MSG: _route(p.IotlbMsg.decode, C._iotlb_msg),
    R.SET_VRING_ENDIAN: _route(_STATE, C._set_vring_endian),
    R.GET_CONFIG: _route(p.ConfigSpace.decode, C._get_config),
    R.SET_CONFIG: _route(p.ConfigSpace.decode, C._set_config),
    R.GET_INFLIGHT_FD: _route(p.InflightDesc.decode, C._get_inflight_fd),
    R.SET_INFLIGHT_FD: _route(p.InflightDesc.decode, C._set_inflight_fd),
    R.GET_MAX_MEM_SLOTS: _route(_EMPTY, C._get_max_mem_slots),
    R.ADD_MEM_REG: _route(p.SingleMemoryRegion.decode, C._add_mem_reg),
    R.REM_MEM_REG: _route(p.SingleMemoryRegion.decode, C._rem_mem_reg),
    R.SET_STATUS: _route(_U64, C._set_status),
    R.GET_STATUS: _route(_EMPTY, C._get_status),
}
"""The dispatch table: every request this backend supports (``state.SUPPORTED``), its payload
type and its handler. A request absent here is refused as "not supported by this backend"."""
