"""The server on packed virtqueues, driven by the Python frontend over a real Unix socket: the frontend
negotiates VIRTIO_F_RING_PACKED (``handshake(packed=True)``) and lays out packed rings
(``rings.driver_packed``); the backend core builds packed device queues from SET_VRING_ADDR and
SET_VRING_BASE, answers GET_VRING_BASE with positions and wrap counters, and refuses inflight
tracking, which it does not do on packed rings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from nicsim.frontend import FrontendError, VhostUserFrontend
from nicsim.ports import GeneratorConfig, GeneratorPort, Port, SinkPort
from nicsim.server import Server
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_RING_PACKED
from rings.driver_packed import PackedDriverQueue
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


async def test_inflight_tracking_is_refused_on_packed_rings(tmp_path: Path) -> None:
    async with serving(tmp_path, SinkPort) as (server, _):
        fe = await VhostUserFrontend.connect(server.endpoints[0].path)
        await fe.handshake(packed=True, inflight=True)
        with pytest.raises(FrontendError, match="refused GET_INFLIGHT_FD"):
            await fe.setup_inflight()
        sess = server.endpoints[0].session
        assert sess is not None
        assert any("not supported on packed rings" in e for e in sess.core.errors), sess.core.errors
        await fe.close()
