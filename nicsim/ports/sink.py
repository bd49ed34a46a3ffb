"""The sink port: counts what the guest sends and discards it.

By default it reads only the batch's length array (one numpy sum per batch), never the frames, so it
measures the device's TX path and nothing else: a *count-only* figure. With ``read=on``
(``SinkConfig.read``) it reads every byte of every frame, as a backend that forwards or copies frames
must (DPDK's testpmd copies each one into an mbuf): inside the device's compiled round (``absorb``:
the sink only absorbs frames), in compiled calls straight out of guest memory (``TxFrames.byte_sum``),
or by gathering the batch's frames (one vectorised copy, ``TxFrames.gather``) and summing each
frame's bytes with one ``np.add.reduceat`` over the gather.
``checksum`` is the running 64-bit sum of every frame byte, so the work cannot be skipped and a test
can check it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.ports.base import Port, TxFrames
from nicsim.virtio.port import ABSORB_COUNT, ABSORB_SUM

_U64 = (1 << 64) - 1


@dataclass(frozen=True, kw_only=True)
class SinkConfig:
    read: bool = False  # on: gather and sum every frame byte; off: count lengths only


def frame_sums(data: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64],
               lengths: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint64]:  # fmt: skip
    """The byte sum of each frame ``data[starts[i] : starts[i] + lengths[i]]`` (frames are never empty)."""
    n = len(starts)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    bounds = np.empty(2 * n, dtype=np.int64)
    bounds[0::2] = starts
    bounds[1::2] = starts + lengths.astype(np.int64)
    # reduceat sums data[bounds[k]:bounds[k+1]]; the even entries are the frames. An end equal to
    # len(data) is not a valid index: dropping it makes the last frame's sum run to the end, the same.
    if bounds[-1] >= len(data):
        bounds = bounds[:-1]
    sums: npt.NDArray[np.uint64] = np.add.reduceat(data, bounds, dtype=np.uint64)[0::2]
    return sums


class SinkPort(Port):
    name = "sink"

    def __init__(self, config: SinkConfig | None = None) -> None:
        super().__init__()
        self.config = config or SinkConfig()
        self.packets = 0
        self.bytes = 0
        self.checksum = 0
        # The sink only absorbs: on a split ring with the kernels, a round is one compiled call that
        # also sums the bytes (DevicePort.absorbs); other rounds come through transmit.
        self.absorbs = ABSORB_SUM if self.config.read else ABSORB_COUNT

    def absorb(self, count: int, frame_bytes: int, byte_sum: int) -> None:
        self.packets += count
        self.bytes += frame_bytes
        if self.config.read:
            self.checksum = (self.checksum + byte_sum) & _U64

    def transmit(self, batch: TxFrames) -> bool:
        lengths = batch.lengths
        self.packets += batch.count
        self.bytes += batch.frame_bytes
        if self.config.read and batch.count:
            total = batch.byte_sum()  # compiled: straight out of guest memory, no copy
            if total is None:
                data, starts = batch.gather()
                total = int(frame_sums(data, starts, lengths).sum(dtype=np.uint64))
            self.checksum = (self.checksum + total) & _U64
        return True

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"packets": self.packets, "bytes": self.bytes, "read": self.config.read}
        if self.config.read:
            out["checksum"] = self.checksum
        return out
