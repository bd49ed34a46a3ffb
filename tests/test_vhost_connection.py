"""BackendConnection: the QEMU 7.2 handshake, reconnect, REPLY_ACK, device queries, errors, fds."""

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
    events,
)
from nicsim.vhost import features as f
from nicsim.vhost import payloads as p
from nicsim.vhost.protocol import FLAG_NEED_REPLY, FLAG_REPLY, VERSION, encode_message
from nicsim.virtio.features import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_RING_PACKED,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
)
from tests.test_vhost_support import (
    REGION,
    REGION2,
    Link,
    close_originals,
    kinds,
    new_fd,
    no_fd_leak,
    qemu72_init,
    qemu72_start,
    state_of,
)


@pytest.fixture(autouse=True)
def _close_frontend_fds() -> object:
    yield
    close_originals()


@pytest.mark.parametrize("use_add_mem_reg", [False, True], ids=["set_mem_table", "add_mem_reg"])
def test_qemu72_handshake_produces_expected_events_and_replies(use_add_mem_reg: bool) -> None:
    with no_fd_leak():
        link = Link()
        qemu72_init(link)
        init = list(link.events)
        assert kinds(init) == (
            ["ProtocolFeaturesSet", "OwnerSet"] + ["VringCallSet", "VringErrSet"] * 2 + ["VringEnabled"] * 2
        )
        assert state_of(link.backend) is ConnectionState.OWNED
        assert link.backend.reply_ack
        qemu72_start(link, use_add_mem_reg=use_add_mem_reg)
        started = link.events[len(init) :]
        mem = "MemoryRegionAdded" if use_add_mem_reg else "MemoryTableSet"
        per_ring = [
            "VringNumSet",
            "VringBaseSet",
            "VringAddrSet",
            "VringKickSet",
            "VringStarted",
            "VringCallSet",
        ]
        assert kinds(started) == ["FeaturesSet", mem] + per_ring * 2
        assert state_of(link.backend) is ConnectionState.READY
        assert [r.phase for r in link.backend.rings] == [RingPhase.STARTED] * 2
        addr = next(e for e in started if isinstance(e, events.VringAddrSet) and e.index == 1)
        assert addr.addr.desc_user_addr == REGION.user_addr + 0x10000
        # Stop: GET_VRING_BASE per queue stops the ring and replies the device's index.
        for q in range(2):
            evs, (reply,) = link.call(link.frontend.get_vring_base(q))
            assert evs == [events.VringStopped(index=q, base=0)]
            assert reply.payload == p.VringState(index=q, num=0)
        assert [r.phase for r in link.backend.rings] == [RingPhase.STOPPED] * 2
        assert link.frontend.replies_pending == 0
        handed = link.settle()
        assert sorted(handed) == sorted(link.received)


def test_reconnect_replays_the_whole_handshake_on_a_new_connection() -> None:
    with no_fd_leak():
        first = Link()
        qemu72_init(first)
        qemu72_start(first, use_add_mem_reg=False)
        first.backend.close()
        first.settle()
        second = Link()  # QEMU's reconnect=N: a new socket, so a new connection object
        assert state_of(second.backend) is ConnectionState.CONNECTED
        qemu72_init(second)
        qemu72_start(second, use_add_mem_reg=False)
        assert not [e for e in second.events if isinstance(e, ProtocolErrorOccurred)]
        assert state_of(second.backend) is ConnectionState.READY
        second.settle()


class CountingDevice(IdleDevice):
    """A device that has consumed ``consumed`` entries from each ring since it was started."""

    def __init__(self, consumed: int) -> None:
        super().__init__(config=bytes(range(12)))
        self.consumed = consumed
        self.stopped: list[int] = []

    def stop_vring(self, index: int, *, base: int) -> int:
        self.stopped.append(index)
        return (base + self.consumed) & 0xFFFF

    def get_status(self, *, driver_status: int) -> int:
        return driver_status | 0x40  # DEVICE_NEEDS_RESET


