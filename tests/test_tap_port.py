"""The tap port and the device's offload path, driven by the driver-side model from ``rings.driver`` (no
QEMU, no mocks): feature offer and negotiation, the virtio-net header passed through both ways, GSO
frames carried across mergeable buffers, and a real TAP in a throwaway network namespace (root needed,
as for every namespace test here) whose kernel completes checksums and segments for the guest.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from nicsim.cli.serve import parse_port
from nicsim.ports import GeneratorConfig, GeneratorPort, Port, ReflectPort, ResponderPort, SinkPort, TxFrames
from nicsim.ports.frames import ETHERTYPE_IPV4, IPPROTO_UDP, ethernet, ip_bytes, ipv4, mac_bytes
from nicsim.ports.tap import OFFLOADS, TUN_ALL, TapConfig, TapError, TapPort, in_netns
from nicsim.ports.vnet_hdr import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    HDR_DTYPE,
    HDR_FIELDS,
    Offloads,
    check,
    check_one,
)
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import (
    OFFLOAD_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
)
from nicsim.virtio.port import MAX_FRAME
from qemu.testvm import Netns
from rings.driver import DriverQueue, GuestDriver

V1 = 1 << VIRTIO_F_VERSION_1
MRG = 1 << VIRTIO_NET_F_MRG_RXBUF
EVT = 1 << VIRTIO_F_EVENT_IDX
IND = 1 << VIRTIO_F_INDIRECT_DESC
CSUM = 1 << VIRTIO_NET_F_CSUM
GCSUM = 1 << VIRTIO_NET_F_GUEST_CSUM
GTSO = (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6)
HTSO4 = 1 << VIRTIO_NET_F_HOST_TSO4
HTSO = HTSO4 | (1 << VIRTIO_NET_F_HOST_TSO6)
MTU = 1 << VIRTIO_NET_F_MTU
PACKED = 1 << VIRTIO_F_RING_PACKED
BASE = V1 | MRG | IND | EVT | MTU | PACKED  # what every device offers without offloads
GUEST_MAC, HOST_MAC = "52:54:00:12:34:56", "52:54:00:00:00:02"
GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.2"
HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers


def start(dev: VirtioNetDevice, features: int, size: int = 256) -> tuple[DriverQueue, DriverQueue]:
    drv = GuestDriver()
    rx = drv.add_queue(0, size, event_idx=bool(features & EVT))
    tx = drv.add_queue(1, size, event_idx=bool(features & EVT))
    dev.set_features(features)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return rx, tx


# -- feature offer and header handling, without a TAP ------------------------------------------------


class HeaderPort(Port):
    """A header-passing port that offers every offload and keeps what it was told (like the tap)."""

    name = "header"
    vnet_hdr = True

    def __init__(self) -> None:
        super().__init__()
        self.accepted: int | None = None
        self.sent: list[bytes] = []

    def features(self) -> int:
        return OFFLOADS

    def negotiated(self, features: int) -> None:
        self.accepted = features

    def transmit(self, batch: TxFrames) -> bool:
        self.sent += [b"".join(bytes(v) for v in batch.iovec(i)) for i in range(batch.count)]
        return True


def _mergeable_generator() -> Port:
    # A small frame's generator offers no mergeable buffers (tests/test_device.py); asked to, it
    # offers the base set like every other port without offloads.
    return GeneratorPort(GeneratorConfig(mergeable=True))


@pytest.mark.parametrize("make", [SinkPort, ReflectPort, ResponderPort, _mergeable_generator])
def test_ports_without_offloads_offer_exactly_the_old_feature_set(make: Callable[[], Port]) -> None:
    dev = VirtioNetDevice(port=make())
    assert dev.device_features() == BASE
    with pytest.raises(Exception, match="never offered"):
        dev.set_features(BASE | GCSUM)


def test_a_port_with_offloads_adds_them_to_the_offer_and_learns_what_was_negotiated() -> None:
    port = HeaderPort()
    dev = VirtioNetDevice(port=port)
    assert dev.device_features() == BASE | OFFLOADS
    assert OFFLOADS & ~OFFLOAD_FEATURES == 0
    dev.set_features(V1 | MRG | GCSUM | GTSO)
    assert port.accepted == V1 | MRG | GCSUM | GTSO


def gso_frame(n: int) -> bytes:
    body = bytes((i * 7) & 0xFF for i in range(n - 14))
    return mac_bytes(GUEST_MAC) + mac_bytes(HOST_MAC) + b"\x08\x00" + body


def test_rx_keeps_the_ports_header_and_spreads_a_64k_gso_frame_over_mergeable_buffers() -> None:
    port = HeaderPort()
    dev = VirtioNetDevice(port=port)
    rx, _ = start(dev, V1 | MRG | GCSUM | GTSO)
    rx.post_rx(4096, count=40)
    f = gso_frame(65000)
    # NEEDS_CSUM, GSO_TCPV4, hdr_len 54, gso_size 1448, csum at 34+16; num_buffers left 0 (the device's)
    hdr = HDR.pack(1, 1, 54, 1448, 34, 16, 0)
    assert dev.push(np.frombuffer(hdr + f, np.uint8))
    res = dev.deliver_rx(0)
    got = rx.reap()
    data = b"".join(c.data or b"" for c in got)
    assert res.processed == 1 and len(got) == -(-(12 + len(f)) // 4096) == 16
    assert HDR.unpack_from(data) == (1, 1, 54, 1448, 34, 16, 16)
    assert data[12:] == f
    assert int(dev.stats.bytes[0]) == len(f) and dev.pool.usage == 0


def test_rx_zeroes_the_ports_header_when_the_driver_did_not_negotiate_guest_csum() -> None:
    dev = VirtioNetDevice(port=HeaderPort())
    rx, _ = start(dev, V1 | MRG)
    rx.post_rx(count=2)
    f = gso_frame(1000)
    dev.push(np.frombuffer(HDR.pack(1, 0, 0, 0, 34, 6, 0) + f, np.uint8))
    dev.deliver_rx(0)
    (c,) = rx.reap()
    assert c.data is not None
    assert HDR.unpack_from(c.data) == (0, 0, 0, 0, 0, 0, 1) and c.data[12:] == f


def test_tx_hands_the_port_the_guests_header_unchanged() -> None:
    port = HeaderPort()
    dev = VirtioNetDevice(port=port)
    _, tx = start(dev, V1 | MRG | CSUM | HTSO)
    hdr = HDR.pack(1, 1, 54, 1448, 34, 16, 0)
    f = gso_frame(30000)
    tx.post_tx(f, header=hdr)
    dev.process_tx(1)
    assert port.sent == [hdr + f]
    assert int(dev.stats.bytes[1]) == len(f)


def test_one_header_checked_with_plain_ints_gets_the_batch_checks_code() -> None:
    """The tap checks a request's header or two with ``check_one``: for every kind of header (each
    offload asked or not, fields at and around their bounds) and every offload set a driver may have
    negotiated, the code is the one the batch's ``check`` gives, precedence included."""
    rng = np.random.default_rng(11)
    n = 4000
    headers = np.zeros((n, HDR_FIELDS), np.uint8)
    fields_ = headers.view(HDR_DTYPE).reshape(-1)
    fields_["flags"] = rng.choice([0, F_NEEDS_CSUM, F_DATA_VALID, 3], n)
    fields_["gso_type"] = rng.choice([GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN | GSO_TCPV4, 3], n)
    fields_["hdr_len"] = rng.choice([0, 54, 66, 2000, 65535], n)
    fields_["gso_size"] = rng.choice([0, 1, 1448], n)
    fields_["csum_start"] = rng.choice([0, 34, 54, 1500, 65535], n)
    fields_["csum_offset"] = rng.choice([0, 6, 16, 65535], n)
    lengths = rng.choice([14, 60, 1514, MAX_FRAME, MAX_FRAME + 1], n).astype(np.uint32)
    for csum, tso4, tso6 in itertools.product((False, True), repeat=3):
        allowed = Offloads(csum, tso4, tso6)
        want = check(headers, lengths, allowed).tolist()
        got = [check_one(headers[i], int(lengths[i]), allowed) for i in range(n)]
        assert got == want
        assert len(set(want)) >= 3  # the sweep reaches several codes, not only OK


