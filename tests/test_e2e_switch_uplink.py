"""End to end through a switch uplink: a real Linux guest under QEMU (TCG) on ``nicsim serve --port switch
--uplink vxlan,...``, the switch's VXLAN uplink tunnelled to Linux's own ``vxlan`` device in another
namespace (``tests.vxlan_lab``: two namespaces joined by a veth pair, created and deleted by the test),
both ways: the guest pings 192.168.77.2 behind ``vxlan0``, then, while the guest sleeps, the namespace
pings the guest. This is how guests on two hosts meet (each host's switch with a VXLAN uplink to the
other); here the other host is the kernel. The guest's MTU is 1450 (a 1500-byte underlay). One boot.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qemu.testvm import Netns, TestVM, VhostUserNic, Workload, parse_result_line
from tests.serve_process import nicsim_serve, read_stats
from tests.vxlan_lab import OVERLAY_B, OVERLAY_GUEST, vxlan_lab

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120.0  # a deadline for failure on a loaded TCG host, not a performance claim


async def test_a_guest_on_a_switch_and_a_host_behind_its_vxlan_uplink_ping_each_other(
    guest_image: Any, tmp_path: Path, netns: Callable[[], Netns]
) -> None:
    lab = vxlan_lab(netns)
    workloads = [Workload("ping", target=OVERLAY_B, count=5, interval=0.2), Workload("sleep", seconds=40)]
    serve = nicsim_serve(tmp_path, "--port", "switch", "--uplink", lab.port_spec())
    async with serve as (proc, sock, stats_path):
        async with TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, nic=VhostUserNic(socket=sock),
                          accel="tcg", guest_ip=f"{OVERLAY_GUEST}/24", mtu=1450,
                          workloads=workloads) as vm:  # fmt: skip
            line = await vm.wait_for(r'(?m)^NICSIM-RESULT \{"workload": "ping".*\}\r?$', BOOT_TIMEOUT)
            ping = parse_result_line(line.group(0))
            # The guest sleeps now: the other way round, from behind vxlan0 (busybox ping).
            back = await asyncio.create_subprocess_exec(
                *lab.host_b.exec_argv(["busybox", "ping", "-c", "5", "-i", "0.2", "-W", "5", OVERLAY_GUEST]),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(back.communicate(), 60)
        stats = await read_stats(
            stats_path, lambda s: not s["sockets"][0]["connected"] and s["sockets"][0]["connections"] == 1
        )
    assert proc.returncode == 0, "nicsim serve shuts down cleanly"
    assert ping.ok, ping
    assert ping["transmitted"] == 5 and ping["received"] == 5 and ping["loss_pct"] == 0
    text = out.decode()
    assert back.returncode == 0, text
    assert re.search(r"5 packets transmitted, 5 (packets )?received", text), text
    uplink = stats["switch"]["ports"]["uplink0"]
    print(f"uplink0: {uplink}")
    # Both pings' requests and replies crossed the uplink, each way (tx: out of the switch to the tunnel).
    assert uplink["tx_packets"] >= 10 and uplink["rx_packets"] >= 10
    assert uplink["uplink"]["kind"] == "vxlan" and uplink["uplink"]["drops"] == {}
    assert uplink["uplink"]["tx_frames"] == uplink["tx_packets"]
    assert stats["sockets"][0]["pool"]["usage"] == 0
