"""The transition tables: every (state, request) and (ring phase, ring request) pair is legal
exactly when its table says so, and then leads where the table says."""

from __future__ import annotations

import os

import pytest

from nicsim.vhost import (
    BackendConnection,
    ConnectionState,
    IdleDevice,
    InflightBuffer,
    LocalProtocolError,
    ProtocolErrorOccurred,
    Request,
    RingPhase,
)
from nicsim.vhost import features as f
from nicsim.vhost import payloads as p
from nicsim.vhost.connection import ROUTES
from nicsim.vhost.protocol import SPECS, VERSION, encode_message
from nicsim.vhost.state import EVERY_RING, GATES, RING_REQUESTS, RING_TRANSITIONS, SUPPORTED, TRANSITIONS
from nicsim.virtio.features import VIRTIO_F_ACCESS_PLATFORM
from tests.test_vhost_codec import SAMPLES
from tests.test_vhost_support import REGION, REGION2, Link, close_originals, new_fd, no_fd_leak

S = ConnectionState
R = Request
ALL_VIRTIO = f.DEFAULT_VIRTIO_FEATURES | f.bit(VIRTIO_F_ACCESS_PLATFORM)
ALL_PROTOCOL = f.DEFAULT_PROTOCOL_FEATURES | f.mask(
    (
        f.VHOST_USER_PROTOCOL_F_LOG_SHMFD,
        f.VHOST_USER_PROTOCOL_F_RARP,
        f.VHOST_USER_PROTOCOL_F_NET_MTU,
        f.VHOST_USER_PROTOCOL_F_BACKEND_REQ,
        f.VHOST_USER_PROTOCOL_F_CROSS_ENDIAN,
        f.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD,
        f.VHOST_USER_PROTOCOL_F_CONFIG,
    )
)
RING = p.VringAddr(
    index=0,
    flags=0,
    desc_user_addr=REGION.user_addr,
    used_user_addr=REGION.user_addr + 0x2000,
    avail_user_addr=REGION.user_addr + 0x1000,
    log_guest_addr=0,
)

# Payloads that are legal whenever the request is (samples fitted to the state built below).
PAYLOADS: dict[Request, tuple[p.Payload, int]] = SAMPLES | {
    R.SET_FEATURES: (p.U64(value=ALL_VIRTIO), 0),
    R.SET_PROTOCOL_FEATURES: (p.U64(value=ALL_PROTOCOL), 0),
    R.SET_MEM_TABLE: (p.MemoryTable(regions=(REGION,)), 1),
    R.SET_VRING_ADDR: (RING, 0),
    R.SET_VRING_KICK: (p.U64(value=0), 1),
    R.SET_VRING_ERR: (p.U64(value=0), 1),
    R.SET_VRING_ENABLE: (p.VringState(index=0, num=1), 0),
    R.SET_VRING_NUM: (p.VringState(index=0, num=256), 0),
    R.ADD_MEM_REG: (p.SingleMemoryRegion(region=REGION2), 1),
    R.REM_MEM_REG: (p.SingleMemoryRegion(region=REGION), 0),
}


class WalkDevice(IdleDevice):
    def __init__(self) -> None:
        super().__init__(config=bytes(16))
        self.inflight = os.memfd_create("inflight")

    def get_inflight_fd(self, *, num_queues: int, queue_size: int) -> InflightBuffer | None:
        return InflightBuffer(fd=self.inflight, mmap_size=4096)


def _send(link: Link, req: Request) -> list[object]:
    payload, nfds = PAYLOADS[req]
    fds = [new_fd() for _ in range(nfds)]
    evs = link.send(link.frontend.request(req, payload, fds=fds))
    for fd in fds:
        os.close(fd)
    return list(evs)


def _connection_in(state: ConnectionState, device: WalkDevice) -> Link:
    link = Link(BackendConnection(device=device, features=ALL_VIRTIO, protocol_features=ALL_PROTOCOL))
    steps = {
        S.CONNECTED: [R.SET_PROTOCOL_FEATURES],
        S.OWNED: [R.SET_PROTOCOL_FEATURES, R.SET_OWNER],
        S.NEGOTIATED: [R.SET_PROTOCOL_FEATURES, R.SET_OWNER, R.SET_FEATURES],
        S.READY: [
            R.SET_PROTOCOL_FEATURES,
            R.SET_OWNER,
            R.SET_FEATURES,
            R.SET_MEM_TABLE,
            R.SET_VRING_NUM,
            R.SET_VRING_ADDR,
        ],
    }[state]
    for req in steps:
        assert not [e for e in _send(link, req) if isinstance(e, ProtocolErrorOccurred)]
    assert link.backend.state is state
    link.backend.data_to_send()
    return link


