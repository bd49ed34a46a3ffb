"""End to end: a real Linux guest under QEMU on nicsim's vhost-user backend.

``nicsim serve`` runs as a subprocess (as users run it) for the ping and lifecycle tests, and as an
in-process ``Server`` in the test's loop where the test needs its own port (a UDP counter that sees
only pktgen's frames, a generator that starts when the guest starts counting). Every boot is short.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from nicsim.ports import GeneratorConfig, GeneratorPort, TxFrames
from nicsim.ports.frames import ETHERTYPE_IPV4, IPPROTO_UDP
from nicsim.ports.sink import SinkPort
from nicsim.server import Server
from nicsim.virtio.device import VirtioNetDevice
from qemu.testvm import TestVM, VhostUserNic, Workload
from tests.serve_process import nicsim_serve, read_stats

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120.0  # a deadline for failure on a loaded TCG host, not a performance claim


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def vm(guest_image: Any, sock: Path, *workloads: Workload) -> TestVM:
    return TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, nic=VhostUserNic(socket=sock),
                  accel="tcg", workloads=workloads)


async def test_guest_pings_the_responder_with_no_loss(guest_image: Any, tmp_path: Path) -> None:
    async with nicsim_serve(tmp_path) as (proc, sock, stats_path):
        async with vm(guest_image, sock, Workload("ping", target="10.0.2.2", count=5, interval=0.2)) as v:
            (result,) = await v.results(BOOT_TIMEOUT)
        assert result.ok, result
        assert result["transmitted"] == 5 and result["received"] == 5 and result["loss_pct"] == 0
        stats = await read_stats(stats_path, lambda s: not s["sockets"][0]["connected"])
        assert stats["port"]["icmp_echo"] == 5
        assert stats["pool"]["usage"] == 0
    assert proc.returncode == 0
    assert not sock.exists()


class PktgenCounter(SinkPort):
    """Counts only UDP datagrams to port 9 (what pktgen sends), not the guest's IPv6/ARP chatter."""

    name = "pktgen-counter"

    def __init__(self) -> None:
        super().__init__()
        self.udp9 = 0

    def transmit(self, batch: TxFrames) -> bool:
        for i in range(batch.count):
            f = batch.frame(i)
            if (f.shape[0] >= 38 and (int(f[12]) << 8 | int(f[13])) == ETHERTYPE_IPV4
                    and int(f[23]) == IPPROTO_UDP and (int(f[36]) << 8 | int(f[37])) == 9):
                self.udp9 += 1
        return super().transmit(batch)


async def test_pktgen_sends_n_frames_and_nicsim_counts_exactly_n(guest_image: Any, tmp_path: Path) -> None:
    ports: list[PktgenCounter] = []

    def make_device() -> VirtioNetDevice:
        ports.append(PktgenCounter())
        return VirtioNetDevice(port=ports[-1])

    n = 20000
    sock = tmp_path / "nicsim.sock"
    async with Server([sock], make_device) as server:
        async with vm(guest_image, sock, Workload("pktgen-tx", count=n, size=60)) as v:
            (result,) = await v.results(BOOT_TIMEOUT)
        assert result.ok, result
        assert result["packets"] == n
        await asyncio.wait_for(server.endpoints[0].wait_idle(), 30)
        assert ports[-1].udp9 == n
        last = server.endpoints[0].last
        assert last is not None and last.final_snapshot is not None
        assert last.final_snapshot["pool"]["usage"] == 0
        assert last.final_snapshot["queues"][1]["drops"] == {}


class GatedGenerator(GeneratorPort):
    """A generator that holds its frames until ``open`` is set (when the guest starts counting)."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__(config)
        self.open = False

    def poll_rx(self, pair: int, budget: int, now: float) -> int:
        return super().poll_rx(pair, budget, now) if self.open else 0


async def test_generator_sends_n_frames_and_the_guest_counts_exactly_n(
    guest_image: Any, tmp_path: Path
) -> None:
    n = 5000
    ports: list[GatedGenerator] = []

    def make_device() -> VirtioNetDevice:
        ports.append(GatedGenerator(GeneratorConfig(size=60, count=n)))
        return VirtioNetDevice(port=ports[-1])

    sock = tmp_path / "nicsim.sock"
    async with Server([sock], make_device):
        async with vm(guest_image, sock, Workload("rx-count", duration=4)) as v:
            await v.wait_for("rx-count: counting", BOOT_TIMEOUT)
            ports[-1].open = True
            (result,) = await v.results(BOOT_TIMEOUT)
        assert result.ok, result
        assert ports[-1].sent == n
        assert result["packets"] == n
        assert result["dropped"] == 0


async def test_reboot_mid_traffic_and_quit_leave_the_backend_serving_with_nothing_held(
    guest_image: Any, tmp_path: Path
) -> None:
    async with nicsim_serve(tmp_path, "--port", "sink") as (proc, sock, stats_path):
        await read_stats(stats_path, lambda s: True)
        fds_idle = fd_count(proc.pid)
        async with vm(guest_image, sock, Workload("pktgen-tx", duration=30, size=60)) as v:
            await v.wait_for("NICSIM-READY", BOOT_TIMEOUT)
            # Reset while pktgen is sending: QEMU stops the rings (GET_VRING_BASE) and restarts them.
            await read_stats(stats_path, lambda s: s["queues"][1]["packets"] > 1000)
            mark = len(v.console_text)
            await v.system_reset()
            await v.wait_for("NICSIM-READY", BOOT_TIMEOUT, since=mark)
            before = (await read_stats(stats_path, lambda s: True))["queues"][1]["packets"]
            await read_stats(stats_path, lambda s: s["queues"][1]["packets"] > before + 1000)
            assert (await read_stats(stats_path, lambda s: True))["sockets"][0]["connections"] == 1
            await v.quit()
        stats = await read_stats(stats_path, lambda s: not s["sockets"][0]["connected"])
        assert proc.poll() is None, "the backend outlives QEMU"
        assert stats["pool"]["usage"] == 0
        assert stats["queues"][1]["inflight"] == 0 and stats["queues"][0]["inflight"] == 0
        assert fd_count(proc.pid) == fds_idle
        # And it serves the next QEMU.
        async with vm(guest_image, sock, Workload("ping", target="10.0.2.2", count=1)) as v:
            (result,) = await v.results(BOOT_TIMEOUT)
        assert not result.ok  # the sink answers nothing...
        stats = await read_stats(stats_path, lambda s: s["sockets"][0]["connections"] == 2
                                 and not s["sockets"][0]["connected"])
        assert stats["queues"][1]["packets"] > 0  # ...but it saw the guest's ARP requests
        assert fd_count(proc.pid) == fds_idle
    assert proc.returncode == 0
