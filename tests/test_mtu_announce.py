"""MTU and announce, without a VM: NET_SET_MTU and the frames it bounds, SEND_RARP and the RARP it sends.

The device is driven by the driver model of ``rings.driver`` (directly, or through a real vhost-user
socket with :class:`~nicsim.frontend.VhostUserFrontend`); the RARP is checked where it comes out: at
another guest's RX buffers and in the FDB of a real switch, and in a real TAP inside a namespace this
test creates.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nicsim.frontend import FrontendError, VhostUserFrontend
from nicsim.ports import Port, TxFrames
from nicsim.ports.frames import mac_bytes
from nicsim.ports.switch import Switch
from nicsim.ports.tap import TapConfig, TapPort, in_netns
from nicsim.server import Server
from nicsim.vhost import features as vf
from nicsim.virtio.announce import rarp_frame
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    mask,
)
from qemu.testvm import Netns
from rings.driver import DriverQueue, GuestDriver
from rings.pool import PacketPool
from tests.hardening import until

BASE = mask((VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF))
MTU = 1 << VIRTIO_NET_F_MTU
GUEST_MAC = mac_bytes("52:54:00:12:34:56")
HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers


def frame(size: int, tag: int = 0) -> bytes:
    """An Ethernet frame of ``size`` bytes (header included), from the guest, its last byte ``tag``."""
    body = bytes(size - 15) + bytes((tag,))
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x00" + body


class Recorder(Port):
    """Keeps every frame it is handed, with the virtio-net header when ``vnet_hdr``."""

    name = "recorder"

    def __init__(self, *, vnet_hdr: bool = False, offloads: int = 0) -> None:
        super().__init__()
        self.vnet_hdr = vnet_hdr
        self._offloads = offloads
        self.sent: list[bytes] = []
        self.mtus: list[int] = []

    def features(self) -> int:
        return self._offloads

    def mtu_changed(self, mtu: int) -> None:
        self.mtus.append(mtu)

    def transmit(self, batch: TxFrames) -> bool:
        if self.vnet_hdr:
            self.sent += [b"".join(bytes(v) for v in batch.iovec(i)) for i in range(batch.count)]
        else:
            self.sent += [bytes(batch.frame(i)) for i in range(batch.count)]
        return True


def start(dev: VirtioNetDevice, features: int) -> tuple[DriverQueue, DriverQueue]:
    drv = GuestDriver()
    rx, tx = drv.add_queue(0, 256), drv.add_queue(1, 256)
    dev.set_features(features)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return rx, tx


# -- the RARP -----------------------------------------------------------------------------------------


def test_the_rarp_is_the_frame_qemu_builds_for_announce_self() -> None:
    f = rarp_frame(GUEST_MAC)
    assert len(f) == 60
    # QEMU's announce_self_create, field by field: broadcast, source MAC, EtherType RARP; Ethernet,
    # IPv4, 6 and 4, opcode 3 (request reverse); sender MAC, 0.0.0.0, target MAC, 0.0.0.0; padding.
    assert f == (b"\xff" * 6 + GUEST_MAC + b"\x80\x35" + b"\x00\x01\x08\x00\x06\x04\x00\x03"
                 + GUEST_MAC + bytes(4) + GUEST_MAC + bytes(4) + bytes(18))  # fmt: skip
    with pytest.raises(ValueError):
        rarp_frame(b"\x01\x02")


# -- the MTU, at the device -------------------------------------------------------------------------------


@pytest.mark.parametrize("burst", [1, 20], ids=["short-round", "numpy-round"])
def test_frames_longer_than_the_mtu_are_dropped_both_ways_with_a_reason(burst: int) -> None:
    port = Recorder()
    dev = VirtioNetDevice(port=port)
    dev.set_mtu(9000)  # QEMU: NET_SET_MTU, before SET_FEATURES
    assert port.mtus == [9000] and dev.mtu == 9000
    rx, tx = start(dev, BASE | MTU)
    limit = 9000 + 14 + 4  # MTU + Ethernet header + a VLAN tag
    assert dev.frame_limit == limit
    # TX: the longest frame the MTU allows goes out, one byte more is dropped; both chains come back.
    sizes = [limit, limit + 1] * max(burst // 2, 1)
    for k, n in enumerate(sizes):
        tx.post_tx(frame(n, k))
        if burst == 1:
            dev.process_tx(1)
    if burst > 1:
        dev.process_tx(1)
    assert [len(f) for f in port.sent] == [n for n in sizes if n <= limit]
    assert len(tx.reap()) == len(sizes) and dev.pool.usage == 0
    assert dev.stats.snapshot()["queues"][1]["drops"] == {"over_mtu": sizes.count(limit + 1)}
    # RX: the same rule toward the guest.
    rx.post_rx(4096, count=16)
    assert dev.push(np.frombuffer(frame(limit, 1), np.uint8))
    assert not dev.push(np.frombuffer(frame(limit + 1, 2), np.uint8))
    dev.deliver_rx(0)
    got = rx.reap()
    assert b"".join(c.data or b"" for c in got)[12:] == frame(limit, 1)
    assert dev.stats.snapshot()["queues"][0]["drops"] == {"over_mtu": 1}
    assert dev.snapshot()["mtu"] == 9000


def test_a_gso_frame_may_exceed_the_mtu_and_without_the_mtu_bit_nothing_is_bounded() -> None:
    offloads = mask((VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4))
    port = Recorder(vnet_hdr=True, offloads=offloads)
    dev = VirtioNetDevice(port=port)
    dev.set_mtu(1500)
    _, tx = start(dev, BASE | MTU | offloads)
    gso = HDR.pack(1, 1, 54, 1448, 34, 16, 0)  # NEEDS_CSUM, GSO_TCPV4: the far side segments it
    tx.post_tx(frame(30000), header=gso)
    tx.post_tx(frame(1519), header=bytes(12))  # gso_type NONE, one byte over 1500 + 14 + 4
    dev.process_tx(1)
    assert port.sent == [gso + frame(30000)]
    assert dev.stats.snapshot()["queues"][1]["drops"] == {"over_mtu": 1}

    other = Recorder()
    dev2 = VirtioNetDevice(port=other)
    dev2.set_mtu(1500)
    _, tx2 = start(dev2, BASE)  # the driver did not take VIRTIO_NET_F_MTU: the MTU binds nobody
    tx2.post_tx(frame(9000))
    dev2.process_tx(1)
    assert [len(f) for f in other.sent] == [9000]


def test_without_mergeable_buffers_a_9000_byte_frame_fills_one_big_chain() -> None:
    # Linux's virtio_net without MRG_RXBUF and with an MTU above 1500 posts "big packets": one chain
    # of a header and several pages. One frame goes into one such chain, across its descriptors.
    dev = VirtioNetDevice(port=Recorder())
    dev.set_mtu(9000)
    rx, _ = start(dev, (1 << VIRTIO_F_VERSION_1) | MTU)
    for _ in range(2):
        segs = [rx.ram.alloc(n) for n in (12, 4096, 4096, 4096)]
        rx.post_chain([(g, n, True) for g, n in zip(segs, (12, 4096, 4096, 4096), strict=True)], buffers=segs)
    assert dev.push(np.frombuffer(frame(9018, 3), np.uint8))
    assert not dev.push(np.frombuffer(frame(9019, 4), np.uint8))
    dev.deliver_rx(0)
    (got,) = rx.reap()
    assert got.len == 12 + 9018 and got.data is not None and got.data[12:] == frame(9018, 3)
    assert dev.stats.snapshot()["queues"][0]["drops"] == {"over_mtu": 1}


# -- through the socket: NET_SET_MTU and SEND_RARP ---------------------------------------------------


class Lab:
    """A switch, a server with one socket per guest, and the devices each connection got."""

    def __init__(self, tmp_path: Path, guests: int = 2) -> None:
        self.switch = Switch()
        self.paths = [tmp_path / f"{chr(ord('a') + i)}.sock" for i in range(guests)]
        self.devices: dict[Path, list[VirtioNetDevice]] = {p: [] for p in self.paths}

        def make_device(path: Path) -> VirtioNetDevice:
            dev = VirtioNetDevice(port=self.switch.port(str(path)), pool=PacketPool(256))
            self.devices[path].append(dev)
            return dev

        self.server = Server(self.paths, make_device)
        for ep in self.server.endpoints:
            ep.make_device = functools.partial(make_device, ep.path)

    async def guest(
        self, i: int, *, mtu: int | None = None, protocol: tuple[int, ...] = ()
    ) -> VhostUserFrontend:
        fe = await VhostUserFrontend.connect(self.paths[i])
        await fe.handshake(protocol=protocol)
        if mtu is not None:
            await fe.set_mtu(mtu)  # QEMU's order: before SET_FEATURES
        await fe.start()
        fe.post_rx(32, buf_size=4096)
        await until(lambda: len(self.devices[self.paths[i]]) > 0, "the device exists")
        return fe

    def device(self, i: int) -> VirtioNetDevice:
        return self.devices[self.paths[i]][-1]


@pytest.fixture
async def lab(tmp_path: Path) -> Lab:
    lab = Lab(tmp_path)
    await lab.server.start()
    yield lab  # type: ignore[misc]
    await lab.server.close()
    lab.switch.close()


async def test_send_rarp_floods_the_rarp_out_of_the_switch_port_which_learns_the_mac(lab: Lab) -> None:
    rarp_bit = vf.VHOST_USER_PROTOCOL_F_RARP
    a = await lab.guest(0, protocol=(rarp_bit,))
    b = await lab.guest(1)
    assert a.protocol_features & vf.bit(rarp_bit)
    mac = mac_bytes("52:54:00:ab:cd:ef")
    await a.send_rarp(mac)
    (got,) = await b.wait_used(0, 1, timeout=5)
    assert got.data is not None and got.data[12:] == rarp_frame(mac)  # after b's virtio_net_hdr_v1
    now = asyncio.get_running_loop().time()
    assert lab.switch.fdb.port_of(mac, now) == lab.switch.slot(str(lab.paths[0]))
    assert lab.device(0).snapshot()["announced"] == 1
    # A frame to the announced MAC now goes to A's guest alone.
    b.transmit([mac + mac_bytes("52:54:00:00:00:02") + b"\x08\x00" + bytes(46)])
    (to_a,) = await a.wait_used(0, 1, timeout=5)
    assert to_a.data is not None and to_a.data[12:18] == mac
    for fe in (a, b):
        await fe.close()


async def test_send_rarp_is_refused_unless_the_rarp_feature_was_negotiated(lab: Lab) -> None:
    a = await lab.guest(0)  # negotiates MQ and REPLY_ACK only
    session = await lab.server.endpoints[0].wait_session()
    await a.send_rarp(GUEST_MAC)
    await until(lambda: any("SEND_RARP" in e for e in session.core.errors), "SEND_RARP refused")
    assert lab.device(0).snapshot()["announced"] == 0
    await a.close()


async def test_net_set_mtu_is_honoured_and_an_mtu_out_of_range_refused(lab: Lab) -> None:
    a = await lab.guest(0, mtu=9000, protocol=(vf.VHOST_USER_PROTOCOL_F_NET_MTU,))
    b = await lab.guest(1, mtu=9000, protocol=(vf.VHOST_USER_PROTOCOL_F_NET_MTU,))
    dev = lab.device(0)
    assert dev.mtu == 9000 and dev.has(VIRTIO_NET_F_MTU) and dev.frame_limit == 9018
    # A 9014-byte frame crosses the switch into B's 4096-byte mergeable buffers; one byte over the
    # limit is dropped at A's TX with its reason.
    big = mac_bytes("52:54:00:00:00:02") + GUEST_MAC + b"\x08\x00" + bytes(range(256)) * 36
    a.transmit([big[:9014], big[:9019]])
    got = await b.wait_used(0, 3, timeout=5)
    assert b"".join(c.data or b"" for c in got)[12:] == big[:9014]
    assert len(got) == 3 and len(big) > 9019
    await until(lambda: dev.stats.snapshot()["queues"][1]["drops"] == {"over_mtu": 1}, "counted")
    with pytest.raises(FrontendError):
        await a.set_mtu(20)
    assert dev.mtu == 9000
    for fe in (a, b):
        await fe.close()


# -- a real TAP follows the MTU ----------------------------------------------------------------------


def test_the_tap_port_sets_its_taps_mtu_to_the_host_mtu(netns: Callable[[], Netns]) -> None:
    ns = netns()
    ns.add_tap("tap0", "10.0.2.2/24")
    port = TapPort(TapConfig(netns=ns.name, ifname="tap0"))
    try:
        dev = VirtioNetDevice(port=port)
        dev.set_mtu(9000)
        assert "mtu 9000 " in ns.run("ip", "link", "show", "tap0").stdout
        assert port.stats()["mtu"] == 9000
        with pytest.raises(OSError):
            dev.set_mtu(70000)  # the kernel refuses it: the device keeps the MTU it had
        assert dev.mtu == 9000
    finally:
        port.close()
    kept = TapPort(TapConfig(netns=ns.name, ifname="tap0", follow_mtu=False))
    try:
        VirtioNetDevice(port=kept).set_mtu(1500)
        assert "mtu 9000 " in ns.run("ip", "link", "show", "tap0").stdout
    finally:
        kept.close()


def test_the_rarp_reaches_the_tap(netns: Callable[[], Netns]) -> None:
    ns = netns()
    ns.add_tap("tap0", "10.0.2.2/24")
    rarp = socket.htons(0x8035)
    sniffer = in_netns(ns.name, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, rarp))
    port = TapPort(TapConfig(netns=ns.name, ifname="tap0"))
    try:
        sniffer.bind(("tap0", 0))
        sniffer.settimeout(5)
        dev = VirtioNetDevice(port=port)
        start(dev, BASE)
        assert dev.announce(GUEST_MAC)
        assert sniffer.recv(2048) == rarp_frame(GUEST_MAC)
    finally:
        sniffer.close()
        port.close()


class RefusingPort(Recorder):
    def mtu_changed(self, mtu: int) -> None:
        raise OSError(22, f"no MTU {mtu} here")


async def test_an_mtu_the_port_cannot_follow_is_refused_to_the_frontend(tmp_path: Path) -> None:
    devices: list[VirtioNetDevice] = []

    def make() -> VirtioNetDevice:
        devices.append(VirtioNetDevice(port=RefusingPort(), pool=PacketPool(64)))
        return devices[-1]

    async with Server([tmp_path / "r.sock"], make) as server:
        fe = await VhostUserFrontend.connect(server.endpoints[0].path)
        try:
            await fe.handshake(protocol=(vf.VHOST_USER_PROTOCOL_F_NET_MTU,))
            with pytest.raises(FrontendError):  # QEMU then leaves the device stopped, and says why
                await fe.set_mtu(9000)
            assert devices[-1].mtu is None
            session = await server.endpoints[0].wait_session()
            assert any("no MTU 9000 here" in e for e in session.errors)
        finally:
            await fe.close()
