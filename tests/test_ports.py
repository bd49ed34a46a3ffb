"""The built-in ports and the frame codec: the responder answers ARP, ping and UDP echo with valid
checksums (checked by parsing the replies the guest receives), the generator honours count and rate."""

from __future__ import annotations

import numpy as np
import pytest

from nicsim.ports import GeneratorConfig, GeneratorPort, ResponderPort, make_port
from nicsim.ports import frames as fr
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_VERSION_1
from rings.driver import DriverQueue, GuestDriver

GUEST_MAC = fr.mac_bytes("52:54:00:12:34:56")
GUEST_IP = fr.ip_bytes("10.0.2.15")
NIC_MAC = fr.mac_bytes("52:54:00:00:00:02")
NIC_IP = fr.ip_bytes("10.0.2.2")


def wire(port: ResponderPort | GeneratorPort) -> tuple[DriverQueue, DriverQueue, VirtioNetDevice]:
    drv = GuestDriver()
    rx, tx = drv.add_queue(0, 64), drv.add_queue(1, 64)
    dev = VirtioNetDevice(port=port)
    dev.set_features(1 << VIRTIO_F_VERSION_1)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    rx.post_rx(count=16)
    return rx, tx, dev


def exchange(frames: list[bytes]) -> tuple[list[fr.EthernetFrame], ResponderPort]:
    port = ResponderPort()
    rx, tx, dev = wire(port)
    for f in frames:
        tx.post_tx(f)
    dev.process_tx(1)
    dev.deliver_rx(0)
    return [fr.parse_ethernet((c.data or b"")[12:]) for c in rx.reap()], port


def test_responder_answers_arp_for_its_address() -> None:
    req = fr.ethernet(fr.BROADCAST_MAC, GUEST_MAC, fr.ETHERTYPE_ARP,
                      fr.arp(fr.ARP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), NIC_IP))
    (reply,), port = exchange([req])
    arp = fr.parse_arp(reply.payload)
    assert (reply.dst, reply.src, reply.ethertype) == (GUEST_MAC, NIC_MAC, fr.ETHERTYPE_ARP)
    assert (arp.op, arp.sha, arp.spa) == (fr.ARP_REPLY, NIC_MAC, NIC_IP)
    assert (arp.tha, arp.tpa) == (GUEST_MAC, GUEST_IP)
    assert port.counters["arp"] == 1


def test_responder_answers_ping_with_valid_checksums() -> None:
    icmp = fr.icmp_echo(fr.ICMP_ECHO_REQUEST, 0x1234, 7, b"abcdefgh" * 7)
    req = fr.ethernet(NIC_MAC, GUEST_MAC, fr.ETHERTYPE_IPV4, fr.ipv4(GUEST_IP, NIC_IP, fr.IPPROTO_ICMP, icmp))
    (reply,), _ = exchange([req])
    ip = fr.parse_ipv4(reply.payload)
    echo = fr.parse_icmp(ip.payload)
    assert ip.header_checksum_ok and echo.checksum_ok
    assert (ip.src, ip.dst, echo.type, echo.ident, echo.seq) == (NIC_IP, GUEST_IP, 0, 0x1234, 7)
    assert echo.data == b"abcdefgh" * 7


def test_responder_echoes_udp_port_7_with_valid_checksums() -> None:
    udp = fr.udp(GUEST_IP, NIC_IP, 40000, 7, b"hello nicsim")
    req = fr.ethernet(NIC_MAC, GUEST_MAC, fr.ETHERTYPE_IPV4, fr.ipv4(GUEST_IP, NIC_IP, fr.IPPROTO_UDP, udp))
    (reply,), _ = exchange([req])
    ip = fr.parse_ipv4(reply.payload)
    dgram = fr.parse_udp(ip)
    assert ip.header_checksum_ok and dgram.checksum_ok
    assert (dgram.sport, dgram.dport, dgram.payload) == (7, 40000, b"hello nicsim")


def test_responder_ignores_other_traffic_and_bad_checksums() -> None:
    other_ip = fr.ethernet(NIC_MAC, GUEST_MAC, fr.ETHERTYPE_IPV4,
                           fr.ipv4(GUEST_IP, fr.ip_bytes("10.0.2.3"), fr.IPPROTO_ICMP,
                                   fr.icmp_echo(8, 1, 1, b"x")))
    other_port = fr.ethernet(NIC_MAC, GUEST_MAC, fr.ETHERTYPE_IPV4,
                             fr.ipv4(GUEST_IP, NIC_IP, fr.IPPROTO_UDP, fr.udp(GUEST_IP, NIC_IP, 1, 9, b"x")))
    bad = bytearray(fr.ethernet(NIC_MAC, GUEST_MAC, fr.ETHERTYPE_IPV4,
                                fr.ipv4(GUEST_IP, NIC_IP, fr.IPPROTO_ICMP, fr.icmp_echo(8, 1, 1, b"x"))))
    bad[14 + 20 + 2] ^= 0xFF  # corrupt the ICMP checksum
    ipv6 = fr.ethernet(NIC_MAC, GUEST_MAC, 0x86DD, bytes(40))
    replies, port = exchange([other_ip, other_port, bytes(bad), ipv6])
    assert replies == [] and port.counters["ignored"] == 4


def test_generator_honours_count() -> None:
    gen = GeneratorPort(GeneratorConfig(size=128, count=10))
    rx, _, dev = wire(gen)
    dev.poll_rx(0)
    dev.poll_rx(0)
    assert gen.sent == 10 and gen.finished and len(rx.reap()) == 10


