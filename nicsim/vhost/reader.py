"""Framing: cut a byte stream with attached fds into vhost-user messages.

This module owns the receive buffer and the rule that ties fds to messages. On a Unix stream
socket SCM_RIGHTS fds travel with the ``sendmsg`` that carried them, i.e. with the first byte of
a vhost-user message (QEMU sends each message, fds included, in one ``sendmsg``). Linux may glue
fd-less data and then *one* fd-carrying send into a single ``recvmsg``, and stops right after the
send whose fds it returned. So the rule is: **fds fed with a chunk belong to the last message that
starts inside that chunk; if no message starts inside it, to the message in progress.** A reader
that asks for at most ``bytes_wanted`` bytes per read never depends on the rule.
Fds are held here until their message is complete, then travel with it in ``RawMessage.fds``;
``close()`` gives back whatever is still held. Only a bad header version or an oversize length is
fatal (the stream cannot be resynchronised); everything else is left to ``protocol``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from nicsim.vhost.errors import FrontendProtocolError
from nicsim.vhost.protocol import (
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    VERSION,
    VERSION_MASK,
    RawMessage,
    request_name,
)


@dataclass(slots=True)
class _FdBatch:
    start: int  # stream offset of the first byte of the chunk the fds came with
    length: int  # that chunk's length (at least 1)
    fds: list[int]


class MessageReader:
    """Accumulates bytes and fds; ``next_message()`` yields complete messages in order.

    Used on both sides: the backend frames requests, the frontend frames replies.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD_SIZE) -> None:
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._batches: deque[_FdBatch] = deque()
        self._max_payload = max_payload
        self._dead = False

    @property
    def dead(self) -> bool:
        """True after a fatal framing error: nothing more will be parsed."""
        return self._dead

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as a message."""
        return len(self._buf)

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes complete the current header or message (never 0).

        A server that reads at most this many bytes per ``recvmsg`` always gets a message's fds in
        the same read as that message's first byte.
        """
        if len(self._buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buf)
        size: int = HEADER.unpack_from(self._buf)[2]
        return max(1, HEADER_SIZE + size - len(self._buf))

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Append a chunk and the fds received with it (the reader holds them from now on)."""
        if fds:
            self._batches.append(_FdBatch(self._base + len(self._buf), max(1, len(data)), list(fds)))
        self._buf += data

    def next_message(self) -> RawMessage | None:
        """The next complete message, or None if more bytes are needed.

        Raises a fatal ``FrontendProtocolError`` on a header that cannot be trusted for framing;
        the reader is dead afterwards and ``close()`` returns the fds it still holds.
        """
        if self._dead or len(self._buf) < HEADER_SIZE:
            return None
        code, flags, size = HEADER.unpack_from(self._buf)
        if flags & VERSION_MASK != VERSION:
            self._dead = True
            raise FrontendProtocolError(
                f"header version {flags & VERSION_MASK} is not {VERSION}: the stream is not vhost-user",
                request=request_name(code),
                fatal=True,
                code=code,
            )
        if size > self._max_payload:
            self._dead = True
            raise FrontendProtocolError(
                f"payload size {size} exceeds the {self._max_payload}-byte limit",
                request=request_name(code),
                fatal=True,
                code=code,
            )
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            return None
        start = self._base
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        self._base += end
        return RawMessage(code=code, flags=flags, payload=payload, fds=tuple(self._claim(start, start + end)))

    def _claim(self, m_start: int, m_end: int) -> list[int]:
        fds: list[int] = []
        while self._batches:
            b = self._batches[0]
            b_end = b.start + b.length
            # The last message starting in the chunk is the one that reaches the chunk's end.
            starts_here = b.start <= m_start < b_end and m_end >= b_end
            inside = b.start > m_start and b_end <= m_end
            stale = b_end <= m_start  # cannot happen with the rules above; never strand fds
            if not (starts_here or inside or stale):
                # The batch belongs to a later message (one starting after this one in its chunk).
                break
            fds.extend(b.fds)
            self._batches.popleft()
        return fds

    def close(self) -> list[int]:
        """Stop parsing; return every fd still held (partial message, unclaimed batches)."""
        self._dead = True
        out = [fd for b in self._batches for fd in b.fds]
        self._batches.clear()
        self._buf.clear()
        return out
