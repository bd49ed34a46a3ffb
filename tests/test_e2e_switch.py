"""End to end: real Linux guests under QEMU joined by ``nicsim serve --port switch``, one socket each.

The guests boot at once; each sleeps long enough for the others to come up (the test checks that
they did, so a slow boot fails with its own message rather than as a lost ping), then pings its
peers. Every boot is short; the guests power off when their workloads are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from qemu.testvm import TestVM, VhostUserNic, Workload
from tests.serve_process import nicsim_serve, read_stats

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 180.0  # three TCG guests on two cores: a deadline for failure, not a performance claim
SETTLE = 25.0  # seconds each guest sleeps after its own boot, so that all three are up before any pings


def guest(image: Any, sock: Path, n: int, *workloads: Workload) -> TestVM:
    return TestVM(kernel=image.kernel, initrd=image.initrd, accel="tcg", workloads=workloads,
                  nic=VhostUserNic(socket=sock, mac=f"52:54:00:00:01:{n:02x}"), guest_ip=f"10.0.3.{n}/24",
                  name=f"switch-{n}")  # fmt: skip


def ping(n: int, count: int = 5, interval: float = 0.2, **extra: Any) -> Workload:
    return Workload("ping", target=f"10.0.3.{n}", count=count, interval=interval, **extra)


async def boot_together(vms: list[TestVM], stack: contextlib.AsyncExitStack) -> None:
    """Launch all, wait for every NICSIM-READY, and check they came up within SETTLE of each other."""
    for v in vms:
        await stack.enter_async_context(v)
    loop = asyncio.get_running_loop()

    async def ready(v: TestVM) -> float:
        await v.wait_for("NICSIM-READY", BOOT_TIMEOUT)
        return loop.time()

    times = await asyncio.gather(*(ready(v) for v in vms))
    spread = max(times) - min(times)
    assert spread < SETTLE - 5, f"the guests came up {spread:.1f} s apart: the first would ping too early"


async def test_three_guests_on_one_switch_ping_each_other_with_no_loss(
    guest_image: Any, tmp_path: Path
) -> None:
    t0 = asyncio.get_running_loop().time()
    names = ["nicsim.sock", "b.sock", "c.sock"]
    async with nicsim_serve(tmp_path, "--port", "switch", more_sockets=names[1:]) as (proc, _, stats_path):
        socks = [tmp_path / n for n in names]
        others = {1: (2, 3), 2: (1, 3), 3: (1, 2)}
        # First contact (ARP) gets a ping of its own, outside the count, so that the counted pings
        # measure the switch once every guest knows the others. Each guest then stays up (its last
        # workload sleeps) until all three are done: one that powered off after its own pings would
        # leave the others pinging nobody.
        vms = [guest(guest_image, socks[n - 1], n, Workload("sleep", seconds=SETTLE),
                     *(ping(m, count=1) for m in others[n]),
                     *(ping(m) for m in others[n]), Workload("sleep", seconds=600))
               for n in (1, 2, 3)]  # fmt: skip
        async with contextlib.AsyncExitStack() as stack:
            await boot_together(vms, stack)
            results = await asyncio.gather(*(v.wait_results(5, BOOT_TIMEOUT + SETTLE) for v in vms))
            for v in vms:
                await v.quit()
        for n, (slept, *contact_and_pings) in zip((1, 2, 3), results, strict=True):
            assert slept.ok, slept
            contact, pings = contact_and_pings[:2], contact_and_pings[2:]
            assert all(r.ok for r in contact), (n, contact)
            for target, r in zip(others[n], pings, strict=True):
                assert r.ok, (n, target, r)
                assert (r["transmitted"], r["received"], r["loss_pct"]) == (5, 5, 0), (n, target, r)
        stats = await read_stats(stats_path, lambda s: not any(e["connected"] for e in s["sockets"]))
        assert proc.poll() is None, "the backend outlives the guests"
        assert [e["pool"]["usage"] for e in stats["sockets"]] == [0, 0, 0]
        switch = stats["switch"]
        assert switch["fdb"]["learned"] >= 3
        for sock in socks:
            port = switch["ports"][str(sock)]
            # Each guest sent 10 echo requests and answered 10, and got as many back.
            assert port["rx_packets"] >= 20 and port["tx_packets"] >= 20, port
            assert "no_rx_buffer" not in port["drops"], port
    print(f"three guests: {asyncio.get_running_loop().time() - t0:.1f} s")


async def test_impaired_ports_lose_and_delay_what_they_are_told_to(guest_image: Any, tmp_path: Path) -> None:
    """Frames to B wait 20 ms; frames to C are lost 10 % of the time (a seeded draw). A pings C
    10 000 times back to back, and B and C 20 times each for the RTT: B's grows by the delay."""
    t0 = asyncio.get_running_loop().time()
    names = ["nicsim.sock", "b.sock", "c.sock"]
    impair = ["--impair", "b.sock:rx:delay=20ms", "--impair", "c.sock:rx:loss=10% seed=1"]
    async with nicsim_serve(tmp_path, "--port", "switch", *impair, more_sockets=names[1:]) as (
        proc, _, stats_path,
    ):  # fmt: skip
        socks = [tmp_path / n for n in names]
        a = guest(guest_image, socks[0], 1, Workload("sleep", seconds=SETTLE),
                  ping(3, count=20, interval=0.05, rtts=True), ping(2, count=20, interval=0.05, rtts=True),
                  ping(3, count=10_000, interval=0.01, adaptive=True))  # fmt: skip
        peers = [guest(guest_image, socks[n - 1], n, Workload("sleep", seconds=600)) for n in (2, 3)]
        async with contextlib.AsyncExitStack() as stack:
            await boot_together([a, *peers], stack)
            _, base, delayed, flood = await a.results(BOOT_TIMEOUT + SETTLE + 120)
            for v in peers:
                await v.quit()
        assert base.ok and delayed.ok and flood.ok, (base, delayed, flood)
        assert delayed["received"] == 20, delayed
        # The fastest round trip of each: the path's own time, which the host's load (two TCG guests
        # and nicsim on two cores) only ever adds to; a median moves with that load by milliseconds.
        grown = min(delayed["rtt_ms"]) - min(base["rtt_ms"])
        assert 18 <= grown <= 22, (grown, base["rtt_ms"], delayed["rtt_ms"])
        lost = 1 - flood["received"] / flood["transmitted"]
        assert flood["transmitted"] >= 10_000  # busybox ping -A may send a few past -c
        assert 0.085 <= lost <= 0.115, flood
        stats = await read_stats(stats_path, lambda s: not any(e["connected"] for e in s["sockets"]))
        assert proc.poll() is None
        loss = stats["switch"]["ports"][str(socks[2])]["impair"]["rx"]
        # What the switch says it lost covers what ping lost (and ARP or IPv6 frames besides).
        assert loss["dropped"]["loss"] >= flood["transmitted"] - flood["received"] - 2
        assert [e["pool"]["usage"] for e in stats["sockets"]] == [0, 0, 0]
    print(f"impairments: {asyncio.get_running_loop().time() - t0:.1f} s, RTT +{grown:.1f} ms, "
          f"loss {100 * lost:.2f} %")


