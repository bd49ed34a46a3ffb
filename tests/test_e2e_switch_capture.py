"""End to end: the capture of a ping between two real guests on ``nicsim serve --port switch --pcap``.

Guest A pings guest B five times through the switch; the pcapng file (one interface per socket, each
frame's direction from its guest's side) must hold exactly the echo requests and replies, in the
order they crossed the switch: request i leaves A and reaches B, then reply i leaves B and reaches A.
ARP (the guests have no static neighbours) and IPv6 housekeeping may be in the file too; nothing
else in it is an ICMP echo. The file is read back with scapy and with ``tcpdump -r``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from qemu.testvm import Workload
from tests.pcap_read import Captured, read_capture, tcpdump
from tests.serve_process import nicsim_serve, read_stats
from tests.test_e2e_switch import BOOT_TIMEOUT, SETTLE, boot_together, guest, ping

pytestmark = pytest.mark.vm

COUNT = 5
INBOUND, OUTBOUND = 1, 2  # pcapng epb_flags direction, from the guest's side
ECHO_REQUEST, ECHO_REPLY = 8, 0
A_IP, B_IP = "10.0.3.1", "10.0.3.2"
ICMPV6_ECHO = {128, 129}


def icmp_echo(c: Captured) -> tuple[str, int, str, str, int, int, int] | None:
    """(interface, direction, source IP, destination IP, ICMP type, id, sequence) of an IPv4 ICMP frame,
    else None; any IPv4 ICMP that is not an echo fails here."""
    frame = Ether(c.data)
    if IP not in frame or ICMP not in frame:
        return None
    icmp = frame[ICMP]
    assert icmp.type in (ECHO_REQUEST, ECHO_REPLY), f"an ICMP frame other than an echo: {frame.summary()}"
    assert c.interface is not None and c.direction is not None
    return c.interface, c.direction, frame[IP].src, frame[IP].dst, int(icmp.type), int(icmp.id), int(icmp.seq)


async def test_the_capture_of_a_ping_between_two_guests_holds_exactly_its_echoes_in_order(
    guest_image: Any, tmp_path: Path
) -> None:
    t0 = asyncio.get_running_loop().time()
    cap = tmp_path / "cap.pcapng"
    async with nicsim_serve(tmp_path, "--port", "switch", "--pcap", str(cap), more_sockets=["b.sock"]) as (
        proc, sock_a, stats_path,
    ):  # fmt: skip
        sock_b = tmp_path / "b.sock"
        a = guest(guest_image, sock_a, 1, Workload("sleep", seconds=SETTLE), ping(2, count=COUNT))
        b = guest(guest_image, sock_b, 2, Workload("sleep", seconds=600))
        async with contextlib.AsyncExitStack() as stack:
            await boot_together([a, b], stack)
            slept, pinged = await a.results(BOOT_TIMEOUT + SETTLE)
            await b.quit()
        assert slept.ok and pinged.ok, (slept, pinged)
        assert (pinged["transmitted"], pinged["received"], pinged["loss_pct"]) == (COUNT, COUNT, 0), pinged
        stats = await read_stats(stats_path, lambda s: not any(e["connected"] for e in s["sockets"]))
        assert proc.poll() is None, "the backend outlives the guests"
        assert [e["pool"]["usage"] for e in stats["sockets"]] == [0, 0]
    assert proc.returncode == 0, "nicsim serve stops cleanly on SIGINT, its capture file closed"

    captured = read_capture(cap)
    a_if, b_if = sock_a.name, sock_b.name
    assert {c.interface for c in captured} <= {a_if, b_if}
    echoes = [(i, e) for i, c in enumerate(captured) if (e := icmp_echo(c)) is not None]
    assert echoes, [Ether(c.data).summary() for c in captured]
    ident = echoes[0][1][5]  # busybox ping's identifier, the same on every request and reply
    expected = []
    for seq in range(COUNT):
        expected += [(a_if, OUTBOUND, A_IP, B_IP, ECHO_REQUEST, ident, seq),
                     (b_if, INBOUND, A_IP, B_IP, ECHO_REQUEST, ident, seq),
                     (b_if, OUTBOUND, B_IP, A_IP, ECHO_REPLY, ident, seq),
                     (a_if, INBOUND, B_IP, A_IP, ECHO_REPLY, ident, seq)]  # fmt: skip
    assert [e for _, e in echoes] == expected, [Ether(c.data).summary() for c in captured]
    # The switch forwards frames untouched: what left one guest is byte for byte what reached the other.
    frames = [captured[i] for i, _ in echoes]
    for k in range(0, len(frames), 2):
        assert frames[k].data == frames[k + 1].data and frames[k].wirelen == len(frames[k].data), k
    # Nothing else in the file is an ICMP echo, IPv6 included (its neighbour discovery may be there).
    for c in captured:
        frame = Ether(c.data)
        if IPv6 in frame:
            assert frame[IPv6].nh != 58 or frame[IPv6].payload.type not in ICMPV6_ECHO, frame.summary()
    others = sorted({type(Ether(c.data).payload).__name__ for c in captured if icmp_echo(c) is None})

    # tcpdump reads the same file: the same 20 ICMP frames, between the same MACs, in the same order.
    header, dumped = tcpdump(cap, "icmp")
    assert header.startswith("reading from file"), header
    mac_a, mac_b = "52:54:00:00:01:01", "52:54:00:00:01:02"
    kinds = ["ICMP echo request", "ICMP echo request", "ICMP echo reply", "ICMP echo reply"]
    assert [(d.src, d.dst) for d in dumped] == ([(mac_a, mac_b)] * 2 + [(mac_b, mac_a)] * 2) * COUNT
    assert [next(k for k in kinds if k in d.line) for d in dumped] == kinds * COUNT
    assert len(tcpdump(cap)[1]) == len(captured)
    print(
        f"switch capture: {asyncio.get_running_loop().time() - t0:.1f} s, {len(captured)} frames, "
        f"{len(echoes)} ICMP echoes; the rest: {others}"
    )
