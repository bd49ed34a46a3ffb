"""The asyncio server driven by the Python frontend over a real Unix socket, in the test's own loop.

Each test starts a ``Server`` on a fresh socket path with one port, connects a ``VhostUserFrontend``
(memfd guest RAM shared with the server, the driver model of ``rings.driver`` on top), and checks what
the device did through the driver's rings and the device's own counters. Every test ends by checking
that the process holds exactly the fds it held before (``/proc/self/fd``) and the pool is empty.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from nicsim.frontend import FrontendError, Malformed, VhostUserFrontend
from nicsim.ports import GeneratorConfig, GeneratorPort, Port, SinkPort
from nicsim.ports.frames import ip_bytes, mac_bytes, udp_frame
from nicsim.ports.sink import SinkConfig, frame_sums
from nicsim.server import Server, Session
from nicsim.vhost import features as vf
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_VERSION_1, VIRTIO_NET_F_GUEST_TSO4
from rings.driver import Completion
from rings.pool import PacketPool
from tests.hardening import until


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def frame(n: int, size: int = 60) -> bytes:
    return udp_frame(dst_mac=mac_bytes("52:54:00:00:00:02"), src_mac=mac_bytes("52:54:00:12:34:56"),
                     src_ip=ip_bytes("10.0.2.15"), dst_ip=ip_bytes("10.0.2.2"), sport=1000 + n, dport=9,
                     size=size)


Serve = Callable[..., Awaitable['Harness']]


class Harness:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.endpoint = server.endpoints[0]
        self.devices: list[VirtioNetDevice] = []

    async def session(self, connections: int = 1) -> Session:
        return await asyncio.wait_for(self.endpoint.wait_session(connections=connections), 10)

    async def frontend(self, **kwargs: object) -> VhostUserFrontend:
        fe = await VhostUserFrontend.connect(self.endpoint.path, **kwargs)
        await fe.handshake()
        await fe.start()
        return fe


@pytest.fixture
def serve(tmp_path: Path) -> Serve:
    servers: list[Server] = []

    async def start(make_port: Callable[[], Port], *, pool_size: int = 1024) -> Harness:
        holder: list[VirtioNetDevice] = []

        def make_device() -> VirtioNetDevice:
            dev = VirtioNetDevice(port=make_port(), pool=PacketPool(pool_size))
            holder.append(dev)
            return dev

        server = Server([tmp_path / f"s{len(servers)}.sock"], make_device)
        servers.append(server)
        await server.start()
        h = Harness(server)
        h.devices = holder
        return h

    return start


async def test_reading_sink_sums_every_byte_of_every_frame(serve: Serve) -> None:
    h = await serve(lambda: SinkPort(SinkConfig(read=True)))
    fe = await h.frontend()
    sess = await h.session()
    frames = [frame(i, size=60 + 97 * i) for i in range(12)]  # sizes up to 1127 B, all distinct bytes
    fe.transmit(frames)
    await fe.wait_used(1, len(frames))
    port = sess.device.snapshot()["port"]
    assert port["read"] is True
    assert port["packets"] == len(frames)
    assert port["checksum"] == sum(sum(f) for f in frames)
    await fe.close()
    await h.server.close()


def test_frame_sums_covers_each_frame_and_nothing_between() -> None:
    data = np.arange(20, dtype=np.uint8)
    # frames at [2, 5) and [9, 20): the bytes between them (a header, say) are not summed
    sums = frame_sums(data, np.array([2, 9], dtype=np.int64), np.array([3, 11], dtype=np.uint32))
    assert sums.tolist() == [2 + 3 + 4, sum(range(9, 20))]


def test_count_only_sink_reads_no_bytes_and_says_so() -> None:
    sink = SinkPort()
    assert sink.stats() == {"packets": 0, "bytes": 0, "read": False}


async def test_tx_to_the_sink_counts_every_frame_and_returns_every_buffer(serve: Serve) -> None:
    before = open_fds()
    h = await serve(SinkPort)
    fe = await h.frontend()
    sess = await h.session()
    n = 1000
    sent = 0
    while sent < n:
        k = min(100, n - sent)
        fe.transmit([frame(sent + i) for i in range(k)])
        await fe.wait_used(1, k)
        sent += k
    snap = sess.device.snapshot()
    assert snap["port"]["packets"] == n
    assert snap["queues"][1]["packets"] == n
    assert snap["port"]["bytes"] == n * 60
    assert snap["pool"]["usage"] == 0
    await fe.close()
    await asyncio.wait_for(h.endpoint.wait_idle(), 10)
    await h.server.close()
    assert open_fds() == before


async def finish(h: Harness, fe: VhostUserFrontend, before: set[str]) -> Session:
    """Disconnect, wait for the server to notice, close it; check fds and pool. Returns the session."""
    sess = h.endpoint.session
    await fe.close()
    await asyncio.wait_for(h.endpoint.wait_idle(), 10)
    assert h.endpoint.last is not None
    last = h.endpoint.last
    await h.server.close()
    assert last.final_snapshot is not None and last.final_snapshot["pool"]["usage"] == 0
    assert last.device.pool.closed
    assert last.memory.leaked_views == 0
    assert open_fds() == before
    assert sess is None or sess is last
    return last


async def test_generator_fills_exactly_count_guest_buffers_with_its_frame(serve: Serve) -> None:
    before = open_fds()
    cfg = GeneratorConfig(size=100, count=700)
    h = await serve(lambda: GeneratorPort(cfg))
    fe = await h.frontend()
    got: list[Completion] = []
    fe.post_rx(256)
    while len(got) < 700:
        done = await fe.wait_used(0, min(64, 700 - len(got)))
        got.extend(done)
        fe.post_rx(len(done))
    template = GeneratorPort(cfg).template.tobytes()
    assert all(c.data is not None and c.data[12:] == template and c.len == 112 for c in got)
    # The generator stops at its count: the buffers still posted stay untouched, even when the guest
    # kicks and the RX ring runs a round that sees them (the chance to fill one more).
    sess = await h.session()
    pump = sess.pumps[0]
    assert fe.queues[0].in_flight == 256
    rounds = pump.snapshot()["rounds"]
    fe.kick(0, force=True)
    await until(lambda: pump.snapshot()["rounds"] > rounds, "a round of the RX ring after the kick")
    assert fe.queues[0].used_pending() == 0
    assert sess.device.snapshot()["queues"][0]["packets"] == 700
    await finish(h, fe, before)


async def test_rx_with_no_guest_buffers_sleeps_until_the_guest_posts_some(serve: Serve) -> None:
    before = open_fds()
    h = await serve(lambda: GeneratorPort(GeneratorConfig(size=60)))
    fe = await h.frontend()
    sess = await h.session()
    pump = sess.pumps[0]
    await until(lambda: pump.snapshot()["sleeps"] >= 1, "the RX ring going to sleep")
    rounds = pump.snapshot()["rounds"]
    # Asleep on the kick eventfd with nothing scheduled (no timer, no next round): only the guest can
    # wake it. A request round trip lets a ring that polled anyway run, and it ran no round.
    assert not pump._busy and pump._handle is None
    assert await fe.get_features()
    assert pump.snapshot()["rounds"] == rounds
    assert sess.device.stats.batches[0] == 0 and pump.snapshot()["wakeups_kick"] == 0
    fe.post_rx(32)
    await fe.wait_used(0, 32)
    assert int(sess.device.stats.packets[0]) == 32
    await finish(h, fe, before)


async def test_stop_returns_the_next_avail_index_and_restart_resumes_from_it(serve: Serve) -> None:
    before = open_fds()
    h = await serve(SinkPort)
    fe = await VhostUserFrontend.connect(h.endpoint.path)
    await fe.handshake()
    await fe.start(base=65530)  # indices wrap during the test
    sess = await h.session()
    fe.transmit([frame(i) for i in range(10)])
    await fe.wait_used(1, 10)
    assert await fe.stop_ring(1) == (65530 + 10) & 0xFFFF
    # Posted while the ring is stopped: the backend must not touch them, even kicked. A request sent
    # after the kick is the marker: by the time its reply is read, a backend still watching the kick
    # would have read it and run its round.
    kicks = int(sess.device.stats.kicks[1])
    fe.transmit([frame(i) for i in range(3)])
    fe.kick(1, force=True)
    assert await fe.get_features()
    assert fe.queues[1].used_pending() == 0
    assert int(sess.device.stats.kicks[1]) == kicks
    # ...until it is restarted from the base it reported.
    await fe.start_ring(1, base=(65530 + 10) & 0xFFFF)
    fe.kick(1, force=True)
    await fe.wait_used(1, 3)
    assert sess.device.snapshot()["port"]["packets"] == 13
    assert await fe.stop_ring(1) == (65530 + 13) & 0xFFFF
    await finish(h, fe, before)


async def test_memory_table_replaced_mid_run_keeps_traffic_flowing(serve: Serve) -> None:
    before = open_fds()
    h = await serve(SinkPort)
    fe = await h.frontend()
    sess = await h.session()
    fe.transmit([frame(i) for i in range(50)])
    await fe.wait_used(1, 50)
    old = sess.memory.memory
    fe.transmit([frame(i) for i in range(50)])
    await fe.set_memory_table()
    assert old is not None and old.released
    assert sess.memory.memory is not None and sess.memory.memory is not old
    fe.transmit([frame(i) for i in range(50)])
    fe.kick(1, force=True)
    await fe.wait_used(1, 100)
    assert sess.device.snapshot()["port"]["packets"] == 150
    await finish(h, fe, before)


@pytest.mark.parametrize("kind", [k for k in Malformed if k is not Malformed.BAD_VERSION])
async def test_malformed_message_is_refused_and_keeps_serving(serve: Serve, kind: Malformed) -> None:
    before = open_fds()
    h = await serve(SinkPort)
    fe = await h.frontend()
    sess = await h.session()
    reply = await fe.send_malformed(kind)
    if kind is Malformed.STRAY_FD:
        assert reply is not None and reply.payload is None  # GET_QUEUE_NUM answered with an error form
    elif kind is not Malformed.UNKNOWN_REQUEST:
        assert reply is not None and not reply.ok
    # Still serving, on the same connection, with the same memory.
    assert await fe.get_features() & vf.bit(VIRTIO_F_VERSION_1)
    assert sess.errors, "the refusal is reported"
    if kind is Malformed.UNSHARED_MEMORY:
        assert "share=on" in sess.errors[-1]
    fe.transmit([frame(i) for i in range(20)])
    await fe.wait_used(1, 20)
    assert sess.device.snapshot()["port"]["packets"] == 20
    await finish(h, fe, before)


async def test_broken_stream_drops_the_connection_and_the_next_frontend_is_served(serve: Serve) -> None:
    before = open_fds()
    h = await serve(SinkPort)
    fe = await h.frontend()
    fe.transmit([frame(i) for i in range(5)])
    await fe.wait_used(1, 5)
    await fe.send_malformed(Malformed.BAD_VERSION)
    with pytest.raises(ConnectionResetError):
        await fe.get_features()
    await asyncio.wait_for(h.endpoint.wait_idle(), 10)
    await fe.close()
    fe2 = await h.frontend()
    sess2 = await h.session(connections=2)
    fe2.transmit([frame(i) for i in range(7)])
    await fe2.wait_used(1, 7)
    assert sess2.device.snapshot()["port"]["packets"] == 7
    await finish(h, fe2, before)


async def test_disconnect_with_buffers_in_flight_returns_them_all_and_closes_every_fd(serve: Serve) -> None:
    before = open_fds()
    h = await serve(lambda: GeneratorPort(GeneratorConfig(size=60)))
    fe = await h.frontend()
    sess = await h.session()
    fe.post_rx(200)
    fe.transmit([frame(i) for i in range(30)])
    await fe.wait_used(0, 10)
    last = await finish(h, fe, before)
    assert last is sess


async def test_refused_features_fail_the_ack(serve: Serve) -> None:
    before = open_fds()
    h = await serve(SinkPort)
    fe = await VhostUserFrontend.connect(h.endpoint.path)
    await fe.handshake()
    with pytest.raises(FrontendError):
        await fe.call(fe.conn.set_features(vf.bit(VIRTIO_NET_F_GUEST_TSO4), need_reply=True))
    await finish(h, fe, before)


async def test_one_server_serves_two_guests_on_two_sockets(tmp_path: Path) -> None:
    before = open_fds()
    server = Server([tmp_path / "a.sock", tmp_path / "b.sock"], lambda: VirtioNetDevice(port=SinkPort()))
    async with server:
        a = await VhostUserFrontend.connect(tmp_path / "a.sock")
        b = await VhostUserFrontend.connect(tmp_path / "b.sock")
        for fe in (a, b):
            await fe.handshake()
            await fe.start()
        a.transmit([frame(i) for i in range(11)])
        b.transmit([frame(i) for i in range(22)])
        await a.wait_used(1, 11)
        await b.wait_used(1, 22)
        snap = server.snapshot()
        assert [s["port"]["packets"] for s in snap["sockets"]] == [11, 22]
        await a.close()
        await b.close()
    assert not (tmp_path / "a.sock").exists() and not (tmp_path / "b.sock").exists()
    assert open_fds() == before


async def test_client_mode_connects_when_the_frontend_listens_and_reconnects_after_it_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    before = open_fds()
    path = tmp_path / "qemu.sock"
    server = Server([path], lambda: VirtioNetDevice(port=SinkPort()), client=True, retry_interval=0.02)
    loop = asyncio.get_running_loop()
    attempts: list[str] = []
    connect = loop.sock_connect

    async def counted(sock: socket.socket, address: str) -> None:
        attempts.append(address)
        await connect(sock, address)

    monkeypatch.setattr(loop, "sock_connect", counted)
    async with server:
        await until(lambda: len(attempts) >= 3, "the server retrying while nothing listens")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listener.setblocking(False)
        try:
            for n in (1, 2):
                conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
                fe = VhostUserFrontend(conn)
                await fe.handshake()
                await fe.start()
                fe.transmit([frame(i) for i in range(n * 10)])
                await fe.wait_used(1, n * 10)
                sess = await asyncio.wait_for(server.endpoints[0].wait_session(connections=n), 10)
                assert sess.device.snapshot()["port"]["packets"] == n * 10
                await fe.close()
                await asyncio.wait_for(server.endpoints[0].wait_idle(), 10)
        finally:
            listener.close()
    assert open_fds() == before
