"""The frontend side of vhost-user, I/O-free: encode requests (with fds), parse the backend's replies.

This module owns ``FrontendConnection``, what QEMU does on its end of the socket, so tests and a
Python frontend can drive a backend: each request method returns an ``Outgoing`` (bytes + fds for
one ``sendmsg``) and records which reply, if any, it expects; ``receive_data`` frames the backend's
bytes and returns ``Reply`` objects in order, raising ``BackendProtocolError`` for a reply the spec
does not allow (wrong version, missing REPLY flag, unexpected request, wrong size). Fds that come
with a reply are handed over in ``Reply.fds``; fds of a refused reply go to ``fds_to_close()``.
The fds passed *to* request methods stay the caller's: sending duplicates them into the peer.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nicsim.vhost import features as f
from nicsim.vhost import payloads as p
from nicsim.vhost.errors import BackendProtocolError, FrontendProtocolError, LocalProtocolError
from nicsim.vhost.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    SPECS,
    VERSION,
    VERSION_MASK,
    VRING_NOFD_MASK,
    Outgoing,
    ReplyKind,
    Request,
    encode_message,
)
from nicsim.vhost.reader import MessageReader


@dataclass(frozen=True, kw_only=True)
class Reply:
    """One reply. ``payload`` is None for an error reply (an empty payload where a body was due)."""

    request: Request
    payload: p.Payload | None
    fds: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        """False for an empty error reply or a non-zero REPLY_ACK / u64 status."""
        if self.payload is None:
            return False
        return not (self.is_ack and isinstance(self.payload, p.U64) and self.payload.value != 0)

    @property
    def is_ack(self) -> bool:
        return SPECS[self.request].reply in (ReplyKind.NONE, ReplyKind.U64_ACK)

    @property
    def value(self) -> int:
        """The u64 of a u64 reply (raises ``LocalProtocolError`` for other replies)."""
        if not isinstance(self.payload, p.U64):
            raise LocalProtocolError(f"{self.request.name} reply is not a u64")
        return self.payload.value


_DECODERS: dict[ReplyKind, Callable[[bytes], p.Payload]] = {
    ReplyKind.NONE: p.U64.decode,  # a REPLY_ACK
    ReplyKind.U64: p.U64.decode,
    ReplyKind.U64_ACK: p.U64.decode,
    ReplyKind.VRING_STATE: p.VringState.decode,
    ReplyKind.CONFIG: p.ConfigSpace.decode,
    ReplyKind.INFLIGHT: p.InflightDesc.decode,
}


class FrontendConnection:
    """Encodes requests and parses replies for one connection to a backend."""

    def __init__(self) -> None:
        self._reader = MessageReader()
        self._expected: deque[Request] = deque()
        self._close: list[int] = []
        self.reply_ack = False  # set once SET_PROTOCOL_FEATURES included REPLY_ACK

    @property
    def replies_pending(self) -> int:
        """Replies still owed by the backend."""
        return len(self._expected)

    def request(
        self,
        req: Request,
        payload: p.Payload | None = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> Outgoing:
        """Encode one request; expect its explicit reply, or a REPLY_ACK if ``need_reply``."""
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        body = payload.encode() if payload is not None else b""
        if SPECS[req].reply is not ReplyKind.NONE or (need_reply and self.reply_ack):
            self._expected.append(req)
        return Outgoing(data=encode_message(int(req), body, flags=flags), fds=tuple(fds))

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> list[Reply]:
        """Feed bytes from the backend; return every complete reply in order."""
        self._reader.feed(data, fds)
        out: list[Reply] = []
        while True:
            try:
                msg = self._reader.next_message()
            except FrontendProtocolError as err:  # the reader's framing errors, seen from this side
                self._close.extend(self._reader.close())
                raise BackendProtocolError(err.reason, request=err.request) from None
            if msg is None:
                return out
            try:
                out.append(self._decode(msg.code, msg.flags, msg.payload, msg.fds))
            except BackendProtocolError:
                self._close.extend(msg.fds)
                raise

    def _decode(self, code: int, flags: int, body: bytes, fds: tuple[int, ...]) -> Reply:
        if not self._expected:
            raise BackendProtocolError(f"unexpected reply with request number {code}")
        req = self._expected.popleft()
        if code != req:
            raise BackendProtocolError(
                f"reply has request number {code}, expected {int(req)}", request=req.name
            )
        if flags & VERSION_MASK != VERSION or not flags & FLAG_REPLY:
            raise BackendProtocolError(f"reply flags {flags:#x} lack version 1 or REPLY", request=req.name)
        kind = SPECS[req].reply
        want_fds = 1 if kind is ReplyKind.INFLIGHT and body else 0
        if len(fds) != want_fds:
            raise BackendProtocolError(
                f"reply came with {len(fds)} fds, expected {want_fds}", request=req.name
            )
        if not body and kind not in (ReplyKind.NONE, ReplyKind.U64_ACK):
            return Reply(request=req, payload=None)
        try:
            payload = _DECODERS[kind](body)
        except FrontendProtocolError as err:
            raise BackendProtocolError(err.reason, request=req.name) from None
        return Reply(request=req, payload=payload, fds=fds)

    def fds_to_close(self) -> list[int]:
        """Fds that came with refused replies or were left at ``close()``."""
        out, self._close = self._close, []
        return out

    def close(self) -> None:
        self._close.extend(self._reader.close())

    # --- one method per request (QEMU's names) -------------------------------------------------

    def get_features(self) -> Outgoing:
        return self.request(Request.GET_FEATURES)

    def set_features(self, features: int, *, need_reply: bool = False) -> Outgoing:
        return self.request(Request.SET_FEATURES, p.U64(value=features), need_reply=need_reply)

    def set_owner(self) -> Outgoing:
        return self.request(Request.SET_OWNER)

    def reset_owner(self) -> Outgoing:
        return self.request(Request.RESET_OWNER)

    def get_protocol_features(self) -> Outgoing:
        return self.request(Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> Outgoing:
        out = self.request(Request.SET_PROTOCOL_FEATURES, p.U64(value=features))
        self.reply_ack = f.has(features, f.VHOST_USER_PROTOCOL_F_REPLY_ACK)
        return out

    def get_queue_num(self) -> Outgoing:
        return self.request(Request.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> Outgoing:
        return self.request(Request.GET_MAX_MEM_SLOTS)

    def set_mem_table(
        self, regions: Sequence[p.MemoryRegionDesc], fds: Sequence[int], *, need_reply: bool = False
    ) -> Outgoing:
        table = p.MemoryTable(regions=tuple(regions))
        return self.request(Request.SET_MEM_TABLE, table, fds=fds, need_reply=need_reply)

    def add_mem_reg(self, region: p.MemoryRegionDesc, fd: int, *, need_reply: bool = False) -> Outgoing:
        body = p.SingleMemoryRegion(region=region)
        return self.request(Request.ADD_MEM_REG, body, fds=(fd,), need_reply=need_reply)

    def rem_mem_reg(self, region: p.MemoryRegionDesc, *, need_reply: bool = False) -> Outgoing:
        return self.request(Request.REM_MEM_REG, p.SingleMemoryRegion(region=region), need_reply=need_reply)

    def set_log_base(self, mmap_size: int, mmap_offset: int, fd: int) -> Outgoing:
        body = p.LogDesc(mmap_size=mmap_size, mmap_offset=mmap_offset)
        return self.request(Request.SET_LOG_BASE, body, fds=(fd,))

    def set_log_fd(self, fd: int) -> Outgoing:
        return self.request(Request.SET_LOG_FD, fds=(fd,))

    def set_vring_num(self, index: int, num: int, *, need_reply: bool = False) -> Outgoing:
        return self.request(Request.SET_VRING_NUM, p.VringState(index=index, num=num), need_reply=need_reply)

    def set_vring_base(self, index: int, base: int, *, need_reply: bool = False) -> Outgoing:
        return self.request(
            Request.SET_VRING_BASE, p.VringState(index=index, num=base), need_reply=need_reply
        )

    def get_vring_base(self, index: int) -> Outgoing:
        return self.request(Request.GET_VRING_BASE, p.VringState(index=index, num=0))

    def set_vring_addr(
        self,
        index: int,
        *,
        desc: int,
        used: int,
        avail: int,
        log: int = 0,
        flags: int = 0,
        need_reply: bool = False,
    ) -> Outgoing:
        addr = p.VringAddr(index=index, flags=flags, desc_user_addr=desc, used_user_addr=used,
                           avail_user_addr=avail, log_guest_addr=log)  # fmt: skip
        return self.request(Request.SET_VRING_ADDR, addr, need_reply=need_reply)

    def _vring_fd(self, req: Request, index: int, fd: int | None, need_reply: bool) -> Outgoing:
        value = index | (VRING_NOFD_MASK if fd is None else 0)
        fds = () if fd is None else (fd,)
        return self.request(req, p.U64(value=value), fds=fds, need_reply=need_reply)

    def set_vring_kick(self, index: int, fd: int | None, *, need_reply: bool = False) -> Outgoing:
        return self._vring_fd(Request.SET_VRING_KICK, index, fd, need_reply)

    def set_vring_call(self, index: int, fd: int | None, *, need_reply: bool = False) -> Outgoing:
        return self._vring_fd(Request.SET_VRING_CALL, index, fd, need_reply)

    def set_vring_err(self, index: int, fd: int | None, *, need_reply: bool = False) -> Outgoing:
        return self._vring_fd(Request.SET_VRING_ERR, index, fd, need_reply)

    def set_vring_enable(self, index: int, enabled: bool, *, need_reply: bool = False) -> Outgoing:
        body = p.VringState(index=index, num=int(enabled))
        return self.request(Request.SET_VRING_ENABLE, body, need_reply=need_reply)

    def set_vring_endian(self, index: int, big_endian: bool) -> Outgoing:
        return self.request(Request.SET_VRING_ENDIAN, p.VringState(index=index, num=int(big_endian)))

    def send_rarp(self, mac: bytes) -> Outgoing:
        (value,) = struct.unpack("=Q", mac[:6].ljust(8, b"\0"))
        return self.request(Request.SEND_RARP, p.U64(value=value))

    def net_set_mtu(self, mtu: int, *, need_reply: bool = False) -> Outgoing:
        return self.request(Request.NET_SET_MTU, p.U64(value=mtu), need_reply=need_reply)

    def set_backend_req_fd(self, fd: int, *, need_reply: bool = False) -> Outgoing:
        return self.request(Request.SET_BACKEND_REQ_FD, fds=(fd,), need_reply=need_reply)

    def iotlb_msg(self, msg: p.IotlbMsg) -> Outgoing:
        return self.request(Request.IOTLB_MSG, msg)

    def get_config(self, offset: int, size: int) -> Outgoing:
        cfg = p.ConfigSpace(offset=offset, size=size, flags=0, payload=bytes(size))
        return self.request(Request.GET_CONFIG, cfg)

    def set_config(self, offset: int, data: bytes, *, migration: bool = False) -> Outgoing:
        cfg = p.ConfigSpace(offset=offset, size=len(data), flags=int(migration), payload=data)
        return self.request(Request.SET_CONFIG, cfg)

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> Outgoing:
        desc = p.InflightDesc(mmap_size=0, mmap_offset=0, num_queues=num_queues, queue_size=queue_size)
        return self.request(Request.GET_INFLIGHT_FD, desc)

    def set_inflight_fd(self, desc: p.InflightDesc, fd: int) -> Outgoing:
        return self.request(Request.SET_INFLIGHT_FD, desc, fds=(fd,))

    def set_status(self, status: int, *, need_reply: bool = False) -> Outgoing:
        return self.request(Request.SET_STATUS, p.U64(value=status), need_reply=need_reply)

    def get_status(self) -> Outgoing:
        return self.request(Request.GET_STATUS)
