"""Request numbers, the message header, and what each request carries.

This module owns the vhost-user wire vocabulary: the ``Request`` numbers of the spec's "Front-end
message types" table (every one of them, so an unsupported request is refused *by name*), the
``BackendRequest`` numbers, the 12-byte header and its flags, the size limits, and ``SPECS``: for
each request its payload layout, how many fds may come with it, and the shape of its reply, if the
spec gives it one. ``decode_request`` turns a framed message into a typed payload, validating the
syntax (``parse_request`` then ``extract_body``, which a dispatcher calls with its own payload type);
``encode_message`` and ``Outgoing`` are the inverse and are shared by both sides.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from nicsim.vhost import payloads as p
from nicsim.vhost.errors import FrontendProtocolError


class Request(enum.IntEnum):
    """Front-end message types (vhost-user spec), with the spec's names minus ``VHOST_USER_``."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Back-end message types (sent on the backend-request channel), for naming only."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


def request_name(code: int) -> str:
    """``"SET_MEM_TABLE"`` for 5; ``"UNKNOWN(99)"`` for a number the spec does not define."""
    try:
        return Request(code).name
    except ValueError:
        return f"UNKNOWN({code})"


# --- header (spec, "Header") ------------------------------------------------------------------------
HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

MAX_PAYLOAD_SIZE = 4096
"""Largest payload accepted; the largest legal one (SET_CONFIG) is 268 bytes. Larger is fatal."""
MAX_FDS = 8
"""Most fds one message may carry (QEMU sends at most VHOST_MEMORY_BASELINE_NREGIONS)."""
MAX_MEM_SLOTS = 509
"""Slots advertised in GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS (as rust-vmm's backend)."""

# SET_VRING_KICK/CALL/ERR u64: bits 0-7 the vring index, bit 8 "no fd" (spec, SET_VRING_KICK).
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8


class FdRule(enum.Enum):
    """How many fds a request carries."""

    NONE = "no fd"
    ONE = "exactly one fd"
    OPTIONAL = "zero or one fd"
    PER_REGION = "one fd per memory region"
    NOFD_BIT = "one fd unless bit 8 of the u64 is set, then none"


class ReplyKind(enum.Enum):
    """The explicit reply a request has in the spec ("Communication"), or NONE."""

    NONE = "none"
    U64 = "u64"
    VRING_STATE = "vring state"
    CONFIG = "config space"
    INFLIGHT = "inflight description + fd"
    U64_ACK = "u64 status (always sent)"


Decoder = Callable[[bytes], p.Payload]
PayloadT = TypeVar("PayloadT", bound=p.Payload)


def empty_or_placeholder(data: bytes) -> p.Empty | p.U64:
    # QEMU sends these with no payload; some frontends send an ignored u64. Both are harmless.
    if len(data) == 8:
        return p.U64.decode(data)
    return p.Empty.decode(data)


@dataclass(frozen=True, kw_only=True)
class RequestSpec:
    """What one request carries: payload decoder, fd rule, explicit reply."""

    decode: Decoder
    fds: FdRule = FdRule.NONE
    reply: ReplyKind = ReplyKind.NONE


_E: Decoder = p.Empty.decode
_U64: Decoder = p.U64.decode
_STATE: Decoder = p.VringState.decode
_OPAQUE: Decoder = p.Opaque.decode

