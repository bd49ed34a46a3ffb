"""The backend side of one vhost-user connection, I/O-free: bytes and fds in, events and replies out.

This module owns ``BackendConnection``: per-connection negotiated state (features, protocol
features, memory-region bookkeeping, ring phases) and the handling of each request. Usage::

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
from dataclasses import dataclass, field

from nicsim.vhost import events as ev
from nicsim.vhost import features as f
from nicsim.vhost import payloads as p
from nicsim.vhost.errors import FrontendProtocolError, LocalProtocolError
from nicsim.vhost.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    MAX_MEM_SLOTS,
    SPECS,
    VERSION,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    RawMessage,
    ReplyKind,
    Request,
    decode_request,
    encode_message,
)
from nicsim.vhost.queries import DeviceQueries, IdleDevice
from nicsim.vhost.reader import MessageReader
from nicsim.vhost.state import (
    RING_REQUESTS,
    RING_TRANSITIONS,
    SUPPORTED,
    TRANSITIONS,
    ConnectionState,
    RingPhase,
    gate_failure,
)
from nicsim.virtio.features import VIRTIO_F_RING_PACKED

MAX_QUEUE_SIZE = 32768  # virtio 1.2 §2.6: Queue Size is at most 32768
REQUEST_LOG_SIZE = 256  # names kept in BackendConnection.request_log
MIN_MTU, MAX_MTU = 68, 65535  # IPv4 minimum; virtio-net config mtu is a u16


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """One message to send with one ``sendmsg``; ``fds`` (rare) stay owned by the device."""

    data: bytes
    fds: tuple[int, ...] = ()


@dataclass(kw_only=True)
class RingStatus:
    """What the connection knows about one ring (read it; the connection updates it)."""

    index: int
    phase: RingPhase = RingPhase.STOPPED
    enabled: bool = False
    num: int = 0
    base: int = 0
    addr: p.VringAddr | None = None


@dataclass(kw_only=True)
class _Pending:
    """A queued reply; an ack can still turn into a failure through ``reject``."""

    code: int
    payload: bytes = b""
    fds: tuple[int, ...] = ()
    ack: bool = False  # a REPLY_ACK: payload is u64 0/1, decided at data_to_send time
    ok: bool = True
    events: list[ev.Event] = field(default_factory=list)


Handler = Callable[[p.Payload, list[int]], list[ev.Event]]


class BackendConnection:
    """The vhost-user backend protocol for one socket connection (a reconnect gets a new object).

    ``features`` / ``protocol_features``: what GET_FEATURES / GET_PROTOCOL_FEATURES offer;
    ``inflight_shmfd`` adds VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD. ``queue_pairs``: GET_QUEUE_NUM's
    answer (virtio-net counts queue pairs); rings are numbered ``0 .. 2 * queue_pairs - 1``.
    """

    def __init__(
        self,
        *,
        device: DeviceQueries | None = None,
        features: int = f.DEFAULT_VIRTIO_FEATURES,
        protocol_features: int = f.DEFAULT_PROTOCOL_FEATURES,
        inflight_shmfd: bool = False,
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
        self.offered_protocol_features = protocol_features | (
            f.bit(f.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) if inflight_shmfd else 0
        )
        self.queue_pairs = queue_pairs
        self.max_queue_size = max_queue_size
        self.max_mem_slots = max_mem_slots
        self.state = ConnectionState.CONNECTED
        self.acked_features: int | None = None
        self.acked_protocol_features: int | None = None
        self.regions: list[p.MemoryRegionDesc] = []
        self.rings = tuple(RingStatus(index=i) for i in range(2 * queue_pairs))
        self.driver_status = 0
        self._reader = MessageReader()
        self._out: list[_Pending] = []
        self._close: list[int] = []
        # Events returned since the last data_to_send(), by id, kept alive so ids stay unique.
        self._unflushed: dict[int, tuple[ev.Event, _Pending | None]] = {}
        self._handlers: dict[Request, Handler] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_fd,
            Request.SET_VRING_CALL: self._set_vring_fd,
            Request.SET_VRING_ERR: self._set_vring_fd,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.SEND_RARP: self._send_rarp,
            Request.NET_SET_MTU: self._net_set_mtu,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.IOTLB_MSG: self._iotlb_msg,
            Request.SET_VRING_ENDIAN: self._set_vring_endian,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
        }
        # Reply being built for the message in progress (set by handlers with an explicit reply).
        self._reply: _Pending | None = None
        self._code = 0
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
                self._close.extend(self._reader.close())
                self.state = ConnectionState.CLOSED
                return out
            if msg is None:
                return out
            out.extend(self._handle(msg))

    def data_to_send(self) -> list[Outgoing]:
        """Replies queued so far, in request order (acks resolved now, after any ``reject``)."""
        out = []
        for pend in self._out:
            flags = VERSION | FLAG_REPLY
            payload = p.U64(value=0 if pend.ok else 1).encode() if pend.ack else pend.payload
            out.append(Outgoing(data=encode_message(pend.code, payload, flags=flags), fds=pend.fds))
        self._out.clear()
        self._unflushed.clear()
        return out

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
        entry = self._unflushed.get(id(event))
        if entry is None or entry[0] is not event:
            raise LocalProtocolError(
                f"reject({type(event).__name__}): not an event returned since the last data_to_send()",
                state=self.state.name,
            )
        pend = entry[1]
        if pend is None:
            return False
        pend.ok = False
        return True

    def close(self) -> None:
        """Stop: any fds still held for an incomplete message move to ``fds_to_close()``. Idempotent."""
        self._close.extend(self._reader.close())
        self.state = ConnectionState.CLOSED

    # --- dispatch ------------------------------------------------------------------------------

    def _handle(self, msg: RawMessage) -> list[ev.Event]:
        fds = list(msg.fds)
        wants_ack = bool(msg.flags & FLAG_NEED_REPLY) and self.reply_ack
        state = self.state
        self._reply = None
        self._code = msg.code
        self.request_log.append(msg.name)
        try:
            req, payload = decode_request(msg)
            nxt = self._check_legal(req, payload)
            events = self._handlers[req](payload, fds)
        except FrontendProtocolError as err:
            self._close.extend(fds)
            error = self._error_event(msg.name, msg.code, err.reason, fatal=False, state=state)
            self._queue_failure(msg.code, wants_ack)
            self._unflushed[id(error)] = (error, None)
            return [error]
        self._close.extend(fds)  # handlers pop the fds they hand over; check_fds left no others
        if self.state is state:  # a handler may have chosen the state itself (REM_MEM_REG)
            self.state = nxt
        pend = self._reply
        if pend is None and wants_ack and SPECS[req].reply is ReplyKind.NONE:
            pend = _Pending(code=msg.code, ack=True)
        if pend is not None:
            pend.events = events
            self._out.append(pend)
        for e in events:
            self._unflushed[id(e)] = (e, pend if pend is not None and pend.ack else None)
        return events

    def _check_legal(self, req: Request, payload: p.Payload) -> ConnectionState:
        if req not in SUPPORTED:
            raise FrontendProtocolError("not supported by this backend")
        nxt = TRANSITIONS[self.state].get(req)
        if nxt is None:
            raise FrontendProtocolError(f"not legal in state {self.state.name}")
        why = gate_failure(
            req,
            offered=self.offered_features,
            acked=self.acked_features,
            offered_protocol=self.offered_protocol_features,
            acked_protocol=self.acked_protocol_features,
        )
        if why:
            raise FrontendProtocolError(why)
        if req in RING_REQUESTS:
            ring = self.rings[self._ring_index(payload)]
            if req not in RING_TRANSITIONS[ring.phase]:
                raise FrontendProtocolError(f"not legal while vring {ring.index} is {ring.phase.value}")
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

    def _queue_failure(self, code: int, wants_ack: bool) -> None:
        try:
            kind = SPECS[Request(code)].reply
        except ValueError:
            kind = ReplyKind.NONE
        if kind is ReplyKind.U64_ACK:
            self._out.append(_Pending(code=code, payload=p.U64(value=1).encode()))
        elif kind is not ReplyKind.NONE:
            # No failure form in the spec (except GET_CONFIG's empty payload): an empty payload
            # makes any frontend fail the request at once instead of waiting for a reply forever.
            self._out.append(_Pending(code=code))
        elif wants_ack:
            self._out.append(_Pending(code=code, ack=True, ok=False))

    def _error_event(
        self, request: str, code: int, reason: str, *, fatal: bool, state: ConnectionState | None = None
    ) -> ev.ProtocolErrorOccurred:
        return ev.ProtocolErrorOccurred(
            request=request, code=code, state=(state or self.state).name, reason=reason, fatal=fatal
        )

    def _reply_with(self, payload: bytes, fds: tuple[int, ...] = ()) -> None:
        self._reply = _Pending(code=self._code, payload=payload, fds=fds)

    def _packed(self) -> bool:
        return f.has(self.acked_features or 0, VIRTIO_F_RING_PACKED)

    # --- handlers: validate everything first, then change state, then build events ------------

    def _get_features(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        self._reply_with(p.U64(value=self.offered_features).encode())
        return []

    def _set_features(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.U64)
        extra = payload.value & ~self.offered_features
        if extra:
            raise FrontendProtocolError(f"features not offered: {', '.join(f.feature_names(extra))}")
        self.acked_features = payload.value
        out: list[ev.Event] = [ev.FeaturesSet(features=payload.value)]
        if not f.has(payload.value, f.VHOST_USER_F_PROTOCOL_FEATURES):
            # Spec "Ring states": without protocol features the rings start directly enabled.
            for ring in self.rings:
                if not ring.enabled:
                    ring.enabled = True
                    out.append(ev.VringEnabled(index=ring.index, enabled=True))
        return out

    def _set_owner(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        return [ev.OwnerSet()]

    def _stop(self, ring: RingStatus) -> ev.VringStopped:
        ring.base = self.device.stop_vring(ring.index, base=ring.base)
        ring.phase = RingPhase.STOPPED
        return ev.VringStopped(index=ring.index, base=ring.base)

    def _reset_owner(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        out: list[ev.Event] = []
        for ring in self.rings:
            if ring.phase is RingPhase.STARTED:
                out.append(self._stop(ring))
            if ring.enabled:
                ring.enabled = False
                out.append(ev.VringEnabled(index=ring.index, enabled=False))
        out.append(ev.OwnerReset())
        return out

    def _set_mem_table(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.MemoryTable)
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
        fds.clear()
        return [ev.MemoryTableSet(regions=regions)]

    def _add_mem_reg(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.SingleMemoryRegion)
        r = payload.region
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
        return [ev.MemoryRegionAdded(region=region)]

    def _rem_mem_reg(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.SingleMemoryRegion)
        r = payload.region
        # Spec: identified by guest address, user address and size; the mmap offset is ignored.
        key = (r.guest_phys_addr, r.user_addr, r.size)
        match = [old for old in self.regions if (old.guest_phys_addr, old.user_addr, old.size) == key]
        if not match:
            raise FrontendProtocolError(f"no memory region at guest address {r.guest_phys_addr:#x}")
        self.regions.remove(match[0])
        # Spec: an fd sent with REM_MEM_REG MUST be closed without being used.
        self._close.extend(fds)
        fds.clear()
        if not self.regions:
            self.state = ConnectionState.NEGOTIATED
        return [ev.MemoryRegionRemoved(guest_phys_addr=r.guest_phys_addr, size=r.size, user_addr=r.user_addr)]

    def _set_log_base(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.LogDesc)
        self._reply_with(p.U64(value=0).encode())
        return [ev.LogBaseSet(mmap_size=payload.mmap_size, mmap_offset=payload.mmap_offset, fd=fds.pop())]

    def _set_log_fd(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        return [ev.LogFdSet(fd=fds.pop())]

    def _set_vring_num(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.VringState)
        num = payload.num
        if not 1 <= num <= self.max_queue_size:
            raise FrontendProtocolError(f"vring size {num} not in 1..{self.max_queue_size}")
        if not self._packed() and num & (num - 1):
            raise FrontendProtocolError(f"split vring size {num} is not a power of 2 (virtio 1.2 §2.7)")
        self.rings[payload.index].num = num
        return [ev.VringNumSet(index=payload.index, num=num)]

    def _set_vring_addr(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.VringAddr)
        self.rings[payload.index].addr = payload
        return [
            ev.VringAddrSet(
                index=payload.index,
                flags=payload.flags,
                desc_user_addr=payload.desc_user_addr,
                used_user_addr=payload.used_user_addr,
                avail_user_addr=payload.avail_user_addr,
                log_guest_addr=payload.log_guest_addr,
            )
        ]

    def _set_vring_base(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.VringState)
        if not self._packed() and payload.num > 0xFFFF:
            raise FrontendProtocolError(f"split vring base {payload.num:#x} exceeds 16 bits")
        self.rings[payload.index].base = payload.num
        return [ev.VringBaseSet(index=payload.index, base=payload.num)]

    def _get_vring_base(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.VringState)
        ring = self.rings[payload.index]
        out: list[ev.Event] = []
        if ring.phase is RingPhase.STARTED:
            out.append(self._stop(ring))
        self._reply_with(p.VringState(index=ring.index, num=ring.base).encode())
        return out

    def _set_vring_fd(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.U64)
        ring = self.rings[payload.value & VRING_IDX_MASK]
        fd = None if payload.value & VRING_NOFD_MASK else fds.pop()
        req = Request(self._code)
        if req is Request.SET_VRING_CALL:
            return [ev.VringCallSet(index=ring.index, fd=fd)]
        if req is Request.SET_VRING_ERR:
            return [ev.VringErrSet(index=ring.index, fd=fd)]
        if ring.phase is RingPhase.STARTED:
            return [ev.VringKickSet(index=ring.index, fd=fd)]
        if ring.num == 0 or ring.addr is None:
            if fd is not None:
                fds.append(fd)  # still ours: the error path closes it
            raise FrontendProtocolError(
                f"vring {ring.index} cannot start before SET_VRING_NUM and SET_VRING_ADDR"
            )
        ring.phase = RingPhase.STARTED
        return [ev.VringKickSet(index=ring.index, fd=fd), ev.VringStarted(index=ring.index)]

    def _get_protocol_features(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        self._reply_with(p.U64(value=self.offered_protocol_features).encode())
        return []

    def _set_protocol_features(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.U64)
        extra = payload.value & ~self.offered_protocol_features
        if extra:
            names = ", ".join(f.feature_names(extra, protocol=True))
            raise FrontendProtocolError(f"protocol features not offered: {names}")
        self.acked_protocol_features = payload.value
        return [ev.ProtocolFeaturesSet(features=payload.value)]

    def _get_queue_num(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        self._reply_with(p.U64(value=self.queue_pairs).encode())
        return []

    def _set_vring_enable(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.VringState)
        if payload.num not in (0, 1):
            raise FrontendProtocolError(f"vring enable value {payload.num} is not 0 or 1")
        self.rings[payload.index].enabled = bool(payload.num)
        return [ev.VringEnabled(index=payload.index, enabled=bool(payload.num))]

    def _send_rarp(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.U64)
        # Spec: "The first 6 bytes of the payload contain the mac address".
        return [ev.RarpRequested(mac=struct.pack("=Q", payload.value)[:6])]

    def _net_set_mtu(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.U64)
        # Spec: with REPLY_ACK the backend answers non-zero for an invalid MTU.
        if not MIN_MTU <= payload.value <= MAX_MTU:
            raise FrontendProtocolError(f"MTU {payload.value} not in {MIN_MTU}..{MAX_MTU}")
        return [ev.MtuSet(mtu=payload.value)]

    def _set_backend_req_fd(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        return [ev.BackendReqFdSet(fd=fds.pop())]

    def _iotlb_msg(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.IotlbMsg)
        self._reply_with(p.U64(value=0).encode())
        return [
            ev.IotlbMsgReceived(
                iova=payload.iova,
                size=payload.size,
                user_addr=payload.user_addr,
                perm=payload.perm,
                type=payload.type,
            )
        ]

    def _set_vring_endian(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.VringState)
        if payload.num not in (0, 1):
            raise FrontendProtocolError(f"vring endianness {payload.num} is not 0 (little) or 1 (big)")
        return [ev.VringEndianSet(index=payload.index, big_endian=bool(payload.num))]

    def _get_config(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.ConfigSpace)
        data = self.device.read_config(payload.offset, payload.size)
        if data is None or len(data) != payload.size:
            raise FrontendProtocolError(
                f"config range offset {payload.offset} size {payload.size} not readable"
            )
        cfg = p.ConfigSpace(offset=payload.offset, size=payload.size, flags=payload.flags, payload=data)
        self._reply_with(cfg.encode())
        return []

    def _set_config(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.ConfigSpace)
        migration = payload.flags == p.VHOST_SET_CONFIG_TYPE_MIGRATION
        return [ev.ConfigSet(offset=payload.offset, data=payload.payload, migration=migration)]

    def _get_inflight_fd(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.InflightDesc)
        buf = self.device.get_inflight_fd(num_queues=payload.num_queues, queue_size=payload.queue_size)
        if buf is None:
            raise FrontendProtocolError("the device has no inflight buffer to offer")
        desc = p.InflightDesc(
            mmap_size=buf.mmap_size,
            mmap_offset=buf.mmap_offset,
            num_queues=payload.num_queues,
            queue_size=payload.queue_size,
        )
        self._reply_with(desc.encode(), (buf.fd,))
        return []

    def _set_inflight_fd(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.InflightDesc)
        return [
            ev.InflightFdSet(
                mmap_size=payload.mmap_size,
                mmap_offset=payload.mmap_offset,
                num_queues=payload.num_queues,
                queue_size=payload.queue_size,
                fd=fds.pop(),
            )
        ]

    def _get_max_mem_slots(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        self._reply_with(p.U64(value=self.max_mem_slots).encode())
        return []

    def _set_status(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        assert isinstance(payload, p.U64)
        if payload.value > 0xFF:
            raise FrontendProtocolError(f"device status {payload.value:#x} exceeds 8 bits")
        self.driver_status = payload.value
        return [ev.StatusSet(status=payload.value)]

    def _get_status(self, payload: p.Payload, fds: list[int]) -> list[ev.Event]:
        self._reply_with(p.U64(value=self.device.get_status(driver_status=self.driver_status)).encode())
        return []
