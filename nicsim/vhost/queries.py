"""The questions the connection must ask the device before it can reply.

This module owns ``DeviceQueries``, the small synchronous protocol through which a
``BackendConnection`` gets the content of the few replies only the device knows: the ring's
last avail index when GET_VRING_BASE stops it, the config space bytes for GET_CONFIG, the device
status for GET_STATUS, and the inflight buffer for GET_INFLIGHT_FD. The calls happen inside
``receive_data`` in message order, so the reply is queued at once and replies stay in request
order; the device runs on the same event loop, so a synchronous answer is always available.
``IdleDevice`` is the complete implementation for a device that never processes a ring
(frontend tests, protocol tests, a backend under construction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, kw_only=True)
class InflightBuffer:
    """A shared buffer for inflight tracking. ``fd`` stays the device's: sent, never closed, by the server."""

    fd: int
    mmap_size: int
    mmap_offset: int = 0


class DeviceQueries(Protocol):
    """What the connection asks the device, synchronously, while it parses a message."""

    def stop_vring(self, index: int, *, base: int) -> int:
        """Stop processing ring ``index`` now; return its next avail index (spec GET_VRING_BASE).

        ``base`` is the last SET_VRING_BASE value; a device that never consumed from the ring
        returns it unchanged. For packed rings the wrap counter goes in bit 15 (and bit 31).
        """
        ...

    def read_config(self, offset: int, size: int) -> bytes | None:
        """``size`` bytes of config space at ``offset``, or None if the range is invalid."""
        ...

    def get_status(self, *, driver_status: int) -> int:
        """The device status byte; ``driver_status`` is the last SET_STATUS value (0 if none)."""
        ...

    def get_inflight_fd(self, *, num_queues: int, queue_size: int) -> InflightBuffer | None:
        """A zeroed inflight buffer for that many queues of that size, or None if unavailable."""
        ...


class IdleDevice:
    """A device that never processes rings: stop returns the base, config is a fixed byte string."""

    def __init__(self, config: bytes = b"") -> None:
        self.config = config

    def stop_vring(self, index: int, *, base: int) -> int:
        return base

    def read_config(self, offset: int, size: int) -> bytes | None:
        if offset + size > len(self.config):
            return None
        return self.config[offset : offset + size]

    def get_status(self, *, driver_status: int) -> int:
        return driver_status

    def get_inflight_fd(self, *, num_queues: int, queue_size: int) -> InflightBuffer | None:
        return None
