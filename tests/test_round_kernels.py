"""The compiled rounds (``rings.round_kernels``) against the numpy path they stand in for, the reference.

- ``SplitQueue.take_round`` on the hostile worlds of ``test_fuzz_rings``: whenever it takes a round,
  the chains it hands back equal the walker's, field by field, and the pool's table bytes equal those
  ``allocate_batch`` and ``track`` write for them; when it declines, nothing changed (pool bytes,
  ``last_avail_idx``), and it declines only what the numpy path must decide (a chain the walker marks,
  a length out of bounds, too few normal descriptors, more segments than the round's area holds).
- ``SplitQueue.complete_round`` writes the used ring and frees exactly as ``push_used`` and
  ``free_batch`` do, and refuses, writing nothing, what ``free_batch`` refuses.
- A sink's absorbed rounds (take, read and return in one call) give the guest and the sink what
  batch rounds give.
- The generator's RX rounds (template scatter, a call per memory region) and TX rounds whose batches a
  port holds while later rounds run give the guest what the numpy path gives.

Both the compiled kernels and their Python sources are checked where it matters, so a numba quirk
cannot hide behind the source being right.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nicsim.ports import GeneratorConfig, GeneratorPort, Port, SinkPort, TxFrames
from nicsim.ports.sink import SinkConfig
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.policy import NotifyPolicy
from nicsim.virtio.port import ABSORB_NONE
from nicsim.virtio.tx import TxBatch
from rings import kernels
from rings import round_kernels as rk
from rings.driver import DriverQueue, GuestDriver, Malformed, TxLayout
from rings.errors import DoubleFreeError
from rings.pool import PacketPool
from rings.round_kernels import U32_MAX, RoundArea
from rings.split import SplitQueue
from rings.walker import ChainWalker
from tests.test_fuzz_rings import EXAMPLES, worlds
from tests.test_kernels import assert_same
from tests.test_short_rounds import EVT, IND, MRG, V1

FEATURES = V1 | MRG | IND | EVT


@pytest.fixture(scope="module", autouse=True)
def compiled() -> Iterator[None]:
    assert kernels.enable(), kernels.engine()
    yield
    kernels.disable()


@pytest.fixture(params=["compiled", "python"])
def source(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The compiled kernels, or their Python sources in their place."""
    if request.param == "python":
        monkeypatch.setattr(kernels, "take_split", rk._take_split_py)
        monkeypatch.setattr(kernels, "complete_split", rk._complete_split_py)
    return str(request.param)


def pool_bytes(pool: PacketPool) -> bytes:
    return pool.table.view(np.uint8).tobytes()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(world=st.data(), count=st.integers(1, 16), indirect=st.booleans(), tx=st.booleans(),
       bounds=st.sampled_from([(0, U32_MAX), (14, 1526), (40, 100)]), capacity=st.sampled_from([3, 16, 64]))
def test_take_round_tracks_what_the_numpy_path_tracks_or_declines_changing_nothing(
    source: str, world: st.DataObject, count: int, indirect: bool, tx: bool, bounds: tuple[int, int],
    capacity: int,
) -> None:  # fmt: skip
    w = world.draw(worlds())
    count = min(count, w.size)
    q = SplitQueue(index=1, size=w.size, desc_addr=w.desc, avail_addr=w.avail, used_addr=w.used)
    views = q._views(w.mem)
    # Heads inside the table, so that many rounds are good ones (the walk's checks on any head are
    # test_kernels' part); one in eight anywhere.
    pick = st.one_of(st.integers(0, w.size - 1), st.integers(0, w.size - 1), st.integers(0, w.size - 1),
                     st.integers(0, w.size - 1), st.integers(0, w.size - 1), st.integers(0, w.size - 1),
                     st.integers(0, w.size - 1), st.integers(0, 0xFFFF))  # fmt: skip
    heads = np.array(world.draw(st.lists(pick, min_size=count, max_size=count)), np.uint16)
    views.avail_ring[:count] = heads
    lo, hi = bounds
    pool, ref = PacketPool(capacity, overflow=2, reserved=3), PacketPool(capacity, overflow=2, reserved=3)
    for p in (pool, ref):  # a used pool: descriptors out of order on the stack, reserved bytes dirty
        p.free_batch(p.allocate_batch(2)[::-1])
        p.table["reserved"] = 0xAB
    before = pool_bytes(pool)
    area = RoundArea(w.size)
    got = q.take_round(w.mem, count, pool, area, queue=1, indirect=indirect, tx=tx, min_len=lo, max_len=hi,
                       lens_off=lo)  # fmt: skip
    want = ChainWalker(w.mem, views, heads, queue=1, indirect=indirect).run()
    lengths = want.readable_len if tx else want.writable_len
    out_of_bounds = bool(np.count_nonzero((lengths < lo) | (lengths > hi)))
    # More segments than the ring has descriptors: chains sharing descriptors (the area holds a ring's worth).
    too_many = want.seg_len.shape[0] > w.size
    must_decline = bool(want.errors) or out_of_bounds or count > capacity or too_many
    if got is None:
        assert must_decline, f"declined a round of good chains ({source})"
        assert pool_bytes(pool) == before and q.last_avail_idx == 0 and pool.usage == 0
        return
    assert not must_decline, f"took a round the numpy path must decide ({source})"
    segments, total = got
    cb = area.batch(count, segments)
    assert_same(cb, want)
    assert q.last_avail_idx == count and pool.usage == count
    descs = ref.allocate_batch(count)
    addrs = want.seg_addr[want.first_seg] if tx else np.zeros(count, np.uint64)
    ref.track(descs, queue=1, heads=heads, addrs=addrs, lengths=lengths.astype(np.uint32))
    assert area.descs[:count].tolist() == descs.tolist()
    assert pool_bytes(pool) == pool_bytes(ref)
    assert area.lens[:count].tolist() == (lengths - lo).tolist() and total == int(lengths.sum()) - lo * count
    assert w.guards_intact()


