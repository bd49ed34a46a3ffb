"""Differential fuzzing of the vhost-user backend parser: one message stream, fed several ways, must
give the same events, the same replies and the same fds back.

``test_vhost_fuzz`` checks that random streams never crash and that every fd comes back *somewhere*.
This file adds what it does not cover: the same stream of valid and broken messages (wrong payload
sizes, wrong fd counts, unknown codes and flags, fatal headers) fed all at once (chunked as Linux
delivers SCM_RIGHTS: a ``recvmsg`` ends after the one send whose fds it returns), byte by byte,
``bytes_wanted`` at a time (what the server does), at random cuts, and with a trailing partial message
must produce identical events and replies (fed three ways, as h11's ``test_io.py`` does); and every fd
ends up in the event of the message it came with or in ``fds_to_close()``, exactly once.

The connection never touches an fd, so unique integers stand in for fds. ``NICSIM_FUZZ_EXAMPLES``
(or ``scripts/fuzz.py --examples N``) sets the budget.
"""

from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nicsim.vhost import BackendConnection, ConnectionState, Event, LocalProtocolError, Request
from nicsim.vhost import features as f
from nicsim.vhost.protocol import (
    FLAG_NEED_REPLY,
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD_SIZE,
    VERSION,
    encode_message,
)
from tests.test_vhost_codec import SAMPLES
from tests.test_vhost_support import fds_in

EXAMPLES = int(os.environ.get("NICSIM_FUZZ_EXAMPLES", "150"))
"""Hypothesis budget; ``scripts/fuzz.py --examples N`` raises it for long runs."""


@dataclass(frozen=True)
class Msg:
    data: bytes
    nfds: int


def _handshake() -> list[Msg]:
    """What makes most requests legal: protocol features (all offered), owner, features."""
    conn = BackendConnection()
    out = []
    for req, value in (
        (Request.SET_PROTOCOL_FEATURES, conn.offered_protocol_features),
        (Request.SET_OWNER, None),
        (Request.SET_FEATURES, f.DEFAULT_VIRTIO_FEATURES),
    ):
        payload = b"" if value is None else struct.pack("=Q", value)
        out.append(Msg(encode_message(int(req), payload), 0))
    return out


@st.composite
def messages(draw: st.DrawFn) -> Msg:
    req = draw(st.sampled_from(list(Request)))
    payload, nfds = SAMPLES[req][0].encode(), SAMPLES[req][1]
    flags = VERSION | (FLAG_NEED_REPLY if draw(st.booleans()) else 0)
    code = int(req)
    mutation = draw(
        st.sampled_from(["none", "none", "none", "fds", "short", "long", "code", "flags", "fatal"])
    )
    if mutation == "fds":
        nfds = draw(st.integers(0, MAX_FDS + 2))
    elif mutation == "short" and payload:
        payload = payload[: draw(st.integers(0, len(payload) - 1))]
    elif mutation == "long":
        payload += draw(st.binary(min_size=1, max_size=16))
    elif mutation == "code":
        code = draw(st.one_of(st.integers(0, 60), st.integers(0, 0xFFFF_FFFF)))
    elif mutation == "flags":
        flags = draw(st.sampled_from([VERSION | 4, VERSION | 0x100, VERSION | 0x80000000]))
    elif mutation == "fatal":
        if draw(st.booleans()):
            flags = draw(st.sampled_from([0, 2, 3]))
        else:
            return Msg(struct.pack("=III", code, flags, MAX_PAYLOAD_SIZE + 1), nfds)
    return Msg(struct.pack("=III", code, flags, len(payload)) + payload, nfds)


Chunks = list[tuple[bytes, list[int]]]


def _fd_lists(msgs: list[Msg]) -> list[list[int]]:
    counter = itertools.count(1000)
    return [[next(counter) for _ in range(m.nfds)] for m in msgs]


def linux_chunks(msgs: list[Msg], fds: list[list[int]]) -> Chunks:
    """All at once, as a big recvmsg returns it: fd-less messages glued to the next fd-carrying one,
    which ends the read."""
    out: Chunks = []
    buf = b""
    for m, fl in zip(msgs, fds, strict=True):
        buf += m.data
        if fl:
            out.append((buf, fl))
            buf = b""
    if buf:
        out.append((buf, []))
    return out


def byte_chunks(msgs: list[Msg], fds: list[list[int]]) -> Chunks:
    out: Chunks = []
    for m, fl in zip(msgs, fds, strict=True):
        out += [(m.data[i : i + 1], fl if i == 0 else []) for i in range(len(m.data))]
    return out


def cut_chunks(msgs: list[Msg], fds: list[list[int]], cuts: list[int]) -> Chunks:
    """Random cuts, plus the cuts a Unix socket always makes: a read never runs past the start of
    the message after one that carries fds."""
    starts = list(itertools.accumulate([0] + [len(m.data) for m in msgs]))
    data = b"".join(m.data for m in msgs)
    forced = {starts[i + 1] for i, fl in enumerate(fds) if fl}
    bounds = sorted({0, len(data), *forced, *(c for c in cuts if 0 < c < len(data))})
    out: Chunks = []
    for a, b in itertools.pairwise(bounds):
        fl = [fd for i, f_ in enumerate(fds) if a <= starts[i] < b and len(msgs[i].data) for fd in f_]
        out.append((data[a:b], fl))
    # A message of zero bytes cannot exist (a header is 12), so every fd list was placed above.
    return out


