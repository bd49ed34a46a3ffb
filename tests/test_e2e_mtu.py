"""End to end: a real Linux guest under QEMU (TCG) with ``host_mtu=9000``, and QMP ``announce-self``.

MTU: QEMU offers the guest VIRTIO_NET_F_MTU with the ``host_mtu`` and, since nicsim negotiates the
NET_MTU protocol feature, tells the backend with NET_SET_MTU; the guest's eth0 comes up with an MTU
of 9000 (the test leaves it there). Through the tap port, whose TAP (created with 1500) follows the
host MTU, the guest pings an address in the namespace with 8972 bytes of payload: 9014-byte frames
both ways, no fragment (Linux sets DF on them; busybox ping has no option for it), with mergeable
RX buffers and without. On the switch, two such guests ping each other the same way. And the bound:
with ``host_mtu=1500`` and the TAP left at 9000 (``follow_mtu=off``), 9014-byte frames from the
namespace never reach the guest and are counted as ``over_mtu``.

Announce: ``announce-self`` makes QEMU announce the guest as after a migration. A guest that took
VIRTIO_NET_F_GUEST_ANNOUNCE (nicsim offers it) sends its own gratuitous ARP, which crosses the backend
like any frame; with ``guest_announce=off`` QEMU sends SEND_RARP and nicsim writes the RARP. Either
way the announcement reaches the TAP in the namespace, where the test reads it with a packet socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nicsim.ports.tap import in_netns
from nicsim.virtio.announce import rarp_frame
from qemu.testvm import Netns, TestVM, VhostUserNic, Workload
from tests.serve_process import nicsim_serve, read_stats

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120.0  # a deadline for failure on a loaded TCG host, not a performance claim
GUEST_IP, HOST_IP, GUEST_MAC = "10.0.2.15", "10.0.2.2", "52:54:00:12:34:56"
PAYLOAD = 8972  # ICMP payload filling an IPv4 MTU of 9000 (+ 8 ICMP + 20 IP)
FRAME = PAYLOAD + 28 + 14
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)


def closed_once(stats: dict[str, Any]) -> bool:
    return all(not s["connected"] and s["connections"] == 1 for s in stats["sockets"])


@pytest.mark.parametrize("mrg_rxbuf", [True, False], ids=["mergeable", "big-buffers"])
async def test_a_guest_with_host_mtu_9000_pings_through_the_tap_with_9000_byte_frames(
    guest_image: Any, tmp_path: Path, netns: Callable[[], Netns], mrg_rxbuf: bool
) -> None:
    # Without MRG_RXBUF, Linux posts "big packets" for an MTU above 1500: a chain of a header and pages.
    ns = netns()
    ns.add_tap("tap0", f"{HOST_IP}/24")  # MTU 1500: the port raises it to the host MTU
    workloads = [Workload("link"), Workload("ping", target=HOST_IP, count=3, interval=0.2, size=PAYLOAD)]
    port = f"tap,netns={ns.name},ifname=tap0"
    async with nicsim_serve(tmp_path, "--port", port) as (proc, sock, stats_path):
        nic = VhostUserNic(socket=sock, host_mtu=9000, mrg_rxbuf=mrg_rxbuf)
        async with TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, accel="tcg", mtu=None,
                          nic=nic, workloads=workloads) as vm:  # fmt: skip
            link, ping = await vm.results(BOOT_TIMEOUT)
        tap_link = ns.run("ip", "link", "show", "tap0").stdout
        stats = await read_stats(stats_path, closed_once)
    assert proc.returncode == 0
    assert link.ok and ping.ok, (link, ping)
    assert link["mtu"] == 9000 and "MTU" in link["feature_names"]
    assert ("MRG_RXBUF" in link["feature_names"]) == mrg_rxbuf
    assert (ping["transmitted"], ping["received"]) == (3, 3), ping
    # Whole frames, not fragments: 7 fragments of 1500 would make 21 frames each way.
    assert ping["rx_packets"] < 10, ping
    assert "mtu 9000 " in tap_link
    assert stats["mtu"] == 9000 and stats["port"]["mtu"] == 9000
    tap = stats["port"]
    assert tap["tx_bytes"] >= 3 * FRAME and tap["rx_bytes"] >= 3 * FRAME
    assert tap["tx_frames"] < 15 and tap["rx_frames"] < 15, tap
    assert stats["queues"][0]["drops"] == {} and stats["queues"][1]["drops"] == {}
    assert stats["pool"]["usage"] == 0


def guest(image: Any, sock: Path, n: int, *workloads: Workload) -> TestVM:
    return TestVM(kernel=image.kernel, initrd=image.initrd, accel="tcg", workloads=workloads, mtu=None,
                  nic=VhostUserNic(socket=sock, mac=f"52:54:00:00:01:{n:02x}", host_mtu=9000),
                  guest_ip=f"10.0.3.{n}/24", name=f"mtu-{n}")  # fmt: skip


async def test_two_guests_with_host_mtu_9000_exchange_9000_byte_frames_on_the_switch(
    guest_image: Any, tmp_path: Path
) -> None:
    settle = 12.0  # each guest waits this long after its boot, so that the other is up before it pings
    async with nicsim_serve(tmp_path, "--port", "switch", more_sockets=["b.sock"]) as (proc, sock, _):
        socks = [sock, tmp_path / "b.sock"]
        # First contact (ARP) gets a ping of its own; each guest then stays up until the test quits it.
        vms = [guest(guest_image, socks[n - 1], n, Workload("link"), Workload("sleep", seconds=settle),
                     Workload("ping", target=f"10.0.3.{3 - n}", count=1),
                     Workload("ping", target=f"10.0.3.{3 - n}", count=3, interval=0.2, size=PAYLOAD),
                     Workload("sleep", seconds=600))
               for n in (1, 2)]  # fmt: skip
        async with contextlib.AsyncExitStack() as stack:
            for v in vms:
                await stack.enter_async_context(v)
            results = await asyncio.gather(*(v.wait_results(4, BOOT_TIMEOUT + settle) for v in vms))
            for v in vms:
                await v.quit()
    assert proc.returncode == 0
    for n, (link, slept, contact, ping) in zip((1, 2), results, strict=True):
        assert link.ok and slept.ok and contact.ok and ping.ok, (n, link, slept, contact, ping)
        assert link["mtu"] == 9000, (n, link)
        assert (ping["transmitted"], ping["received"]) == (3, 3), (n, ping)
        assert ping["rx_packets"] < 12, (n, ping)  # 3 echo requests and 3 replies, whole


def sniff(ns: Netns) -> socket.socket:
    """A packet socket on tap0 in ``ns`` that sees every frame the backend writes to the TAP."""
    eth_p_all = socket.htons(0x0003)
    sock = in_netns(ns.name, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, eth_p_all))
    sock.bind(("tap0", 0))
    sock.settimeout(0.2)
    return sock


def announcements(sock: socket.socket, mac: bytes, seconds: float) -> list[bytes]:
    """Frames from ``mac`` with EtherType ARP or RARP, read for ``seconds``."""
    out: list[bytes] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data = sock.recv(2048)
        except TimeoutError:
            continue
        if data[6:12] == mac and data[12:14] in (b"\x08\x06", b"\x80\x35"):
            out.append(data)
    return out


@pytest.mark.parametrize("guest_announce", [True, False], ids=["guest-announces", "send-rarp"])
async def test_announce_self_announces_the_guest_out_of_the_tap(
    guest_image: Any, tmp_path: Path, netns: Callable[[], Netns], guest_announce: bool
) -> None:
    ns = netns()
    ns.add_tap("tap0", f"{HOST_IP}/24")
    mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    sniffer = sniff(ns)
    try:
        nic = VhostUserNic(socket=tmp_path / "nicsim.sock", offloads={"guest_announce": guest_announce})
        workloads = [Workload("link"), Workload("sleep", seconds=20)]
        port = f"tap,netns={ns.name},ifname=tap0"
        vm = TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, accel="tcg", nic=nic,
                    guest_ip=f"{GUEST_IP}/24", workloads=workloads)  # fmt: skip
        async with nicsim_serve(tmp_path, "--port", port) as (proc, _, stats_path), vm:
            (link,) = await vm.wait_results(1, BOOT_TIMEOUT)
            await asyncio.to_thread(announcements, sniffer, mac, 0.5)  # what came before, dropped
            await vm.qmp("announce-self", {"initial": 50, "max": 550, "rounds": 2, "step": 100})
            seen = await asyncio.to_thread(announcements, sniffer, mac, 3.0)
            want = 0 if guest_announce else 2
            stats = await read_stats(stats_path, lambda s: s.get("announced", -1) >= want)
            await vm.quit()
    finally:
        sniffer.close()
    assert proc.returncode == 0
    assert link.ok, link
    assert ("GUEST_ANNOUNCE" in link["feature_names"]) == guest_announce
    if guest_announce:
        # The guest's own gratuitous ARP (sender and target 10.0.2.15), through the TX ring.
        ip = socket.inet_aton(GUEST_IP)
        garps = [f for f in seen if f[12:14] == b"\x08\x06" and f[28:32] == f[38:42] == ip]
        assert garps, seen
        assert stats["announced"] == 0
    else:
        # QEMU's RARP, sent by nicsim for SEND_RARP: once per round.
        rarps = [f for f in seen if f == rarp_frame(mac)]
        assert len(rarps) == 2, seen
        assert stats["announced"] == 2


async def test_frames_longer_than_the_guests_mtu_are_dropped_toward_it_with_a_reason(
    guest_image: Any, tmp_path: Path, netns: Callable[[], Netns]
) -> None:
    """The TAP keeps an MTU of 9000 (follow_mtu=off) while the guest's host MTU is 1500: UDP datagrams
    of 8972 bytes from the namespace (DF set) reach nicsim as 9014-byte frames, which the guest must not
    be given; 1472-byte ones (a full 1500-byte packet) reach it."""
    ns = netns()
    ns.add_tap("tap0", f"{HOST_IP}/24")
    ns.run("ip", "link", "set", "tap0", "mtu", "9000")
    udp = in_netns(ns.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF set, never fragmented by the sender.
    udp.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    port = f"tap,netns={ns.name},ifname=tap0,follow_mtu=off"
    try:
        async with nicsim_serve(tmp_path, "--port", port) as (proc, sock, stats_path):
            nic = VhostUserNic(socket=sock, host_mtu=1500)
            workloads = [Workload("link"), Workload("sleep", seconds=600)]
            async with TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, accel="tcg", mtu=None,
                              nic=nic, workloads=workloads) as vm:  # fmt: skip
                (link,) = await vm.wait_results(1, BOOT_TIMEOUT)
                for size in (1472, 1472, PAYLOAD, PAYLOAD, PAYLOAD):  # the first waits for ARP
                    udp.sendto(bytes(size), (GUEST_IP, 9))
                stats = await read_stats(stats_path, lambda s: s["queues"][0]["drops"].get("over_mtu") == 3)
                await vm.quit()
    finally:
        udp.close()
    assert proc.returncode == 0
    assert link["mtu"] == 1500, link
    assert stats["mtu"] == 1500 and stats["port"]["mtu"] is None  # the TAP was left alone
    assert stats["queues"][0]["drops"] == {"over_mtu": 3}, stats["queues"][0]
    assert stats["queues"][0]["bytes"] >= 2 * (1472 + 28 + 14)  # the two that fit were delivered