@pytest.mark.parametrize("seed", range(24))
def test_take_round_on_a_guests_chains_tracks_what_the_numpy_path_tracks(source: str, seed: int) -> None:
    """The same on the chains a Linux guest posts (the driver model: one or two descriptors, indirect
    tables, now and then a malformed chain), in rounds of random size across the avail ring's wrap,
    from a pool whose stack is out of order and whose reserved bytes are dirty."""
    rng = np.random.default_rng(seed)
    drv = GuestDriver((1 << 20, 1 << 20))
    tx = bool(seed % 2)
    dq = drv.add_queue(1 if tx else 0, 64, start_idx=65500 + seed)
    malformed = list(Malformed)
    q = dq.device_queue()
    indirect = bool(rng.integers(0, 2))
    lo, hi = ((0, U32_MAX), (12 + 14, 12 + 1514))[int(rng.integers(0, 2))]
    pool, ref = PacketPool(128, reserved=2), PacketPool(128, reserved=2)
    for p in (pool, ref):
        p.free_batch(p.allocate_batch(40)[::-1])
        p.table["reserved"] = 0x5A  # an owner's bytes left behind: allocation zeroes them
    area = RoundArea(64)
    taken = 0
    for _ in range(4):  # the guest fills its ring, the rounds empty it; the device returns it all
        while dq.num_free >= 3:
            r = int(rng.integers(0, 40))
            layout = (TxLayout.ONE, TxLayout.TWO, TxLayout.ONE, TxLayout.TWO, TxLayout.INDIRECT)[r % 5]
            if r == 0:
                dq.post_malformed(malformed[int(rng.integers(0, len(malformed)))])
            elif tx:
                dq.post_tx(bytes(int(rng.choice([0, 14, 60, 1514, 60, 1514, 98, 500]))), layout=layout)
            else:
                dq.post_rx(int(rng.choice([12 + 60, 12 + 1514])), layout=layout)
        popped = []
        while q.avail_pending(drv.memory):
            count = min(int(rng.choice([1, 1, 2, 3, 5, 8, 32])), q.avail_pending(drv.memory))
            start = q.last_avail_idx
            got = q.take_round(drv.memory, count, pool, area, queue=3, indirect=indirect, tx=tx, min_len=lo,
                               max_len=hi, lens_off=0)  # fmt: skip
            rq = SplitQueue(index=q.index, size=q.size, desc_addr=q.desc_addr, avail_addr=q.avail_addr,
                            used_addr=q.used_addr, last_avail_idx=start)  # fmt: skip
            heads = rq.pop_avail(drv.memory, count)
            popped += heads.tolist()
            want = rq.walk(drv.memory, heads, indirect=indirect)
            lengths = want.readable_len if tx else want.writable_len
            if got is None:
                assert pool_bytes(pool) == pool_bytes(ref) and q.last_avail_idx == start
                q.skip_avail(count)  # the numpy path's round, as far as this test goes
                continue
            taken += 1
            assert not want.errors and not np.count_nonzero((lengths < lo) | (lengths > hi))
            assert_same(area.batch(count, got[0]), want)
            descs = ref.allocate_batch(count)
            addrs = want.seg_addr[want.first_seg] if tx else np.zeros(count, np.uint64)
            ref.track(descs, queue=3, heads=heads, addrs=addrs, lengths=lengths.astype(np.uint32))
            assert pool_bytes(pool) == pool_bytes(ref) and area.descs[:count].tolist() == descs.tolist()
            assert q.last_avail_idx == rq.last_avail_idx
            for p in (pool, ref):
                p.free_batch(descs)
        q.push_used(drv.memory, np.array(popped, np.uint16), np.zeros(len(popped), np.uint32))
        dq.reap()
    assert taken >= 1