async def test_a_broadcast_flood_and_a_killed_guest_leave_the_others_pinging(
    guest_image: Any, tmp_path: Path
) -> None:
    """A floods broadcast (pktgen) while B pings C; then A's QEMU is killed (SIGKILL) and B pings C
    again. Neither costs B a ping: the flood takes A's peers' free receive buffers, never their
    backlog room."""
    t0 = asyncio.get_running_loop().time()
    names = ["nicsim.sock", "b.sock", "c.sock"]
    async with nicsim_serve(tmp_path, "--port", "switch", more_sockets=names[1:]) as (proc, _, stats_path):
        socks = [tmp_path / n for n in names]
        a = guest(guest_image, socks[0], 1, Workload("sleep", seconds=SETTLE - 3),
                  Workload("pktgen-tx", duration=600, size=60, dst="10.0.3.255"))  # fmt: skip
        b = guest(guest_image, socks[1], 2, Workload("sleep", seconds=SETTLE), ping(3, count=20),
                  Workload("sleep", seconds=8), ping(3, count=5))  # fmt: skip
        c = guest(guest_image, socks[2], 3, Workload("sleep", seconds=600))
        async with contextlib.AsyncExitStack() as stack:
            await boot_together([a, b, c], stack)
            await b.wait_for('NICSIM-RESULT.*"ping"', BOOT_TIMEOUT + SETTLE)
            flooded = await read_stats(stats_path, lambda s: True)
            os.kill(a.pid, signal.SIGKILL)
            _, during, _, after = await b.results(BOOT_TIMEOUT)
            await c.quit()
        assert during.ok and after.ok, (during, after)
        # The flood fills B's and C's receive rings too, but flooded frames never wait in a backlog:
        # a ping that meets a full ring waits there, ahead of the flood, and is not lost.
        assert during["received"] == during["transmitted"] == 20, during
        assert after["received"] == after["transmitted"] == 5, after
        ports = flooded["switch"]["ports"]
        assert ports[str(socks[0])]["rx_packets"] > 1000, "A flooded while B pinged"
        stats = await read_stats(stats_path, lambda s: not any(e["connected"] for e in s["sockets"]))
        assert proc.poll() is None
        assert [e["pool"]["usage"] for e in stats["sockets"]] == [0, 0, 0]
        assert str(socks[0]) not in stats["switch"]["joined"]
    drops = [ports[str(s)]["drops"] for s in socks[1:]]
    print(f"flood and kill: {asyncio.get_running_loop().time() - t0:.1f} s; "
          f"{during['received']}/20 pings during the flood; drops on B, C: {drops}")


