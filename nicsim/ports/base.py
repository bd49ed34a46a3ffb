"""The Port interface: how a virtio-net device hands frames to whatever is on the other end of the wire.

This module owns the three small contracts between the device (``nicsim.virtio.device``) and a port, so that
tap, switch and tunnel ports plug in later without the device changing:

- :class:`TxFrames` is one batch of frames the guest sent, already stripped of the virtio-net header.
  It exposes lengths as a numpy array (a counting port never touches bytes), per-frame views, and a
  vectorised gather. The port returns ``True`` from :meth:`Port.transmit` when it is done with the
  batch, or ``False`` to keep it and call :meth:`TxFrames.complete` later (an asynchronous port); until
  then the device keeps the guest's buffers and their pool descriptors in flight.
- :class:`RxSink` is what the device gives a port to inject frames toward the guest, at any time:
  one frame, many frames in a flat buffer, or one template frame written ``count`` times.
- :class:`Port` is the port itself; pull-style ports (the generator, the tap) also implement
  :meth:`Port.poll_rx`. A port that can honour offloads (the tap) declares them with :meth:`Port.features`,
  learns what the driver accepted in :meth:`Port.negotiated`, and passes the virtio-net header through
  (``vnet_hdr``, :meth:`TxFrames.iovec`); a port owning an fd gets the event loop in :meth:`Port.start_io`.
"""

from __future__ import annotations

import abc
import asyncio
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

    def iovec(self, i: int) -> list[npt.NDArray[np.uint8]]:
        """Frame ``i`` *with* its virtio-net header in front, as views of guest memory (one per
        readable segment, no copy): for ports that pass the header through (a TAP with IFF_VNET_HDR)."""

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

    def wake(self, pair: int = 0) -> None:
        """A pull-style port's source became ready (a readable fd): poll its RX soon."""


class Port(abc.ABC):
    """One end of the wire. Subclasses set ``name`` and implement :meth:`transmit`."""

    name: str = "port"
    # True: frames the port pushes start with a virtio-net header of the negotiated length (§5.1.6),
    # whose flags/gso fields the device keeps (it fills num_buffers); False: bare frames.
    vnet_hdr: bool = False

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

    def features(self) -> int:
        """Offload feature bits (virtio 1.2 §5.1.3: CSUM, GUEST_CSUM, HOST_/GUEST_TSO4/6...) the port can
        honour; the device offers them on top of its base set. Default: none."""
        return 0

    def negotiated(self, features: int) -> None:
        """The driver's accepted features (SET_FEATURES), before any queue runs: a port configures its
        offloads to match. Raising OSError refuses the features."""
        return None

    def start_io(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called once by the server, on its event loop, before any ring runs: a port that owns file
        descriptors registers its readers here and removes them in :meth:`close`. Default: nothing."""
        return None

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