def test_get_vring_base_asks_the_device_and_replies_its_index() -> None:
    link = Link(BackendConnection(device=CountingDevice(consumed=7)))
    qemu72_init(link)
    qemu72_start(link, use_add_mem_reg=False)
    link.call(link.frontend.get_vring_base(1))
    evs, (reply,) = link.call(link.frontend.get_vring_base(0))
    assert evs == [events.VringStopped(index=0, base=7)]
    assert reply.payload == p.VringState(index=0, num=7)
    # A stopped ring is not stopped again: the device is asked once per start.
    _, (again,) = link.call(link.frontend.get_vring_base(0))
    assert again.payload == p.VringState(index=0, num=7)
    assert isinstance(link.backend.device, CountingDevice)
    assert link.backend.device.stopped == [1, 0]
    link.settle()


def test_get_config_and_get_status_come_from_the_device() -> None:
    link = Link(BackendConnection(device=CountingDevice(consumed=0), config_space=True))
    qemu72_init(link)
    _, (cfg,) = link.call(link.frontend.get_config(2, 6))
    assert cfg.payload == p.ConfigSpace(offset=2, size=6, flags=0, payload=bytes(range(2, 8)))
    link.send(link.frontend.set_status(0x0F))
    _, (st,) = link.call(link.frontend.get_status())
    assert st.value == 0x4F
    # An unreadable range: the spec's error form, an empty payload.
    evs, (bad,) = link.call(link.frontend.get_config(8, 8))
    assert isinstance(evs[0], ProtocolErrorOccurred) and not bad.ok
    link.settle()


def test_reply_ack_success_and_failure() -> None:
    link = Link()
    qemu72_init(link)
    _, (ok,) = link.call(link.frontend.set_features(f.DEFAULT_VIRTIO_FEATURES, need_reply=True))
    assert ok.ok and ok.value == 0
    evs, (bad,) = link.call(link.frontend.set_vring_num(0, 3, need_reply=True))  # not a power of 2
    assert isinstance(evs[0], ProtocolErrorOccurred) and "power of 2" in evs[0].reason
    assert not bad.ok and bad.value != 0
    # A request that already has a reply gets no extra ack.
    _, replies = link.call(link.frontend.request(Request.GET_FEATURES, need_reply=True))
    assert len(replies) == 1 and replies[0].value == f.DEFAULT_VIRTIO_FEATURES
    link.settle()


def test_need_reply_is_ignored_without_reply_ack() -> None:
    link = Link()
    qemu72_init(link, protocol=f.bit(f.VHOST_USER_PROTOCOL_F_MQ))
    assert not link.backend.reply_ack
    link.send(link.frontend.set_features(f.DEFAULT_VIRTIO_FEATURES, need_reply=True))
    assert link.backend.data_to_send() == []
    link.settle()


def test_reject_turns_the_pending_ack_into_a_failure() -> None:
    link = Link()
    qemu72_init(link)
    link.call(link.frontend.set_features(f.DEFAULT_VIRTIO_FEATURES))
    fd = new_fd()
    (table,) = link.send(link.frontend.set_mem_table([REGION], [fd], need_reply=True))
    os.close(fd)
    assert isinstance(table, events.MemoryTableSet)
    assert link.backend.reject(table, "mmap failed") is True
    (reply,) = link.replies()
    assert not reply.ok
    with pytest.raises(LocalProtocolError):
        link.backend.reject(table, "too late: its reply was sent")
    link.settle()


def test_set_features_with_a_bit_not_offered_is_refused() -> None:
    link = Link()
    qemu72_init(link)
    evs, (ack,) = link.call(
        link.frontend.set_features(f.DEFAULT_VIRTIO_FEATURES | f.bit(VIRTIO_F_RING_PACKED), need_reply=True)
    )
    (err,) = evs
    assert isinstance(err, ProtocolErrorOccurred)
    assert err.request == "SET_FEATURES" and "VIRTIO_F_RING_PACKED" in err.reason and not err.fatal
    assert not ack.ok
    assert state_of(link.backend) is ConnectionState.OWNED and link.backend.acked_features is None
    link.settle()


