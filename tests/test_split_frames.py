"""``split_frames`` (the switch's view of a guest's TX batch: bare frames and their headers) gives
the same frames and headers whether it takes a batch round's one-segment chains a memory region at a
time (``TxBatch.bare_frames``) or frame by frame through ``iovec``; frames stay views, not copies."""

from __future__ import annotations

import numpy as np
import pytest

from nicsim.ports.base import Port, TxFrames
from nicsim.ports.vnet_hdr import HDR_FIELDS, split_frames
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_VERSION_1
from nicsim.virtio.tx import TxBatch
from rings.driver import GuestDriver, TxLayout
from rings.pool import PacketPool


class Splitting(Port):
    """Splits every batch it is handed both ways, while the batch is still valid."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, list[bytes], list[bytes], list[bytes], list[bytes], bool]] = []

    def transmit(self, batch: TxFrames) -> bool:
        frames, headers = split_frames(batch, 12)
        bare = batch.bare_frames(12) if isinstance(batch, TxBatch) else None
        slow = TxBatch.bare_frames
        try:
            TxBatch.bare_frames = lambda self, hdr_len: None  # type: ignore[method-assign]
            ref_frames, ref_headers = split_frames(batch, 12)
        finally:
            TxBatch.bare_frames = slow  # type: ignore[method-assign]
        views = all(f.base is not None for f in frames)
        self.seen.append((bare is not None, [bytes(f) for f in frames], [bytes(h) for h in headers],
                          [bytes(f) for f in ref_frames], [bytes(h) for h in ref_headers], views))
        return True


@pytest.mark.parametrize("layout", [TxLayout.ONE, TxLayout.TWO], ids=["one-segment", "two-segments"])
def test_a_batch_splits_the_same_region_by_region_as_frame_by_frame(layout: TxLayout) -> None:
    rng = np.random.default_rng(3)
    port = Splitting()
    dev = VirtioNetDevice(port=port, pool=PacketPool(64))
    drv = GuestDriver(region_sizes=(1 << 15, 1 << 20))  # two regions: the frames spill into the second
    rxq, txq = drv.add_queue(0, 128), drv.add_queue(1, 128)
    dev.set_features(1 << VIRTIO_F_VERSION_1)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rxq.device_queue())
    dev.start_queue(1, txq.device_queue())
    for _ in range(40):
        header = bytes(rng.integers(0, 256, 12, dtype=np.uint8))
        txq.post_tx(bytes(rng.integers(0, 256, int(rng.integers(14, 1500)), dtype=np.uint8)),
                    layout=layout, header=header)  # fmt: skip
    dev.process_tx(1)
    assert txq.reap() and port.seen
    for took, frames, headers, ref_frames, ref_headers, views in port.seen:
        assert took == (layout is TxLayout.ONE)
        assert frames == ref_frames and headers == ref_headers
        assert all(len(h) == HDR_FIELDS for h in headers) and views
