"""The replies of one backend connection: queued in request order, acks settled at flush time.

This module owns ``ReplyQueue``: the replies ``BackendConnection`` owes the frontend since the
last ``data_to_send()``, and which events each REPLY_ACK answers for, so that ``reject(event)``
can turn the ack of a message the server failed to apply into a failure before it is sent. A
refused message gets the failure form its request has (spec "Communication"): a u64 status, an
empty payload for a reply with no failure form, or a failed REPLY_ACK when one was requested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nicsim.vhost import events as ev
from nicsim.vhost import payloads as p
from nicsim.vhost.protocol import FLAG_REPLY, SPECS, VERSION, Outgoing, ReplyKind, Request, encode_message


@dataclass(kw_only=True)
class _Pending:
    """A queued reply; an ack can still turn into a failure through ``reject``."""

    code: int
    payload: bytes = b""
    fds: tuple[int, ...] = ()
    ack: bool = False  # a REPLY_ACK: payload is u64 0/1, decided at flush time
    ok: bool = True


class ReplyQueue:
    """Replies in request order, and the events returned since the last flush."""

    def __init__(self) -> None:
        self._out: list[_Pending] = []
        # Events returned since the last flush, by id, kept alive so ids stay unique.
        self._unflushed: dict[int, tuple[ev.Event, _Pending | None]] = {}

    def answer(
        self,
        code: int,
        events: Sequence[ev.Event],
        *,
        reply: p.Payload | None,
        reply_fds: tuple[int, ...] = (),
        ack: bool,
    ) -> None:
        """A handled request: its explicit reply if it has one, else a REPLY_ACK if ``ack``."""
        pend = None
        if reply is not None:
            pend = _Pending(code=code, payload=reply.encode(), fds=reply_fds)
        elif ack:
            pend = _Pending(code=code, ack=True)
        if pend is not None:
            self._out.append(pend)
        for e in events:
            self._unflushed[id(e)] = (e, pend if pend is not None and pend.ack else None)

    def refuse(self, code: int, error: ev.ProtocolErrorOccurred, *, wants_ack: bool) -> None:
        """A refused request (``code`` may be no request at all): queue its failure form, if any."""
        self._unflushed[id(error)] = (error, None)
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

    def reject(self, event: ev.Event) -> bool | None:
        """Fail the ack ``event`` answers for; False if it has none, None if ``event`` is not ours."""
        entry = self._unflushed.get(id(event))
        if entry is None or entry[0] is not event:
            return None
        pend = entry[1]
        if pend is None:
            return False
        pend.ok = False
        return True

    def flush(self) -> list[Outgoing]:
        """Every queued reply, encoded, in request order; the events returned so far are settled."""
        out = []
        for pend in self._out:
            payload = p.U64(value=0 if pend.ok else 1).encode() if pend.ack else pend.payload
            data = encode_message(pend.code, payload, flags=VERSION | FLAG_REPLY)
            out.append(Outgoing(data=data, fds=pend.fds))
        self._out.clear()
        self._unflushed.clear()
        return out