def _fds_at_starts(msgs: list[Msg], fds: list[list[int]]) -> dict[int, list[int]]:
    starts = itertools.accumulate([0] + [len(m.data) for m in msgs])
    return {s: fl for s, fl in zip(starts, fds, strict=False) if fl}


@dataclass
class Outcome:
    events: list[Event]
    replies: list[tuple[bytes, tuple[int, ...]]]
    closed: list[int]
    state: ConnectionState


def run(chunks: Chunks, *, wanted: dict[int, list[int]] | None = None) -> Outcome:
    """Feed ``chunks`` and collect everything that comes out. With ``wanted`` (stream offset of each
    message's first byte -> its fds), read the chunks' bytes as the server does instead: at most
    ``bytes_wanted`` at a time, each message's fds with its first byte."""
    conn = BackendConnection(inflight_shmfd=True, config_space=True, queue_pairs=2)
    events: list[Event] = []
    replies: list[tuple[bytes, tuple[int, ...]]] = []
    closed: list[int] = []
    at = dict(wanted or {})

    def feed(data: bytes, fl: list[int]) -> None:
        try:
            events.extend(conn.receive_data(data, fl))
        except LocalProtocolError:
            assert conn.state is ConnectionState.CLOSED  # the only way receive_data raises
        replies.extend((o.data, o.fds) for o in conn.data_to_send())
        closed.extend(conn.fds_to_close())

    if (
        wanted is not None
    ):  # the server's loop: read at most bytes_wanted; fds come with a message's first byte
        data = b"".join(c for c, _ in chunks)
        pos = 0
        while pos < len(data):
            n = 1 if conn.state is ConnectionState.CLOSED else conn.bytes_wanted
            feed(data[pos : pos + n], at.pop(pos, []))
            pos += n
    else:
        for c, fl in chunks:
            feed(c, fl)
    conn.close()
    closed.extend(conn.fds_to_close())
    return Outcome(events, replies, sorted(closed), conn.state)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    handshake=st.booleans(),
    body=st.lists(messages(), min_size=1, max_size=14),
    cuts=st.lists(st.integers(1, 4000), max_size=10),
    trailing=st.one_of(
        st.just(b""),
        st.binary(min_size=1, max_size=HEADER_SIZE - 1),
        st.builds(
            lambda n, body: struct.pack("=III", 1, VERSION, n) + body[: n - 1],
            st.integers(1, 40),
            st.binary(max_size=40),
        ),
    ),
    trailing_fds=st.integers(0, 3),
)
def test_the_same_stream_fed_any_way_gives_the_same_events_replies_and_fds(
    handshake: bool, body: list[Msg], cuts: list[int], trailing: bytes, trailing_fds: int
) -> None:
    msgs = (_handshake() if handshake else []) + body
    fds = _fd_lists(msgs)
    given_fds = sorted(fd for fl in fds for fd in fl)
    whole = run(linux_chunks(msgs, fds))
    for way, outcome in (
        ("byte by byte", run(byte_chunks(msgs, fds))),
        ("bytes_wanted", run(linux_chunks(msgs, fds), wanted=_fds_at_starts(msgs, fds))),
        ("random cuts", run(cut_chunks(msgs, fds, cuts))),
    ):
        assert outcome.events == whole.events, way
        assert outcome.replies == whole.replies, way
        assert outcome.closed == whole.closed, way
        assert outcome.state is whole.state, way

    # Every fd exactly once: in an event or given back.
    handed = sorted(fd for e in whole.events for fd in fds_in(e))
    assert sorted(handed + whole.closed) == given_fds

    # A partial message at the end (with its own fds) adds no event and returns its fds at close.
    extra = list(range(9000, 9000 + trailing_fds)) if trailing else []
    tail = linux_chunks(msgs, fds) + ([(trailing, extra)] if trailing else [])
    with_tail = run(tail)
    assert with_tail.events == whole.events and with_tail.replies == whole.replies
    assert with_tail.closed == sorted(whole.closed + extra)


@settings(max_examples=EXAMPLES, deadline=None)
@given(handshake=st.booleans(), body=st.lists(messages(), min_size=1, max_size=14))
def test_each_message_hands_over_exactly_its_own_fds(handshake: bool, body: list[Msg]) -> None:
    # Feeding one message per call attributes events to messages: an event may carry only fds that
    # came with its own message, and a refused message's fds all go to fds_to_close() at once.
    msgs = (_handshake() if handshake else []) + body
    fds = _fd_lists(msgs)
    conn = BackendConnection(inflight_shmfd=True, config_space=True, queue_pairs=2)
    for m, fl in zip(msgs, fds, strict=True):
        try:
            evs = conn.receive_data(m.data, fl)
        except LocalProtocolError:
            assert conn.state is ConnectionState.CLOSED
            assert sorted(conn.fds_to_close()) == sorted(fl)
            continue
        conn.data_to_send()
        handed = [fd for e in evs for fd in fds_in(e)]
        back = conn.fds_to_close()
        assert sorted(handed + back) == sorted(fl), f"message {m.data[:12].hex()}"
    conn.close()
    assert conn.fds_to_close() == []
