"""Capture on any port without the port knowing: a wrapper port and a wrapper sink.

This module owns :func:`capturing`, which wraps a port so that every frame the guest transmits and
every frame the port hands toward the guest is written to a :class:`CaptureWriter` as one interface.
The device talks to the wrapper as to any port; the wrapper gives the inner port a sink that records
what the device accepted and then passes it on. With capture off there is no wrapper at all, so it
costs nothing.

Directions are the guest's: a frame the guest transmits is *outbound*, a frame for the guest
*inbound*, as ``tcpdump`` on the guest's interface would mark them. A TX frame is captured when the
device hands it to the port; an RX frame when the device accepts it from the port (delivered, or
queued in the RX backlog for delivery); frames the device refuses (dropped and counted by the device)
are not captured, while a queued frame the device drops later because its queue stopped (counted as
``queue_stopped``) is. All frames of one batch share one timestamp, taken when it is written. A port
that passes virtio-net headers (the tap) has the header stripped: the file holds Ethernet frames.

A switch's uplink (a tap, a vxlan tunnel) is captured by the same wrapper around the uplink's port,
the switch's :class:`~nicsim.ports.uplink.Uplink` in the device's place, with the directions swapped
(``transmit_as=INBOUND``): what the switch sends out of the uplink is *inbound*, what comes in from the
network *outbound*, as ``tcpdump`` on the far end's interface (the TAP in its namespace) marks them.
So on every interface of a switch's capture, outbound is into the switch and inbound out of it,
whether a guest or the network sits at that switch port. A frame the switch sends out is captured
when it is handed to the uplink's port (one the port then fails to send is counted ``uplink_tx`` on
the switch), a frame coming in when the uplink takes it (a runt it refuses is not).

Pull-style ports (those that override ``poll_rx``, such as the generator and the tap) are wrapped by a
subclass that overrides it too, because the pump tells the two kinds apart by that override.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.ports.base import Port, RxSink, TxFrames
from nicsim.ports.capture.records import Direction
from nicsim.ports.capture.writer import CaptureWriter
from nicsim.virtio.port import HDR_LEN_LEGACY, Buffer, vnet_hdr_len


class CapturingSink:
    """The device's sink as the inner port sees it: each accepted frame is captured (inbound for a
    guest's port)."""

    def __init__(self, sink: RxSink, owner: CapturingPort) -> None:
        self._sink = sink
        self._owner = owner

    def push(self, frame: Buffer, *, pair: int | None = None) -> bool:
        if not self._sink.push(frame, pair=pair):
            return False
        arr = frame if isinstance(frame, np.ndarray) else np.frombuffer(frame, dtype=np.uint8)
        self._owner.captured_rx(arr, np.zeros(1, dtype=np.int64), np.array([arr.shape[0]], dtype=np.uint32))
        return True

    def push_many(self, data: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64],
                  lengths: npt.NDArray[np.uint32], *, pair: int | None = None) -> int:  # fmt: skip
        # One push per frame, so the frames the device refuses (a full backlog, too big) are known and
        # left out; the device's own push_many is the same loop. Then one capture write for the batch.
        kept = np.zeros(lengths.shape[0], dtype=bool)
        for i, (off, n) in enumerate(zip(offsets.tolist(), lengths.tolist(), strict=True)):
            kept[i] = self._sink.push(data[off : off + n], pair=pair)
        self._owner.captured_rx(data, offsets[kept], lengths[kept])
        return int(np.count_nonzero(kept))

    def push_views(
        self, frames: Sequence[npt.NDArray[np.uint8]], *, pair: int | None = None, queue: bool = True,
        headers: npt.NDArray[np.uint8] | None = None,
    ) -> npt.NDArray[np.bool_]:
        # Frames with their header apart are bare: the file gets them as the guest got them (a GSO
        # frame passed whole is one big frame, as tcpdump on a Linux bridge shows it).
        kept = self._sink.push_views(frames, pair=pair, queue=queue, headers=headers)
        if kept.any():  # the capture's own copy: what the guest was given, one write for the batch
            lengths = np.fromiter((f.shape[0] for f in frames), np.int64, len(frames))[kept]
            data = np.concatenate([f for f, k in zip(frames, kept.tolist(), strict=True) if k])
            self._owner.captured_rx(data, np.cumsum(lengths) - lengths, lengths.astype(np.uint32),
                                    bare=headers is not None)  # fmt: skip
        return kept

    def push_template(self, template: npt.NDArray[np.uint8], count: int, *, pair: int = 0) -> int:
        delivered = self._sink.push_template(template, count, pair=pair)
        if delivered:
            self._owner.captured_rx_repeated(template, delivered)
        return delivered

    def place_round(
        self, kernel: Callable[..., tuple[int, ...]], extra: tuple[Any, ...], *, pair: int = 0
    ) -> tuple[int, ...] | None:
        return None  # the capture sees each frame: they come through push_views

    def rx_space(self, pair: int = 0) -> int:
        return self._sink.rx_space(pair)

    def rx_backlog(self, pair: int = 0) -> int:
        return self._sink.rx_backlog(pair)

    def wake(self, pair: int = 0) -> None:
        self._sink.wake(pair)


