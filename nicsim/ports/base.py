"""The Port base class: what every port shares, on top of the port interface the device defines.

This module owns :class:`Port`, the base of every port in ``nicsim.ports``. The contracts themselves
(:class:`~nicsim.virtio.port.TxFrames`, the batch a port is handed; :class:`~nicsim.virtio.port.RxSink`,
where it injects frames; :class:`~nicsim.virtio.port.DevicePort`, what the device calls on it) belong to
the device layer, :mod:`nicsim.virtio.port`, so that the device never imports a port; they are
re-exported here for port authors. :class:`Port` adds the defaults: the attached sink, no offloads, no
fd, no pull-style RX, no counters. Subclasses set ``name`` and implement :meth:`Port.transmit`; tap,
switch and tunnel ports plug in without the device changing.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.virtio.port import ABSORB_NONE, DevicePort, LaneTarget, RecvTarget, RxSink, SendTarget, TxFrames

__all__ = ["Port", "RxSink", "TxFrames"]


class Port(DevicePort, abc.ABC):
    """One end of the wire, with the defaults of :class:`~nicsim.virtio.port.DevicePort` (whose
    docstrings say what each method is for). Subclasses set ``name`` and implement :meth:`transmit`."""

    name: str = "port"
    vnet_hdr: bool = False  # bare frames; a header-passing port (the tap) sets True
    small_frames: bool = False  # it may send frames that need mergeable RX buffers (see DevicePort)
    absorbs: int = ABSORB_NONE  # it needs the frames: the device hands it batches (see DevicePort)
    bulk_rx: bool = False  # its poll_rx sends distinct frames (see DevicePort)
    compiled_rounds: bool = False  # short rounds suit it as well as compiled ones (see DevicePort)

    def __init__(self) -> None:
        self._sink: RxSink | None = None

    def attach(self, sink: RxSink) -> None:
        self._sink = sink

    @property
    def sink(self) -> RxSink:
        """The device's sink, for pushing frames toward the guest (once attached)."""
        if self._sink is None:
            raise RuntimeError(f"{self.name} port is not attached to a device")
        return self._sink

    @abc.abstractmethod
    def transmit(self, batch: TxFrames) -> bool: ...

    def absorb(self, count: int, frame_bytes: int, byte_sum: int) -> None:
        raise NotImplementedError(f"the {self.name} port does not absorb frames (absorbs is ABSORB_NONE)")

    def tx_budget(self, pair: int) -> int | None:
        return None  # every round may be a full one

    def send_target(self, pair: int) -> SendTarget | None:
        return None  # it takes batches (transmit)

    def wrote(self, frames: int, nbytes: int, failed: Sequence[tuple[int, int]]) -> None:
        raise NotImplementedError(f"the {self.name} port gives the device no descriptor to write to")

    def recv_target(self, pair: int) -> RecvTarget | None:
        return None  # the device calls poll_rx

    def lane_target(self, pair: int) -> LaneTarget | None:
        return None  # no request lane: the event loop's pumps serve requests

    def hold_reads(self, pair: int) -> None:
        """A request lane reads the pair's descriptor now: stop watching it on the event loop."""

    def release_reads(self, pair: int) -> None:
        """The lane returned: watch the pair's descriptor on the event loop again."""

    def received(
        self, pair: int, frames: int, nbytes: int, pending: int, status: int, err: int,
        drops: npt.NDArray[np.int64],
    ) -> int:  # fmt: skip
        raise NotImplementedError(f"the {self.name} port gives the device no descriptor to read from")

    def features(self) -> int:
        return 0  # no offloads: the device offers exactly its base set

    def negotiated(self, features: int) -> None:
        return None

    def mtu_changed(self, mtu: int) -> None:
        return None  # nothing on the far end has an MTU to follow

    def pair_enabled(self, pair: int, enabled: bool) -> None:
        return None  # a port with one queue of its own serves every pair through it

    def start_io(self, loop: asyncio.AbstractEventLoop) -> None:
        return None  # no fd to watch

    def poll_rx(self, pair: int, budget: int, now: float) -> int:
        return 0  # push-style: frames arrive through the sink instead

    def close(self) -> None:
        self._sink = None  # the base class only detaches from the device

    def stats(self) -> dict[str, Any]:
        return {}
