"""The virtio-net device on packed virtqueues (virtio 1.2 §2.8), driven by the driver-side model
``rings.driver_packed.PackedDriverQueue`` (no mocks): TX through the scalar and numpy paths across the
ring's wrap, RX with chains given back (``unpop_avail``), GET_VRING_BASE's packed value, batched kick
re-arming counted in descriptors, the dirty log of a packed ring, and the backend core building a
packed queue from SET_VRING_ADDR / SET_VRING_BASE."""

from __future__ import annotations

import numpy as np
import pytest

from nicsim.ports import Port, SinkPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
)
from nicsim.virtio.policy import NotifyPolicy
from rings.dirty_log import DirtyLog
from rings.driver import GuestRam, TxLayout
from rings.driver_packed import PackedDriverQueue
from rings.packed import PackedQueue
from rings.packed_layout import off_wrap

V1 = 1 << VIRTIO_F_VERSION_1
PACKED = 1 << VIRTIO_F_RING_PACKED
MRG = 1 << VIRTIO_NET_F_MRG_RXBUF
EVT = 1 << VIRTIO_F_EVENT_IDX
IND = 1 << VIRTIO_F_INDIRECT_DESC


def make(
    port: Port, features: int = V1 | IND | PACKED, *, size: int = 64, start_pos: int = 0, start_wrap: int = 1,
    policy: NotifyPolicy | None = None,
) -> tuple[GuestRam, PackedDriverQueue, PackedDriverQueue, VirtioNetDevice]:
    ram = GuestRam()
    evt = bool(features & EVT)
    rx = PackedDriverQueue(ram, index=0, size=size, event_idx=evt, start_pos=start_pos, start_wrap=start_wrap)
    tx = PackedDriverQueue(ram, index=1, size=size, event_idx=evt, start_pos=start_pos, start_wrap=start_wrap)
    dev = VirtioNetDevice(port=port, policy=policy)
    dev.set_features(features)
    dev.set_memory(ram.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return ram, rx, tx, dev


def frame(n: int, seed: int) -> bytes:
    body = bytes((seed + i) & 0xFF for i in range(n - 14))
    return bytes([0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0x12, 0x34, seed & 0xFF, 8, 0]) + body


def test_the_device_offers_packed_rings() -> None:
    assert VirtioNetDevice(port=SinkPort()).device_features() & PACKED


@pytest.mark.parametrize("start_wrap", [1, 0])
def test_tx_on_a_packed_ring_across_the_wrap_short_and_batched_rounds(start_wrap: int) -> None:
    sink = SinkPort()
    _, _, tx, dev = make(sink, start_pos=50, start_wrap=start_wrap)
    layouts = [TxLayout.ONE, TxLayout.TWO, TxLayout.INDIRECT]
    sent = 0
    for rnd, count in enumerate((3, 20, 1, 17, 5)):  # short (<= 8) and numpy rounds alternate
        sizes = [60 + 13 * (i + rnd) for i in range(count)]
        for i, n in enumerate(sizes):
            tx.post_tx(frame(n, i), layout=layouts[(i + rnd) % 3])
        r = dev.process_tx(1)
        assert r.processed == count and r.dropped == 0 and not r.more
        done = tx.reap()
        assert len(done) == count and all(c.len == 0 for c in done)
        sent += count
    assert sink.packets == sent
    assert dev.pool_info()["usage"] == 0
    assert dev.snapshot()["queues"][1]["drops"] == {}


def test_stop_queue_reports_the_packed_vring_base_and_a_queue_resumes_from_it() -> None:
    _, _, tx, dev = make(SinkPort(), start_pos=60)
    for i in range(6):
        tx.post_tx(frame(100, i), layout=TxLayout.TWO)  # 12 descriptors: the ring wraps
    dev.process_tx(1)
    tx.reap()
    base = dev.stop_queue(1)
    pos, wrap = (60 + 12) % 64, 0
    assert base == off_wrap(pos, wrap) | off_wrap(pos, wrap) << 16
    q = PackedQueue.from_vring_base(base, index=1, size=64, desc_addr=tx.desc_addr,
                                    driver_addr=tx.driver_addr, device_addr=tx.device_addr)  # fmt: skip
    dev.start_queue(1, q)
    tx.post_tx(frame(80, 9))
    assert dev.process_tx(1).processed == 1
    assert [c.len for c in tx.reap()] == [0]


def test_rx_on_a_packed_ring_gives_unused_chains_back_and_uses_them_next() -> None:
    ram, rx, _, dev = make(SinkPort(), V1 | IND | PACKED | MRG, size=128, start_pos=100)
    del ram
    rx.post_rx(count=40)
    frames = [frame(60 + i, i) for i in range(20)]
    for f in frames[:12]:
        assert dev.push(f)
    r = dev.deliver_rx(0)  # more than a short round: pops rx_batch chains, gives 28 back
    assert r.processed == 12
    for f in frames[12:]:
        assert dev.push(f)
    assert dev.deliver_rx(0).processed == 8
    got = rx.reap()
    assert len(got) == 20
    hdr = 12
    assert [c.data[hdr:] for c in got if c.data is not None] == frames
    assert dev.pool_info()["usage"] == 0
    assert rx.in_flight == 20  # the 20 buffers no frame took are still the device's to fill


def test_batched_kick_rearm_counts_descriptors_on_a_packed_ring() -> None:
    _, _, tx, dev = make(SinkPort(), V1 | IND | PACKED | EVT)
    for i in range(3):
        tx.post_tx(frame(80, i), layout=TxLayout.TWO)  # 3 chains, 6 descriptors
    # Asking for a kick after 4 descriptors: 6 are already there, so the driver would not kick.
    assert dev.rearm_kicks(1, after=4) is False
    assert dev.process_tx(1).processed == 3
    tx.reap()
    tx.post_tx(frame(80, 7), layout=TxLayout.TWO)  # 2 descriptors: within the batch asked for
    assert dev.rearm_kicks(1, after=4) is True


def test_the_dirty_log_covers_the_packed_descriptor_ring_and_device_area() -> None:
    _, _, tx, dev = make(SinkPort())
    q = dev.queue(1)
    assert isinstance(q, PackedQueue)
    log = DirtyLog(np.zeros(1 << 16, np.uint8))
    dev.set_dirty_log(log)
    dev.set_log_all(True)
    tx.post_tx(frame(80, 1))
    dev.process_tx(1)
    tx.reap()
    pages = set(log.dirty_pages().tolist())
    for gpa in (tx.desc_addr, tx.desc_addr + 16 * 64 - 1, tx.device_addr):
        assert gpa >> 12 in pages, hex(gpa)