def test_repeated_set_features_with_the_same_bits_is_accepted_while_rings_run() -> None:
    # QEMU sends SET_FEATURES once per queue pair (one vhost_dev each), so with multiqueue the second
    # one arrives while the first pair's rings are started.
    link = Link()
    qemu72_init(link)
    qemu72_start(link, use_add_mem_reg=False)
    assert [r.phase for r in link.backend.rings] == [RingPhase.STARTED] * 2
    evs, (ok,) = link.call(link.frontend.set_features(f.DEFAULT_VIRTIO_FEATURES, need_reply=True))
    assert evs == [events.FeaturesSet(features=f.DEFAULT_VIRTIO_FEATURES)] and ok.ok
    link.settle()


def test_set_features_with_other_bits_is_refused_while_a_ring_is_started() -> None:
    link = Link()
    qemu72_init(link)
    qemu72_start(link, use_add_mem_reg=False)
    fewer = f.DEFAULT_VIRTIO_FEATURES & ~f.bit(VIRTIO_F_EVENT_IDX)
    (err,), (ack,) = link.call(link.frontend.set_features(fewer, need_reply=True))
    assert isinstance(err, ProtocolErrorOccurred) and not ack.ok
    assert "vring 0 is started" in err.reason and "VIRTIO_F_EVENT_IDX" in err.reason
    assert link.backend.acked_features == f.DEFAULT_VIRTIO_FEATURES
    # Once every ring is stopped the frontend may renegotiate (a driver reset does).
    for q in range(2):
        link.call(link.frontend.get_vring_base(q))
    evs, (ok,) = link.call(link.frontend.set_features(fewer, need_reply=True))
    assert evs == [events.FeaturesSet(features=fewer)] and ok.ok
    link.settle()


def test_offered_features_are_constructor_arguments() -> None:
    extra = f.bit(VIRTIO_NET_F_CSUM) | f.bit(VIRTIO_NET_F_HOST_TSO4)
    link = Link(BackendConnection(features=f.DEFAULT_VIRTIO_FEATURES | extra, inflight_shmfd=True))
    _, (r,) = link.call(link.frontend.get_features())
    assert r.value & extra == extra
    _, (r,) = link.call(link.frontend.get_protocol_features())
    assert f.has(r.value, f.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)
    assert BackendConnection().offered_protocol_features == f.DEFAULT_PROTOCOL_FEATURES
    assert not f.has(f.DEFAULT_PROTOCOL_FEATURES, f.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)


def test_config_space_is_offered_only_on_request() -> None:
    # QEMU 7.2's net device never uses the config space over vhost-user and warns when a backend
    # offers CONFIG, so it is off unless asked for; GET_CONFIG is then refused by its gate.
    assert not f.has(f.DEFAULT_PROTOCOL_FEATURES, f.VHOST_USER_PROTOCOL_F_CONFIG)
    plain = Link(BackendConnection(device=CountingDevice(consumed=0)))
    qemu72_init(plain)
    assert not f.has(plain.backend.acked_protocol_features or 0, f.VHOST_USER_PROTOCOL_F_CONFIG)
    (err,), (refused,) = plain.call(plain.frontend.get_config(0, 6))
    assert isinstance(err, ProtocolErrorOccurred) and "CONFIG" in err.reason and not refused.ok
    plain.settle()
    asked = Link(BackendConnection(device=CountingDevice(consumed=0), config_space=True))
    _, (r,) = asked.call(asked.frontend.get_protocol_features())
    assert r.value == f.DEFAULT_PROTOCOL_FEATURES | f.bit(f.VHOST_USER_PROTOCOL_F_CONFIG)


