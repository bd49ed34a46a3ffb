"""End to end on packed virtqueues (virtio 1.2 §2.8): a real Linux guest whose NIC has ``packed=on``.

QEMU offers VIRTIO_F_RING_PACKED to the guest only with ``packed=on``; the guest's virtio_ring then
lays out packed rings and nicsim's device runs them (``rings.packed``). Each test checks, while the
guest still runs, that both rings of the pair really are packed, then what the split-ring tests
(``tests/test_e2e_qemu.py``) check: ping through the responder, pktgen's frames counted one by one,
the generator's frames counted by the guest, nothing left in flight. Every boot is short.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from nicsim.ports import GeneratorConfig, ResponderPort
from nicsim.server import Server
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_RING_PACKED
from qemu.testvm import TestVM, VhostUserNic, Workload
from rings.packed import PackedQueue
from tests.test_e2e_qemu import BOOT_TIMEOUT, GatedGenerator, PktgenCounter

pytestmark = pytest.mark.vm


def packed_vm(guest_image: Any, sock: Path, *workloads: Workload) -> TestVM:
    return TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd,
                  nic=VhostUserNic(socket=sock, packed=True), accel="tcg", workloads=workloads)  # fmt: skip


def assert_packed(device: VirtioNetDevice) -> None:
    assert device.has(VIRTIO_F_RING_PACKED)
    assert all(isinstance(device.queue(i), PackedQueue) for i in (0, 1)), [device.queue(i) for i in (0, 1)]


async def final_snapshot(server: Server) -> dict[str, Any]:
    await asyncio.wait_for(server.endpoints[0].wait_idle(), 30)
    last = server.endpoints[0].last
    assert last is not None and last.final_snapshot is not None
    return last.final_snapshot


async def test_packed_guest_pings_the_responder_with_no_loss(guest_image: Any, tmp_path: Path) -> None:
    devices: list[VirtioNetDevice] = []

    def make_device() -> VirtioNetDevice:
        devices.append(VirtioNetDevice(port=ResponderPort()))
        return devices[-1]

    sock = tmp_path / "nicsim.sock"
    async with Server([sock], make_device) as server:
        ping = Workload("ping", target="10.0.2.2", count=5, interval=0.2)
        async with packed_vm(guest_image, sock, ping) as v:
            (result,) = await v.results(BOOT_TIMEOUT)
            assert_packed(devices[-1])
        assert result.ok, result
        assert result["transmitted"] == 5 and result["received"] == 5 and result["loss_pct"] == 0
        snap = await final_snapshot(server)
        assert snap["port"]["icmp_echo"] == 5
        assert snap["pool"]["usage"] == 0


async def test_packed_pktgen_sends_n_frames_and_nicsim_counts_exactly_n(
    guest_image: Any, tmp_path: Path
) -> None:
    ports: list[PktgenCounter] = []
    devices: list[VirtioNetDevice] = []

    def make_device() -> VirtioNetDevice:
        ports.append(PktgenCounter())
        devices.append(VirtioNetDevice(port=ports[-1]))
        return devices[-1]

    n = 20000
    sock = tmp_path / "nicsim.sock"
    async with Server([sock], make_device) as server:
        async with packed_vm(guest_image, sock, Workload("pktgen-tx", count=n, size=60)) as v:
            (result,) = await v.results(BOOT_TIMEOUT)
            assert_packed(devices[-1])
        assert result.ok, result
        assert result["packets"] == n
        snap = await final_snapshot(server)
        assert ports[-1].udp9 == n
        assert snap["pool"]["usage"] == 0
        assert snap["queues"][1]["drops"] == {}


async def test_packed_generator_sends_n_frames_and_the_guest_counts_exactly_n(
    guest_image: Any, tmp_path: Path
) -> None:
    n = 5000
    ports: list[GatedGenerator] = []
    devices: list[VirtioNetDevice] = []

    def make_device() -> VirtioNetDevice:
        ports.append(GatedGenerator(GeneratorConfig(size=60, count=n)))
        devices.append(VirtioNetDevice(port=ports[-1]))
        return devices[-1]

    sock = tmp_path / "nicsim.sock"
    async with Server([sock], make_device) as server:
        async with packed_vm(guest_image, sock, Workload("rx-count", duration=4)) as v:
            await v.wait_for("rx-count: counting", BOOT_TIMEOUT)
            assert_packed(devices[-1])
            ports[-1].open = True
            (result,) = await v.results(BOOT_TIMEOUT)
        assert result.ok, result
        assert ports[-1].sent == n
        assert result["packets"] == n
        assert result["dropped"] == 0
        snap = await final_snapshot(server)
        assert snap["pool"]["usage"] == 0
