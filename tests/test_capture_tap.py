"""Capture on a real TAP in a throwaway namespace (root needed): the tap passes virtio-net headers both
ways, and the capture holds bare Ethernet frames, whichever header length was negotiated."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nicsim.ports.capture import CaptureConfig, CaptureWriter, capturing
from nicsim.ports.frames import ip_bytes, mac_bytes, udp_frame
from nicsim.ports.tap import TapPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF
from qemu.testvm import Netns
from tests.pcap_read import read_capture, tcpdump
from tests.test_tap_port import GUEST_IP, GUEST_MAC, HOST_IP, ns_udp, start, tap, tapns

__all__ = ["tapns"]  # the fixture, used by name below

V1 = 1 << VIRTIO_F_VERSION_1
MRG = 1 << VIRTIO_NET_F_MRG_RXBUF


@pytest.mark.parametrize(("features", "hdr_len"), [(V1 | MRG, 12), (0, 10)])
async def test_tap_frames_are_captured_without_their_virtio_net_header(
    tapns: Netns, tmp_path: Path, features: int, hdr_len: int
) -> None:
    path = tmp_path / "cap.pcapng"
    sock = ns_udp(tapns)
    with CaptureWriter(CaptureConfig(path=path)) as w:
        inner: TapPort = tap(tapns)
        port = capturing(inner, w, w.add_interface("tap0"))
        assert port.vnet_hdr
        dev = VirtioNetDevice(port=port)
        port.start_io(asyncio.get_running_loop())
        try:
            # To the TAP's own MAC (changing it would flush the guest's permanent neighbour entry).
            host_mac = tapns.run("cat", "/sys/class/net/tap0/address").stdout.strip()
            rx, tx = start(dev, features)
            rx.post_rx(count=64)
            sent = udp_frame(dst_mac=mac_bytes(host_mac), src_mac=mac_bytes(GUEST_MAC),
                             src_ip=ip_bytes(GUEST_IP), dst_ip=ip_bytes(HOST_IP), sport=40000,
                             dport=sock.getsockname()[1], size=80)  # fmt: skip
            tx.post_tx(sent, header=bytes(hdr_len))
            dev.process_tx(1)

            assert sock.recvfrom(100)[1] == (GUEST_IP, 40000)
            sock.sendto(b"to the guest", (GUEST_IP, 9))
            received: list[bytes] = []
            async with asyncio.timeout(10):
                while not any(r.endswith(b"to the guest") for r in received):
                    await asyncio.sleep(0.01)
                    dev.poll_rx(0)
                    received += [(c.data or b"")[hdr_len:] for c in rx.reap()]
        finally:
            sock.close()
            dev.shutdown()
    captured = read_capture(path)
    assert [(c.data, c.direction) for c in captured] == [(sent, 2)] + [(r, 1) for r in received]
    _, dumped = tcpdump(path)
    assert dumped[0].src == GUEST_MAC and "10.0.2.15.40000 > 10.0.2.2." in dumped[0].line
    # The namespace's datagram, among what else its kernel sent (ARP, IPv6 neighbour discovery).
    (reply,) = [d for d in dumped if f"> {GUEST_IP}.9: UDP, length 12" in d.line]
    assert reply.dst == GUEST_MAC