async def test_iperf3_tcp_between_two_guests_through_the_switch(guest_image: Any, tmp_path: Path) -> None:
    """With the switch's offloads on (the default) both guests negotiate checksum and TSO offloads,
    and the TCP stream crosses the switch as GSO frames, whole (counted ``rx_gso`` on the sender's
    port, ``tx_gso`` on the receiver's), not as MTU-sized segments."""
    t0 = asyncio.get_running_loop().time()
    async with nicsim_serve(tmp_path, "--port", "switch", more_sockets=["b.sock"]) as (
        proc, sock, stats_path,
    ):  # fmt: skip
        server = guest(guest_image, tmp_path / "b.sock", 2, Workload("iperf3-server"))
        client = guest(guest_image, sock, 1, Workload("sleep", seconds=SETTLE),
                       Workload("iperf3-client", server="10.0.3.2", time=3, proto="tcp"))  # fmt: skip
        async with contextlib.AsyncExitStack() as stack:
            await boot_together([server, client], stack)
            _, sent = await client.results(BOOT_TIMEOUT + SETTLE)
            (served,) = await server.results(60)
        assert sent.ok and served.ok, (sent, served)
        assert sent["received_bytes"] > 1_000_000, sent
        stats = await read_stats(stats_path, lambda s: not any(e["connected"] for e in s["sockets"]))
        assert proc.poll() is None
        assert [e["pool"]["usage"] for e in stats["sockets"]] == [0, 0]
    for entry in stats["sockets"]:
        offloads = entry["port"]["offloads"]
        assert offloads == {"tx": ["csum", "tso4", "tso6"], "rx": ["csum", "tso4", "tso6"]}, entry["port"]
    ports = stats["switch"]["ports"]
    a, b = ports[str(sock)], ports[str(tmp_path / "b.sock")]
    # A's stream went out as GSO frames and reached B whole: none segmented in software, and the
    # frames B got far bigger than an MTU on average.
    assert a["offload"].get("rx_gso", 0) > 100, a
    assert b["offload"].get("tx_gso", 0) == a["offload"]["rx_gso"] and "gso_segmented" not in b["offload"], b
    assert b["tx_bytes"] / b["tx_packets"] > 4 * 1514, b
    drops = [p["drops"] for p in ports.values()]
    print(f"iperf3: {asyncio.get_running_loop().time() - t0:.1f} s, {sent['received_bps'] / 1e6:.0f} Mbit/s, "
          f"retransmits {sent.get('retransmits')}, drops {drops}, {a['offload']['rx_gso']} GSO frames, "
          f"{b['tx_bytes'] / b['tx_packets']:.0f} B per frame to B")
