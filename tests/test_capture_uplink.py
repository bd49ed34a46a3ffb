"""Capture on a switch's TAP uplink, wired as ``nicsim serve --port switch --uplink tap,... --pcap`` wires
it (:class:`nicsim.cli.capture.Captures` wrapping the guests' and the uplink's ports), with a real TAP
in a throwaway namespace (root needed) and Python frontends as the guests. Guest A pings the kernel
behind the uplink, then the kernel pings A, which answers: every echo crosses the uplink once each way.
The file is read back with scapy and ``tcpdump -r``: on the uplink's interface, what the switch sent
out to the TAP is inbound and what the kernel sent outbound (into the switch, as on a guest's
interface), byte for byte the frames seen on A's interface the other way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from nicsim.cli import build_parser
from nicsim.cli.capture import Captures
from nicsim.cli.serve import parse_switch
from nicsim.frontend import VhostUserFrontend
from nicsim.ports.frames import (
    ETHERTYPE_IPV4,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IPPROTO_ICMP,
    ethernet,
    icmp_echo,
    ipv4,
    parse_ethernet,
    parse_icmp,
    parse_ipv4,
)
from qemu.testvm import Netns
from tests.hardening import until
from tests.pcap_read import Captured, read_capture, tcpdump
from tests.test_switch import BROADCAST, MACS, Lab, frame
from tests.test_switch_uplinks import arp_and_ping, finish, next_frame

INBOUND, OUTBOUND = 1, 2
A_IP, PEER_IP = "10.0.2.15", "10.0.2.2"
UPLINK_IF = "uplink0 (tap)"

Echo = tuple[str, int, str, str, int]  # interface, direction, source IP, destination IP, ICMP type


def is_echo_request(frame: bytes) -> bool:
    eth = parse_ethernet(frame)
    if eth.ethertype != ETHERTYPE_IPV4:
        return False
    ip = parse_ipv4(eth.payload)
    return ip.proto == IPPROTO_ICMP and parse_icmp(ip.payload).type == ICMP_ECHO_REQUEST


async def answer_a_ping_from_the_namespace(ns: Netns, a: VhostUserFrontend) -> None:
    """The kernel behind the uplink pings A once (busybox ping), and A answers it."""
    ping = ns.popen("busybox", "ping", "-c", "1", "-W", "5", A_IP)
    request = await next_frame(a, is_echo_request)
    eth = parse_ethernet(request)
    ip = parse_ipv4(eth.payload)
    echo = parse_icmp(ip.payload)
    reply = icmp_echo(ICMP_ECHO_REPLY, echo.ident, echo.seq, echo.data)
    a.transmit([ethernet(eth.src, eth.dst, ETHERTYPE_IPV4, ipv4(ip.dst, ip.src, IPPROTO_ICMP, reply))])
    assert await asyncio.to_thread(ping.wait, 10) == 0, "the namespace's ping got its reply"


async def ping_over_a_captured_tap_uplink(tmp_path: Path, netns: Callable[[], Netns], fmt: str) -> None:
    """Two guests and a TAP uplink on a switch, every port captured in ``fmt``; A and the kernel behind
    the uplink ping each other. On return the capture files are complete."""
    ns = netns()
    ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")  # no IPv6 noise from the TAP
    ns.add_tap("tap0", f"{PEER_IP}/24")
    sockets = [tmp_path / "a.sock", tmp_path / "b.sock"]
    args = build_parser().parse_args([
        "serve", *(a for s in sockets for a in ("--socket", str(s))), "--port", "switch",
        "--uplink", f"tap,netns={ns.name},ifname=tap0", "--pcap", str(tmp_path / f"cap.{fmt}"),
        "--pcap-format", fmt,
    ])  # fmt: skip
    captures = Captures(args, sockets, args.uplink)
    try:
        switch = parse_switch("switch", [], sockets, args.uplink, wrap_uplink=captures.wrap_uplink)
        lab = Lab(tmp_path, switch, guests=2, wrap=captures.wrap)
        await lab.server.start()
        switch.start_io(asyncio.get_running_loop())
        _, a, b = await arp_and_ping(lab, A_IP, PEER_IP)
        await answer_a_ping_from_the_namespace(ns, a)
        up = switch.uplinks["uplink0"]
        row = switch.port_stats(up.number)
        print(f"uplink port: {row}")
        # Everything the switch sent out of the uplink was captured inbound, all it took in outbound.
        assert row["uplink"]["capture"] == {"inbound": row["tx_packets"], "outbound": row["rx_packets"]}
        assert row["drops"] == {}
        await finish(lab, a, b)
    finally:
        captures.close()


def echoes(captured: list[Captured]) -> list[tuple[Echo, bytes]]:
    """Each IPv4 ICMP echo in the file, with its bytes."""
    out = []
    for c in captured:
        frame = Ether(c.data)
        if IP in frame and ICMP in frame:
            iface, direction = c.interface or "", c.direction or 0
            out.append(((iface, direction, frame[IP].src, frame[IP].dst, int(frame[ICMP].type)), c.data))
    return out


async def test_a_pcapng_capture_holds_the_tap_uplink_as_an_interface_both_ways(
    tmp_path: Path, netns: Callable[[], Netns]
) -> None:
    await ping_over_a_captured_tap_uplink(tmp_path, netns, "pcapng")
    cap = tmp_path / "cap.pcapng"
    captured = read_capture(cap)
    assert {c.interface for c in captured} <= {"a.sock", "b.sock", UPLINK_IF}
    request, reply = ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY
    a_to_peer = [("a.sock", OUTBOUND, A_IP, PEER_IP, request), (UPLINK_IF, INBOUND, A_IP, PEER_IP, request),
                 (UPLINK_IF, OUTBOUND, PEER_IP, A_IP, reply), ("a.sock", INBOUND, PEER_IP, A_IP, reply)]
    peer_to_a = [(UPLINK_IF, OUTBOUND, PEER_IP, A_IP, request), ("a.sock", INBOUND, PEER_IP, A_IP, request),
                 ("a.sock", OUTBOUND, A_IP, PEER_IP, reply), (UPLINK_IF, INBOUND, A_IP, PEER_IP, reply)]
    got = echoes(captured)
    assert [e for e, _ in got] == a_to_peer * 2 + peer_to_a, [Ether(c.data).summary() for c in captured]
    # The switch forwards untouched: what one side sent is byte for byte what the other was given.
    for k in range(0, len(got), 2):
        assert got[k][1] == got[k + 1][1], k
    # A's ARP request went out of the uplink (inbound there); the kernel's reply came in (outbound).
    arps = [(c.direction, Ether(c.data).op) for c in captured if c.interface == UPLINK_IF
            and Ether(c.data).type == 0x0806]  # fmt: skip
    assert arps[:2] == [(INBOUND, 1), (OUTBOUND, 2)], arps

    header, dumped = tcpdump(cap, "icmp")
    assert header.startswith("reading from file"), header
    mac_a, mac_peer = MACS[0], str(Ether(got[2][1]).src)  # the first reply came from the TAP
    assert [(d.src, d.dst) for d in dumped] == [(mac_a, mac_peer) if e[2] == A_IP else (mac_peer, mac_a)
                                                for e, _ in got]  # fmt: skip
    assert sum("ICMP echo request" in d.line for d in dumped) == 6
    assert len(tcpdump(cap)[1]) == len(captured)


async def test_pcap_gives_the_tap_uplink_its_own_file(tmp_path: Path, netns: Callable[[], Netns]) -> None:
    await ping_over_a_captured_tap_uplink(tmp_path, netns, "pcap")
    uplink = tmp_path / "cap-uplink0.pcap"
    assert {p.name for p in tmp_path.glob("cap*")} == {"cap-a.pcap", "cap-b.pcap", "cap-uplink0.pcap"}
    request, reply = ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY
    want = [(A_IP, PEER_IP, request), (PEER_IP, A_IP, reply)] * 2 + [(PEER_IP, A_IP, request),
                                                                      (A_IP, PEER_IP, reply)]  # fmt: skip
    on_uplink = [(e[2], e[3], e[4]) for e, _ in echoes(read_capture(uplink))]
    assert on_uplink == want
    # The same echoes, the same bytes, in A's own file.
    on_a = echoes(read_capture(tmp_path / "cap-a.pcap"))
    assert [d for _, d in echoes(read_capture(uplink))] == [d for _, d in on_a]
    header, dumped = tcpdump(uplink, "icmp")
    assert header.startswith("reading from file") and len(dumped) == 6, (header, dumped)
    assert all(MACS[0] in (d.src, d.dst) for d in dumped)


async def test_a_frame_the_tap_refuses_is_captured_yet_counted_as_dropped_not_sent(
    tmp_path: Path, netns: Callable[[], Netns]
) -> None:
    """The capture holds what the switch handed to the uplink's port; whether it left is the port's
    ``tx_frames``, which the switch still reads through the capture's wrapper: a TAP that is down
    refuses the write (EIO), and the switch counts the frame ``uplink_tx``, not as sent."""
    ns = netns()
    ns.add_tap("tap0", f"{PEER_IP}/24")
    ns.run("ip", "link", "set", "tap0", "down")
    args = build_parser().parse_args(["serve", "--socket", str(tmp_path / "a.sock"), "--port", "switch",
                                      "--uplink", f"tap,netns={ns.name},ifname=tap0",
                                      "--pcap", str(tmp_path / "cap.pcapng")])  # fmt: skip
    captures = Captures(args, args.socket, args.uplink)
    try:
        switch = parse_switch("switch", [], args.socket, args.uplink, wrap_uplink=captures.wrap_uplink)
        lab = Lab(tmp_path, switch, guests=1, wrap=captures.wrap)
        await lab.server.start()
        switch.start_io(asyncio.get_running_loop())
        a = await lab.guest(0)
        a.transmit([frame(0, BROADCAST)])
        number = switch.slot("uplink0")
        await until(lambda: switch.port_stats(number)["drops"] == {"uplink_tx": 1}, "the drop is counted")
        row = switch.port_stats(number)
        assert row["tx_packets"] == 0 and row["uplink"]["drops"] == {"tx_eio": 1}
        assert row["uplink"]["capture"] == {"inbound": 1, "outbound": 0}
        await finish(lab, a)
    finally:
        captures.close()
    on_uplink = [c.direction for c in read_capture(tmp_path / "cap.pcapng") if c.interface == UPLINK_IF]
    assert on_uplink == [INBOUND]
