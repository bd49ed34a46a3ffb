"""End to end through the tap port: a real Linux guest under QEMU (TCG) on ``nicsim serve --port tap,...``,
forwarding to a TAP (10.0.2.2/24) inside a network namespace this test creates and deletes.

One boot per offload setting runs four workloads: ``link`` (the feature bits the guest's driver
accepted), ``ping`` to 10.0.2.2 (no loss), and iperf3 guest->host and host->guest (3 s each) against a
server in the namespace. With offloads the guest must have negotiated CSUM/GUEST_CSUM and TSO both ways,
and 64 KB GSO frames must have crossed the tap port in both directions; without them, none of those
bits are offered and every frame fits the MTU. Throughput is only checked to be positive: a TCG guest's
numbers vary with the machine (``nicsim bench`` measures them).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qemu.testvm import Netns, TestVM, VhostUserNic, Workload
from tests.serve_process import nicsim_serve, read_stats

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120.0  # a deadline for failure on a loaded TCG host, not a performance claim
OFFLOAD_NAMES = {"CSUM", "GUEST_CSUM", "HOST_TSO4", "HOST_TSO6", "GUEST_TSO4", "GUEST_TSO6"}
GUEST_IP, HOST_IP, GUEST_MAC = "10.0.2.15", "10.0.2.2", "52:54:00:12:34:56"


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
async def test_ping_and_iperf3_both_ways_through_the_tap_port(
    guest_image: Any, tmp_path: Path, netns: Callable[[], Netns], offload: bool
) -> None:
    ns = netns()
    ns.add_tap("tap0", f"{HOST_IP}/24")
    server = ns.popen("iperf3", "-s", "-B", HOST_IP, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workloads = [
        Workload("link"),
        Workload("ping", target=HOST_IP, count=5, interval=0.2),
        Workload("iperf3-client", server=HOST_IP, time=3, proto="tcp"),
        Workload("iperf3-client", server=HOST_IP, time=3, proto="tcp", reverse=1),
    ]
    port = f"tap,netns={ns.name},ifname=tap0,offload={'on' if offload else 'off'}"
    async with nicsim_serve(tmp_path, "--port", port) as (proc, sock, stats_path):
        async with TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, nic=VhostUserNic(socket=sock),
                          accel="tcg", workloads=workloads) as vm:  # fmt: skip
            link, ping, tx, rx = await vm.results(BOOT_TIMEOUT)
        stats = await read_stats(
            stats_path, lambda s: not s["sockets"][0]["connected"] and s["sockets"][0]["connections"] == 1
        )
    assert proc.returncode == 0, "nicsim serve shuts down cleanly"
    assert server.poll() is None, "the iperf3 server in the namespace stays up"
    for r in (link, ping, tx, rx):
        assert r.ok, r
    names = set(link["feature_names"])
    assert names >= {"VERSION_1", "MRG_RXBUF"}
    assert (names & OFFLOAD_NAMES) == (OFFLOAD_NAMES if offload else set())
    assert ping["transmitted"] == 5 and ping["received"] == 5 and ping["loss_pct"] == 0
    assert tx["received_bps"] > 0 and rx["received_bps"] > 0
    port = stats["port"]
    assert port["tun_offload"] == (7 if offload else 0)
    # Frames larger than the MTU crossed the port only with TSO: 64 KB GSO frames both ways.
    tx_avg = port["tx_bytes"] / port["tx_frames"]
    rx_avg = port["rx_bytes"] / port["rx_frames"]
    print(f"offload={offload}: guest->host {tx['received_bps'] / 1e9:.3f} Gbit/s, "
          f"host->guest {rx['received_bps'] / 1e9:.3f} Gbit/s; "
          f"mean frame tx {tx_avg:.0f} B, rx {rx_avg:.0f} B")  # fmt: skip
    if offload:
        assert tx_avg > 1514 and rx_avg > 1514
    else:
        assert tx_avg <= 1514 and rx_avg <= 1514
    assert stats["pool"]["usage"] == 0
    assert stats["queues"][0]["drops"] == {} and stats["queues"][1]["drops"] == {}
