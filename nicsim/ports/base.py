"""The Port interface: how a virtio-net device hands frames to whatever is on the other end of the wire.

This module owns the three small contracts between the device (``nicsim.device``) and a port, so that
tap, switch and tunnel ports plug in later without the device changing:

- :class:`TxFrames` is one batch of frames the guest sent, already stripped of the virtio-net header.
  It exposes lengths as a numpy array (a counting port never touches bytes), per-frame views, and a
  vectorised gather. The port returns ``True`` from :meth:`Port.transmit` when it is done with the
  batch, or ``False`` to keep it and call :meth:`TxFrames.complete` later (an asynchronous port); until
  then the device keeps the guest's buffers and their pool descriptors in flight.
- :class:`RxSink` is what the device gives a port to inject frames toward the guest, at any time:
  one frame, many frames in a flat buffer, or one template frame written ``count`` times.
- :class:`Port` is the port itself; pull-style ports (the generator) also implement :meth:`Port.poll_rx`.
"""

from __future__ import annotations

import abc
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from nicsim.ports.frames import Buffer


class TxFrames(Protocol):
    """A batch of TX frames (no virtio-net header), valid until :meth:`complete` is called."""

    @property
    def pair(self) -> int:
        """The queue pair the frames came from (replies usually go back on the same pair)."""

    @property
    def count(self) -> int: ...

    @property
    def lengths(self) -> npt.NDArray[np.uint32]:
        """Frame lengths, header excluded; do not modify."""

    def frame(self, i: int) -> npt.NDArray[np.uint8]:
        """Frame ``i``: a view of guest memory when contiguous, else a gathered copy."""

    def gather(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """Every frame copied back to back: (flat bytes, start offsets), one vectorised copy."""

    def complete(self) -> None:
        """A port that returned False from transmit() calls this once when it no longer needs the frames."""


class RxSink(Protocol):
    """Where a port injects frames toward the guest. Frames that cannot be placed now wait in a small
    bounded backlog; past it they are dropped and counted (reason ``no_rx_buffer``)."""

    def push(self, frame: Buffer, *, pair: int = 0) -> bool:
        """Queue one frame (copied); False if it was dropped."""

    def push_many(
        self,
        data: npt.NDArray[np.uint8],
        offsets: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.uint32],
        *,
        pair: int = 0,
    ) -> int:
        """Queue frames ``data[offsets[i]:offsets[i] + lengths[i]]`` (copied); returns how many were kept."""

    def push_template(self, template: npt.NDArray[np.uint8], count: int, *, pair: int = 0) -> int:
        """Write ``template`` into up to ``count`` guest buffers now; returns how many were delivered.
        Nothing is queued or dropped: a pull-style port simply offers the rest again later."""

    def rx_space(self, pair: int = 0) -> int:
        """Guest buffers currently posted on the pair's RX queue (an upper bound on frames deliverable)."""


class Port(abc.ABC):
    """One end of the wire. Subclasses set ``name`` and implement :meth:`transmit`."""

    name: str = "port"

    def __init__(self) -> None:
        self._sink: RxSink | None = None

    def attach(self, sink: RxSink) -> None:
        """Called by the device once it exists; a port may push frames through ``sink`` from then on."""
        self._sink = sink

    @property
    def sink(self) -> RxSink:
        if self._sink is None:
            raise RuntimeError(f"{self.name} port is not attached to a device")
        return self._sink

    @abc.abstractmethod
    def transmit(self, batch: TxFrames) -> bool:
        """Take a batch the guest sent. True: done with it now; False: will call ``batch.complete()``."""

    def poll_rx(self, pair: int, budget: int, now: float) -> int:
        """Pull-style ports produce up to ``budget`` frames for ``pair``; ``now`` is a monotonic time in
        seconds (the core does no clock reads). Returns frames delivered. Push-style ports return 0."""
        return 0

    def close(self) -> None:
        """Release the port's resources; idempotent. The base class only detaches from the device."""
        self._sink = None

    def stats(self) -> dict[str, Any]:
        """Port-specific counters, JSON-ready."""
        return {}
