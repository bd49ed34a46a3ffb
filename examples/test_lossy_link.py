"""A small user suite: two guests on a nicsim switch, one lossy link, and a check on the capture.

Guest B sits on a link that loses 20 % of the frames delivered to it (a seeded draw: the same run
loses the same frames). Guest A pings B; the test checks what ping saw against what the switch
captured. Run it with ``pytest -n 2 examples/`` (the two tests run side by side, one per worker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scapy.layers.inet import ICMP
from scapy.layers.l2 import Ether
from scapy.utils import RawPcapNgReader

from qemu.testvm import Workload, WorkloadResult

COUNT = 20
ECHO_REQUEST, ECHO_REPLY = 8, 0
INBOUND, OUTBOUND = 1, 2  # a pcapng frame's direction, seen from the guest on that interface


async def ping_b_from_a(nicsim_server: Any, nicsim_vm: Any, impair: list[str]) -> tuple[WorkloadResult, Any]:
    """Two guests on a switch with a capture; A pings B ``COUNT`` times. Returns (A's ping, server)."""
    server = nicsim_server("a", "b", port="switch", impair=impair, pcap=True)
    b = nicsim_vm(server.socket("b"), Workload("sleep", seconds=600), name="b")
    a = nicsim_vm(server.socket("a"), Workload("ping", target=nicsim_vm.ip_of(b), count=COUNT,
                                               interval=0.1, seqs=True), name="a")  # fmt: skip
    await nicsim_vm.boot(b, a)  # B first: it is up before A sends its first ping
    (ping,) = await a.results(timeout=60)
    assert ping.ok, ping
    await b.quit()
    await server.wait_disconnected()
    return ping, server


def echoes(capture: Path, interface: str, direction: int, icmp_type: int) -> list[int]:
    """Sequence numbers of the ICMP echoes of ``icmp_type`` captured on ``interface`` in ``direction``."""
    found = []
    with RawPcapNgReader(str(capture)) as reader:
        for data, meta in reader:
            frame = Ether(data)
            if (meta.ifname.decode(), meta.direction) != (interface, direction) or ICMP not in frame:
                continue
            if frame[ICMP].type == icmp_type:
                found.append(int(frame[ICMP].seq))
    return found


async def test_a_lossy_link_loses_some_pings_and_the_capture_shows_which(nicsim_server, nicsim_vm) -> None:
    ping, server = await ping_b_from_a(nicsim_server, nicsim_vm, impair=["b:rx:loss=20% seed=1"])
    assert 0 < ping["received"] < ping["transmitted"] == COUNT, ping

    stats = server.stats()
    lost = server.port_stats(stats, "b")["impair"]["rx"]["dropped"]["loss"]
    assert lost >= COUNT - ping["received"], "the switch counts every frame its impairment lost"

    server.stop()  # closes the capture file
    sent = echoes(server.pcap, "a", OUTBOUND, ECHO_REQUEST)
    answered = echoes(server.pcap, "a", INBOUND, ECHO_REPLY)
    assert sent == list(range(COUNT)), "every request left A"
    assert answered == ping["seqs"], "the replies A got are the ones the capture saw reach it"


async def test_a_clean_link_loses_nothing(nicsim_server, nicsim_vm) -> None:
    ping, server = await ping_b_from_a(nicsim_server, nicsim_vm, impair=[])
    assert ping["received"] == ping["transmitted"] == COUNT, ping
    server.stop()
    assert echoes(server.pcap, "b", INBOUND, ECHO_REQUEST) == list(range(COUNT))
    assert echoes(server.pcap, "a", INBOUND, ECHO_REPLY) == list(range(COUNT))