def test_complete_round_writes_and_frees_what_push_used_and_free_batch_do(source: str) -> None:
    """The same round completed both ways on twin guests: the same guest bytes and pool bytes; then
    the frees ``free_batch`` refuses (already free, twice in one batch, an overflow descriptor) are
    refused here too, writing nothing."""
    twins = []
    for _ in range(2):
        drv = GuestDriver((1 << 20,))
        txq = drv.add_queue(1, 16, start_idx=65530)  # the used ring wraps within the round
        for i in range(12):
            txq.post_tx(bytes(60 + i))
        q = txq.device_queue()
        pool = PacketPool(16, overflow=2)
        heads = q.pop_avail(drv.memory, 12)
        descs = pool.allocate_batch(12)
        twins.append((drv, q, pool, heads, descs))
    lens = np.arange(12, dtype=np.uint32) * 7
    (drv, q, pool, heads, descs), (rdrv, rq, rpool, rheads, rdescs) = twins
    assert q.complete_round(drv.memory, heads, lens, descs, pool)
    rq.push_used(rdrv.memory, rheads, lens)
    rpool.free_batch(rdescs)
    assert np.array_equal(drv.ram.backing, rdrv.ram.backing) and q.used_idx == rq.used_idx
    assert pool_bytes(pool) == pool_bytes(rpool)
    assert pool.free_indices().tolist() == rpool.free_indices().tolist()
    taken = pool.allocate_batch(3)
    free = int(pool.free_indices()[0])
    for bad, error in (([taken[0], free], DoubleFreeError), ([taken[0], taken[0]], DoubleFreeError),
                       ([taken[1], -1], None)):  # fmt: skip
        if bad[1] == -1:
            bad[1] = int(pool.allocate_batch(pool.available)[-1])  # the last one out: an overflow descriptor
        ram, pbytes, used = drv.ram.backing.copy(), pool_bytes(pool), q.used_idx
        ids = np.array(bad, np.int32)
        assert not q.complete_round(drv.memory, heads[:2], lens[:2], ids, pool)
        assert np.array_equal(drv.ram.backing, ram) and pool_bytes(pool) == pbytes and q.used_idx == used
        if error is not None:
            with pytest.raises(error):
                pool.free_batch(ids)


def tx_device(
    port: Port, *, tx_batch: int, publish_every: int = 64, fused_rounds: int = 1, min_round: int = 32
) -> tuple[GuestDriver, DriverQueue, VirtioNetDevice]:
    """A guest with two memory regions and a TX ring of 64, and a device whose every round goes the
    batch way (no short rounds)."""
    drv = GuestDriver((1 << 20, 1 << 20))
    txq = drv.add_queue(1, 64, event_idx=True)
    policy = NotifyPolicy(tx_batch=tx_batch, publish_every=publish_every, fused_rounds=fused_rounds,
                          min_round=min_round)  # fmt: skip
    dev = VirtioNetDevice(port=port, policy=policy, short_round=0)
    dev.set_features(FEATURES)
    dev.set_memory(drv.memory)
    dev.start_queue(1, txq.device_queue())
    return drv, txq, dev


