"""Per-port counters of a multi-port device (a switch): packets and bytes each way, drops by reason.

This module owns :class:`PortCounters`: numpy columns indexed by port number, updated a batch at a
time (one ``bincount`` for a batch spread over many ports, one addition for a batch on one port), so
counting costs nothing per frame. Reasons are open-ended (``no_rx_buffer``, ``loss``, ``limit``,
``rate``, ``filtered``...): a new one gets its own column the first time it is counted; so do offload
events (``rx_gso``, ``tx_gso``, ``gso_segmented``, ``segments``, ``csum_completed``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["PortCounters"]

_COLUMNS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")


class PortCounters:
    """Counters for ports 0 .. ports-1; ``rx`` is what a port received from its guest, ``tx`` what
    it sent to it. Grows when a higher port number is counted."""

    def __init__(self, ports: int = 0) -> None:
        self._ports = ports
        self._columns = {name: np.zeros(ports, np.int64) for name in _COLUMNS}
        self._drops: dict[str, npt.NDArray[np.int64]] = {}
        self._offload: dict[str, npt.NDArray[np.int64]] = {}  # frames each offload event touched

    @property
    def ports(self) -> int:
        return self._ports

    def received(self, port: int, lengths: npt.NDArray[np.uint32]) -> None:
        """A batch that came in on ``port``."""
        self._add("rx", port, lengths)

    def sent(self, port: int, lengths: npt.NDArray[np.uint32]) -> None:
        """A batch that went out on ``port``."""
        self._add("tx", port, lengths)

    def sent_many(self, ports: npt.NDArray[np.int64], lengths: npt.NDArray[np.uint32]) -> None:
        """Frames that went out on ``ports[i]`` each (one pass for a whole fan-out)."""
        if ports.size == 0:
            return
        self._grow(int(ports.max()) + 1)
        size = self._ports
        self._columns["tx_packets"] += np.bincount(ports, minlength=size)
        self._columns["tx_bytes"] += np.bincount(ports, weights=lengths, minlength=size).astype(np.int64)

    def dropped(self, port: int, reason: str, count: int = 1) -> None:
        """``count`` frames meant for (or from) ``port`` dropped for ``reason``."""
        self._grow(port + 1)
        column = self._drops.setdefault(reason, np.zeros(self._ports, np.int64))
        column[port] += count

    def offloaded(self, port: int, counts: dict[str, int]) -> None:
        """Offload events on ``port`` (GSO frames passed or segmented, checksums completed), by name."""
        for name, count in counts.items():
            self._grow(port + 1)
            self._offload.setdefault(name, np.zeros(self._ports, np.int64))[port] += count

    def port(self, port: int) -> dict[str, Any]:
        """One port's counters, with ``drops`` by reason (only reasons that happened there)."""
        if not 0 <= port < self._ports:
            return {**dict.fromkeys(_COLUMNS, 0), "drops": {}}
        row: dict[str, Any] = {name: int(column[port]) for name, column in self._columns.items()}
        row["drops"] = {r: int(c[port]) for r, c in sorted(self._drops.items()) if c[port]}
        offload = {r: int(c[port]) for r, c in sorted(self._offload.items()) if c[port]}
        if offload:
            row["offload"] = offload
        return row

    def forget(self, port: int) -> None:
        """Zero a port's counters (its guest left and another may take the number)."""
        if 0 <= port < self._ports:
            for column in (*self._columns.values(), *self._drops.values(), *self._offload.values()):
                column[port] = 0

    def _add(self, way: str, port: int, lengths: npt.NDArray[np.uint32]) -> None:
        self._grow(port + 1)
        self._columns[f"{way}_packets"][port] += lengths.size
        self._columns[f"{way}_bytes"][port] += int(lengths.sum(dtype=np.int64))

    def _grow(self, ports: int) -> None:
        if ports <= 0:
            raise ValueError(f"port number {ports - 1} is out of range")
        if ports <= self._ports:
            return
        if ports > 1 << 16:
            raise ValueError(f"port number {ports - 1} is out of range")
        for table in (self._columns, self._drops, self._offload):
            for name, column in table.items():
                table[name] = np.concatenate([column, np.zeros(ports - column.size, np.int64)])
        self._ports = ports
