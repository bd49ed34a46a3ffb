"""End to end through a TAP uplink: a real Linux guest under QEMU (TCG) on ``nicsim serve --port switch
--uplink tap,netns=NS,ifname=tap0 --pcap FILE``, the TAP in a namespace the test creates (and deletes)
carrying 10.0.2.2/24. The guest pings 10.0.2.2, then, while the guest sleeps, the namespace pings the
guest (``tests.uplink_ping``): no ping lost either way, and the guest's pool is back to 0 once it quit.
The capture holds every echo twice, once on the guest's interface and once on the uplink's, in
opposite directions (outbound is into the switch on both), byte for byte the same frames. One boot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from qemu.testvm import Netns
from tests.pcap_read import read_capture, tcpdump
from tests.uplink_ping import COUNT, ping_both_ways

pytestmark = pytest.mark.vm

GUEST_IP, PEER_IP = "10.0.2.15", "10.0.2.2"
INBOUND, OUTBOUND = 1, 2
REQUEST, REPLY = 8, 0
UPLINK_IF, GUEST_IF = "uplink0 (tap)", "nicsim.sock"


async def test_a_guest_on_a_switch_and_a_host_behind_its_tap_uplink_ping_each_other(
    guest_image: Any, tmp_path: Path, netns: Callable[[], Netns]
) -> None:
    ns = netns()
    ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")  # no IPv6 noise from the TAP
    ns.add_tap("tap0", f"{PEER_IP}/24")
    cap = tmp_path / "cap.pcapng"
    pings = await ping_both_ways(guest_image, tmp_path, f"tap,netns={ns.name},ifname=tap0",
                                 guest_ip=f"{GUEST_IP}/24", peer_ip=PEER_IP, peer=ns,
                                 serve_args=("--pcap", str(cap)))  # fmt: skip
    pings.assert_both_ways()
    uplink = pings.uplink
    print(f"uplink0: {uplink}")
    # Both pings' requests and replies crossed the uplink, each way (tx: out of the switch to the TAP).
    assert uplink["tx_packets"] >= 2 * COUNT and uplink["rx_packets"] >= 2 * COUNT
    assert uplink["drops"] == {} and uplink["uplink"]["kind"] == "tap" and uplink["uplink"]["drops"] == {}
    assert uplink["uplink"]["tx_frames"] == uplink["tx_packets"]
    assert uplink["uplink"]["capture"] == {"inbound": uplink["tx_packets"], "outbound": uplink["rx_packets"]}

    echoes = []
    for c in read_capture(cap):
        frame = Ether(c.data)
        if IP in frame and ICMP in frame:
            echoes.append((c.interface, c.direction, frame[IP].src, int(frame[ICMP].type), c.data))
    kinds = Counter((i, d, src, t) for i, d, src, t, _ in echoes)
    assert kinds == {
        (GUEST_IF, OUTBOUND, GUEST_IP, REQUEST): COUNT, (UPLINK_IF, INBOUND, GUEST_IP, REQUEST): COUNT,
        (UPLINK_IF, OUTBOUND, PEER_IP, REPLY): COUNT, (GUEST_IF, INBOUND, PEER_IP, REPLY): COUNT,
        (UPLINK_IF, OUTBOUND, PEER_IP, REQUEST): COUNT, (GUEST_IF, INBOUND, PEER_IP, REQUEST): COUNT,
        (GUEST_IF, OUTBOUND, GUEST_IP, REPLY): COUNT, (UPLINK_IF, INBOUND, GUEST_IP, REPLY): COUNT,
    }, kinds  # fmt: skip
    # The switch forwards untouched: the same frames, in the same order, on both interfaces.
    assert [e[4] for e in echoes if e[0] == UPLINK_IF] == [e[4] for e in echoes if e[0] == GUEST_IF]
    header, dumped = tcpdump(cap, "icmp")
    assert header.startswith("reading from file") and len(dumped) == 8 * COUNT, (header, dumped)
