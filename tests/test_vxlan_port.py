"""The vxlan port over real UDP sockets on loopback, driven by the driver-side model (no QEMU, no mocks):
two ports face each other (127.0.0.1 and 127.0.0.2, same UDP port, as two hosts' VTEPs would), frames
cross byte for byte both ways, and datagrams that are not VXLAN for this tunnel are dropped with a
counted reason while the good ones behind them still arrive. Loopback only: nothing leaves the host.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest

from nicsim.cli.serve import parse_port
from nicsim.ports import VxlanConfig, VxlanError, VxlanPort
from nicsim.ports.frames import ETHERTYPE_IPV4, ethernet, mac_bytes
from nicsim.ports.vxlan_wire import header
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF
from rings.driver import DriverQueue, GuestDriver

FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_F_EVENT_IDX)
A_IP, B_IP, STRANGER_IP = "127.0.0.1", "127.0.0.2", "127.0.0.3"
VNI = 4242


def start(dev: VirtioNetDevice, size: int = 256) -> tuple[DriverQueue, DriverQueue]:
    drv = GuestDriver()
    rx = drv.add_queue(0, size, event_idx=True)
    tx = drv.add_queue(1, size, event_idx=True)
    dev.set_features(FEATURES)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return rx, tx


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((A_IP, 0))
        return int(s.getsockname()[1])


def frame(n: int, size: int = 100) -> bytes:
    body = bytes((n + i) & 0xFF for i in range(size - 14))
    return ethernet(mac_bytes("52:54:00:00:00:02"), mac_bytes("52:54:00:12:34:56"), ETHERTYPE_IPV4, body,
                    pad=False)  # fmt: skip


@pytest.fixture
def pair() -> Iterator[tuple[VirtioNetDevice, VirtioNetDevice, int]]:
    """Device A on a port at 127.0.0.1 facing device B on a port at 127.0.0.2 (same UDP port)."""
    port = free_udp_port()
    a = VirtioNetDevice(port=VxlanPort(VxlanConfig(remote=B_IP, local=A_IP, port=port, vni=VNI)))
    b = VirtioNetDevice(port=VxlanPort(VxlanConfig(remote=A_IP, local=B_IP, port=port, vni=VNI)))
    try:
        yield a, b, port
    finally:
        a.shutdown()
        b.shutdown()


async def receive(dev: VirtioNetDevice, rx: DriverQueue, count: int) -> list[bytes]:
    """Poll ``dev`` as the RX pump would until ``count`` frames reached the driver (10 s at most)."""
    got: list[bytes] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            await asyncio.sleep(0.005)  # lets the port's fd watch run
            dev.poll_rx(0)
            got += [bytes(c.data[12:]) for c in rx.reap() if c.data]
    return got


async def test_frames_cross_the_tunnel_byte_for_byte_both_ways(
    pair: tuple[VirtioNetDevice, VirtioNetDevice, int],
) -> None:
    a, b, _ = pair
    loop = asyncio.get_running_loop()
    for dev in (a, b):
        dev.port.start_io(loop)
    rx_a, tx_a = start(a)
    rx_b, tx_b = start(b)
    rx_a.post_rx(count=64)
    rx_b.post_rx(count=64)
    frames = [frame(i, size=14 + 37 * i) for i in range(40)]  # 14 .. 1457 bytes
    for f in frames:
        tx_a.post_tx(f)
    a.process_tx(1)
    assert await receive(b, rx_b, len(frames)) == frames
    back = [frame(100 + i) for i in range(5)]
    for f in back:
        tx_b.post_tx(f)
    b.process_tx(1)
    assert await receive(a, rx_a, len(back)) == back
    sa, sb = a.port.stats(), b.port.stats()
    assert (sa["tx_frames"], sa["tx_bytes"]) == (len(frames), sum(map(len, frames)))
    assert (sb["rx_frames"], sb["rx_bytes"]) == (len(frames), sum(map(len, frames)))
    assert (sa["rx_frames"], sb["tx_frames"]) == (len(back), len(back))
    assert sa["drops"] == {} and sb["drops"] == {}
    assert b.port.finished  # drained: it sleeps on the fd watch


async def test_datagrams_that_are_not_this_tunnels_are_dropped_by_reason_and_the_good_ones_arrive(
    pair: tuple[VirtioNetDevice, VirtioNetDevice, int],
) -> None:
    a, _, port = pair
    a.port.start_io(asyncio.get_running_loop())
    rx, _ = start(a)
    rx.post_rx(count=64)
    good = frame(7)
    hdr = header(VNI)
    bad_flags = bytes([0x0C]) + hdr[1:]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:  # fmt: skip
        peer.bind((B_IP, 0))  # the remote's address, from any source port (Linux hashes it)
        stranger.bind((STRANGER_IP, 0))
        to = (A_IP, port)
        peer.sendto(b"", to)
        peer.sendto(hdr + good[:13], to)
        peer.sendto(bad_flags + good, to)
        peer.sendto(hdr[:7] + b"\x01" + good, to)
        peer.sendto(header(VNI + 1) + good, to)
        stranger.sendto(hdr + good, to)
        peer.sendto(hdr + good, to)
        got = await receive(a, rx, 1)
    assert got == [good]
    assert a.port.stats()["drops"] == {
        "rx_runt": 2, "rx_bad_flags": 1, "rx_bad_reserved": 1, "rx_wrong_vni": 1, "rx_foreign_source": 1,
    }  # fmt: skip
    assert a.snapshot()["pool"]["usage"] == 0


def test_a_frame_too_big_for_one_datagram_is_dropped_and_counted_never_fragmented(
    pair: tuple[VirtioNetDevice, VirtioNetDevice, int],
) -> None:
    a, _, _ = pair
    _, tx = start(a)
    tx.post_tx(frame(1, size=65500))  # + 8 header bytes > 65507, the largest IPv4 UDP payload
    tx.post_tx(frame(2))
    a.process_tx(1)
    s = a.port.stats()
    assert s["drops"] == {"tx_too_big": 1} and s["tx_frames"] == 1


def test_port_specs_name_what_is_missing_or_wrong() -> None:
    with pytest.raises(ValueError, match="remote= is required"):
        parse_port("vxlan,vni=1")
    with pytest.raises(ValueError, match="vni= is required"):
        parse_port("vxlan,remote=127.0.0.2")
    with pytest.raises(ValueError, match="24 bits"):
        parse_port("vxlan,remote=127.0.0.2,vni=16777216")
    with pytest.raises(ValueError, match="known keys: remote, vni, local, port, netns"):
        parse_port("vxlan,remote=127.0.0.2,vni=1,learn=on")
    with pytest.raises(VxlanError, match="no such network namespace"):
        parse_port("vxlan,remote=127.0.0.2,vni=1,netns=nicsim-no-such-ns")


def test_a_port_already_bound_is_a_vxlan_error_and_close_releases_the_socket() -> None:
    fds = len(os.listdir("/proc/self/fd"))
    port = free_udp_port()
    first = VxlanPort(VxlanConfig(remote=B_IP, local=A_IP, port=port, vni=1))
    assert len(os.listdir("/proc/self/fd")) == fds + 1
    with pytest.raises(VxlanError, match=f"bind {A_IP}:{port}"):
        VxlanPort(VxlanConfig(remote=B_IP, local=A_IP, port=port, vni=1))
    first.close()
    first.close()  # harmless
    assert len(os.listdir("/proc/self/fd")) == fds
    assert first.stats()["drops"] == {}


async def test_datagrams_the_kernel_dropped_on_a_full_receive_queue_are_counted_not_lost_silently(
    pair: tuple[VirtioNetDevice, VirtioNetDevice, int],
) -> None:
    a, _, port = pair
    a.port.start_io(asyncio.get_running_loop())
    rx, _ = start(a)
    sent = 3000  # far more than a small receive queue holds, with no guest buffer posted meanwhile
    assert a.port._sock is not None
    a.port._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind((B_IP, 0))
        for i in range(sent):
            peer.sendto(header(VNI) + frame(i), (A_IP, port))
    overflow = a.port.stats()["drops"]["rx_socket_overflow"]
    assert 0 < overflow < sent
    delivered = posted = 0
    async with asyncio.timeout(10):
        while delivered < sent - overflow:
            rx.post_rx(count=64 - (posted - delivered))  # 64 buffers out at a time, of 256 descriptors
            posted = delivered + 64
            await asyncio.sleep(0.001)
            a.poll_rx(0)
            delivered += len(rx.reap())
    assert delivered == sent - overflow  # every datagram either reached the guest or was counted
    a.port.close()
    assert a.port.stats()["drops"] == {"rx_socket_overflow": overflow}  # still shown once closed