def test_unknown_request_gets_an_error_event_and_a_failure_ack_and_the_fds_back() -> None:
    with no_fd_leak():
        link = Link()
        qemu72_init(link)
        fd = new_fd()
        raw = encode_message(99, b"\0" * 8, flags=VERSION | FLAG_NEED_REPLY)
        (err,) = link.backend.receive_data(raw, [fd])
        assert isinstance(err, ProtocolErrorOccurred)
        assert (err.request, err.code, err.state, err.fatal) == ("UNKNOWN(99)", 99, "OWNED", False)
        assert fd in link.backend.fds_to_close()
        os.close(fd)
        (out,) = link.backend.data_to_send()
        assert out.data == encode_message(99, p.U64(value=1).encode(), flags=VERSION | FLAG_REPLY)
        # The connection survives: the next request is served.
        _, (r,) = link.call(link.frontend.get_queue_num())
        assert r.value == 1
        link.settle()


def test_supported_by_name_but_never_offered_is_refused_by_name() -> None:
    link = Link()
    qemu72_init(link)
    (err,) = link.send(link.frontend.request(Request.POSTCOPY_LISTEN))
    assert isinstance(err, ProtocolErrorOccurred)
    assert err.request == "POSTCOPY_LISTEN" and "not supported" in err.reason
    link.settle()


def test_bad_version_is_fatal_and_closes_the_connection() -> None:
    with no_fd_leak():
        link = Link()
        fd = new_fd()
        (err,) = link.backend.receive_data(encode_message(1, flags=0x2), [fd])
        assert isinstance(err, ProtocolErrorOccurred) and err.fatal and err.code == 1
        assert state_of(link.backend) is ConnectionState.CLOSED
        fd2 = new_fd()
        with pytest.raises(LocalProtocolError):
            link.backend.receive_data(b"x", [fd2])
        assert sorted(link.backend.fds_to_close()) == sorted([fd, fd2])
        os.close(fd)
        os.close(fd2)


def test_oversize_length_is_fatal() -> None:
    link = Link()
    (err,) = link.backend.receive_data(encode_message(1)[:8] + (1 << 20).to_bytes(4, "little"))
    assert isinstance(err, ProtocolErrorOccurred) and err.fatal and "exceeds" in err.reason


def test_close_returns_fds_of_an_incomplete_message() -> None:
    with no_fd_leak():
        link = Link()
        qemu72_init(link)
        fd = new_fd()
        out = link.frontend.set_vring_kick(0, fd)
        assert link.backend.receive_data(out.data[:5], [fd]) == []
        link.backend.close()
        link.backend.close()  # harmless
        assert link.backend.fds_to_close() == [fd]
        os.close(fd)
        link.settle()


def test_rem_mem_reg_fd_is_closed_unused_and_last_region_returns_to_negotiated() -> None:
    with no_fd_leak():
        link = Link()
        qemu72_init(link)
        link.call(link.frontend.set_features(f.DEFAULT_VIRTIO_FEATURES))
        a, b = new_fd(), new_fd()
        link.call(link.frontend.add_mem_reg(REGION, a, need_reply=True))
        link.call(link.frontend.add_mem_reg(REGION2, b, need_reply=True))
        stray = new_fd()
        out = link.frontend.rem_mem_reg(REGION, need_reply=True)
        evs = link.backend.receive_data(out.data, [stray])
        assert evs == [
            events.MemoryRegionRemoved(guest_phys_addr=0, size=REGION.size, user_addr=REGION.user_addr)
        ]
        assert link.backend.fds_to_close() == [stray]
        assert state_of(link.backend) is ConnectionState.READY
        link.send(link.frontend.rem_mem_reg(REGION2))
        assert state_of(link.backend) is ConnectionState.NEGOTIATED
        # Removing a region that is not there is refused.
        (err,) = link.send(link.frontend.rem_mem_reg(REGION2))
        assert isinstance(err, ProtocolErrorOccurred)
        for fd in (a, b, stray):
            os.close(fd)
        link.replies()
        link.settle()


