"""Uplinks on the switch: two Python frontends on one in-process switch, and a port that is not a guest
joined to it, a TAP in a throwaway namespace or a VXLAN tunnel to Linux's own ``vxlan0``
(``tests.vxlan_lab``). Guest A's ARP request and ICMP echo cross the switch to the kernel behind the
uplink, whose replies come back to A alone (the switch learned A from its request); B, on the same
switch, sees the flooded ARP request and nothing addressed to A. The uplink's switch port counts both
ways; every device's pool goes back to 0. Root is needed, as for every namespace test.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nicsim.cli.serve import parse_switch
from nicsim.frontend import CompletionTimeout, VhostUserFrontend
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
from nicsim.ports.switch import Switch
from nicsim.ports.tap import TapConfig, TapPort
from nicsim.ports.vxlan import VxlanConfig, VxlanPort
from qemu.testvm import Netns
from tests.hardening import until
from tests.test_switch import MACS, Lab
from tests.vxlan_lab import OVERLAY_B, OVERLAY_GUEST, UNDERLAY_A, UNDERLAY_B, VNI, vxlan_lab

HDR = 12


async def next_frame(fe: VhostUserFrontend, want: Callable[[bytes], bool], timeout: float = 10) -> bytes:
    """The next frame delivered to ``fe`` that ``want`` accepts (others, IPv6 noise say, are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            for c in await fe.wait_used(0, 1, timeout=timeout):
                frame = (c.data or b"")[HDR:]
                fe.post_rx(1)
                if want(frame):
                    return frame


def is_arp(op: int) -> Callable[[bytes], bool]:
    def want(frame: bytes) -> bool:
        eth = parse_ethernet(frame)
        return eth.ethertype == ETHERTYPE_ARP and parse_arp(eth.payload).op == op

    return want


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


async def arp_and_ping(lab: Lab, me: str, peer: str) -> tuple[bytes, VhostUserFrontend, VhostUserFrontend]:
    """Guest A (``me``) asks for ``peer`` behind the uplink and pings it twice; returns the peer's MAC."""
    a, b = await lab.guest(0), await lab.guest(1)
    mac_a, ip_a, ip_p = mac_bytes(MACS[0]), ip_bytes(me), ip_bytes(peer)
    a.transmit([ethernet(BROADCAST_MAC, mac_a, ETHERTYPE_ARP, arp(ARP_REQUEST, mac_a, ip_a, bytes(6), ip_p))])
    reply = parse_arp(parse_ethernet(await next_frame(a, is_arp(ARP_REPLY))).payload)
    assert (reply.spa, reply.tpa, reply.tha) == (ip_p, ip_a, mac_a)
    # B is on the same switch: the broadcast reached it too.
    seen = parse_arp(parse_ethernet(await next_frame(b, is_arp(ARP_REQUEST))).payload)
    assert (seen.spa, seen.tpa) == (ip_a, ip_p)
    for seq in (1, 2):
        payload = bytes(range(56))
        echo = ipv4(ip_a, ip_p, IPPROTO_ICMP, icmp_echo(ICMP_ECHO_REQUEST, 9, seq, payload))
        a.transmit([ethernet(reply.sha, mac_a, ETHERTYPE_IPV4, echo)])
        got = await next_frame(a, is_echo_reply(seq))
        assert parse_icmp(parse_ipv4(parse_ethernet(got).payload).payload).data == payload
    # The replies went to A alone: B, whose MAC nobody asked for, got none of them.
    while True:
        try:
            done = await b.wait_used(0, 1, timeout=0.3)
        except CompletionTimeout:
            break
        assert not any(is_echo_reply(seq)((c.data or b"")[HDR:]) for c in done for seq in (1, 2))
    return reply.sha, a, b


async def finish(lab: Lab, *frontends: VhostUserFrontend) -> None:
    for fe in frontends:
        await fe.close()
    await lab.pools_empty()
    await lab.server.close()
    lab.switch.close()


async def test_a_guest_pings_an_address_behind_a_tap_uplink(
    tmp_path: Path, netns: Callable[[], Netns]
) -> None:
    ns = netns()
    ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")  # no IPv6 noise from the TAP
    ns.add_tap("tap0", "10.0.2.2/24")
    switch = Switch()
    up = switch.uplink("uplink0", TapPort(TapConfig(netns=ns.name, ifname="tap0")))
    lab = Lab(tmp_path, switch, guests=2)
    await lab.server.start()
    switch.start_io(asyncio.get_running_loop())
    peer_mac, a, b = await arp_and_ping(lab, "10.0.2.15", "10.0.2.2")
    assert peer_mac == mac_bytes(ns.run("cat", "/sys/class/net/tap0/address").stdout.strip())
    # The kernel knows A now, at A's MAC: the TAP's neighbour table says so.
    assert MACS[0] in ns.run("ip", "neigh", "show", "dev", "tap0").stdout
    row = switch.port_stats(up.number)
    print(f"uplink port: {row}")
    # tx: what the switch sent the uplink (the ARP request, two echoes); rx: what came in (their replies)
    assert row["tx_packets"] == 3 and row["rx_packets"] >= 3
    assert row["drops"] == {}
    tap = row["uplink"]
    assert tap["kind"] == "tap" and tap["drops"] == {}
    assert tap["tx_frames"] == row["tx_packets"] and tap["rx_frames"] == row["rx_packets"]
    assert switch.fdb.port_of(peer_mac, time.monotonic()) == up.number  # learned on the uplink
    await finish(lab, a, b)


async def test_a_guest_pings_an_address_behind_linux_vxlan_through_a_vxlan_uplink(
    tmp_path: Path, netns: Callable[[], Netns]
) -> None:
    vx = vxlan_lab(netns)
    switch = Switch()
    port = VxlanPort(VxlanConfig(remote=UNDERLAY_B, local=UNDERLAY_A, vni=VNI, netns=vx.host_a.name))
    up = switch.uplink("uplink0", port)
    lab = Lab(tmp_path, switch, guests=2)
    await lab.server.start()
    switch.start_io(asyncio.get_running_loop())
    peer_mac, a, b = await arp_and_ping(lab, OVERLAY_GUEST, OVERLAY_B)
    assert peer_mac == mac_bytes(vx.host_b.run("cat", "/sys/class/net/vxlan0/address").stdout.strip())
    # The kernel decapsulated exactly what A sent (the ARP request, two echoes): nothing else crossed.
    assert int(vx.host_b.run("cat", "/sys/class/net/vxlan0/statistics/rx_packets").stdout) == 3
    row = switch.port_stats(up.number)
    print(f"uplink port: {row}")
    assert row["tx_packets"] == 3 and row["rx_packets"] >= 3
    assert row["drops"] == {}
    assert switch.fdb.port_of(peer_mac, time.monotonic()) == up.number
    tunnel = row["uplink"]
    assert tunnel["kind"] == "vxlan" and tunnel["drops"] == {} and tunnel["vni"] == VNI
    assert tunnel["tx_frames"] == 3 and tunnel["rx_frames"] == row["rx_packets"]
    await finish(lab, a, b)


async def test_an_impaired_uplink_loses_what_the_kernel_sends_and_counts_it(
    tmp_path: Path, netns: Callable[[], Netns]
) -> None:
    """Impairments apply to an uplink's switch port as to a guest's: ``tx`` is what the uplink sends
    into the switch. With loss=100% there, the kernel's ARP reply never reaches A, and is counted."""
    ns = netns()
    ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    ns.add_tap("tap0", "10.0.2.2/24")
    switch = parse_switch("switch", ["uplink0:tx:loss=100% seed=1"], [], [f"tap,netns={ns.name},ifname=tap0"])
    lab = Lab(tmp_path, switch, guests=2)
    await lab.server.start()
    switch.start_io(asyncio.get_running_loop())
    a, b = await lab.guest(0), await lab.guest(1)
    mac_a, ip_a, ip_p = mac_bytes(MACS[0]), ip_bytes("10.0.2.15"), ip_bytes("10.0.2.2")
    a.transmit([ethernet(BROADCAST_MAC, mac_a, ETHERTYPE_ARP, arp(ARP_REQUEST, mac_a, ip_a, bytes(6), ip_p))])
    await next_frame(b, is_arp(ARP_REQUEST))  # the request did go out, to B and the uplink alike
    tap = switch.uplinks["uplink0"].port
    await until(lambda: tap.stats()["rx_frames"] >= 1, "the kernel's reply came in on the TAP")
    with pytest.raises(CompletionTimeout):
        await a.wait_used(0, 1, timeout=0.5)
    row = switch.port_stats(switch.slot("uplink0"))
    assert row["rx_packets"] == tap.stats()["rx_frames"] >= 1
    assert row["impair"]["tx"]["dropped"]["loss"] == row["rx_packets"]
    assert row["tx_packets"] == 1
    await finish(lab, a, b)


def test_an_uplink_must_be_a_tap_or_a_vxlan_tunnel_and_needs_a_switch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="an uplink is tap or vxlan"):
        parse_switch("switch", [], [], ["responder"])
    with pytest.raises(ValueError, match=r"--uplink 'vxlan,vni=1'.*remote"):
        parse_switch("switch", [], [], ["vxlan,vni=1"])
    with pytest.raises(ValueError, match="'uplink1' names no --socket or uplink"):
        parse_switch("switch", ["uplink1:tx:loss=1%"], [], [])
    argv = [sys.executable, "-m", "nicsim", "serve", "--socket", str(tmp_path / "x.sock"),
            "--uplink", "vxlan,remote=10.0.0.1,vni=1"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--uplink needs --port switch" in done.stderr, done.stderr
