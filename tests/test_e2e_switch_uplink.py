"""End to end through a switch uplink: a real Linux guest under QEMU (TCG) on ``nicsim serve --port switch
--uplink vxlan,...``, the switch's VXLAN uplink tunnelled to Linux's own ``vxlan`` device in another
namespace (``tests.vxlan_lab``: two namespaces joined by a veth pair, created and deleted by the test),
both ways: the guest pings 192.168.77.2 behind ``vxlan0``, then, while the guest sleeps, the namespace
pings the guest (``tests.uplink_ping``). This is how guests on two hosts meet (each host's switch with
a VXLAN uplink to the other); here the other host is the kernel. The guest's MTU is 1450 (a 1500-byte
underlay). One boot.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qemu.testvm import Netns
from tests.uplink_ping import ping_both_ways
from tests.vxlan_lab import OVERLAY_B, OVERLAY_GUEST, vxlan_lab

pytestmark = pytest.mark.vm


async def test_a_guest_on_a_switch_and_a_host_behind_its_vxlan_uplink_ping_each_other(
    guest_image: Any, tmp_path: Path, netns: Callable[[], Netns]
) -> None:
    lab = vxlan_lab(netns)
    pings = await ping_both_ways(guest_image, tmp_path, lab.port_spec(), guest_ip=f"{OVERLAY_GUEST}/24",
                                 peer_ip=OVERLAY_B, peer=lab.host_b, mtu=1450)  # fmt: skip
    pings.assert_both_ways()
    uplink = pings.uplink
    print(f"uplink0: {uplink}")
    # Both pings' requests and replies crossed the uplink, each way (tx: out of the switch to the tunnel).
    assert uplink["tx_packets"] >= 10 and uplink["rx_packets"] >= 10
    assert uplink["uplink"]["kind"] == "vxlan" and uplink["uplink"]["drops"] == {}
    assert uplink["uplink"]["tx_frames"] == uplink["tx_packets"]
