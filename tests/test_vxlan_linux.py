"""The vxlan port against Linux's own ``vxlan`` device, through the in-process server and the Python
vhost-user frontend (``nicsim.frontend``): no VM, but real sockets, a real veth underlay and a real
kernel VTEP in throwaway namespaces (``tests.vxlan_lab``; root needed, as for every namespace test).

The frontend plays the guest 192.168.77.1: its ARP request and ICMP echo leave nicsim as VXLAN, come out
of ``vxlan0`` in the other namespace, and the kernel's replies come back to the frontend's RX ring.
The inner MTU is checked at its edge: over a 1500-byte underlay a 1464-byte frame crosses both ways,
and a 1465-byte one is dropped and counted by the port (the kernel refuses to fragment it).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from nicsim.frontend import VhostUserFrontend
from nicsim.ports import VxlanConfig, VxlanPort
from nicsim.ports.frames import (
    ARP_REPLY,
    ARP_REQUEST,
    BROADCAST_MAC,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IPPROTO_ICMP,
    arp,
    ethernet,
    icmp_echo,
    ip_bytes,
    ipv4,
    mac_bytes,
    parse_arp,
    parse_ethernet,
    parse_icmp,
    parse_ipv4,
)
from nicsim.server import Server
from nicsim.virtio.device import VirtioNetDevice
from qemu.testvm import Netns
from rings.pool import PacketPool
from tests.vxlan_lab import OVERLAY_B, OVERLAY_GUEST, UNDERLAY_A, UNDERLAY_B, VNI, vxlan_lab

GUEST_MAC = mac_bytes("52:54:00:12:34:56")
GUEST_IP, PEER_IP = ip_bytes(OVERLAY_GUEST), ip_bytes(OVERLAY_B)


async def next_frame(fe: VhostUserFrontend, want: Callable[[bytes], bool]) -> bytes:
    """The next frame the backend delivers that ``want`` accepts (others are skipped)."""
    while True:
        for c in await fe.wait_used(0, 1):
            frame = (c.data or b"")[12:]
            fe.post_rx(1)
            if want(frame):
                return frame


def echo(seq: int, size: int, peer_mac: bytes) -> bytes:
    data = bytes(i & 0xFF for i in range(size - 14 - 20 - 8))
    packet = ipv4(GUEST_IP, PEER_IP, IPPROTO_ICMP, icmp_echo(ICMP_ECHO_REQUEST, 77, seq, data))
    return ethernet(peer_mac, GUEST_MAC, ETHERTYPE_IPV4, packet)


def is_echo_reply(seq: int) -> Callable[[bytes], bool]:
    def want(frame: bytes) -> bool:
        eth = parse_ethernet(frame)
        if eth.ethertype != ETHERTYPE_IPV4:
            return False
        ip = parse_ipv4(eth.payload)
        if ip.proto != IPPROTO_ICMP:
            return False
        icmp = parse_icmp(ip.payload)
        return icmp.type == ICMP_ECHO_REPLY and icmp.seq == seq and icmp.checksum_ok

    return want


async def test_arp_and_ping_to_an_address_behind_linux_vxlan_and_the_inner_mtu(
    tmp_path: Path, netns: Callable[[], Netns]
) -> None:
    lab = vxlan_lab(netns)
    fds = len(os.listdir("/proc/self/fd"))
    devices: list[VirtioNetDevice] = []

    def make_device() -> VirtioNetDevice:
        port = VxlanPort(VxlanConfig(remote=UNDERLAY_B, local=UNDERLAY_A, vni=VNI, netns=lab.host_a.name))
        devices.append(VirtioNetDevice(port=port, pool=PacketPool(1024)))
        return devices[-1]

    server = Server([tmp_path / "vx.sock"], make_device)
    await server.start()
    fe = await VhostUserFrontend.connect(server.endpoints[0].path)
    try:
        await fe.handshake()
        await fe.start()
        fe.post_rx(32)
        # ARP: the kernel behind vxlan0 answers for 192.168.77.2 (and learns the guest from the request).
        fe.transmit([ethernet(BROADCAST_MAC, GUEST_MAC, ETHERTYPE_ARP,
                              arp(ARP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), PEER_IP))])  # fmt: skip
        async with asyncio.timeout(10):
            reply = await next_frame(fe, lambda f: parse_ethernet(f).ethertype == ETHERTYPE_ARP)
        a = parse_arp(parse_ethernet(reply).payload)
        assert (a.op, a.spa, a.tpa, a.tha) == (ARP_REPLY, PEER_IP, GUEST_IP, GUEST_MAC)
        peer_mac = a.sha
        assert peer_mac == mac_bytes(lab.host_b.run("cat", "/sys/class/net/vxlan0/address").stdout.strip())
        # ICMP echo, small and at the largest inner frame a 1500-byte underlay carries (1464 bytes).
        for seq, size in ((1, 98), (2, 1464)):
            fe.transmit([echo(seq, size, peer_mac)])
            async with asyncio.timeout(10):
                got = await next_frame(fe, is_echo_reply(seq))
            assert len(got) == size
        port = devices[0].port
        assert port.stats()["drops"] == {}
        # One byte more and the outer packet would be 1501 bytes: dropped and counted, never fragmented.
        fe.transmit([echo(3, 1465, peer_mac)])
        await fe.wait_used(1, 4)  # every TX buffer back: the ARP request, two echoes, this one
        assert port.stats()["drops"] == {"tx_too_big": 1}
        stats = port.stats()
        assert stats["tx_frames"] == 3 and stats["rx_frames"] >= 3
        rx_b = int(lab.host_b.run("cat", "/sys/class/net/vxlan0/statistics/rx_packets").stdout)
        assert rx_b == 3  # the kernel decapsulated exactly what we sent: our header is one it accepts
    finally:
        await fe.close()
        await server.close()
    assert len(os.listdir("/proc/self/fd")) == fds