def _settle(link: Link, device: WalkDevice) -> None:
    for out in link.backend.data_to_send():
        assert not out.fds or out.fds == (device.inflight,)
    link.settle()
    os.close(device.inflight)
    close_originals()


OPEN_STATES = [S.CONNECTED, S.OWNED, S.NEGOTIATED, S.READY]


@pytest.mark.parametrize("req", list(Request), ids=lambda r: r.name)
@pytest.mark.parametrize("state", OPEN_STATES, ids=lambda s: s.name)
def test_every_state_request_pair(state: ConnectionState, req: Request) -> None:
    with no_fd_leak():
        device = WalkDevice()
        link = _connection_in(state, device)
        evs = _send(link, req)
        errors = [e for e in evs if isinstance(e, ProtocolErrorOccurred)]
        legal = req in TRANSITIONS[state]
        if legal:
            assert errors == []
            expected = TRANSITIONS[state][req]
            if req is R.REM_MEM_REG:
                expected = S.NEGOTIATED  # it removed the only region
            assert link.backend.state is expected
        else:
            (err,) = errors
            assert err.request == req.name and err.state == state.name
            assert ("not supported" in err.reason) == (req not in SUPPORTED)
            assert link.backend.state is state
        _settle(link, device)


@pytest.mark.parametrize("req", sorted(RING_REQUESTS | EVERY_RING), ids=lambda r: r.name)
@pytest.mark.parametrize("phase", list(RingPhase), ids=lambda s: s.name)
def test_every_ring_phase_request_pair(phase: RingPhase, req: Request) -> None:
    # Ring 0 of a READY connection has its size and addresses, so it can start.
    with no_fd_leak():
        device = WalkDevice()
        link = _connection_in(S.READY, device)
        if phase is RingPhase.STARTED:
            _send(link, R.SET_VRING_KICK)
        ring = link.backend.rings[0]
        assert ring.phase is phase
        errors = [e for e in _send(link, req) if isinstance(e, ProtocolErrorOccurred)]
        if req in RING_TRANSITIONS[phase]:
            assert errors == []
            assert ring.phase is RING_TRANSITIONS[phase][req]
        else:
            (err,) = errors
            assert err.request == req.name and f"vring 0 is {phase.value}" in err.reason
            assert ring.phase is phase
        _settle(link, device)


def test_the_dispatch_table_routes_the_supported_requests_as_the_wire_table_decodes_them() -> None:
    assert set(ROUTES) == SUPPORTED
    for req, route in ROUTES.items():
        assert route.decode == SPECS[req].decode, req.name


@pytest.mark.parametrize("req", list(Request), ids=lambda r: r.name)
def test_closed_refuses_everything_and_returns_the_fds(req: Request) -> None:
    with no_fd_leak():
        link = Link()
        link.backend.close()
        payload, nfds = PAYLOADS[req]
        fds = [new_fd() for _ in range(nfds)]
        with pytest.raises(LocalProtocolError):
            link.backend.receive_data(encode_message(int(req), payload.encode(), flags=VERSION), fds)
        assert link.backend.fds_to_close() == fds
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("req", sorted(GATES), ids=lambda r: r.name)
def test_gate_refuses_when_its_feature_is_missing(req: Request) -> None:
    # The connection offers no protocol feature at all here (the defaults offer no LOG_SHMFD,
    # BACKEND_REQ, CROSS_ENDIAN, INFLIGHT or ACCESS_PLATFORM), so the frontend negotiates none.
    no_proto = f.DEFAULT_VIRTIO_FEATURES & ~f.bit(f.VHOST_USER_F_PROTOCOL_FEATURES)
    link = Link(BackendConnection(features=no_proto, protocol_features=0))
    _send(link, R.SET_OWNER)
    evs = _send(link, req)
    assert req in TRANSITIONS[S.OWNED] or req in TRANSITIONS[S.READY]
    if req in TRANSITIONS[S.OWNED]:
        (err,) = evs
        assert isinstance(err, ProtocolErrorOccurred) and "needs" in err.reason, err
    link.settle()
    close_originals()
