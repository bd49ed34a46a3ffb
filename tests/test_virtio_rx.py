"""The RX path's template scatter (nicsim.virtio.rx.scatter_template) on chains the split-ring walker
returns: every good chain's writable space filled across its segments, the driver reading it back."""

from __future__ import annotations

import numpy as np
import pytest

from nicsim.virtio.rx import scatter_template
from rings.driver import GuestDriver, TxLayout


@pytest.mark.parametrize("layout", list(TxLayout))
def test_rx_template_fills_writable_space_and_driver_reads_it_back(layout: TxLayout) -> None:
    g = GuestDriver()
    q = g.add_queue(0, 16)
    dq = q.device_queue()
    q.post_rx(100, count=3, layout=layout)
    batch = dq.walk(g.memory, dq.pop_avail(g.memory, 8))
    template = np.arange(150, dtype=np.uint8)[:90]
    written = scatter_template(g.memory, batch, template)
    assert written.tolist() == [90, 90, 90]
    dq.push_used(g.memory, batch.heads, written)
    done = q.reap()
    assert [c.data for c in done] == [template.tobytes()] * 3
    # Longer than the buffer: truncated to the writable space.
    q.post_rx(100, count=1, layout=layout)
    batch = dq.walk(g.memory, dq.pop_avail(g.memory, 8))
    big = (np.arange(300) % 251).astype(np.uint8)
    assert scatter_template(g.memory, batch, big).tolist() == [100]


def test_a_frame_shorter_than_the_first_writable_buffer_is_written_without_error() -> None:
    # Found by the ring fuzzer (tests/test_fuzz_rings.py): a chain with two writable buffers and a
    # template that ends inside the first one made GuestMemory.scatter refuse the (empty) copy into
    # the second.
    drv = GuestDriver(region_sizes=(64 << 10, 64 << 10))
    dq = drv.add_queue(0, 8)
    a, b = drv.ram.alloc(64), drv.ram.alloc(64)
    dq.post_chain([(a, 64, True), (b, 64, True)], buffers=[a, b])
    q = dq.device_queue()
    batch = q.walk(drv.memory, q.pop_avail(drv.memory, 8))
    frame = np.arange(50, dtype=np.uint8)
    assert scatter_template(drv.memory, batch, frame).tolist() == [50]
    q.push_used(drv.memory, batch.heads, [50])
    (done,) = dq.reap()
    assert done.data == frame.tobytes()
