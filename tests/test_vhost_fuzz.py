"""Random message sequences, payloads, fd counts and chunkings never crash the backend or lose an fd.

The connection never touches an fd (it only passes numbers around), so unique integers stand in for
fds here; the fd tests with real fds are in ``test_vhost_connection``.
"""

from __future__ import annotations

import itertools
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from nicsim.vhost import BackendConnection, ConnectionState, LocalProtocolError, Request
from nicsim.vhost.protocol import FLAG_NEED_REPLY, HEADER_SIZE, VERSION, encode_message
from tests.test_vhost_codec import SAMPLES
from tests.test_vhost_support import fds_in

_valid = st.builds(
    lambda req, need, extra: encode_message(
        int(req), SAMPLES[req][0].encode(), flags=VERSION | (FLAG_NEED_REPLY if need else 0)
    ),
    st.sampled_from(list(Request)),
    st.booleans(),
    st.none(),
)
_header_garbage = st.builds(
    lambda code, flags, body: struct.pack("=III", code, flags, len(body)) + body,
    st.integers(0, 60),
    st.sampled_from([VERSION, VERSION | FLAG_NEED_REPLY, VERSION | 4, VERSION | 0x100, 0, 2, 3]),
    st.binary(max_size=80),
)
_raw_bytes = st.binary(min_size=1, max_size=40)
_message = st.one_of(_valid, _valid, _header_garbage, _raw_bytes)


@st.composite
def _stream(draw: st.DrawFn) -> list[tuple[bytes, int]]:
    """Chunks of a stream, each with a number of fds to attach."""
    data = b"".join(draw(st.lists(_message, min_size=1, max_size=12)))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # truncated mid-message or mid-header
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(data))), max_size=8)))
    chunks = [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)]) if b > a]
    return [(c, draw(st.integers(0, 3))) for c in chunks]


@settings(max_examples=int(os.environ.get("NICSIM_FUZZ_EXAMPLES", "300")), deadline=None)
@given(stream=_stream(), handshake=st.booleans())
def test_random_streams_never_crash_and_account_for_every_fd(
    stream: list[tuple[bytes, int]], handshake: bool
) -> None:
    conn = BackendConnection(config_space=True)  # the fuzzer reaches GET/SET_CONFIG too
    given_fds: list[int] = []
    handed: list[int] = []
    counter = itertools.count(1000)
    if handshake:
        for req in (Request.SET_PROTOCOL_FEATURES, Request.SET_OWNER, Request.SET_FEATURES):
            payload = SAMPLES[req][0].encode()
            conn.receive_data(encode_message(int(req), payload))
    for data, nfds in stream:
        fds = [next(counter) for _ in range(nfds)]
        given_fds += fds
        try:
            evs = conn.receive_data(data, fds)
        except LocalProtocolError:
            assert conn.state is ConnectionState.CLOSED
            continue
        for e in evs:
            handed += fds_in(e)
        for out in conn.data_to_send():
            assert out.data[:HEADER_SIZE] and not out.fds
    conn.close()
    handed += conn.fds_to_close()
    assert sorted(handed) == sorted(given_fds)