# -- a real TAP in a namespace -------------------------------------------------------------------------


@pytest.fixture
def tapns(netns: Callable[[], Netns]) -> Iterator[Netns]:
    """A namespace with a persistent tap0 (10.0.2.2/24, up) and the guest as a permanent neighbour."""
    ns = netns()
    ns.add_tap("tap0", f"{HOST_IP}/24", neighbour=(GUEST_IP, GUEST_MAC))
    yield ns


def ns_udp(ns: Netns, port: int = 0) -> socket.socket:
    """A UDP socket that lives in ``ns`` (opened by a thread that joined it)."""
    s = in_netns(ns.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    s.bind((HOST_IP, port))
    s.settimeout(10)
    return s


def tap(ns: Netns, *, offload: bool = True) -> TapPort:
    return TapPort(TapConfig(netns=ns.name, ifname="tap0", offload=offload))


def rx_stat(ns: Netns, name: str) -> int:
    return int(ns.run("cat", f"/sys/class/net/tap0/statistics/{name}").stdout)


def test_a_missing_namespace_is_a_tap_error_that_names_it() -> None:
    with pytest.raises(TapError) as info:
        TapPort(TapConfig(netns="nicsim-no-such-ns", ifname="tap0"))
    assert info.value.netns == "nicsim-no-such-ns" and info.value.step == "setns"
    with pytest.raises(ValueError, match="netns"):
        parse_port("tap,ifname=tap0")


def test_tap_offers_offloads_only_when_asked_and_sets_them_from_the_negotiated_bits(tapns: Netns) -> None:
    off = tap(tapns, offload=False)
    try:
        assert VirtioNetDevice(port=off).device_features() == BASE
    finally:
        off.close()
    port = parse_port(f"tap,netns={tapns.name},ifname=tap0,offload=on")
    assert isinstance(port, TapPort)
    dev = VirtioNetDevice(port=port)
    try:
        assert dev.device_features() == BASE | OFFLOADS
        dev.set_features(V1 | MRG | CSUM | GCSUM | GTSO | HTSO)
        assert port.tun_offload == TUN_ALL
        # The kernel now lets the namespace hand tap0 unsegmented, checksum-less TCP.
        k = tapns.run("ethtool", "-k", "tap0").stdout
        assert "tcp-segmentation-offload: on" in k and "tx-checksumming: on" in k
    finally:
        dev.shutdown()


def udp_frame_needing_csum(payload: bytes, dport: int) -> tuple[bytes, bytes]:
    """A guest->host UDP frame whose checksum field holds only the pseudo-header sum, and the
    virtio-net header asking the other side to finish it (NEEDS_CSUM at 34 + 6)."""
    src, dst = ip_bytes(GUEST_IP), ip_bytes(HOST_IP)
    length = 8 + len(payload)
    pseudo = sum(struct.unpack("!4H", src + dst)) + IPPROTO_UDP + length
    while pseudo >> 16:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    udp = struct.pack("!HHHH", 40000, dport, length, pseudo) + payload
    f = ethernet(mac_bytes(HOST_MAC), mac_bytes(GUEST_MAC), ETHERTYPE_IPV4, ipv4(src, dst, IPPROTO_UDP, udp))
    return HDR.pack(1, 0, 0, 0, 34, 6, 0), f


def test_tx_header_reaches_the_kernel_which_completes_the_checksum(tapns: Netns) -> None:
    sock = ns_udp(tapns)
    port = tap(tapns)
    dev = VirtioNetDevice(port=port)
    try:
        # A TAP fd is up for the kernel only once attached: the namespace learns our MAC by this frame.
        tapns.run("ip", "link", "set", "tap0", "address", HOST_MAC)
        _, tx = start(dev, V1 | MRG | CSUM | GCSUM)
        hdr, f = udp_frame_needing_csum(b"checksum me", sock.getsockname()[1])
        tx.post_tx(f, header=hdr)
        dev.process_tx(1)
        data, peer = sock.recvfrom(100)
        assert data == b"checksum me" and peer == (GUEST_IP, 40000)
        assert port.counters["tx_frames"] == 1 and port.drops == {}
        # The same frame without CSUM negotiated is refused by the port, never handed to the kernel.
        dev.shutdown()
        dev = VirtioNetDevice(port=tap(tapns))
        _, tx = start(dev, V1 | MRG)
        before = rx_stat(tapns, "rx_packets")
        tx.post_tx(f, header=hdr)
        dev.process_tx(1)
        assert dev.port.stats()["drops"] == {"tx_offload_not_negotiated": 1}
        assert rx_stat(tapns, "rx_packets") == before
    finally:
        dev.shutdown()
        sock.close()


def test_tx_gso_frame_is_segmented_by_the_kernel_only_when_host_tso4_was_negotiated(tapns: Netns) -> None:
    port = tap(tapns)
    dev = VirtioNetDevice(port=port)
    try:
        tapns.run("ip", "link", "set", "tap0", "address", HOST_MAC)
        _, tx = start(dev, V1 | MRG | CSUM | HTSO4)
        src, dst = ip_bytes(GUEST_IP), ip_bytes(HOST_IP)
        tcp = struct.pack("!HHIIBBHHH", 40000, 9, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + bytes(20000)
        f = ethernet(mac_bytes(HOST_MAC), mac_bytes(GUEST_MAC), ETHERTYPE_IPV4,
                     ipv4(src, dst, 6, tcp))  # fmt: skip
        before = rx_stat(tapns, "rx_bytes"), rx_stat(tapns, "rx_packets")
        tx.post_tx(f, header=HDR.pack(1, 1, 54, 1448, 34, 16, 0))
        dev.process_tx(1)
        assert port.counters["tx_frames"] == 1 and port.drops == {}
        # tun accepted the 20 kB frame as one GSO packet (a bad header would be EINVAL, counted).
        after = rx_stat(tapns, "rx_bytes"), rx_stat(tapns, "rx_packets")
        assert after == (before[0] + len(f), before[1] + 1)
    finally:
        dev.shutdown()


async def test_rx_from_the_namespace_reaches_the_guest_with_the_kernels_header(tapns: Netns) -> None:
    for offload, features, want_flags in ((True, V1 | MRG | GCSUM | GTSO, 1), (False, V1 | MRG, 0)):
        port = tap(tapns, offload=offload)
        dev = VirtioNetDevice(port=port)
        woken: list[int] = []
        dev.on_wakeup = woken.append
        port.start_io(asyncio.get_running_loop())
        sock = ns_udp(tapns)
        try:
            rx, _ = start(dev, features)
            rx.post_rx(count=64)
            sock.sendto(b"to the guest", (GUEST_IP, 9))
            async with asyncio.timeout(10):
                while not woken:  # the fd became readable: the port asked the device to poll it
                    await asyncio.sleep(0.01)
            got: list[Any] = []
            async with asyncio.timeout(10):
                while not got:
                    # Yield: the port re-arms its fd watch through the loop, and the timeout needs it too
                    # (when an IPv6 frame of the namespace's arrives first, a loop that never yields spins).
                    await asyncio.sleep(0.01)
                    dev.poll_rx(0)
                    got = [c for c in rx.reap() if c.data and c.data[12 + 12 : 12 + 14] == b"\x08\x00"]
            data = got[0].data
            flags, gso, _, _, start_, off, nbufs = HDR.unpack_from(data)
            assert (flags, gso, nbufs) == (want_flags, 0, 1)
            if want_flags:  # the kernel left the UDP checksum to the guest (CHECKSUM_PARTIAL)
                assert (start_, off) == (34, 6)
            assert data[12:].endswith(b"to the guest")
            async with asyncio.timeout(10):
                # Drained: the fd is watched again (a late IPv6 frame of the namespace's may come first).
                while not port.finished:
                    await asyncio.sleep(0.01)
                    dev.poll_rx(0)
        finally:
            sock.close()
            dev.shutdown()


def test_closing_the_port_keeps_the_persistent_tap_and_releases_its_fd(tapns: Netns) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    port = tap(tapns)
    assert len(os.listdir("/proc/self/fd")) == fds + 1
    port.close()
    port.close()  # idempotent
    assert len(os.listdir("/proc/self/fd")) == fds
    assert "tap0" in tapns.run("ip", "link", "show", "tap0").stdout


def test_a_multiqueue_tap_returns_a_flow_on_the_pair_it_was_sent_on_and_detaches_disabled_pairs(
    netns: Callable[[], Netns],
) -> None:
    ns = netns()
    port = TapPort(TapConfig(netns=ns.name, ifname="tapmq", queues=2))  # created, IFF_MULTI_QUEUE
    dev = VirtioNetDevice(port=port, pairs=2)
    sock: socket.socket | None = None
    try:
        ns.run("ip", "link", "set", "tapmq", "address", HOST_MAC)
        ns.run("ip", "addr", "add", f"{HOST_IP}/24", "dev", "tapmq")
        ns.run("ip", "link", "set", "tapmq", "up")
        ns.run("ip", "neigh", "add", GUEST_IP, "lladdr", GUEST_MAC, "dev", "tapmq", "nud", "permanent")
        sock = ns_udp(ns)
        drv = GuestDriver()
        qs = [drv.add_queue(i, 256) for i in range(4)]
        dev.set_features(V1 | MRG | (1 << VIRTIO_NET_F_MQ))
        dev.set_memory(drv.memory)
        for i, q in enumerate(qs):
            dev.start_queue(i, q.device_queue())
        qs[0].post_rx(count=64)
        qs[2].post_rx(count=64)
        _, f = udp_frame_needing_csum(b"on pair 1", sock.getsockname()[1])
        f = f[:40] + b"\0\0" + f[42:]  # UDP checksum 0 on IPv4: none (no offload negotiated)
        qs[3].post_tx(f, header=HDR.pack(0, 0, 0, 0, 0, 0, 0))
        dev.process_tx(3)
        data, peer = sock.recvfrom(100)
        assert data == b"on pair 1" and peer == (GUEST_IP, 40000)

        def reply_on(pair: int, text: bytes) -> None:
            sock.sendto(text, peer)
            for _ in range(500):
                for p in (0, 1):
                    if dev.enabled(2 * p):
                        dev.poll_rx(p)
                got = {i: [c for c in qs[i].reap() if c.data and c.data.endswith(text)] for i in (0, 2)}
                if got[0] or got[2]:
                    assert got[2 * pair] and not got[2 - 2 * pair], (pair, got)
                    return
                time.sleep(0.01)
            raise AssertionError(f"{text!r} never reached the guest")

        reply_on(1, b"back on pair 1")  # tun's flow steering: the queue the flow was written to
        dev.set_enabled(2, False)  # the guest stops using pair 1: its TAP queue is detached
        assert port.stats()["attached"] == 1 and port.drops == {}
        reply_on(0, b"back on pair 0")
        dev.set_enabled(2, True)
        assert port.stats()["attached"] == 2 and port.drops == {}
    finally:
        if sock is not None:
            sock.close()
        dev.shutdown()


def test_serve_refuses_more_tap_queues_than_queue_pairs(
    netns: Callable[[], Netns], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from nicsim.cli import main

    ns = netns()
    spec = f"tap,netns={ns.name},ifname=tapq,queues=2"
    argv = ["serve", "--socket", str(tmp_path / "s.sock"), "--port", spec]
    assert main(argv) == 2
    assert "needs --queue-pairs 2" in capsys.readouterr().err
