"""An uplink: a port that is not a guest (a tap, a vxlan tunnel) joined to a switch
(:class:`~nicsim.ports.switch.Switch`).

This module owns :class:`Uplink`, the adapter between the switch and such a port, both ways:

- Switch to port: frames the switch sends to the uplink's switch port are handed to the port's
  ``transmit`` one at a time, each as a one-frame :class:`~nicsim.ports.base.TxFrames` batch (one reused
  object, no copy: the views are the sender's TX buffers). A port that passes a virtio-net header
  (``vnet_hdr``: the tap) gets a 12-byte ``virtio_net_hdr_v1`` in front: the frame's own (NEEDS_CSUM,
  a GSO frame whole) when the switch's offloads are on and the port's kernel honours CSUM and TSO
  (told at start: ``negotiated(VERSION_1 | CSUM | HOST_TSO4/6)``), else a zeroed one that asks for
  nothing (``negotiated(VERSION_1)``; the switch then segments and checksums every frame itself).
  Nothing is asked of the kernel the other way: what comes in is complete, MTU-sized frames.
  Whether the port sent a frame is read from its ``tx_frames`` counter, so the switch counts as
  sent only what left, and the rest as dropped (``uplink_tx``; the port's own stats say why).
- Port to switch: the uplink is the port's :class:`~nicsim.ports.base.RxSink`. There is no guest ring to
  poll, so when the port wakes it (its fd became readable) the uplink polls the port itself from the
  event loop (``call_soon``), ``budget`` frames at a time, until the port says it is drained
  (``finished``); each poll's frames are copied into one staging buffer (the port reuses its read
  buffer) with the tap's header stripped, and forwarded as one batch, as if the uplink's switch port had
  transmitted them: learning, flooding, impairments and counters apply as to any port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from nicsim.ports.base import Port
from nicsim.ports.vnet_hdr import HDR_FIELDS, Offloads
from nicsim.virtio.features import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    mask,
)
from nicsim.virtio.port import ETH_HLEN, HDR_LEN_V1, MAX_FRAME, Buffer

__all__ = ["POLL_BUDGET", "Uplink"]

POLL_BUDGET: Final = 64  # frames per poll of the port; the loop gets a turn between polls
STAGING_BYTES: Final = 512 * 1024  # a poll's frames, copied out of the port's reused read buffer

Frame = npt.NDArray[np.uint8]
Forward = Callable[[Frame, npt.NDArray[np.int64], npt.NDArray[np.uint32]], None]


class _OneFrame:
    """A one-frame :class:`~nicsim.ports.base.TxFrames` batch over a view, reused for every frame."""

    pair = 0
    count = 1

    def __init__(self, header: Frame | None) -> None:
        self.header = header
        self._frame: Frame = np.zeros(0, np.uint8)
        self.lengths = np.zeros(1, np.uint32)

    def set(self, frame: Frame) -> None:
        self._frame = frame
        self.lengths[0] = frame.shape[0]

    @property
    def frame_bytes(self) -> int:
        return int(self._frame.shape[0])

    def byte_sum(self) -> None:
        return None

    def frame(self, i: int) -> Frame:
        return self._frame

    def gather(self) -> tuple[Frame, npt.NDArray[np.int64]]:
        return self._frame.copy(), np.zeros(1, np.int64)

    def iovec(self, i: int) -> list[Frame]:
        return [self._frame] if self.header is None else [self.header, self._frame]

    def complete(self) -> None:
        return None


class Uplink:
    """Port ``port`` as switch port ``number`` (called ``name``); ``forward`` takes the frames it
    received into the switch (``Switch.forward_flat`` for that number)."""

    def __init__(self, name: str, number: int, port: Port, forward: Forward, *,
                 clock: Callable[[], float] = time.monotonic, offload: bool = False) -> None:  # fmt: skip
        self.name = name
        self.number = number
        self.port = port
        self._forward = forward
        self._clock = clock
        self._hdr_len = HDR_LEN_V1 if port.vnet_hdr else 0
        self._batch = _OneFrame(np.zeros(HDR_LEN_V1, np.uint8) if port.vnet_hdr else None)
        self._staging: Frame = np.zeros(STAGING_BYTES, np.uint8)
        self._offsets: list[int] = []
        self._lengths: list[int] = []
        self._used = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self.counters: dict[str, int] = {"polls": 0, "wakes": 0, "runts": 0}
        # The tap reads and writes a 12-byte v1 header. With ``offload`` and a port that can (a tap
        # whose kernel honours TUNSETOFFLOAD), the switch's frames go to it with their header, GSO
        # frames whole, for the kernel to segment and checksum; what comes in is complete frames
        # (no GUEST_* offload asked of the kernel). Otherwise the switch finishes every frame.
        takes = port.features() & mask((VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6))
        features = mask((VIRTIO_F_VERSION_1,)) | (takes if offload and port.vnet_hdr else 0)
        port.negotiated(features)
        self.rx_offloads = Offloads.tx(features)  # what the far end takes from the switch
        port.attach(self)

    # -- switch -> port ---------------------------------------------------------------------------

    def deliver(self, views: Sequence[Frame], *, queue: bool = True,
                headers: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.bool_]:  # fmt: skip
        """Send ``views`` out through the port now; returns which frames it sent (nothing waits).
        ``headers``: what each frame asks of a port that takes offloads (:attr:`rx_offloads`); the
        switch finished every frame for one that takes none."""
        kept = np.zeros(len(views), np.bool_)
        port, batch = self.port, self._batch
        counters: dict[str, Any] = getattr(port, "counters", {})
        header = batch.header
        pass_on = header is not None and headers is not None and self.rx_offloads.any
        for i, view in enumerate(views):
            before = counters.get("tx_frames", 0)
            if pass_on:
                assert header is not None and headers is not None
                header[:HDR_FIELDS] = headers[i]
            batch.set(view)
            port.transmit(batch)
            kept[i] = counters.get("tx_frames", before + 1) > before
        if pass_on:
            assert header is not None
            header[:] = 0  # the next frames may come with no header of their own
        return kept

    # -- port -> switch (the port's RxSink) -------------------------------------------------------

    def start_io(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
            self.port.start_io(loop)
            self.wake(0)  # whatever arrived before the loop ran

    def wake(self, pair: int = 0) -> None:
        self.counters["wakes"] += 1
        if self._loop is not None and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        self._scheduled = False
        if self._loop is None:  # closed meanwhile
            return
        self.counters["polls"] += 1
        try:
            self.port.poll_rx(0, POLL_BUDGET, self._clock())
        finally:
            self._flush()
        if not getattr(self.port, "finished", True):
            self.wake(0)  # the budget cut the poll short: more after the loop's other work

    def push(self, frame: Buffer, *, pair: int | None = None) -> bool:
        data = np.frombuffer(frame, np.uint8) if not isinstance(frame, np.ndarray) else frame
        data = data[self._hdr_len :]
        n = int(data.shape[0])
        if n < ETH_HLEN or n > MAX_FRAME:
            self.counters["runts"] += 1
            return False
        if self._used + n > self._staging.shape[0]:
            self._flush()
        self._staging[self._used : self._used + n] = data
        self._offsets.append(self._used)
        self._lengths.append(n)
        self._used += n
        return True

    def push_many(self, data: Frame, offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.uint32], *,
                  pair: int | None = None) -> int:  # fmt: skip
        return sum(self.push(data[o : o + n], pair=pair) for o, n in zip(offsets.tolist(), lengths.tolist(),
                                                                          strict=True))  # fmt: skip

    def push_views(self, frames: Sequence[Frame], *, pair: int | None = None, queue: bool = True,
                   headers: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.bool_]:  # fmt: skip
        return np.array([self.push(f, pair=pair) for f in frames], np.bool_)

    def push_template(self, template: Frame, count: int, *, pair: int = 0) -> int:
        return sum(self.push(template, pair=pair) for _ in range(count))

    def place_round(
        self, kernel: Callable[..., tuple[int, ...]], extra: tuple[Any, ...], *, pair: int = 0
    ) -> tuple[int, ...] | None:
        return None  # frames from the network are no guest's TX round

    def rx_space(self, pair: int = 0) -> int:
        return POLL_BUDGET

    def rx_backlog(self, pair: int = 0) -> int:
        return 0  # what the port reads goes into the switch at once

    def _flush(self) -> None:
        if not self._lengths:
            return
        offsets = np.array(self._offsets, np.int64)
        lengths = np.array(self._lengths, np.uint32)
        self._offsets.clear()
        self._lengths.clear()
        self._used = 0
        self._forward(self._staging, offsets, lengths)

    # -- bookkeeping ------------------------------------------------------------------------------

    def close(self) -> None:
        self._loop = None
        self.port.close()

    def stats(self) -> dict[str, Any]:
        return {"kind": self.port.name, **self.port.stats(), "adapter": dict(self.counters)}
