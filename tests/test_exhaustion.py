"""Pool exhaustion through the server: backpressure with counters, recovery when it clears, and the
pool's drained/close contract at shutdown (NdisFreePacketPool: only once every descriptor is back).

``WithholdingPort`` is a real port that accepts TX batches and completes them only when told to (a
device whose transmit queue stalled); the pool is small so the guest runs it dry.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from nicsim.ports import GeneratorConfig, GeneratorPort, SinkPort, TxFrames
from tests.hardening import finish, frame, open_fds, start_rig, until

POOL = 32


class WithholdingPort(SinkPort):
    name = "withholding"

    def __init__(self) -> None:
        super().__init__()
        self.withhold = True
        self.held: list[TxFrames] = []

    def transmit(self, batch: TxFrames) -> bool:
        if not self.withhold:
            return super().transmit(batch)
        self.held.append(batch)
        return False

    def release(self) -> None:
        self.withhold = False
        held, self.held = self.held, []
        for batch in held:
            super().transmit(batch)
            batch.complete()


async def test_stalled_tx_port_exhausts_the_pool_gives_backpressure_and_recovers(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path, WithholdingPort, pool_size=POOL)
    fe = await rig.frontend()
    sess = await rig.session()
    port = sess.device.port
    assert isinstance(port, WithholdingPort)
    fe.transmit([frame(i) for i in range(100)])
    await until(lambda: sess.device.pool.usage == POOL, "pool exhausted")
    # The chance to overrun: the guest kicks again and the ring runs a round while 68 chains wait.
    pump = sess.pumps[1]
    rounds = pump.snapshot()["rounds"]
    fe.kick(1, force=True)
    await until(lambda: pump.snapshot()["rounds"] > rounds, "a round with the pool exhausted")
    snap = sess.device.snapshot()
    assert snap["pool"]["usage"] == POOL and snap["pool"]["high_water"] == POOL  # bounded, not grown
    assert snap["queues"][1]["inflight"] == POOL
    assert fe.queues[1].used_pending() == 0  # nothing completed, nothing dropped: backpressure
    assert snap["queues"][1]["drops"] == {}
    port.release()
    await fe.wait_used(1, 100)
    snap = sess.device.snapshot()
    assert snap["port"]["packets"] == 100 and snap["pool"]["usage"] == 0
    await finish_with_sink(rig, fe, before)


async def finish_with_sink(rig, fe, before) -> None:  # type: ignore[no-untyped-def]
    sess = rig.endpoint.session
    await fe.close()
    await asyncio.wait_for(rig.endpoint.wait_idle(), 10)
    await rig.server.close()
    last = rig.endpoint.last
    assert last is sess and last.final_snapshot["pool"]["usage"] == 0 and last.device.pool.closed
    assert open_fds() == before


async def test_shutdown_with_tx_withheld_returns_every_buffer_and_closes_the_pool(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path, WithholdingPort, pool_size=POOL)
    fe = await rig.frontend()
    sess = await rig.session()
    fe.transmit([frame(i) for i in range(50)])
    await until(lambda: sess.device.pool.usage == POOL, "pool exhausted")
    # GET_VRING_BASE (QEMU's stop) cancels what the port holds and returns it on the used ring.
    base = await fe.stop_ring(1)
    assert base == POOL
    done = await fe.wait_used(1, POOL)
    assert [c.len for c in done] == [0] * POOL and sess.device.pool.usage == 0
    await finish_with_sink(rig, fe, before)


async def test_guest_posting_far_more_rx_buffers_than_the_pool_holds_is_served_in_pool_sized_rounds(
    tmp_path: Path,
) -> None:
    before = open_fds()
    n = 2000
    rig = await start_rig(tmp_path, lambda: GeneratorPort(GeneratorConfig(size=60, count=n)), pool_size=POOL)
    fe = await rig.frontend(queue_size=1024)
    sess = await rig.session()
    got = 0
    fe.post_rx(1000)
    while got < n:
        done = await fe.wait_used(0, min(200, n - got))
        got += len(done)
        fe.post_rx(len(done))
        assert sess.device.pool.high_water <= POOL
    assert int(sess.device.stats.packets[0]) == n
    assert sess.device.snapshot()["queues"][0]["drops"] == {}
    await finish_with_sink(rig, fe, before)


async def test_reflected_traffic_still_flows_after_exhaustion(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path, pool_size=8)
    fe = await rig.frontend()
    fe.post_rx(100)
    fe.transmit([frame(i) for i in range(100)])
    await fe.wait_used(1, 100)
    await fe.wait_used(0, 100)
    await finish(rig, fe, before)