def test_an_identical_region_added_again_is_held_until_its_last_removal() -> None:
    """QEMU sends ADD_MEM_REG (and REM_MEM_REG) once per vhost device, and with multiqueue each queue
    pair is a device on the same connection: the same region again is accepted, not mapped twice (its
    fd comes back unused), and it goes only with the last of its removals."""
    with no_fd_leak():
        link = Link()
        qemu72_init(link)
        link.call(link.frontend.set_features(f.DEFAULT_VIRTIO_FEATURES))
        fd = new_fd()
        (added,) = link.send(link.frontend.add_mem_reg(REGION, fd))
        assert isinstance(added, events.MemoryRegionAdded)
        assert link.send(link.frontend.add_mem_reg(REGION, fd)) == []  # the other queue pair's copy
        back = link.backend.fds_to_close()
        assert back == [link.received[-1]]  # its fd is given back unused
        os.close(back[0])
        assert state_of(link.backend) is ConnectionState.READY
        assert link.send(link.frontend.rem_mem_reg(REGION)) == []  # the other pair still holds it
        assert state_of(link.backend) is ConnectionState.READY
        (gone,) = link.send(link.frontend.rem_mem_reg(REGION))
        assert isinstance(gone, events.MemoryRegionRemoved)
        assert state_of(link.backend) is ConnectionState.NEGOTIATED
        (err,) = link.send(link.frontend.rem_mem_reg(REGION))
        assert isinstance(err, ProtocolErrorOccurred)
        os.close(fd)
        link.replies()
        link.settle()


def test_add_mem_reg_refuses_overlap_and_full_slots() -> None:
    link = Link(BackendConnection(max_mem_slots=1))
    qemu72_init(link)
    link.call(link.frontend.set_features(f.DEFAULT_VIRTIO_FEATURES))
    fd = new_fd()
    link.send(link.frontend.add_mem_reg(REGION, fd))
    (err,) = link.send(link.frontend.add_mem_reg(REGION2, fd))
    assert isinstance(err, ProtocolErrorOccurred) and "slots" in err.reason
    overlap = p.MemoryRegionDesc(
        guest_phys_addr=REGION.size // 2, size=REGION.size, user_addr=0, mmap_offset=0
    )
    link2 = Link()
    qemu72_init(link2)
    link2.call(link2.frontend.set_features(f.DEFAULT_VIRTIO_FEATURES))
    link2.send(link2.frontend.add_mem_reg(REGION, fd))
    (err2,) = link2.send(link2.frontend.add_mem_reg(overlap, fd))
    assert isinstance(err2, ProtocolErrorOccurred) and "overlaps" in err2.reason
    os.close(fd)
    link.settle()
    link2.settle()


def test_kick_before_ring_configured_is_refused_and_its_fd_returned() -> None:
    with no_fd_leak():
        link = Link()
        qemu72_init(link)
        link.call(link.frontend.set_features(f.DEFAULT_VIRTIO_FEATURES))
        link.send(link.frontend.set_mem_table([REGION], [new_fd_owned := new_fd()]))
        kick = new_fd()
        (err,) = link.send(link.frontend.set_vring_kick(0, kick))
        assert isinstance(err, ProtocolErrorOccurred) and "SET_VRING_ADDR" in err.reason
        assert link.backend.rings[0].phase is RingPhase.STOPPED
        os.close(kick)
        os.close(new_fd_owned)
        handed = link.settle()
        assert sorted(handed) == sorted(link.received)


def test_kick_with_nofd_bit_starts_a_polled_ring() -> None:
    link = Link()
    qemu72_init(link)
    qemu72_start(link, use_add_mem_reg=False)
    link.call(link.frontend.get_vring_base(0))
    evs = link.send(link.frontend.set_vring_kick(0, None))
    assert evs == [events.VringKickSet(index=0, fd=None), events.VringStarted(index=0)]
    link.settle()


def test_ring_size_and_base_cannot_change_while_started() -> None:
    link = Link()
    qemu72_init(link)
    qemu72_start(link, use_add_mem_reg=False)
    (e1,) = link.send(link.frontend.set_vring_num(0, 128))
    (e2,) = link.send(link.frontend.set_vring_base(0, 5))
    assert isinstance(e1, ProtocolErrorOccurred) and "started" in e1.reason
    assert isinstance(e2, ProtocolErrorOccurred)
    link.settle()


