"""Offloads across the switch, driven by the driver-side model (``rings.driver``), two or three devices
on one :class:`Switch`: a GSO frame and its virtio-net header go as they are to a guest that negotiated
GUEST_TSO, are cut into checked segments for one that did not, a partial checksum is completed for a
guest without GUEST_CSUM, and a malformed header is dropped and counted with its reason. Frames and
their checksums are built and checked with scapy, independently of :mod:`nicsim.ports.gso`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from nicsim.ports import switch as switch_module
from nicsim.ports.base import Port, TxFrames
from nicsim.ports.switch import Switch
from nicsim.ports.tap import TapConfig, TapPort
from nicsim.ports.vnet_hdr import OFFLOADS
from nicsim.virtio.device import VirtioNetDevice
from qemu.testvm import Netns
from rings.driver import DriverQueue, GuestDriver
from rings.pool import PacketPool
from tests.test_tap_port import CSUM, GCSUM, GTSO, HDR, HTSO, MRG, V1

ALL = V1 | MRG | CSUM | GCSUM | HTSO | GTSO  # what a Linux guest negotiates with offloads offered
MAC_A, MAC_B, MAC_C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"
MSS = 1448
RX_BUF = 4096


@dataclass
class Guest:
    dev: VirtioNetDevice
    rx: DriverQueue
    tx: DriverQueue

    def send(self, frame: bytes, header: bytes = bytes(12)) -> None:
        self.tx.post_tx(frame, header=header)
        self.dev.process_tx(1)
        self.tx.reap()

    def frames(self) -> list[tuple[tuple[int, ...], bytes]]:
        """Every frame received: (header fields, frame), mergeable buffers joined by num_buffers."""
        out = []
        got = self.rx.reap()
        i = 0
        while i < len(got):
            first = got[i].data or b""
            fields = HDR.unpack_from(first)
            data = b"".join(c.data or b"" for c in got[i : i + fields[6]])
            out.append((fields, data[12:]))
            i += fields[6]
        return out


def guest(
    switch: Switch, name: str, features: int, *, rx: int = 64, pairs: int = 1,
    wrap: Callable[[Port], Port] = lambda port: port,
) -> Guest:
    """A guest on ``switch`` as ``name``; ``wrap`` gives the device another port around the switch's
    (a capture)."""
    dev = VirtioNetDevice(port=wrap(switch.port(name)), pool=PacketPool(256), pairs=pairs)
    drv = GuestDriver(region_sizes=(16 << 20, 16 << 20))
    rxq, txq = drv.add_queue(0, 256), drv.add_queue(1, 256)
    dev.set_features(features)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rxq.device_queue())
    dev.start_queue(1, txq.device_queue())
    if rx:
        rxq.post_rx(RX_BUF, count=rx)
    return Guest(dev, rxq, txq)


def payload(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


def tcp4(n: int, *, flags: str = "PA", dst: str = MAC_B) -> bytes:
    """A TCP/IPv4 GSO frame as Linux hands it over (IP total length of the whole, TCP checksum field
    holding only the pseudo-header sum: we put junk there, nobody may rely on it)."""
    p = Ether(src=MAC_A, dst=dst) / IP(src="10.0.0.1", dst="10.0.0.2", id=4242, flags="DF") / TCP(
        sport=40000, dport=5201, seq=1_000_000, ack=77, flags=flags, window=502, chksum=0x1234
    ) / Raw(payload(n))
    return bytes(p)


def tcp6(n: int) -> bytes:
    p = Ether(src=MAC_A, dst=MAC_B) / IPv6(src="fd00::1", dst="fd00::2") / TCP(
        sport=40000, dport=5201, seq=0xFFFFF000, flags="PA", chksum=0x1234
    ) / Raw(payload(n))
    return bytes(p)


def long_tcp_header() -> bytes:
    f = bytearray(tcp4(10))
    f[34 + 12] = 0xF0  # data offset 60 bytes: 10 past the end of the frame
    return bytes(f)


def gso_header(gso_type: int, l4: int) -> bytes:
    return HDR.pack(1, gso_type, l4 + 20, MSS, l4, 16, 0)  # NEEDS_CSUM, TCP checksum at l4 + 16


def recomputed(frame: bytes) -> bytes:
    """``frame`` with every IP/TCP/UDP checksum computed afresh by scapy."""
    p = Ether(frame)
    for layer in (IP, TCP, UDP):
        if layer in p:
            del p[layer].chksum
    return bytes(Ether(bytes(p)))


@pytest.fixture
def switch() -> Switch:
    sw = Switch()
    yield sw  # type: ignore[misc]
    sw.close()


def learn(sw: Switch, *guests: Guest) -> None:
    """Each guest sends one broadcast so the switch knows where its MAC is."""
    for g, mac in zip(guests, (MAC_A, MAC_B, MAC_C), strict=False):
        g.send(bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP()))
    for g in guests:
        g.rx.reap()


def test_switch_ports_offer_the_offloads_unless_the_switch_is_told_not_to() -> None:
    on, off = Switch(), Switch(offload=False)
    assert VirtioNetDevice(port=on.port("a")).device_features() & OFFLOADS == OFFLOADS
    assert VirtioNetDevice(port=off.port("a")).device_features() & OFFLOADS == 0
    assert on.port("b").vnet_hdr and not off.port("b").vnet_hdr


def test_a_gso_frame_reaches_a_guest_with_guest_tso_whole_with_its_header(switch: Switch) -> None:
    a, b = guest(switch, "a", ALL), guest(switch, "b", ALL)
    learn(switch, a, b)
    f = tcp4(60000)
    hdr = gso_header(1, 34)
    a.send(f, hdr)
    ((fields, data),) = b.frames()
    assert fields[:6] == HDR.unpack(hdr)[:6] and fields[6] == -(-(12 + len(f)) // RX_BUF)
    assert data == f
    assert switch.port_stats(0)["offload"] == {"rx_gso": 1}
    assert switch.port_stats(1)["offload"] == {"tx_gso": 1}
    assert switch.port_stats(1)["tx_packets"] == 1 + 1  # the ARP, the GSO frame
    assert a.dev.pool.usage == 0 and b.dev.pool.usage == 0


@pytest.mark.parametrize("v6", [False, True])
def test_a_guest_without_guest_tso_gets_checked_mtu_sized_segments(switch: Switch, v6: bool) -> None:
    a, b = guest(switch, "a", ALL), guest(switch, "b", V1 | MRG | GCSUM)
    learn(switch, a, b)
    n = 20 * MSS + 333
    f = tcp6(n) if v6 else tcp4(n, flags="FPA")
    a.send(f, gso_header(4 if v6 else 1, 54 if v6 else 34))
    got = b.frames()
    assert len(got) == 21
    sent = Ether(f)
    joined = b""
    for k, (fields, data) in enumerate(got):
        assert fields[:6] == (0, 0, 0, 0, 0, 0)  # complete checksums: nothing for the guest to do
        assert data == recomputed(data), f"segment {k}: a checksum is wrong"
        seg = Ether(data)
        tcp = seg[TCP]
        body = bytes(tcp.payload)
        assert len(body) == (MSS if k < 20 else 333)
        assert tcp.seq == (sent[TCP].seq + k * MSS) & 0xFFFFFFFF
        assert ((k == 20) and not v6, k == 20) == (tcp.flags.F, tcp.flags.P)
        if v6:
            assert seg[IPv6].plen == 20 + len(body)
        else:
            assert seg[IP].len == 40 + len(body) and seg[IP].id == 4242 + k and seg[IP].flags == "DF"
        joined += body
    assert joined == payload(n)
    assert switch.port_stats(1)["offload"] == {"gso_segmented": 1, "segments": 21}
    assert switch.port_stats(1)["tx_packets"] == 1 + 21  # A's ARP, the segments
    assert a.dev.pool.usage == 0 and b.dev.pool.usage == 0


def test_a_partial_checksum_is_completed_only_for_a_guest_without_guest_csum(switch: Switch) -> None:
    a, b, c = guest(switch, "a", ALL), guest(switch, "b", V1 | MRG), guest(switch, "c", ALL)
    learn(switch, a, b, c)
    good = bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / IP(src="10.0.0.1", dst="10.0.0.255")
                 / UDP(sport=5000, dport=9) / Raw(payload(301)))  # fmt: skip
    # What Linux sends with CSUM: the UDP checksum field holds the pseudo-header sum only.
    p = Ether(good)
    pseudo = (sum(struct.unpack("!4H", bytes(p[IP])[12:20])) + 17 + p[UDP].len)
    while pseudo >> 16:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    partial = good[:40] + struct.pack("!H", pseudo) + good[42:]
    hdr = HDR.pack(1, 0, 0, 0, 34, 6, 0)
    a.send(partial, hdr)
    ((fb, db),) = b.frames()
    ((fc, dc),) = c.frames()
    assert fb[:6] == (0, 0, 0, 0, 0, 0) and db == good == recomputed(db)
    assert fc[:6] == (1, 0, 0, 0, 34, 6) and dc == partial  # C completes it itself
    # DATA_VALID is not the sender's to set: a receiver that takes headers gets none of it.
    a.send(good, HDR.pack(2, 0, 0, 0, 0, 0, 0))
    assert [f[:6] for f, _ in c.frames()] == [(0, 0, 0, 0, 0, 0)]
    assert switch.port_stats(1)["offload"] == {"csum_completed": 1}
    assert "offload" not in switch.port_stats(2)


def test_a_gso_frame_waits_in_the_backlog_with_its_header(switch: Switch) -> None:
    a, b = guest(switch, "a", ALL), guest(switch, "b", ALL, rx=0)
    a.send(bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP()))
    b.send(bytes(Ether(src=MAC_B, dst="ff:ff:ff:ff:ff:ff") / ARP()))
    a.rx.reap()
    f = tcp4(30000)
    a.send(f, gso_header(1, 34))  # B has no buffer: the frame and its header wait
    assert b.dev.rx_backlog(0) == 1
    b.rx.post_rx(RX_BUF, count=16)
    b.dev.deliver_rx(0)
    ((fields, data),) = b.frames()
    assert fields[:6] == HDR.unpack(gso_header(1, 34))[:6] and data == f


@pytest.mark.parametrize(("features", "header", "frame", "reason"), [
    (V1 | MRG, HDR.pack(1, 0, 0, 0, 34, 16, 0), tcp4(100), "tx_offload_not_negotiated"),
    (V1 | MRG | CSUM, gso_header(1, 34), tcp4(5000), "tx_offload_not_negotiated"),
    (ALL, HDR.pack(1, 3, 42, MSS, 34, 6, 0), tcp4(5000), "tx_offload_not_negotiated"),  # GSO_UDP
    (ALL, HDR.pack(1, 0x81, 54, MSS, 34, 16, 0), tcp4(5000), "tx_offload_not_negotiated"),  # ECN
    (ALL, HDR.pack(1, 0, 0, 0, 5100, 16, 0), tcp4(5000), "bad_csum_offset"),
    (ALL, HDR.pack(1, 0, 0, 0, 34, 0xFFFF, 0), tcp4(100), "bad_csum_offset"),
    (ALL, HDR.pack(1, 1, 54, 0, 34, 16, 0), tcp4(5000), "bad_gso_size"),
    (ALL, HDR.pack(1, 1, 0xFFFF, MSS, 34, 16, 0), tcp4(5000), "bad_hdr_len"),
    (ALL, gso_header(4, 54), tcp4(5000), "bad_gso_frame"),  # TCPV6 on an IPv4 frame
    (ALL, gso_header(1, 34), bytes(Ether(src=MAC_A, dst=MAC_B) / ARP()) + bytes(3000), "bad_gso_frame"),
    (ALL, gso_header(1, 34), long_tcp_header(), "bad_gso_frame"),  # a TCP header past the frame's end
    (ALL, gso_header(1, 34), tcp4(60000) + bytes(6000), "too_big"),
])  # fmt: skip
@pytest.mark.parametrize("few", [True, False], ids=["plain-ints", "numpy"])
def test_a_malformed_header_is_dropped_and_counted_with_its_reason(
    switch: Switch, features: int, header: bytes, frame: bytes, reason: str, few: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A lone frame takes the switch's plain-int path; with it off, the numpy path must agree.
    if not few:
        monkeypatch.setattr(switch_module, "_FEW", 0)
    a, b = guest(switch, "a", features), guest(switch, "b", V1 | MRG)
    learn(switch, a, b)
    a.send(frame, header)
    assert b.frames() == []
    assert switch.port_stats(0)["drops"] == {reason: 1}
    assert a.dev.pool.usage == 0 and b.dev.pool.usage == 0
    a.send(tcp4(100))  # the next good frame goes through
    assert [d for _, d in b.frames()] == [tcp4(100)]


def test_an_impaired_link_carries_segments_and_counts_each(switch: Switch) -> None:
    switch.impair("a", "tx", "loss=0%")
    a, b = guest(switch, "a", ALL), guest(switch, "b", ALL)
    learn(switch, a, b)
    a.send(tcp4(10 * MSS), gso_header(1, 34))
    got = b.frames()
    assert len(got) == 10 and all(d == recomputed(d) for _, d in got)
    assert switch.port_stats(0)["impair"]["tx"]["offered"] == 1 + 10  # the ARP, the segments


class Recorder(Port):
    """A bare-frame port that keeps what it is sent: an uplink's far end that takes no offload."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.counters = {"tx_frames": 0}

    def transmit(self, batch: TxFrames) -> bool:
        self.sent += [bytes(batch.frame(i)) for i in range(batch.count)]
        self.counters["tx_frames"] += batch.count
        return True


