"""The server on packed virtqueues, driven by the Python frontend over a real Unix socket: the frontend
negotiates VIRTIO_F_RING_PACKED (``handshake(packed=True)``) and lays out packed rings
(``rings.driver_packed``); the backend core builds packed device queues from SET_VRING_ADDR and
SET_VRING_BASE, answers GET_VRING_BASE with positions and wrap counters, and hands out an inflight
buffer in the packed layout (``tests/test_restart_inflight_packed.py`` restarts a backend with it)."""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from nicsim.frontend import FrontendError, VhostUserFrontend
from nicsim.ports import GeneratorConfig, GeneratorPort, Port, SinkPort
from nicsim.server import Server
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_RING_PACKED
from rings.driver import TxLayout
from rings.driver_packed import PackedDriverQueue
from rings.inflight_packed import PACKED_HEADER_DTYPE, packed_inflight_size, packed_region_size
from rings.packed import PackedQueue
from rings.packed_layout import off_wrap
from tests.test_server_frontend import frame, open_fds


@asynccontextmanager
async def serving(
    tmp_path: Path, make_port: Callable[[], Port]
) -> AsyncIterator[tuple[Server, list[VirtioNetDevice]]]:
    devices: list[VirtioNetDevice] = []

    def make_device() -> VirtioNetDevice:
        devices.append(VirtioNetDevice(port=make_port()))
        return devices[-1]

    server = Server([tmp_path / "packed.sock"], make_device)
    await server.start()
    try:
        yield server, devices
    finally:
        await server.close()


async def packed_frontend(server: Server, *, queue_size: int = 64) -> VhostUserFrontend:
    fe = await VhostUserFrontend.connect(server.endpoints[0].path, queue_size=queue_size)
    features = await fe.handshake(packed=True)
    assert features & (1 << VIRTIO_F_RING_PACKED)
    await fe.start()
    assert fe.packed and all(isinstance(q, PackedDriverQueue) for q in fe.queues.values())
    return fe


async def ended(server: Server) -> None:
    ep = server.endpoints[0]
    await asyncio.wait_for(ep.wait_idle(), 10)
    assert ep.last is not None and ep.last.final_snapshot is not None
    assert ep.last.final_snapshot["pool"]["usage"] == 0


async def test_a_frontend_without_packed_does_not_get_packed_rings(tmp_path: Path) -> None:
    async with serving(tmp_path, SinkPort) as (server, devices):
        fe = await VhostUserFrontend.connect(server.endpoints[0].path)
        assert not (await fe.handshake()) & (1 << VIRTIO_F_RING_PACKED)
        await fe.start()
        fe.transmit([frame(1)])
        await fe.wait_used(1, 1)
        assert not isinstance(devices[-1].queue(1), PackedQueue)
        await fe.close()
        await ended(server)


async def test_tx_over_packed_rings_wraps_many_times_and_get_vring_base_says_where(tmp_path: Path) -> None:
    before = open_fds()
    async with serving(tmp_path, SinkPort) as (server, devices):
        fe = await packed_frontend(server)
        assert isinstance(devices[-1].queue(1), PackedQueue)
        sent = 0
        for k in (1, 5, 30, 3, 25, 40, 7, 31, 2, 56):  # 200 one-descriptor chains on a ring of 64
            fe.transmit([frame(sent + i) for i in range(k)])
            done = await fe.wait_used(1, k)
            assert [c.len for c in done] == [0] * k
            sent += k
        assert devices[-1].snapshot()["port"]["packets"] == sent
        pos, wrap = sent % 64, 1 ^ (sent // 64) & 1
        assert await fe.stop_ring(1) == off_wrap(pos, wrap) | off_wrap(pos, wrap) << 16
        await fe.close()
        await ended(server)
    assert open_fds() <= before  # nothing leaked (an earlier test's leftovers may close meanwhile)


async def test_the_generator_fills_packed_rx_rings(tmp_path: Path) -> None:
    n = 500
    cfg = GeneratorConfig(size=100, count=n)
    async with serving(tmp_path, lambda: GeneratorPort(cfg)) as (server, _):
        fe = await packed_frontend(server, queue_size=128)
        fe.post_rx(128)
        got = []
        while len(got) < n:
            done = await fe.wait_used(0, min(32, n - len(got)))
            got.extend(done)
            fe.post_rx(len(done))
        template = GeneratorPort(cfg).template.tobytes()
        assert all(c.data is not None and c.data[12:] == template and c.len == 112 for c in got)
        await fe.close()
        await ended(server)


async def test_the_inflight_buffer_of_packed_rings_has_the_packed_layout_and_tracks_them(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, SinkPort) as (server, _):
        fe = await VhostUserFrontend.connect(server.endpoints[0].path, queue_size=64)
        await fe.handshake(packed=True, inflight=True)
        await fe.setup_inflight()  # SET_FEATURES (packed), GET_INFLIGHT_FD, SET_INFLIGHT_FD
        assert fe.inflight is not None
        fd, desc = fe.inflight
        assert desc.mmap_size == packed_inflight_size(2, 64) == os.fstat(fd).st_size
        await fe.start(base=60)
        fe.transmit([frame(i) for i in range(10)], layout=TxLayout.TWO)
        await fe.wait_used(1, 10)
        sess = server.endpoints[0].session
        assert sess is not None and not sess.core.errors, sess.core.errors
        # The TX ring's region: initialised, every entry free again, the used side 20 descriptors on.
        mm = mmap.mmap(fd, desc.mmap_size, prot=mmap.PROT_READ)
        try:
            h = np.frombuffer(mm, PACKED_HEADER_DTYPE, count=1, offset=packed_region_size(64))[0]
            assert (int(h["version"]), int(h["desc_num"])) == (1, 64)
            assert (int(h["used_idx"]), int(h["used_wrap_counter"])) == ((60 + 20) % 64, 0)
            committed = (int(h["old_used_idx"]), int(h["old_free_head"]))
            assert committed == (int(h["used_idx"]), int(h["free_head"]))
            del h
        finally:
            mm.close()
        await fe.close()
        await ended(server)


@pytest.mark.parametrize(
    ("offset", "value", "why"),
    [
        (8, 7, "version 7 is not 1"),  # QueueRegionPacked.version
        (10, 63, "made for 63 descriptors"),  # desc_num
        (18, 200, "old_used_idx 200 is outside"),  # old_used_idx
    ],
)
async def test_a_packed_inflight_region_that_cannot_be_trusted_stops_only_its_ring(
    tmp_path: Path, offset: int, value: int, why: str
) -> None:
    async with serving(tmp_path, SinkPort) as (server, _):
        fe = await VhostUserFrontend.connect(server.endpoints[0].path, queue_size=64)
        await fe.handshake(packed=True, inflight=True)
        await fe.setup_inflight()
        await fe.start()
        fe.transmit([frame(i) for i in range(5)])
        await fe.wait_used(1, 5)
        assert fe.inflight is not None
        fd, desc = fe.inflight
        mm = mmap.mmap(fd, desc.mmap_size)
        try:
            tx_region = np.frombuffer(mm, np.uint16, count=16, offset=packed_region_size(64))
            tx_region[offset // 2] = value  # the TX ring's header, written by someone else
            del tx_region
        finally:
            mm.close()
        with pytest.raises(FrontendError, match="refused SET_VRING_KICK"):
            await fe.reconnect(server.endpoints[0].path)
        sess = server.endpoints[0].session
        assert sess is not None
        errors = sess.core.errors
        assert any("inflight region" in e and why in e and "queue 1" in e for e in errors), errors
        await fe.close()
        await ended(server)
