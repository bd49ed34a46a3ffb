"""The reflect port: sends every frame the guest transmits straight back with the MAC addresses swapped.

The whole batch is gathered into one flat buffer, the 12 address bytes of every frame are swapped with
one fancy-indexed assignment, and the batch goes back through the sink in one call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nicsim.ports.base import Port, TxFrames

_DST = np.arange(0, 6, dtype=np.int64)
_SRC = np.arange(6, 12, dtype=np.int64)


class ReflectPort(Port):
    name = "reflect"

    def __init__(self) -> None:
        super().__init__()
        self.reflected = 0
        self.dropped = 0

    def transmit(self, batch: TxFrames) -> bool:
        if batch.count == 0:
            return True
        data, offsets = batch.gather()
        # The device never hands a port a frame shorter than an Ethernet header, so both ranges exist.
        dst = offsets[:, None] + _DST[None, :]
        src = offsets[:, None] + _SRC[None, :]
        data[dst], data[src] = data[src], data[dst]
        kept = self.sink.push_many(data, offsets, batch.lengths, pair=batch.pair)
        self.reflected += kept
        self.dropped += batch.count - kept
        return True

    def stats(self) -> dict[str, Any]:
        return {"reflected": self.reflected, "dropped": self.dropped}