SPECS: dict[Request, RequestSpec] = {
    Request.GET_FEATURES: RequestSpec(decode=_E, reply=ReplyKind.U64),
    Request.SET_FEATURES: RequestSpec(decode=_U64),
    Request.SET_OWNER: RequestSpec(decode=_E),
    Request.RESET_OWNER: RequestSpec(decode=_E),
    Request.SET_MEM_TABLE: RequestSpec(decode=p.MemoryTable.decode, fds=FdRule.PER_REGION),
    Request.SET_LOG_BASE: RequestSpec(decode=p.LogDesc.decode, fds=FdRule.ONE, reply=ReplyKind.U64),
    Request.SET_LOG_FD: RequestSpec(decode=empty_or_placeholder, fds=FdRule.ONE),
    Request.SET_VRING_NUM: RequestSpec(decode=_STATE),
    Request.SET_VRING_ADDR: RequestSpec(decode=p.VringAddr.decode),
    Request.SET_VRING_BASE: RequestSpec(decode=_STATE),
    Request.GET_VRING_BASE: RequestSpec(decode=_STATE, reply=ReplyKind.VRING_STATE),
    Request.SET_VRING_KICK: RequestSpec(decode=_U64, fds=FdRule.NOFD_BIT),
    Request.SET_VRING_CALL: RequestSpec(decode=_U64, fds=FdRule.NOFD_BIT),
    Request.SET_VRING_ERR: RequestSpec(decode=_U64, fds=FdRule.NOFD_BIT),
    Request.GET_PROTOCOL_FEATURES: RequestSpec(decode=_E, reply=ReplyKind.U64),
    Request.SET_PROTOCOL_FEATURES: RequestSpec(decode=_U64),
    Request.GET_QUEUE_NUM: RequestSpec(decode=_E, reply=ReplyKind.U64),
    Request.SET_VRING_ENABLE: RequestSpec(decode=_STATE),
    Request.SEND_RARP: RequestSpec(decode=_U64),
    Request.NET_SET_MTU: RequestSpec(decode=_U64),
    Request.SET_BACKEND_REQ_FD: RequestSpec(decode=empty_or_placeholder, fds=FdRule.ONE),
    Request.IOTLB_MSG: RequestSpec(decode=p.IotlbMsg.decode, reply=ReplyKind.U64_ACK),
    Request.SET_VRING_ENDIAN: RequestSpec(decode=_STATE),
    Request.GET_CONFIG: RequestSpec(decode=p.ConfigSpace.decode, reply=ReplyKind.CONFIG),
    Request.SET_CONFIG: RequestSpec(decode=p.ConfigSpace.decode),
    # Never offered by this backend: decoded by name only, refused by the state table.
    Request.CREATE_CRYPTO_SESSION: RequestSpec(decode=_OPAQUE, reply=ReplyKind.U64),
    Request.CLOSE_CRYPTO_SESSION: RequestSpec(decode=_OPAQUE),
    Request.POSTCOPY_ADVISE: RequestSpec(decode=_OPAQUE, reply=ReplyKind.U64),
    Request.POSTCOPY_LISTEN: RequestSpec(decode=_OPAQUE),
    Request.POSTCOPY_END: RequestSpec(decode=_OPAQUE, reply=ReplyKind.U64_ACK),
    Request.GET_INFLIGHT_FD: RequestSpec(decode=p.InflightDesc.decode, reply=ReplyKind.INFLIGHT),
    Request.SET_INFLIGHT_FD: RequestSpec(decode=p.InflightDesc.decode, fds=FdRule.ONE),
    Request.GPU_SET_SOCKET: RequestSpec(decode=_OPAQUE, fds=FdRule.OPTIONAL),
    Request.RESET_DEVICE: RequestSpec(decode=_E),
    Request.VRING_KICK: RequestSpec(decode=_STATE),
    Request.GET_MAX_MEM_SLOTS: RequestSpec(decode=_E, reply=ReplyKind.U64),
    Request.ADD_MEM_REG: RequestSpec(decode=p.SingleMemoryRegion.decode, fds=FdRule.ONE),
    # Spec: REM_MEM_REG SHOULD carry no fd, MAY carry one, which the backend MUST close unused.
    Request.REM_MEM_REG: RequestSpec(decode=p.SingleMemoryRegion.decode, fds=FdRule.OPTIONAL),
    Request.SET_STATUS: RequestSpec(decode=_U64),
    Request.GET_STATUS: RequestSpec(decode=_E, reply=ReplyKind.U64),
    Request.GET_SHARED_OBJECT: RequestSpec(decode=_OPAQUE, reply=ReplyKind.U64),
    Request.SET_DEVICE_STATE_FD: RequestSpec(
        decode=p.DeviceStateTransfer.decode, fds=FdRule.OPTIONAL, reply=ReplyKind.U64
    ),
    Request.CHECK_DEVICE_STATE: RequestSpec(decode=_E, reply=ReplyKind.U64),
}


