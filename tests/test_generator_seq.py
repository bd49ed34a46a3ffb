"""The generator's numbered frames (``seq=on``): every frame the guest's buffers receive carries the
next 64-bit sequence number and a UDP checksum valid for it, checked by decoding them with scapy (an
independent implementation of the checksum), through the device and its backlog, round after round."""

from __future__ import annotations

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from nicsim.ports import GeneratorConfig, GeneratorPort
from nicsim.ports import frames as fr
from nicsim.ports.generator import SEQ_MIN_SIZE, SEQ_OFFSET, SeqFrames
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_VERSION_1
from rings.driver import DriverQueue, GuestDriver


def wire(port: GeneratorPort) -> tuple[DriverQueue, VirtioNetDevice]:
    drv = GuestDriver()
    rx, tx = drv.add_queue(0, 64), drv.add_queue(1, 64)
    dev = VirtioNetDevice(port=port)
    dev.set_features(1 << VIRTIO_F_VERSION_1)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return rx, dev


def decode(frame: bytes) -> tuple[int, bool]:
    """(sequence number, UDP checksum valid) of one generator frame, as scapy reads it."""
    pkt = Ether(frame)
    udp = pkt[UDP]
    sent = udp.chksum
    ip = pkt[IP]
    ip_hdr = IP(src=ip.src, dst=ip.dst, proto=17)  # scapy recomputes the checksum when it is None
    again = UDP(bytes(udp))
    again.chksum = None
    recomputed = UDP(bytes(ip_hdr / again)[20:]).chksum
    seq = int.from_bytes(bytes(udp.payload)[:8], "big")
    return seq, sent == recomputed


@pytest.mark.parametrize("size", [SEQ_MIN_SIZE, 64, 1400])
def test_numbered_frames_are_consecutive_and_carry_valid_udp_checksums(size: int) -> None:
    gen = GeneratorPort(GeneratorConfig(size=size, count=100, seq=True))
    rx, dev = wire(gen)
    got: list[tuple[int, bool]] = []
    for _ in range(10):  # rounds of at most 16 buffers: the numbers go on across rounds
        rx.post_rx(count=16)
        dev.poll_rx(0)
        got += [decode((c.data or b"")[12:]) for c in rx.reap()]
    assert [s for s, _ in got] == list(range(100)) and all(ok for _, ok in got)
    assert gen.sent == 100 and gen.stats()["next_seq"] == 100


def test_a_rate_limited_generator_numbers_only_what_it_delivered() -> None:
    gen = GeneratorPort(GeneratorConfig(size=128, rate_pps=1000.0, burst=4, seq=True))
    rx, dev = wire(gen)
    rx.post_rx(count=32)
    for now in (0.0, 0.001, 0.002, 0.010):
        dev.poll_rx(0, now=now)
    got = [decode((c.data or b"")[12:]) for c in rx.reap()]
    assert [s for s, _ in got] == list(range(len(got))) and len(got) == 4 + 1 + 1 + 4
    assert all(ok for _, ok in got)


@pytest.mark.parametrize("first", [0, 0xFFFF, 0xFFFF_FFFF, 2**48 - 3, 2**63 + 12345, 2**64 - 3])
def test_the_vectorised_checksum_matches_the_reference_one_for_any_number(first: int) -> None:
    tmpl = np.frombuffer(fr.udp_frame(dst_mac=bytes(6), src_mac=bytes(6), src_ip=fr.ip_bytes("10.0.2.2"),
                                      dst_ip=fr.ip_bytes("10.0.2.15"), sport=9, dport=9, size=90),
                         np.uint8)  # fmt: skip
    frames = SeqFrames(tmpl, checksum=True)
    data, offsets, lengths = frames.build(first, 8)
    for i, (off, n) in enumerate(zip(offsets.tolist(), lengths.tolist(), strict=True)):
        frame = bytes(data[off : off + n])
        seq = (first + i) % 2**64
        ip = fr.parse_ipv4(fr.parse_ethernet(frame).payload)
        dgram = fr.parse_udp(ip)
        reference = fr.udp(ip.src, ip.dst, 9, 9, dgram.payload)
        assert int.from_bytes(dgram.payload[:8], "big") == seq
        assert frame[34:] == reference and dgram.checksum_ok


def test_without_udp_checksum_numbered_frames_send_none() -> None:
    gen = GeneratorPort(GeneratorConfig(size=64, count=3, seq=True, udp_checksum=False))
    rx, dev = wire(gen)
    rx.post_rx(count=4)
    dev.poll_rx(0)
    frames = [(c.data or b"")[12:] for c in rx.reap()]
    assert [int.from_bytes(f[SEQ_OFFSET : SEQ_OFFSET + 8], "big") for f in frames] == [0, 1, 2]
    assert all(f[40:42] == b"\0\0" for f in frames)


def test_a_numbered_frame_needs_room_for_its_number() -> None:
    with pytest.raises(ValueError, match="seq=on"):
        GeneratorPort(GeneratorConfig(size=SEQ_MIN_SIZE - 1, seq=True))
