"""Capture wrapped around real ports on a real device: what the guest sends is captured outbound, what
it is handed inbound, in order, byte for byte as the guest sees it; frames the device refuses are not
captured; pull-style ports stay pull-style. The device is driven by the driver model of ``rings``, then
by the Python frontend over a real vhost-user socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nicsim.frontend import VhostUserFrontend
from nicsim.ports import GeneratorConfig, GeneratorPort, Port, ReflectPort, ResponderPort, SinkPort
from nicsim.ports import frames as fr
from nicsim.ports.capture import CaptureConfig, CaptureWriter, CapturingPort, Direction, Format, capturing
from nicsim.ports.capture.port import CapturingPullPort
from nicsim.server import Server
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_VERSION_1
from nicsim.virtio.policy import NotifyPolicy
from rings.driver import DriverQueue, GuestDriver
from rings.pool import PacketPool
from tests.pcap_read import read_capture, tcpdump

GUEST_MAC, GUEST_IP = fr.mac_bytes("52:54:00:12:34:56"), fr.ip_bytes("10.0.2.15")
NIC_MAC, NIC_IP = fr.mac_bytes("52:54:00:00:00:02"), fr.ip_bytes("10.0.2.2")
OUT, IN = 2, 1  # epb_flags directions


def udp(n: int, size: int = 60) -> bytes:
    return fr.udp_frame(dst_mac=NIC_MAC, src_mac=GUEST_MAC, src_ip=GUEST_IP, dst_ip=NIC_IP, sport=1000 + n,
                        dport=9, size=size)  # fmt: skip


def arp_request() -> bytes:
    body = fr.arp(fr.ARP_REQUEST, GUEST_MAC, GUEST_IP, b"\0" * 6, NIC_IP)
    return fr.ethernet(fr.BROADCAST_MAC, GUEST_MAC, fr.ETHERTYPE_ARP, body)


def ping(seq: int) -> bytes:
    icmp = fr.icmp_echo(fr.ICMP_ECHO_REQUEST, 0x4242, seq, bytes(range(32)))
    packet = fr.ipv4(GUEST_IP, NIC_IP, fr.IPPROTO_ICMP, icmp)
    return fr.ethernet(NIC_MAC, GUEST_MAC, fr.ETHERTYPE_IPV4, packet)


def wired(port: Port, *, rx_buffers: int = 16, rx_backlog: int = 256,
          ) -> tuple[DriverQueue, DriverQueue, VirtioNetDevice]:  # fmt: skip
    drv = GuestDriver()
    rx, tx = drv.add_queue(0, 64), drv.add_queue(1, 64)
    dev = VirtioNetDevice(port=port, policy=NotifyPolicy(rx_backlog=rx_backlog))
    dev.set_features(1 << VIRTIO_F_VERSION_1)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    if rx_buffers:
        rx.post_rx(count=rx_buffers)
    return rx, tx, dev


def received(rx: DriverQueue) -> list[bytes]:
    return [(c.data or b"")[12:] for c in rx.reap()]  # past the 12-byte virtio_net_hdr_v1


def test_reflect_captures_each_frame_out_and_its_reflection_in(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcapng"
    sent = [udp(i, size=60 + 151 * i) for i in range(8)]
    with CaptureWriter(CaptureConfig(path=path)) as w:
        rx, tx, dev = wired(capturing(ReflectPort(), w, w.add_interface("guest0")))
        for f in sent:
            tx.post_tx(f)
        dev.process_tx(1)
        dev.deliver_rx(0)
        got = received(rx)
    assert len(got) == len(sent)
    captured = read_capture(path)
    assert [(c.data, c.direction) for c in captured] == [(f, OUT) for f in sent] + [(g, IN) for g in got]
    assert {c.interface for c in captured} == {"guest0"}


def test_frames_the_device_refuses_are_not_captured(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcapng"
    sent = [udp(i) for i in range(5)]
    with CaptureWriter(CaptureConfig(path=path)) as w:
        # No RX buffer and a backlog of 2: the reflection of frames 2..4 is dropped (no_rx_buffer).
        port = capturing(ReflectPort(), w, w.add_interface("guest0"))
        rx, tx, dev = wired(port, rx_buffers=0, rx_backlog=2)
        for f in sent:
            tx.post_tx(f)
        dev.process_tx(1)
        assert dev.snapshot()["port"] == {"name": "reflect", "reflected": 2, "dropped": 3,
                                          "capture": {"inbound": 2, "outbound": 5}}  # fmt: skip
        rx.post_rx(count=8)
        dev.deliver_rx(0)
        got = received(rx)
    assert [fr.parse_udp(fr.parse_ipv4(fr.parse_ethernet(g).payload)).sport for g in got] == [1000, 1001]
    expect = [(f, OUT) for f in sent] + [(g, IN) for g in got]
    assert [(c.data, c.direction) for c in read_capture(path)] == expect


def test_responder_replies_are_captured_after_their_requests(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    with CaptureWriter(CaptureConfig(path=path, format=Format.PCAP)) as w:
        port = capturing(ResponderPort(), w, w.add_interface("guest0"))
        rx, tx, dev = wired(port)
        expect: list[bytes] = []
        for request in (arp_request(), ping(1), udp(9), ping(2)):  # the UDP frame (port 9) is ignored
            tx.post_tx(request)
            dev.process_tx(1)
            dev.deliver_rx(0)
            expect += [request, *received(rx)]
        assert dev.snapshot()["port"]["capture"] == {"inbound": 3, "outbound": 4}
    assert len(expect) == 7
    assert [c.data for c in read_capture(path)] == expect
    _, dumped = tcpdump(path)
    kinds = ["Request who-has", "Reply 10.0.2.2 is-at", "ICMP echo request", "ICMP echo reply", "UDP"]
    assert [next(k for k in kinds if k in d.line) for d in dumped] == [
        "Request who-has", "Reply 10.0.2.2 is-at", "ICMP echo request", "ICMP echo reply", "UDP",
        "ICMP echo request", "ICMP echo reply",
    ]  # fmt: skip


def test_a_generator_stays_pull_style_and_its_frames_are_captured(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcapng"
    with CaptureWriter(CaptureConfig(path=path, snaplen=40)) as w:
        gen = GeneratorPort(GeneratorConfig(size=200, count=10))
        port = capturing(gen, w, w.add_interface("guest0"))
        # The pump's test for a pull-style port: it overrides poll_rx.
        assert isinstance(port, CapturingPullPort) and type(port).poll_rx is not Port.poll_rx
        assert type(capturing(SinkPort(), w, w.add_interface("other"))).poll_rx is Port.poll_rx
        # The same offer as without the capture: small frames, no mergeable RX buffers.
        assert port.small_frames and VirtioNetDevice(port=port).device_features() == VirtioNetDevice(
            port=GeneratorPort()).device_features()
        rx, _, dev = wired(port)
        for _ in range(3):
            dev.poll_rx(0, now=0.0)
        got = received(rx)
        assert port.finished  # type: ignore[attr-defined]
    assert len(got) == 10 and set(got) == {gen.template.tobytes()}
    captured = read_capture(path)
    assert [(c.data, c.wirelen, c.direction) for c in captured] == [(got[0][:40], 200, IN)] * 10


def test_a_port_knows_nothing_of_capture_and_closing_it_leaves_the_file_open(tmp_path: Path) -> None:
    with CaptureWriter(CaptureConfig(path=tmp_path / "cap.pcapng")) as w:
        inner = SinkPort()
        port = capturing(inner, w, w.add_interface("guest0"))
        assert type(port) is CapturingPort and port.name == "sink" and port.vnet_hdr is False
        port.close()
        # Still writable: the writer is not the port's to close.
        w.write_repeated(0, Direction.OUTBOUND, np.frombuffer(udp(0), np.uint8), 1)
    assert len(read_capture(tmp_path / "cap.pcapng")) == 1


# -- over a real vhost-user socket ----------------------------------------------------------------------


async def run_server(tmp_path: Path, make_port: Callable[[], Port], w: CaptureWriter) -> Server:
    interface = w.add_interface("nicsim.sock")

    def make_device() -> VirtioNetDevice:
        return VirtioNetDevice(port=capturing(make_port(), w, interface), pool=PacketPool(256))

    server = Server([tmp_path / "nicsim.sock"], make_device)
    await server.start()
    return server


async def pings(sock: Path, requests: list[bytes]) -> list[tuple[bytes, int]]:
    """One guest connection: each request, then its reply; what the capture should hold."""
    fe = await VhostUserFrontend.connect(sock)
    try:
        await fe.handshake()
        await fe.start()
        fe.post_rx(16)
        expect: list[tuple[bytes, int]] = []
        for request in requests:
            fe.transmit([request])
            await fe.wait_used(1, 1)
            (reply,) = await fe.wait_used(0, 1)
            expect += [(request, OUT), ((reply.data or b"")[12:], IN)]
        return expect
    finally:
        await fe.close()


async def test_ping_over_vhost_user_captures_exactly_requests_and_replies_in_order(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcapng"
    with CaptureWriter(CaptureConfig(path=path)) as w:
        server = await run_server(tmp_path, ResponderPort, w)
        try:
            requests = [arp_request(), *(ping(seq) for seq in range(1, 6))]
            expect = await pings(tmp_path / "nicsim.sock", requests)
        finally:
            await server.close()
    captured = read_capture(path)
    assert [(c.data, c.direction) for c in captured] == expect
    assert {c.interface for c in captured} == {"nicsim.sock"}
    _, dumped = tcpdump(path)
    assert sum("ICMP echo request" in d.line for d in dumped) == 5
    assert sum("ICMP echo reply" in d.line for d in dumped) == 5


async def test_a_burst_through_reflect_over_vhost_user_is_captured_whole(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    sent = [udp(i, size=60 + (i * 37) % 1400) for i in range(200)]
    with CaptureWriter(CaptureConfig(path=path, format=Format.PCAP)) as w:
        server = await run_server(tmp_path, ReflectPort, w)
        fe = await VhostUserFrontend.connect(tmp_path / "nicsim.sock")
        try:
            await fe.handshake()
            await fe.start()
            fe.post_rx(200)
            got: list[bytes] = []
            for i in range(0, len(sent), 50):
                fe.transmit(sent[i : i + 50])
                await fe.wait_used(1, 50)
                got += [(c.data or b"")[12:] for c in await fe.wait_used(0, 50)]
            await asyncio.sleep(0)
        finally:
            await fe.close()
            await server.close()
    captured = [c.data for c in read_capture(path)]
    assert sorted(captured) == sorted(sent + got)
    # Each TX batch is captured before its reflections.
    outbound = [c for c in captured if c[6:12] == GUEST_MAC]
    inbound = [c for c in captured if c[:6] == GUEST_MAC]
    assert outbound == sent and inbound == got
    assert len(tcpdump(path)[1]) == 400


async def test_the_next_guest_on_a_socket_writes_on_in_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcapng"
    with CaptureWriter(CaptureConfig(path=path)) as w:
        server = await run_server(tmp_path, ResponderPort, w)
        try:
            first = await pings(tmp_path / "nicsim.sock", [ping(1)])
            await asyncio.wait_for(server.endpoints[0].wait_idle(), 10)  # the first device is gone
            second = await pings(tmp_path / "nicsim.sock", [ping(2), ping(3)])
        finally:
            await server.close()
        assert w.interfaces == ("nicsim.sock",)
    assert [(c.data, c.direction) for c in read_capture(path)] == first + second