def test_generator_rate_is_a_token_bucket_fed_by_the_callers_clock() -> None:
    gen = GeneratorPort(GeneratorConfig(size=64, rate_pps=1000.0, burst=4))
    rx, _, dev = wire(gen)
    assert dev.poll_rx(0, now=0.0).processed == 4  # the initial burst
    assert dev.poll_rx(0, now=0.001).processed == 1  # 1 ms at 1000 pps
    assert dev.poll_rx(0, now=0.001).processed == 0
    assert dev.poll_rx(0, now=0.005).processed == 4  # capped by the bucket depth
    assert len(rx.reap()) == 9


def test_generator_template_is_a_valid_udp_frame_of_the_requested_size() -> None:
    gen = GeneratorPort(GeneratorConfig(size=1500))
    eth = fr.parse_ethernet(gen.template)
    ip = fr.parse_ipv4(eth.payload)
    assert gen.template.shape[0] == 1500 and eth.dst == GUEST_MAC and ip.dst == GUEST_IP
    assert ip.header_checksum_ok and fr.parse_udp(ip).checksum_ok


def test_internet_checksum_matches_the_rfc1071_example() -> None:
    data = bytes([0x00, 0x01, 0xF2, 0x03, 0xF4, 0xF5, 0xF6, 0xF7])
    assert fr.internet_checksum(data) == (~0xDDF2) & 0xFFFF  # RFC 1071 §3 sum is ddf2
    assert fr.internet_checksum(np.frombuffer(data, np.uint8)) == fr.internet_checksum(data)


@pytest.mark.parametrize("cut", [0, 5, 13])
def test_parsers_reject_truncated_frames_and_ignore_trailing_padding(cut: int) -> None:
    f = fr.ethernet(NIC_MAC, GUEST_MAC, fr.ETHERTYPE_IPV4,
                    fr.ipv4(GUEST_IP, NIC_IP, fr.IPPROTO_UDP, fr.udp(GUEST_IP, NIC_IP, 1, 7, b"z")))
    with pytest.raises(fr.FrameError) as err:
        fr.parse_ethernet(f[:cut])
    assert err.value.layer == "ethernet"
    ip = fr.parse_ipv4(fr.parse_ethernet(f + b"\x00" * 9).payload)
    assert fr.parse_udp(ip).payload == b"z"  # the 60-byte minimum padding is not payload
    with pytest.raises(fr.FrameError):
        fr.parse_ipv4(fr.parse_ethernet(f).payload[:25])  # total length 29


def test_make_port_builds_every_builtin_and_rejects_unknown_names() -> None:
    assert [make_port(n).name for n in ("responder", "sink", "generator", "reflect")] == [
        "responder", "sink", "generator", "reflect"]
    with pytest.raises(ValueError):
        make_port("nope")


def test_offered_generator_drops_and_counts_what_falls_due_with_no_buffer() -> None:
    # 16 buffers posted; 1000 frames fall due at once: 16 are sent, burst (4) wait, the rest dropped.
    gen = GeneratorPort(GeneratorConfig(size=64, count=1000, rate_pps=1000.0, burst=4, offered=True))
    rx, _, dev = wire(gen)
    assert dev.poll_rx(0, now=0.0).processed == 0  # an offered load starts from an empty bucket
    dev.poll_rx(0, now=1.0)
    assert gen.sent == 16 and gen.dropped == 1000 - 16 - 4 and not gen.finished
    rx.post_rx(count=16)
    dev.poll_rx(0, now=1.0)
    assert gen.sent == 20 and gen.offered_count == 1000 and gen.finished and len(rx.reap()) == 20
    burst = gen.stats()["burst"]
    assert burst["offered"] == 1000 and burst["dropped"] == 980 and burst["finished"]


def test_offered_generator_loses_nothing_when_the_guest_keeps_up() -> None:
    gen = GeneratorPort(GeneratorConfig(size=64, count=40, rate_pps=1000.0, burst=4, offered=True))
    rx, _, dev = wire(gen)
    dev.poll_rx(0, now=0.0)
    for ms in range(1, 60):
        dev.poll_rx(0, now=ms / 1000)
        rx.reap()
        rx.post_rx(count=1)
    assert gen.sent == 40 and gen.dropped == 0 and gen.finished


def test_held_generator_sends_nothing_until_started() -> None:
    gen = GeneratorPort(GeneratorConfig(size=64, count=5, hold=True))
    rx, _, dev = wire(gen)
    dev.poll_rx(0, now=0.0)
    assert gen.sent == 0
    gen.start()
    dev.poll_rx(0, now=0.0)
    assert gen.sent == 5 and len(rx.reap()) == 5


def test_offered_generator_needs_a_rate() -> None:
    with pytest.raises(ValueError, match="rate"):
        GeneratorPort(GeneratorConfig(offered=True))


def test_each_start_is_a_burst_counted_on_its_own() -> None:
    gen = GeneratorPort(GeneratorConfig(size=64, count=3, rate_pps=1000.0, offered=True, hold=True))
    rx, _, dev = wire(gen)
    gen.start()
    dev.poll_rx(0, now=0.0)
    dev.poll_rx(0, now=1.0)
    assert gen.finished and gen.burst_sent == 3
    gen.start(rate_pps=2000.0, count=5)
    assert not gen.finished and gen.offered_count == 0
    dev.poll_rx(0, now=5.0)
    dev.poll_rx(0, now=6.0)
    assert gen.burst_sent == 5 and gen.sent == 8 and gen.bursts == 2 and len(rx.reap()) == 8