def test_reset_owner_stops_and_disables_every_ring_but_keeps_the_session() -> None:
    link = Link()
    qemu72_init(link)
    qemu72_start(link, use_add_mem_reg=False)
    link.send(link.frontend.set_vring_enable(0, True))
    evs = link.send(link.frontend.reset_owner())
    assert kinds(evs) == ["VringStopped", "VringEnabled", "VringStopped", "OwnerReset"]
    assert state_of(link.backend) is ConnectionState.READY
    assert all(r.phase is RingPhase.STOPPED and not r.enabled for r in link.backend.rings)
    link.settle()


def test_without_protocol_features_rings_start_enabled() -> None:
    no_proto = f.DEFAULT_VIRTIO_FEATURES & ~f.bit(f.VHOST_USER_F_PROTOCOL_FEATURES)
    link = Link(BackendConnection(features=no_proto))
    link.send(link.frontend.set_owner())
    evs = link.send(link.frontend.set_features(no_proto))
    assert kinds(evs) == ["FeaturesSet", "VringEnabled", "VringEnabled"]
    (err,) = link.send(link.frontend.set_vring_enable(0, False))
    assert isinstance(err, ProtocolErrorOccurred) and "SET_PROTOCOL_FEATURES" in err.reason


def test_vring_index_out_of_range_is_refused() -> None:
    link = Link()
    qemu72_init(link)
    (err,) = link.send(link.frontend.set_vring_enable(2, True))
    assert isinstance(err, ProtocolErrorOccurred) and "out of range" in err.reason
    fd = new_fd()
    (err,) = link.send(link.frontend.set_vring_call(7, fd))
    os.close(fd)
    assert isinstance(err, ProtocolErrorOccurred)
    link.settle()


def test_inflight_fd_is_served_by_the_device_when_enabled() -> None:
    class InflightDevice(IdleDevice):
        def __init__(self) -> None:
            super().__init__()
            self.fd = os.memfd_create("inflight")

        def get_inflight_fd(self, *, num_queues: int, queue_size: int) -> InflightBuffer | None:
            return InflightBuffer(fd=self.fd, mmap_size=4096)

    device = InflightDevice()
    link = Link(BackendConnection(device=device, inflight_shmfd=True))
    qemu72_init(link)
    link.call(link.frontend.set_features(f.DEFAULT_VIRTIO_FEATURES))
    _, (reply,) = link.call(link.frontend.get_inflight_fd(2, 256))
    assert reply.payload == p.InflightDesc(mmap_size=4096, mmap_offset=0, num_queues=2, queue_size=256)
    assert len(reply.fds) == 1
    os.close(reply.fds[0])
    (ev,) = link.send(link.frontend.set_inflight_fd(reply.payload, device.fd))
    assert isinstance(ev, events.InflightFdSet) and ev.num_queues == 2
    os.close(device.fd)
    link.settle()


def test_mtu_rarp_status_and_config_events() -> None:
    proto = (
        f.DEFAULT_PROTOCOL_FEATURES
        | f.bit(f.VHOST_USER_PROTOCOL_F_NET_MTU)
        | f.bit(f.VHOST_USER_PROTOCOL_F_RARP)
    )
    link = Link(BackendConnection(protocol_features=proto, config_space=True))
    qemu72_init(link)
    assert link.send(link.frontend.net_set_mtu(9000)) == [events.MtuSet(mtu=9000)]
    (bad,) = link.send(link.frontend.net_set_mtu(20))
    assert isinstance(bad, ProtocolErrorOccurred)
    mac = bytes.fromhex("525400123456")
    assert link.send(link.frontend.send_rarp(mac)) == [events.RarpRequested(mac=mac)]
    assert link.send(link.frontend.set_status(0)) == [events.StatusSet(status=0)]
    assert link.send(link.frontend.set_config(0, b"\x01\x02", migration=True)) == [
        events.ConfigSet(offset=0, data=b"\x01\x02", migration=True)
    ]
    link.settle()