@dataclass(frozen=True, kw_only=True)
class RawMessage:
    """One framed message off the stream: header fields, payload bytes and the fds that came with it."""

    code: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return request_name(self.code)


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """One message for one ``sendmsg``; ``fds`` (rare) stay their owner's: sending duplicates them."""

    data: bytes
    fds: tuple[int, ...] = ()


def encode_message(code: int, payload: bytes = b"", *, flags: int = VERSION) -> bytes:
    """Header + payload, ready for one ``sendmsg``."""
    return HEADER.pack(code, flags, len(payload)) + payload


def check_fds(req: Request, payload: p.Payload, nfds: int) -> None:
    """Refuse a message whose fd count does not match its fd rule (raises FrontendProtocolError)."""
    rule = SPECS[req].fds
    if rule is FdRule.NONE:
        want: tuple[int, ...] = (0,)
    elif rule is FdRule.ONE:
        want = (1,)
    elif rule is FdRule.OPTIONAL:
        want = (0, 1)
    elif rule is FdRule.PER_REGION:
        assert isinstance(payload, p.MemoryTable)
        want = (len(payload.regions),)
    else:
        assert isinstance(payload, p.U64)
        want = (0,) if payload.value & VRING_NOFD_MASK else (1,)
    if nfds not in want:
        expected = " or ".join(str(w) for w in want)
        raise FrontendProtocolError(f"came with {nfds} fds, expected {expected} ({rule.value})")


def parse_request(msg: RawMessage) -> Request:
    """The request a message is, once its number and header flags are valid.

    Raises ``FrontendProtocolError`` (never fatal: the message was framed, so the stream survives)
    with ``request`` set.
    """
    name = msg.name
    try:
        req = Request(msg.code)
    except ValueError:
        raise FrontendProtocolError("not a request number of the vhost-user spec", request=name) from None
    if msg.flags & FLAG_REPLY:
        raise FrontendProtocolError("REPLY flag set on a request (only replies carry it)", request=name)
    if msg.flags & ~KNOWN_FLAGS:
        raise FrontendProtocolError(f"unknown header flag bits {msg.flags & ~KNOWN_FLAGS:#x}", request=name)
    return req


def extract_body(req: Request, msg: RawMessage, decode: Callable[[bytes], PayloadT]) -> PayloadT:
    """Decode ``req``'s payload with the layout its caller expects, and check its fd count.

    As rust-vmm's ``extract_request_body::<T>``: whoever handles the body names its type here, so
    decoder and handler cannot disagree. Raises ``FrontendProtocolError`` with ``request`` set.
    """
    try:
        payload = decode(msg.payload)
        # KICK/CALL/ERR: only bits 0-8 are defined (index and "no fd"); anything else is garbage.
        nofd_rule = SPECS[req].fds is FdRule.NOFD_BIT
        if nofd_rule and isinstance(payload, p.U64) and payload.value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise FrontendProtocolError(f"u64 {payload.value:#x} has bits above 8 set")
        check_fds(req, payload, len(msg.fds))
    except FrontendProtocolError as err:
        raise FrontendProtocolError(err.reason, request=msg.name) from None
    return payload


def decode_request(msg: RawMessage) -> tuple[Request, p.Payload]:
    """Validate a request's header flags, payload syntax (by ``SPECS``) and fd count."""
    req = parse_request(msg)
    return req, extract_body(req, msg, SPECS[req].decode)
