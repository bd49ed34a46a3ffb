"""The sink port: counts what the guest sends and discards it.

It reads only the batch's length array (one numpy sum per batch), never the frames, so it measures the
device's TX path and nothing else.
"""

from __future__ import annotations

from typing import Any

from nicsim.ports.base import Port, TxFrames


class SinkPort(Port):
    name = "sink"

    def __init__(self) -> None:
        super().__init__()
        self.packets = 0
        self.bytes = 0

    def transmit(self, batch: TxFrames) -> bool:
        self.packets += batch.count
        self.bytes += int(batch.lengths.sum(dtype="u8"))
        return True

    def stats(self) -> dict[str, Any]:
        return {"packets": self.packets, "bytes": self.bytes}