class CapturingPort(Port):
    """``inner``, with its traffic written to ``writer`` as interface ``interface``; what it is handed
    to transmit is recorded as ``transmit_as``, what it receives as the other direction."""

    def __init__(self, inner: Port, writer: CaptureWriter, interface: int, *,
                 transmit_as: Direction = Direction.OUTBOUND) -> None:  # fmt: skip
        super().__init__()
        self.inner = inner
        self.writer = writer
        self.interface = interface
        self._tx_dir = transmit_as
        self._rx_dir = Direction.INBOUND if transmit_as is Direction.OUTBOUND else Direction.OUTBOUND
        self.name = inner.name
        self.vnet_hdr = inner.vnet_hdr
        self.small_frames = inner.small_frames  # the device offers what it offers without a capture
        # Until negotiation says otherwise, a header-passing port's frames carry the legacy header
        # (the tap's kernel default); bare-frame ports carry none.
        self._hdr_len = HDR_LEN_LEGACY if inner.vnet_hdr else 0

    def attach(self, sink: RxSink) -> None:
        super().attach(sink)
        self.inner.attach(CapturingSink(sink, self))

    def transmit(self, batch: TxFrames) -> bool:
        # Before the port sees it: a reflecting port rewrites the gathered bytes in place.
        if batch.count:
            data, offsets = batch.gather()  # header already stripped; cached for the inner port
            self.writer.write(self.interface, self._tx_dir, data, offsets, batch.lengths)
        return self.inner.transmit(batch)

    def captured_rx(self, data: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64],
                    lengths: npt.NDArray[np.uint32], *, bare: bool = False) -> None:  # fmt: skip
        """Frames the device accepted from the inner port; their virtio-net header, if any, skipped
        (``bare``: the frames came without one, their headers apart)."""
        hdr = 0 if bare else self._hdr_len
        if hdr:
            lengths = np.maximum(lengths, np.uint32(hdr)) - np.uint32(hdr)
            offsets = offsets + hdr
        self.writer.write(self.interface, self._rx_dir, data, offsets, lengths)

    def captured_rx_repeated(self, template: npt.NDArray[np.uint8], count: int) -> None:
        """A template frame the device wrote into ``count`` guest buffers."""
        self.writer.write_repeated(self.interface, self._rx_dir, template[self._hdr_len :], count)

    @property
    def counters(self) -> dict[str, Any]:
        """The inner port's counters, if it keeps any: an uplink reads ``tx_frames`` to know what left."""
        counters: dict[str, Any] = getattr(self.inner, "counters", {})
        return counters

    def tx_budget(self, pair: int) -> int | None:
        return self.inner.tx_budget(pair)  # a captured guest is paced as any other (the switch's pace=)

    def features(self) -> int:
        return self.inner.features()

    def negotiated(self, features: int) -> None:
        self.inner.negotiated(features)
        if self.inner.vnet_hdr:
            self._hdr_len = vnet_hdr_len(features)

    def mtu_changed(self, mtu: int) -> None:
        self.inner.mtu_changed(mtu)

    def pair_enabled(self, pair: int, enabled: bool) -> None:
        self.inner.pair_enabled(pair, enabled)

    def start_io(self, loop: asyncio.AbstractEventLoop) -> None:
        self.inner.start_io(loop)

    def close(self) -> None:
        # The writer is not ours: it outlives this port (the next guest on the socket writes to it).
        self.inner.close()
        super().close()

    def stats(self) -> dict[str, Any]:
        counts = self.writer.stats()["interfaces"][self.interface]
        capture = {"inbound": counts["inbound"], "outbound": counts["outbound"]}
        return {**self.inner.stats(), "capture": capture}


class CapturingPullPort(CapturingPort):
    """A pull-style port (it overrides ``poll_rx``), captured."""

    def poll_rx(self, pair: int, budget: int, now: float) -> int:
        return self.inner.poll_rx(pair, budget, now)

    @property
    def finished(self) -> bool:
        """The inner port's ``finished`` (the pump stops polling a finished generator)."""
        return bool(getattr(self.inner, "finished", False))


def capturing(inner: Port, writer: CaptureWriter, interface: int, *,
              transmit_as: Direction = Direction.OUTBOUND) -> CapturingPort:  # fmt: skip
    """Wrap ``inner`` so its traffic is captured as ``interface`` of ``writer``; ``transmit_as``:
    OUTBOUND for a guest's port (the guest transmits), INBOUND for a switch's uplink."""
    pull = type(inner).poll_rx is not Port.poll_rx
    return (CapturingPullPort if pull else CapturingPort)(inner, writer, interface, transmit_as=transmit_as)