class HoldingPort(Port):
    """Holds every TX batch it is given, and what its frames were when it got them."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[TxFrames, list[bytes]]] = []

    def transmit(self, batch: TxFrames) -> bool:
        self.held.append((batch, [batch.frame(i).tobytes() for i in range(batch.count)]))
        return False


def test_tx_batches_a_port_holds_keep_their_chains_while_later_rounds_run() -> None:
    """A compiled round's chains are views of a work area: a batch the port holds keeps its area, so
    later rounds cannot overwrite the chains under it; completing it gives the area back for reuse."""
    port = HoldingPort()
    _, txq, dev = tx_device(port, tx_batch=16)
    frames = [bytes([i]) * (60 + i) for i in range(48)]
    for f in frames:
        txq.post_tx(f, layout=TxLayout.ONE)
    for _ in range(3):
        assert dev.process_tx(1).processed == 16
    areas = [b.area for b, _ in port.held]  # type: ignore[attr-defined]
    assert all(a is not None for a in areas) and len({id(a) for a in areas}) == 3
    for b, seen in port.held:
        assert [b.frame(i).tobytes() for i in range(b.count)] == seen  # nothing overwritten
    assert [s for _, seen in port.held for s in seen] == frames
    for b, _ in reversed(port.held):
        b.complete()
    used = txq.reap()
    assert len(used) == 48 and dev.pool.usage == 0
    for f in frames[:16]:
        txq.post_tx(f, layout=TxLayout.ONE)
    dev.process_tx(1)
    assert port.held[-1][0].area in areas  # type: ignore[attr-defined]  # an area given back, reused


@pytest.mark.parametrize("every", [0, 5])
@pytest.mark.parametrize("layout", [TxLayout.ONE, TxLayout.TWO])
@pytest.mark.parametrize("size", [64, 1500])
def test_generator_rounds_with_the_kernels_match_the_numpy_rounds(
    size: int, layout: TxLayout, every: int, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generator's round in one compiled call (``_fill_split_py``: take, the template into every
    buffer region by region, used entries; the Python source too), buffers posted in both regions,
    some too short for the frame, or of two descriptors each (taken by the kernel, written the numpy
    way), ``used.idx`` published once or every 5 buffers: the same guest RAM and used entries with
    the kernels on and off."""
    calls: list[tuple[int, int]] = []
    kernel = rk._fill_split_py if source == "python" else kernels.fill_split
    assert kernel is not None

    def counted(*args: object) -> tuple[int, int]:
        got: tuple[int, int] = kernel(*args)
        calls.append(got)
        return got

    worlds = []
    for _ in range(2):
        drv = GuestDriver((1 << 20, 1 << 20))
        rxq = drv.add_queue(0, 64, event_idx=True)
        policy = NotifyPolicy(rx_batch=32, publish_every=every)
        dev = VirtioNetDevice(port=GeneratorPort(GeneratorConfig(size=size, mergeable=True)), policy=policy,
                              short_round=0)  # fmt: skip
        dev.set_features(FEATURES)
        dev.set_memory(drv.memory)
        dev.start_queue(0, rxq.device_queue())
        worlds.append((drv, rxq, dev))
    rng = np.random.default_rng(size)
    try:
        for step in range(30):
            count = int(rng.integers(1, 40))
            room = int(rng.choice([0, 40]))
            short = bool(rng.integers(0, 6) == 0)  # a round holding a buffer too short: numpy's way
            results = []
            for on, (_, rxq, dev) in zip((True, False), worlds, strict=True):
                if on:
                    assert kernels.enable()
                    monkeypatch.setattr(kernels, "fill_split", counted)
                else:
                    kernels.disable()
                rxq.post_rx(12 + size + room, count=min(count, rxq.num_free // 2), layout=layout)
                if short and rxq.num_free:
                    rxq.post_rx(12 + 20, count=1)
                results.append((dev.poll_rx(0), [(c.id, c.len, c.data) for c in rxq.reap()]))
            assert results[0] == results[1], step
            assert np.array_equal(worlds[0][0].ram.backing, worlds[1][0].ram.backing), step
    finally:
        assert kernels.enable()
    for _, _, dev in worlds:
        assert dev.pool.usage == 0
    done = [written for written, _ in calls if written > 0]
    taken = [segments for written, segments in calls if written == 0 and segments > 0]
    assert (done and not taken) if layout is TxLayout.ONE else (taken and not done)



class ReadingSink(Port):
    """Reads every frame byte of each batch both ways: compiled (``byte_sum``) and gathered."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: list[tuple[int | None, int]] = []
        self.regions: set[int] = set()

    def transmit(self, batch: TxFrames) -> bool:
        data, starts = batch.gather()
        frames = zip(starts.tolist(), batch.lengths.tolist(), strict=True)
        gathered = sum(int(data[s : s + n].sum(dtype=np.uint64)) for s, n in frames)
        self.sums.append((batch.byte_sum(), gathered))
        assert isinstance(batch, TxBatch)
        self.regions |= set(batch.chains.seg_region.tolist())
        return True


@pytest.mark.parametrize("layout", [TxLayout.ONE, TxLayout.TWO, TxLayout.INDIRECT])
def test_byte_sum_reads_every_frame_byte_and_no_header_byte(
    layout: TxLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reading sink's sum straight out of guest memory (a compiled call per region) equals the sum
    of the gathered frames, for frames in one or two descriptors, in an indirect table, in both
    memory regions, header bytes all 0xFF so that one read by mistake shows; the Python source too."""
    port = ReadingSink()
    _, txq, dev = tx_device(port, tx_batch=64)
    rng = np.random.default_rng(7)
    for source in ("compiled", "python"):
        if source == "python":
            monkeypatch.setattr(kernels, "sum_frames", rk._sum_frames_py)
        for _ in range(3):
            for _ in range(20):
                size = int(rng.choice([60, 61, 1514, 333]))
                body = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                txq.post_tx(body, layout=layout, header=b"\xff" * 12)
            dev.process_tx(1)
            txq.reap()
    assert len(port.sums) == 6
    for got, want in port.sums:
        assert got == want
    assert port.regions == {0, 1}  # frames in both memory regions


class BatchSink(SinkPort):
    """The sink, told to take every round as a batch (``transmit``), as a port that needs its frames."""

    def __init__(self, config: SinkConfig) -> None:
        super().__init__(config)
        self.absorbs = ABSORB_NONE


@pytest.mark.parametrize("every", [0, 7])
@pytest.mark.parametrize("read", [True, False])
@pytest.mark.parametrize("layout", [TxLayout.ONE, TxLayout.TWO, TxLayout.INDIRECT])
def test_a_sinks_absorbed_rounds_give_the_guest_and_the_sink_what_batches_give(
    layout: TxLayout, read: bool, every: int, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink absorbs (``DevicePort.absorbs``): a round of good direct chains is one compiled call
    that takes, reads and returns them (``_absorb_split_py``; the Python source too), publishing
    ``used.idx`` once or every 7 chains (``publish_every``). Against twin guests whose sink takes
    batches: the same guest bytes (used ring), counters, checksum and drops, the pool empty after
    each round, header bytes (all 0xFF) never summed, frames in both memory regions, in indirect
    tables too; runts go the batch way and are counted there."""
    calls: list[int] = []
    kernel = rk._absorb_split_py if source == "python" else kernels.absorb_split
    assert kernel is not None

    def counted(*args: object) -> tuple[int, int, int]:
        got: tuple[int, int, int] = kernel(*args)
        calls.append(got[0])
        return got

    monkeypatch.setattr(kernels, "absorb_split", counted)
    ports = (SinkPort(SinkConfig(read=read)), BatchSink(SinkConfig(read=read)))
    twins = [tx_device(port, tx_batch=64, publish_every=every) for port in ports]
    rng = np.random.default_rng(11)
    for r in range(6):
        frames = []
        for _ in range(int(rng.integers(1, 30))):  # (two descriptors each fit a ring of 64)
            size = int(rng.choice([60, 61, 1514, 333, 9 if r == 3 else 60]))  # round 3 has runts
            frames.append(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        for _, txq, dev in twins:
            for body in frames:
                txq.post_tx(body, layout=layout, header=b"\xff" * 12)
            dev.process_tx(1)
            txq.reap()
            assert dev.pool.usage == 0
    (drv, _, dev), (rdrv, _, rdev) = twins
    assert np.array_equal(drv.ram.backing, rdrv.ram.backing)
    absorbed, batched = ports
    assert (absorbed.packets, absorbed.bytes, absorbed.checksum) == (batched.packets, batched.bytes,
                                                                     batched.checksum)  # fmt: skip
    assert absorbed.checksum != 0 if read else absorbed.checksum == 0
    assert dev.stats.snapshot() == rdev.stats.snapshot()
    assert sum(c > 0 for c in calls) == 5  # every round but the one with runts (indirect tables too)
    assert dev.stats.drops_total() > 0  # the runts, counted the batch way


def test_an_absorbed_round_publishes_each_chunk_after_its_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``publish_every`` 8, a round of 30 chains publishes ``used.idx`` inside the call after
    chains 8, 16, 24 and 30, each time behind the fence and after the chunk's used entries: at every
    fence the entries up to the chunk's end are written and the index still shows the last chunk's
    end (the Python source, with a spy for the fence)."""
    port = SinkPort(SinkConfig(read=True))
    drv, txq, dev = tx_device(port, tx_batch=64, publish_every=8)
    q = dev.queue(1)
    assert isinstance(q, SplitQueue)
    views = q._views(drv.memory)
    seen: list[tuple[int, list[int]]] = []

    def spy() -> None:
        seen.append((int(views.used_head[1]), views.used_ring[:, 0].tolist()))

    monkeypatch.setattr(kernels, "absorb_split", rk._absorb_split_py)
    monkeypatch.setattr(rk, "_store_fence", spy)
    heads = [txq.post_tx(bytes(60 + i)) for i in range(30)]
    dev.process_tx(1)
    assert [idx for idx, _ in seen] == [0, 8, 16, 24]  # the index as the fence before each store found it
    for n, (_, entries) in zip((8, 16, 24, 30), seen, strict=True):
        assert entries[:n] == heads[:n]  # the chunk's entries were written before its index
    assert int(views.used_head[1]) == 30 and port.packets == 30 and dev.pool.usage == 0


@pytest.mark.parametrize("wanted", [None, 20])
def test_an_absorbed_call_runs_rounds_while_the_ring_keeps_up_and_no_interrupt_is_wanted(
    wanted: int | None, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fused_rounds`` 4 of ``tx_batch`` 16, ``min_round`` 1: 60 chains posted with interrupts off
    are taken in one call as rounds of 16, 16, 16 and 12, each chain held by a pool descriptor in its
    round (the pool's high-water mark is one round), the guest bytes those of four batch rounds. With
    an interrupt wanted after 21 used entries (``used_event``), the call stops after the round that
    crossed it (32), and the device signals."""
    if source == "python":
        monkeypatch.setattr(kernels, "absorb_split", rk._absorb_split_py)
    port, batched = SinkPort(SinkConfig(read=True)), BatchSink(SinkConfig(read=True))
    twins = [tx_device(p, tx_batch=16, fused_rounds=4, min_round=1) for p in (port, batched)]
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, int(rng.integers(60, 1515)), dtype=np.uint8).tobytes() for _ in range(60)]
    results = []
    for _, txq, dev in twins:
        if wanted is None:
            txq.disable_interrupts()
        else:
            txq.enable_interrupts(after=wanted)
        for body in frames:
            txq.post_tx(body)
        results.append(dev.process_tx(1))
    res = results[0]
    if wanted is None:
        assert res.processed == 60 and not res.more and not res.interrupt
        rdev = twins[1][2]
        for _ in range(3):
            rdev.process_tx(1)
        assert np.array_equal(twins[0][0].ram.backing, twins[1][0].ram.backing)
        assert (port.packets, port.bytes, port.checksum) == (batched.packets, batched.bytes, batched.checksum)
    else:
        assert res.processed == 32 and res.more and res.interrupt
    dev = twins[0][2]
    assert dev.pool.usage == 0 and dev.pool.high_water == 16 and dev.stats.drops_total() == 0


def test_a_generator_fills_rounds_in_one_call_up_to_what_it_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator sends one frame over and over (``bulk_rx``): a round offers it ``rx_batch`` x
    ``fused_rounds`` frames, and one compiled call fills rounds of ``rx_batch`` while buffers are
    posted; with ``count=40`` it sends 40 and no more, though 60 buffers wait."""
    drv = GuestDriver((1 << 20, 1 << 20))
    rxq = drv.add_queue(0, 64, event_idx=True)
    gen = GeneratorPort(GeneratorConfig(size=64, count=40, mergeable=True))
    assert gen.bulk_rx
    policy = NotifyPolicy(rx_batch=16, fused_rounds=8, min_round=1)
    dev = VirtioNetDevice(port=gen, policy=policy, short_round=0)
    dev.set_features(FEATURES)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rxq.device_queue())
    rxq.disable_interrupts()
    rxq.post_rx(12 + 1514, count=60)
    calls: list[tuple[int, int]] = []
    kernel = kernels.fill_split
    assert kernel is not None

    def counted(*args: object) -> tuple[int, int]:
        got: tuple[int, int] = kernel(*args)
        calls.append(got)
        return got

    monkeypatch.setattr(kernels, "fill_split", counted)
    res = dev.poll_rx(0)
    assert res.processed == 40 and gen.sent == 40 and calls == [(40, 16)]
    assert len(rxq.reap()) == 40 and dev.pool.usage == 0 and dev.pool.high_water == 16
