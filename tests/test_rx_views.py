"""``push_views`` (the switch's one-copy way into a guest) gives the guest exactly what ``push`` gives.

Two identical guests (driver model) post the same RX chains, in every layout, with and without
MRG_RXBUF; one is handed frames as views through ``push_views``, the other frame by frame through
``push`` (the backlog, then the RX round's staging and scatter). They must agree on the used entries
and every byte written, on which frames were kept, and on the stats; frames beyond the posted buffers
wait in the backlog either way. (Which frames each call reports kept differs by design: ``push``
keeps a frame too big for the guest's buffers in the backlog and drops it later, ``push_views``
drops it at once.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from nicsim.ports import SinkPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
)
from nicsim.virtio.policy import NotifyPolicy
from rings import kernels
from rings.driver import DriverQueue, GuestDriver, TxLayout
from rings.pool import PacketPool

V1 = 1 << VIRTIO_F_VERSION_1
MRG = 1 << VIRTIO_NET_F_MRG_RXBUF


def guest(features: int) -> tuple[VirtioNetDevice, SinkPort, DriverQueue]:
    drv = GuestDriver((1 << 20, 1 << 20))
    rx = drv.add_queue(0, 64, event_idx=True, start_idx=65530)
    tx = drv.add_queue(1, 64, event_idx=True)
    port = SinkPort()
    dev = VirtioNetDevice(port=port, pool=PacketPool(128), policy=NotifyPolicy(rx_batch=16, rx_backlog=64))
    dev.set_features(features | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC))
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return dev, port, rx


@pytest.fixture(params=["numpy", "compiled"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The numpy path, or the compiled kernels (a frame over several buffers is then one
    ``scatter_frame`` call): yields the list the kernel's calls are counted in."""
    calls: list[int] = []
    if request.param == "numpy":
        yield calls
        return
    assert kernels.enable(), kernels.engine()
    compiled = kernels.scatter_frame
    assert compiled is not None

    def counted(*args: Any) -> int:
        calls.append(1)
        return int(compiled(*args))

    monkeypatch.setattr(kernels, "scatter_frame", counted)
    try:
        yield calls
    finally:
        kernels.disable()


@pytest.mark.parametrize("features", [V1, V1 | MRG], ids=["one-buffer", "mergeable"])
@pytest.mark.parametrize("layout", list(TxLayout))
@pytest.mark.parametrize("chunk", [12, 2], ids=["batch", "by-two"])
def test_views_land_as_pushed_frames_do(
    features: int, layout: TxLayout, engine: list[int], chunk: int
) -> None:
    # By two: the switch's way for a frame or two (plain ints, ShortRx.deliver_views) where every
    # frame fits the one buffer it meets; the batch path for the rest.
    rng = np.random.default_rng(7)
    sizes = [60, 1514, 300, 2000, 61, 999, 14, 700, 1200, 64, 65, 1500]
    pool = rng.integers(0, 256, sum(sizes) + 100, dtype=np.uint8)  # the other guest's memory
    starts = np.cumsum([0, *sizes[:-1]]) + 50
    views = [pool[s : s + n] for s, n in zip(starts.tolist(), sizes, strict=True)]
    direct, by_push = guest(features), guest(features)
    got = []
    for dev, port, rx in (direct, by_push):
        rx.post_rx(12 + 1514, count=6, layout=layout)
        rx.post_rx(12 + 512, count=3, layout=layout)
        if dev is direct[0]:
            parts = [views[at : at + chunk] for at in range(0, len(views), chunk)]
            kept = [k for part in parts for k in port.sink.push_views(part)]
        else:
            kept = [port.sink.push(v) for v in views]
        direct_now = rx.used_pending()  # what push_views wrote before any round ran
        dev.deliver_rx(0)  # the round the wakeup runs: flushes the backlog into what is still posted
        first = [(c.id, c.len, c.data) for c in rx.reap()]
        rx.post_rx(12 + 1514, count=8, layout=layout)
        dev.deliver_rx(0)
        done = first + [(c.id, c.len, c.data) for c in rx.reap()]
        snap = dev.snapshot()
        got.append((done, snap["queues"][0]["packets"], snap["queues"][0]["bytes"],
                    snap["queues"][0]["drops"], snap["pool"]["usage"]))  # fmt: skip
        if dev is direct[0]:
            # Kept: every frame but those too big for the buffers they met (push keeps them in the
            # backlog first, and drops them as too_big when their turn comes; push_views at once).
            too_big = snap["queues"][0]["drops"].get("too_big", 0)
            assert sum(kept) == len(sizes) - too_big and direct_now > 0
    assert got[0] == got[1]
    done, packets, _, drops, usage = got[0]
    assert packets + drops.get("too_big", 0) == len(sizes) and usage == 0
    assert drops.get("too_big", 0) == (0 if features & MRG else 4)  # > 512 B in the 12 + 512 B buffers
    if kernels.enabled() and features & MRG and layout is TxLayout.ONE:
        # Frames over 512 B took two buffers, each one segment (as Linux posts mergeable buffers):
        # written by the compiled call.
        assert engine
