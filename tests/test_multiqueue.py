"""Multiqueue on the device, driven by the driver-side model (no VM): a port that names no pair has its
frames steered to the pair their flow was sent on, else spread over the enabled RX pairs by flow hash,
one flow on one queue in order; a port answering a request (the responder) replies on the request's
pair; the pairs share the device's pool."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from nicsim.cli import main
from nicsim.ports import Port, ResponderPort
from nicsim.ports.frames import ETHERTYPE_IPV4
from nicsim.ports.sink import SinkPort
from nicsim.ports.switch import Switch
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_VERSION_1, VIRTIO_NET_F_MQ
from nicsim.virtio.steer import flow_hash, pick_pair
from rings.driver import DriverQueue, GuestDriver
from rings.pool import PacketPool

V1 = 1 << VIRTIO_F_VERSION_1
HDR = 12


def udp(sport: int, dport: int = 9, *, src: int = 1, dst: int = 2, frag: int = 0) -> bytes:
    """An Ethernet + IPv4 + UDP frame from 10.0.0.``src``:``sport`` to 10.0.0.``dst``:``dport``."""
    eth = bytes.fromhex("525400000002525400123456") + struct.pack("!H", ETHERTYPE_IPV4)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + 18, 0, frag, 64, 17, 0, bytes([10, 0, 0, src]),
                     bytes([10, 0, 0, dst]))  # fmt: skip
    return eth + ip + struct.pack("!HHHH", sport, dport, 8 + 18, 0) + bytes(18)


class Pusher(SinkPort):
    """A port that pushes frames without naming a pair, as the switch, the tap and vxlan do."""

    name = "pusher"


def make(port: Port, pairs: int = 2) -> tuple[GuestDriver, list[DriverQueue], VirtioNetDevice]:
    drv = GuestDriver()
    qs = [drv.add_queue(i, 256) for i in range(2 * pairs)]
    dev = VirtioNetDevice(port=port, pairs=pairs, pool=PacketPool(1024, name="mq"))
    dev.set_features(V1 | (1 << VIRTIO_NET_F_MQ))
    dev.set_memory(drv.memory)
    for i, q in enumerate(qs):
        dev.start_queue(i, q.device_queue())
    return drv, qs, dev


def test_mq_is_offered_only_with_several_pairs() -> None:
    assert VirtioNetDevice(port=Pusher(), pairs=2).device_features() & (1 << VIRTIO_NET_F_MQ)
    assert not VirtioNetDevice(port=Pusher()).device_features() & (1 << VIRTIO_NET_F_MQ)


def test_flow_hash_keeps_a_flow_together_and_tells_ports_apart() -> None:
    a = np.frombuffer(udp(1000), np.uint8)
    assert flow_hash(a) == flow_hash(np.frombuffer(udp(1000), np.uint8))
    assert len({flow_hash(np.frombuffer(udp(p), np.uint8)) for p in range(1000, 1016)}) == 16
    # A fragment carries no ports: every fragment of a datagram hashes alike, by addresses only.
    frags = {flow_hash(np.frombuffer(udp(p, frag=0x2000), np.uint8)) for p in range(1000, 1016)}
    assert len(frags) == 1
    # Both directions of a flow hash alike (replies follow the flow's TX pair).
    assert flow_hash(np.frombuffer(udp(9, 1000, src=2, dst=1), np.uint8)) == flow_hash(a)
    # The virtio-net header in front (a header-passing port) is skipped.
    assert flow_hash(np.frombuffer(bytes(HDR) + udp(1000), np.uint8), HDR) == flow_hash(a)
    # Not IP: by MAC addresses.
    arp = np.frombuffer(bytes(12) + b"\x08\x06" + bytes(28), np.uint8)
    assert pick_pair(arp, [0, 1]) in (0, 1)
    assert pick_pair(a, [1]) == 1


def test_frames_without_a_pair_spread_over_both_pairs_by_flow_in_order() -> None:
    port = Pusher()
    _, qs, dev = make(port)
    qs[0].post_rx(count=128)
    qs[2].post_rx(count=128)
    flows = [udp(2000 + f) for f in range(8)]
    sent = [flows[i % 8][:-1] + bytes([i]) for i in range(64)]  # the last byte numbers the frame
    kept = port.sink.push_views([np.frombuffer(f, np.uint8) for f in sent])
    assert kept.all()
    dev.deliver_rx(0)
    dev.deliver_rx(1)
    got0 = [c.data[HDR:] for c in qs[0].reap() if c.data is not None]
    got2 = [c.data[HDR:] for c in qs[2].reap() if c.data is not None]
    assert len(got0) + len(got2) == 64 and got0 and got2
    for got in (got0, got2):
        # One flow on one queue only, and in the order sent.
        assert got == [f for f in sent if f[:-1] in {g[:-1] for g in got}]
    assert not {g[:-1] for g in got0} & {g[:-1] for g in got2}
    snap = dev.snapshot()
    assert [q["packets"] for q in snap["queues"]] == [len(got0), 0, len(got2), 0]
    assert dev.pool.usage == 0


def test_a_disabled_pair_gets_nothing_steered_to_it() -> None:
    port = Pusher()
    _, qs, dev = make(port)
    dev.set_enabled(2, False)  # the guest uses one pair: QEMU leaves pair 1 disabled
    qs[0].post_rx(count=64)
    for f in range(16):
        assert port.sink.push(udp(3000 + f))
    dev.deliver_rx(0)
    assert len(qs[0].reap()) == 16
    assert dev.snapshot()["drops_total"] == 0


def test_the_responder_answers_on_the_pair_the_request_came_from() -> None:
    _, qs, dev = make(ResponderPort())
    ping = bytes.fromhex("525400000002525400123456") + struct.pack("!H", ETHERTYPE_IPV4)
    icmp = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + bytes(8)
    words = struct.unpack(f"!{len(icmp) // 2}H", icmp)
    csum = sum(words)
    csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
    icmp = icmp[:2] + struct.pack("!H", csum) + icmp[4:]
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0,
                               bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])))  # fmt: skip
    s = sum(struct.unpack("!10H", bytes(ip)))
    ip[10:12] = struct.pack("!H", ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF)
    frame = ping + bytes(ip) + icmp
    for pair in (0, 1):
        qs[2 * pair].post_rx(count=4)
        qs[2 * pair + 1].post_tx(frame)
        dev.process_tx(2 * pair + 1)
        dev.deliver_rx(pair)
    assert [len(qs[i].reap()) for i in (0, 2)] == [1, 1]
    assert dev.port.stats()["icmp_echo"] == 2


def test_replies_to_a_flow_go_to_the_pair_the_guest_sent_it_on() -> None:
    port = Pusher()
    _, qs, dev = make(port)
    # Flows whose hash alone would pick pair 0; the guest sends each on pair 1 (TX queue 3).
    by_hash = [p for p in range(4000, 4100) if pick_pair(np.frombuffer(udp(p), np.uint8), [0, 1]) == 0]
    *flows, unseen = by_hash[:5]
    for p in flows:
        qs[3].post_tx(udp(p))
    assert dev.process_tx(3).processed == len(flows)
    qs[0].post_rx(count=32)
    qs[2].post_rx(count=32)
    for p in flows:  # the replies (and a flow the guest never sent, which goes by its hash)
        assert port.sink.push(udp(9, p, src=2, dst=1))
    assert port.sink.push(udp(unseen))
    dev.deliver_rx(0)
    dev.deliver_rx(1)
    assert (len(qs[0].reap()), len(qs[2].reap())) == (1, len(flows))


def test_the_switch_delivers_between_two_guests_with_two_pairs_each() -> None:
    switch = Switch()
    _, qa, a = make(switch.port("a"))
    _, qb, b = make(switch.port("b"))
    b.set_enabled(2, False)  # guest B uses one pair only
    for q in (qa[0], qa[2], qb[0]):
        q.post_rx(count=64)
    mac_a, mac_b = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")

    def eth(dst: bytes, src: bytes, sport: int) -> bytes:
        return dst + src + udp(sport)[12:]

    qb[1].post_tx(eth(mac_a, mac_b, 1))  # B (pair 0) introduces itself to A: flooded, learned
    b.process_tx(1)
    for sport in range(16):  # A to B from its pair 1: B has one enabled pair, pair 0
        qa[3].post_tx(eth(mac_b, mac_a, 100 + sport))
    a.process_tx(3)
    b.deliver_rx(0)
    assert len(qb[0].reap()) == 16
    assert b.snapshot()["drops_total"] == 0
    # B's reply to a flow A sent on pair 1 comes back to A on pair 1.
    qb[1].post_tx(eth(mac_a, mac_b, 9)[:12] + udp(9, 100, src=2, dst=1)[12:])
    b.process_tx(1)
    a.deliver_rx(0)
    a.deliver_rx(1)
    got0, got2 = ([c.data[HDR:] for c in q.reap() if c.data is not None] for q in (qa[0], qa[2]))
    assert len(got0) + len(got2) == 2  # B's hello (a new flow: by its hash) and the reply
    reply = [f for f in got0 + got2 if f[34:38] == struct.pack("!HH", 9, 100)]
    assert len(reply) == 1 and reply[0] in got2


def test_serve_refuses_a_queue_pair_count_vhost_user_cannot_number(capsys: pytest.CaptureFixture[str],
                                                                    tmp_path: Path) -> None:  # fmt: skip
    for n in ("0", "129"):
        assert main(["serve", "--socket", str(tmp_path / "s.sock"), "--queue-pairs", n]) == 2
        assert "--queue-pairs" in capsys.readouterr().err
