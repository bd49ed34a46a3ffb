"""End to end: real Linux guests under QEMU joined by ``nicsim serve --port switch``, one socket each.

The guests boot at once; each sleeps long enough for the others to come up (the test checks that
they did, so a slow boot fails with its own message rather than as a lost ping), then pings its
peers. Every boot is short; the guests power off when their workloads are done.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        vms = [guest(guest_image, socks[n - 1], n, Workload("sleep", seconds=SETTLE),
                     *(ping(m) for m in others[n])) for n in (1, 2, 3)]  # fmt: skip
        async with contextlib.AsyncExitStack() as stack:
            await boot_together(vms, stack)
            results = await asyncio.gather(*(v.results(BOOT_TIMEOUT + SETTLE) for v in vms))
        for n, (slept, *pings) in zip((1, 2, 3), results, strict=True):
            assert slept.ok, slept
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