def test_an_uplink_gets_segments_with_complete_checksums(switch: Switch) -> None:
    up = Recorder()
    switch.uplink("uplink0", up)
    a = guest(switch, "a", ALL)
    a.send(tcp4(5 * MSS, dst="ff:ff:ff:ff:ff:ff"), gso_header(1, 34))
    assert len(up.sent) == 5 and all(f == recomputed(f) for f in up.sent)
    assert b"".join(bytes(Ether(f)[TCP].payload) for f in up.sent) == payload(5 * MSS)
    assert np.all([len(f) == 54 + MSS for f in up.sent])


def test_serve_turns_the_switchs_offloads_off_on_request() -> None:
    from nicsim.cli.serve import parse_switch

    assert parse_switch("switch").offload and not parse_switch("switch,offload=off").offload
    with pytest.raises(ValueError, match="not on or off"):
        parse_switch("switch,offload=maybe")


@pytest.mark.parametrize("offload", [True, False])
def test_a_tap_uplink_gets_a_gso_frame_whole_for_its_kernel_to_segment(
    netns: Callable[[], Netns], offload: bool
) -> None:
    """The TAP's kernel honours CSUM and TSO: with offloads on, the switch writes a GSO frame to it
    whole with its header (one packet for tun, 10 segments' worth of bytes); off, as 10 segments."""
    ns = netns()
    ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    ns.add_tap("tap0", "10.0.0.2/24")
    sw = Switch(offload=offload)
    try:
        up = sw.uplink("uplink0", TapPort(TapConfig(netns=ns.name, ifname="tap0")))
        a = guest(sw, "a", ALL if offload else V1 | MRG)
        tap_mac = ns.run("cat", "/sys/class/net/tap0/address").stdout.strip()

        def stat(name: str) -> int:
            return int(ns.run("cat", f"/sys/class/net/tap0/statistics/{name}").stdout)

        packets, nbytes = stat("rx_packets"), stat("rx_bytes")
        f = tcp4(10 * MSS, dst=tap_mac)
        if offload:
            a.send(f, gso_header(1, 34))
        else:  # the guest segments itself: the same bytes as ten frames
            for k in range(10):
                a.send(tcp4(MSS, dst=tap_mac)[:54] + payload(10 * MSS)[k * MSS : (k + 1) * MSS])
        row = sw.port_stats(up.number)
        assert row["uplink"]["drops"] == {} and row["drops"] == {}
        assert stat("rx_packets") - packets == (1 if offload else 10)
        assert stat("rx_bytes") - nbytes == (len(f) if offload else 10 * (54 + MSS))
        assert row.get("offload", {}) == ({"tx_gso": 1} if offload else {})
    finally:
        sw.close()
