"""End to end: a 2-vCPU guest with two queue pairs (QEMU ``queues=2``, ``mq=on``) on ``nicsim serve
--queue-pairs 2``.

QEMU keeps the control queue: when the guest's virtio_net driver asks for two pairs
(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, one pair per vCPU by default) QEMU enables the second pair with
SET_VRING_ENABLE, and nicsim serves it. pktgen sends UDP echo requests on TX queue 0, then on TX
queue 1 (``queue_map_min/max``); the responder answers each on the pair it came from, so both RX
rings fill too. nicsim's per-queue stats must show traffic on all four rings, and a ping then goes
through with no loss. The same through a multiqueue TAP (``queues=2``) and a UDP echo server in a
network namespace this test creates: there the kernel picks the queue of each echo.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qemu.testvm import Netns, TestVM, VhostUserNic, Workload
from tests.serve_process import nicsim_serve, read_stats

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120.0  # a deadline for failure on a loaded TCG host, not a performance claim
RESPONDER_MAC = HOST_MAC = "52:54:00:00:00:02"
GUEST_IP, HOST_IP, GUEST_MAC = "10.0.2.15", "10.0.2.2", "52:54:00:12:34:56"
COUNT = 2000


def udp_echo_burst(queue: int) -> Workload:
    return Workload("pktgen-tx", count=COUNT, size=60, queue=queue, udp_dst=7, dst_mac=RESPONDER_MAC,
                    clone_skb=0)  # fmt: skip


async def test_two_vcpu_guest_moves_traffic_on_both_queue_pairs(guest_image: Any, tmp_path: Path) -> None:
    async with nicsim_serve(tmp_path, "--queue-pairs", "2") as (proc, sock, stats_path):
        nic = VhostUserNic(socket=sock, queues=2)
        workloads = (udp_echo_burst(0), udp_echo_burst(1), Workload("ping", target="10.0.2.2", count=10,
                                                                    interval=0.2))  # fmt: skip
        async with TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, nic=nic, accel="tcg",
                          cpus=2, workloads=workloads) as v:  # fmt: skip
            results = await v.results(BOOT_TIMEOUT)
        stats = await read_stats(stats_path, lambda s: not s["sockets"][0]["connected"])
    assert proc.returncode == 0
    burst0, burst1, ping = results
    assert burst0.ok and burst1.ok, results
    assert burst0["tx_queues"] == 2, ("the guest driver uses one queue pair", results, stats["queues"])
    assert burst0["packets"] == burst1["packets"] == COUNT, results
    assert ping.ok and ping["transmitted"] == 10 and ping["received"] == 10 and ping["loss_pct"] == 0, ping
    packets = [q["packets"] for q in stats["queues"]]
    assert len(packets) == 4, stats["queues"]
    # TX rings 1 and 3 carry each burst (plus the guest's own few frames), RX rings 0 and 2 the echoes.
    assert packets[1] >= COUNT and packets[3] >= COUNT, packets
    # Echoes the guest had no buffer for are dropped and counted (no_rx_buffer): most get through.
    assert packets[0] > COUNT // 5 and packets[2] > COUNT // 5, (packets, stats["queues"])
    assert stats["port"]["udp_echo"] >= COUNT, stats["port"]
    assert stats["pool"]["usage"] == 0


ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], 7))
while True:
    data, peer = s.recvfrom(65536)
    s.sendto(data, peer)
"""


async def test_two_queue_pairs_through_a_multiqueue_tap(
    guest_image: Any, tmp_path: Path, netns: Callable[[], Netns]
) -> None:
    """``--port tap,...,queues=2``: pair ``p`` writes to and reads from the TAP's queue ``p``. Each
    pktgen burst is its own flow (its UDP source port), sent on its own TX queue; the kernel sends the
    echoes of a flow back on the TAP queue it came in on, so they reach the guest on the same pair."""
    ns = netns()
    ns.run("ip", "tuntap", "add", "dev", "tapmq", "mode", "tap", "multi_queue")
    ns.run("ip", "link", "set", "tapmq", "address", HOST_MAC)
    ns.run("ip", "addr", "add", f"{HOST_IP}/24", "dev", "tapmq")
    ns.run("ip", "link", "set", "tapmq", "up")
    ns.run("ip", "neigh", "add", GUEST_IP, "lladdr", GUEST_MAC, "dev", "tapmq", "nud", "permanent")
    ns.popen(sys.executable, "-c", ECHO_SERVER, HOST_IP)
    port = f"tap,netns={ns.name},ifname=tapmq,queues=2,offload=off"
    async with nicsim_serve(tmp_path, "--queue-pairs", "2", "--port", port) as (proc, sock, stats_path):
        workloads = (
            Workload("ping", target=HOST_IP, count=10, interval=0.2),
            *(Workload("pktgen-tx", count=COUNT, size=60, queue=q, udp_dst=7, udp_src=1000 + q, dst=HOST_IP,
                       dst_mac=HOST_MAC, clone_skb=0) for q in (0, 1)),
        )
        async with TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, accel="tcg", cpus=2,
                          nic=VhostUserNic(socket=sock, queues=2), workloads=workloads) as v:  # fmt: skip
            ping, burst0, burst1 = await v.results(BOOT_TIMEOUT)
        stats = await read_stats(stats_path, lambda s: not s["sockets"][0]["connected"])
    assert proc.returncode == 0
    assert ping.ok and ping["received"] == 10 and ping["loss_pct"] == 0, ping
    assert burst0.ok and burst1.ok and burst0["tx_queues"] == 2, (burst0, burst1)
    packets = [q["packets"] for q in stats["queues"]]
    assert packets[1] >= COUNT and packets[3] >= COUNT, packets
    assert packets[0] > COUNT // 5 and packets[2] > COUNT // 5, (packets, stats["queues"], stats["port"])
    assert stats["port"]["queues"] == 2 and stats["port"]["attached"] == 2, stats["port"]
    assert stats["pool"]["usage"] == 0
