"""The virtio-net device driven by the driver-side model from ``rings.driver`` (no mocks): TX to ports,
RX from ports with correct virtio-net headers, malformed chains, backpressure, queue stop, notifications."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from nicsim.ports import GeneratorConfig, GeneratorPort, Port, ReflectPort, SinkPort, TxFrames
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
)
from nicsim.virtio.policy import NotifyPolicy
from rings.driver import DriverQueue, GuestDriver, Malformed, TxLayout
from rings.pool import PacketPool

V1 = 1 << VIRTIO_F_VERSION_1
MRG = 1 << VIRTIO_NET_F_MRG_RXBUF
EVT = 1 << VIRTIO_F_EVENT_IDX
IND = 1 << VIRTIO_F_INDIRECT_DESC


class HoldingPort(Port):
    """An asynchronous port (like a tap port waiting for its fd): keeps every batch until told."""

    name = "holding"

    def __init__(self) -> None:
        super().__init__()
        self.held: list[TxFrames] = []

    def transmit(self, batch: TxFrames) -> bool:
        self.held.append(batch)
        return False


def make(
    port: Port, features: int = V1 | IND, *, size: int = 256, pool: PacketPool | None = None,
    policy: NotifyPolicy | None = None, start_idx: int = 0,
) -> tuple[GuestDriver, DriverQueue, DriverQueue, VirtioNetDevice]:
    drv = GuestDriver()
    evt = bool(features & EVT)
    rx = drv.add_queue(0, size, event_idx=evt, start_idx=start_idx)
    tx = drv.add_queue(1, size, event_idx=evt, start_idx=start_idx)
    dev = VirtioNetDevice(port=port, pool=pool, policy=policy)
    dev.set_features(features)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return drv, rx, tx, dev


def frame(n: int, seed: int) -> bytes:
    dst = bytes([0x52, 0x54, 0, 0, 0, 2])
    src = bytes([0x52, 0x54, 0, 0x12, 0x34, seed & 0xFF])
    body = bytes((seed + i) & 0xFF for i in range(n - 14))
    return dst + src + b"\x08\x00" + body


def test_tx_frames_reach_the_sink_with_exact_counts_and_bytes_without_headers() -> None:
    sink = SinkPort()
    _, _, tx, dev = make(sink, start_idx=65500)  # indices wrap during the test
    sizes = [60 + 7 * i for i in range(200)]
    layouts = [TxLayout.ONE, TxLayout.TWO, TxLayout.INDIRECT]
    for i, n in enumerate(sizes[:128]):
        tx.post_tx(frame(n, i), layout=layouts[i % 3])
    r1 = dev.process_tx(1)
    tx.reap()
    for i, n in enumerate(sizes[128:]):
        tx.post_tx(frame(n, i), layout=layouts[i % 3])
    r2 = dev.process_tx(1)
    done = tx.reap()
    assert (r1.processed, r2.processed) == (128, 72)
    assert sink.packets == 200
    assert sink.bytes == sum(sizes)  # 12-byte headers not counted
    assert all(c.len == 0 for c in done)
    assert int(dev.stats.packets[1]) == 200 and int(dev.stats.bytes[1]) == sum(sizes)
    assert dev.pool.usage == 0


def test_reflect_returns_each_frame_with_macs_swapped_and_header_stripped() -> None:
    _, rx, tx, dev = make(ReflectPort())
    rx.post_rx(count=16)
    sent = [frame(64 + 100 * i, i) for i in range(5)]
    for i, f in enumerate(sent):
        tx.post_tx(f, layout=[TxLayout.ONE, TxLayout.TWO, TxLayout.INDIRECT][i % 3])
    dev.process_tx(1)
    res = dev.deliver_rx(0)
    got = rx.reap()
    assert res.processed == 5 and res.interrupt
    assert [c.len for c in got] == [12 + len(f) for f in sent]
    for c, f in zip(got, sent, strict=True):
        assert c.data is not None
        assert c.data[:12] == struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)
        assert c.data[12:] == f[6:12] + f[0:6] + f[12:]


@pytest.mark.parametrize("layout", [TxLayout.ONE, TxLayout.TWO, TxLayout.INDIRECT])
def test_generator_frames_land_in_rx_buffers_with_virtio_net_headers(layout: TxLayout) -> None:
    gen = GeneratorPort(GeneratorConfig(size=64))
    _, rx, _, dev = make(gen)
    rx.post_rx(count=100, layout=layout)
    res = dev.poll_rx(0)
    got = rx.reap()
    assert res.processed == 100 and gen.sent == 100
    for c in got:
        assert c.len == 12 + 64 and c.data is not None
        assert struct.unpack("<BBHHHHH", c.data[:12]) == (0, 0, 0, 0, 0, 0, 1)
        assert c.data[12:] == gen.template.tobytes()
    assert dev.pool.usage == 0


def test_mergeable_buffers_are_offered_unless_every_frame_of_the_port_fits_a_small_buffer() -> None:
    def offered(port: Port) -> bool:
        return bool(VirtioNetDevice(port=port).device_features() & MRG)

    assert not offered(GeneratorPort(GeneratorConfig(size=64)))
    assert not offered(GeneratorPort(GeneratorConfig(size=1514)))  # a full Ethernet frame, MTU 1500
    assert offered(GeneratorPort(GeneratorConfig(size=1515)))  # a jumbo frame needs them
    assert offered(GeneratorPort(GeneratorConfig(size=64, mergeable=True)))  # asked for
    assert offered(SinkPort()) and offered(ReflectPort())  # a port that says nothing may need them
    with pytest.raises(Exception, match="never offered"):
        VirtioNetDevice(port=GeneratorPort()).set_features(V1 | MRG)


def test_mergeable_buffers_carry_a_large_frame_across_several_with_num_buffers() -> None:
    gen = GeneratorPort(GeneratorConfig(size=1500, count=4, mergeable=True))
    _, rx, _, dev = make(gen, V1 | MRG)
    rx.post_rx(512, count=20)
    res = dev.poll_rx(0)
    got = rx.reap()
    assert res.processed == 4
    assert [c.len for c in got] == [512, 512, 488] * 4  # 12 + 1500 = 1512 bytes each
    for k in range(4):
        parts = got[3 * k : 3 * k + 3]
        data = b"".join(c.data or b"" for c in parts)
        assert struct.unpack_from("<H", data, 10)[0] == 3
        assert data[12:] == gen.template.tobytes()
    assert dev.rx_space(0) == 20 - 12


def test_mergeable_frame_waits_when_too_few_buffers_are_posted() -> None:
    _, rx, tx, dev = make(ReflectPort(), V1 | MRG)
    rx.post_rx(512, count=2)
    tx.post_tx(frame(1400, 1))
    dev.process_tx(1)
    assert dev.deliver_rx(0).processed == 0 and rx.used_pending() == 0
    rx.post_rx(512, count=1)
    assert dev.deliver_rx(0).processed == 1
    assert [c.len for c in rx.reap()] == [512, 512, 1412 - 1024]


def test_frame_larger_than_the_buffers_is_dropped_too_big_without_mergeable() -> None:
    gen = GeneratorPort(GeneratorConfig(size=1500, count=3))
    _, rx, _, dev = make(gen)
    rx.post_rx(256, count=8)
    dev.poll_rx(0)
    assert dev.stats.drops[0, dev.stats.reason("too_big")] == 3
    assert rx.used_pending() == 0 and dev.rx_space(0) == 8  # buffers untouched, still the guest's


@pytest.mark.parametrize("kind", [k for k in Malformed if k is not Malformed.ZERO_LENGTH_WILD])
def test_malformed_tx_chains_are_returned_with_length_zero_and_counted(kind: Malformed) -> None:
    sink = SinkPort()
    _, _, tx, dev = make(sink)
    tx.post_tx(frame(100, 1))
    bad = tx.post_malformed(kind)
    tx.post_tx(frame(100, 2))
    res = dev.process_tx(1)
    done = tx.reap() if kind is not Malformed.HEAD_OUT_OF_RANGE else None
    assert res.processed == 3 and res.dropped == 1
    assert sink.packets == 2
    assert dev.stats.drops_total(1) == 1
    if done is not None:
        assert {c.id: c.len for c in done}[bad] == 0
    assert dev.pool.usage == 0


def test_zero_length_wild_descriptor_is_not_an_error() -> None:
    sink = SinkPort()
    _, _, tx, dev = make(sink)
    tx.post_malformed(Malformed.ZERO_LENGTH_WILD)
    res = dev.process_tx(1)
    assert res.dropped == 0 and sink.packets == 1 and sink.bytes == 128 - 12


def test_short_chains_are_counted_as_short_header_and_runt() -> None:
    _, _, tx, dev = make(SinkPort())
    tx.post_chain([(tx.ram.alloc(8), 8, False)])
    tx.post_tx(b"\x00" * 10)
    dev.process_tx(1)
    snap = dev.snapshot()["queues"][1]["drops"]
    assert snap == {"short_header": 1, "runt": 1}
    assert [c.len for c in tx.reap()] == [0, 0]


def test_pool_exhaustion_stops_taking_buffers_and_resumes_after_free() -> None:
    pool = PacketPool(8, name="small")
    sink = SinkPort()
    _, _, tx, dev = make(sink, pool=pool)
    for i in range(20):
        tx.post_tx(frame(80, i))
    hog = pool.allocate_batch(8)
    res = dev.process_tx(1)
    assert res.blocked and res.more and res.processed == 0
    assert dev.queue(1) is not None and dev.queue(1).last_avail_idx == 0  # type: ignore[union-attr]
    pool.free_batch(hog[:5])
    res = dev.process_tx(1)
    assert res.processed == 5 and res.more and not res.blocked
    pool.free_batch(hog[5:])
    while dev.process_tx(1).more:
        pass
    assert sink.packets == 20 and dev.stats.drops_total() == 0 and pool.usage == 0


def test_async_port_keeps_descriptors_until_it_completes() -> None:
    port = HoldingPort()
    _, _, tx, dev = make(port)
    for i in range(10):
        tx.post_tx(frame(70, i))
    dev.process_tx(1)
    assert dev.pool.usage == 10 and tx.used_pending() == 0
    assert bytes(port.held[0].frame(3)) == frame(70, 3)
    port.held[0].complete()
    assert dev.pool.usage == 0 and [c.len for c in tx.reap()] == [0] * 10


def test_stop_queue_returns_every_outstanding_descriptor() -> None:
    port = HoldingPort()
    _, _, tx, dev = make(port)
    for i in range(30):
        tx.post_tx(frame(70, i))
    dev.process_tx(1)
    assert dev.pool.usage == 30
    last = dev.stop_queue(1)
    assert last == 30 and dev.pool.usage == 0
    assert len(tx.reap()) == 30
    port.held[0].complete()  # a late completion after the stop is harmless
    assert dev.pool.usage == 0


def test_shutdown_returns_everything_then_closes_the_pool() -> None:
    port = HoldingPort()
    _, _, tx, dev = make(port)
    tx.post_tx(frame(70, 0))
    dev.process_tx(1)
    dev.shutdown()
    assert dev.pool.closed and len(tx.reap()) == 1
    dev.shutdown()  # idempotent


def test_rx_backlog_holds_frames_until_buffers_then_drops_with_reason() -> None:
    policy = NotifyPolicy(rx_backlog=4)
    _, rx, tx, dev = make(ReflectPort(), policy=policy)
    for i in range(6):
        tx.post_tx(frame(80, i))
    dev.process_tx(1)
    assert dev.snapshot()["rx_backlog"] == [4]
    assert dev.stats.drops[0, dev.stats.reason("no_rx_buffer")] == 2
    rx.post_rx(count=8)
    assert dev.deliver_rx(0).processed == 4
    assert len(rx.reap()) == 4


def test_push_many_queues_a_batch_at_once_and_past_the_backlog_frame_by_frame() -> None:
    # The bulk copy (all fit) and the frame-by-frame fallback (some do not) keep the same frames.
    _, rx, _, dev = make(SinkPort(), policy=NotifyPolicy(rx_backlog=4))
    sent = [frame(60 + 10 * i, i) for i in range(6)]
    data = np.frombuffer(b"".join(sent), np.uint8)
    lengths = np.array([len(f) for f in sent], np.uint32)
    offsets = (np.cumsum(lengths) - lengths).astype(np.int64)
    assert dev.push_many(data, offsets[:3], lengths[:3]) == 3  # one vectorised copy
    assert dev.push_many(data, offsets[3:], lengths[3:]) == 1  # one more fits, two are dropped
    assert dev.stats.drops[0, dev.stats.reason("no_rx_buffer")] == 2
    rx.post_rx(count=8)
    assert dev.deliver_rx(0).processed == 4
    assert [(c.data or b"")[12:] for c in rx.reap()] == sent[:4]


def _run_rounds(features: int, policy: NotifyPolicy) -> int:
    _, _, tx, dev = make(SinkPort(), features, policy=policy)
    for i in range(256):
        tx.post_tx(frame(60, i))
    while dev.process_tx(1).more:
        pass  # the guest does not reap meanwhile: it is busy sending
    return int(dev.stats.interrupts[1])


def test_event_idx_reduces_interrupts() -> None:
    per_batch = NotifyPolicy(tx_batch=32, irq_coalesce=1)
    without = _run_rounds(V1, per_batch)
    with_evt = _run_rounds(V1 | EVT, per_batch)
    assert without == 8  # one per round: the guest left interrupts enabled
    assert with_evt == 1  # used_event was crossed once; the guest had not asked again


def test_coalescing_interrupts_at_most_every_n_used_entries_and_on_idle() -> None:
    assert _run_rounds(V1, NotifyPolicy(tx_batch=16, irq_coalesce=64)) == 4


def test_no_interrupt_when_the_guest_suppresses_them() -> None:
    _, _, tx, dev = make(SinkPort())
    tx.disable_interrupts()
    tx.post_tx(frame(60, 0))
    assert not dev.process_tx(1).interrupt


def test_rearm_kicks_rechecks_avail_before_sleeping() -> None:
    _, _, tx, dev = make(SinkPort(), V1 | EVT)
    dev.suppress_kicks(1)
    tx.post_tx(frame(60, 0))
    assert not tx.should_kick()  # suppressed while we poll
    assert dev.rearm_kicks(1) is False  # work arrived in the race window: keep going
    dev.process_tx(1)
    assert dev.rearm_kicks(1) is True
    tx.post_tx(frame(60, 1))
    assert tx.should_kick()


def test_corrupt_avail_index_breaks_only_that_queue() -> None:
    _, _, tx, dev = make(SinkPort())
    tx.overrun_avail_idx()
    res = dev.process_tx(1)
    assert res.error is not None and dev.stats.drops[1, dev.stats.reason("ring_error")] == 1
    assert dev.process_tx(1).error is res.error


def test_stats_table_names_queues_and_drop_reasons() -> None:
    _, _, tx, dev = make(SinkPort())
    tx.post_malformed(Malformed.LOOP)
    dev.process_tx(1)
    text = dev.stats.table(pool=dev.pool_info())
    assert "chain_loop: 1" in text and "pool usage=0" in text
    assert np.asarray(dev.stats.drops).sum() == 1
