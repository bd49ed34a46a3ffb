"""The port interface, as the device defines it: what a virtio-net device hands a port, what it gives a
port to inject frames with, and what it calls on the port. The ports themselves (``nicsim.ports``) sit
above the device and build on this module; the device never imports them.

This module owns the three contracts and the few facts both sides must agree on:

- :class:`TxFrames` is one batch of frames the guest sent, already stripped of the virtio-net header.
  It exposes lengths as a numpy array (a counting port never touches bytes), per-frame views, and a
  vectorised gather. The port returns ``True`` from :meth:`DevicePort.transmit` when it is done with
  the batch, or ``False`` to keep it and call :meth:`TxFrames.complete` later (an asynchronous port);
  until then the device keeps the guest's buffers and their pool descriptors in flight.
- :class:`RxSink` is what the device gives a port to inject frames toward the guest, at any time:
  one frame, many frames in a flat buffer, or one template frame written ``count`` times.
- :class:`DevicePort` is what the device calls on its port: pull-style ports (the generator, the tap)
  produce frames in :meth:`~DevicePort.poll_rx`; a port that can honour offloads declares them with
  :meth:`~DevicePort.features`, learns what the driver accepted in :meth:`~DevicePort.negotiated`, and
  passes the virtio-net header through (``vnet_hdr``, :meth:`TxFrames.iovec`).
- The virtio-net header lengths (virtio 1.2 §5.1.6) and the largest frame either side may hand over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from nicsim.virtio.features import VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, has

if TYPE_CHECKING:
    import asyncio

ETH_HLEN = 14        # destination MAC, source MAC, EtherType: a TX frame shorter than this is a runt
HDR_LEN_V1 = 12      # struct virtio_net_hdr_v1 (virtio 1.2 §5.1.6): ... num_buffers le16 at offset 10
HDR_LEN_LEGACY = 10  # legacy header without num_buffers (neither VERSION_1 nor MRG_RXBUF)
NUM_BUFFERS_OFFSET = 10  # in struct virtio_net_hdr_v1, le16: how many RX buffers the frame spans
MAX_FRAME = 65550    # an IPv4 packet of 65535 bytes behind an Ethernet + VLAN header

# What a port that only absorbs TX frames needs of them (DevicePort.absorbs).
ABSORB_NONE = 0      # the frames themselves: the device hands over batches (transmit)
ABSORB_COUNT = 1     # their count and bytes
ABSORB_SUM = 2       # those and the sum of every frame byte: the device reads each byte for the port

Buffer = bytes | bytearray | memoryview | npt.NDArray[np.uint8]


def vnet_hdr_len(features: int) -> int:
    """The virtio-net header length the negotiated ``features`` imply (§5.1.6: num_buffers is present
    with VERSION_1 or MRG_RXBUF; only a legacy device without MRG_RXBUF uses the 10-byte header)."""
    if has(features, VIRTIO_F_VERSION_1) or has(features, VIRTIO_NET_F_MRG_RXBUF):
        return HDR_LEN_V1
    return HDR_LEN_LEGACY


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

    @property
    def frame_bytes(self) -> int:
        """The sum of :attr:`lengths` (known to the device already: a port need not add them up)."""

    def byte_sum(self) -> int | None:
        """The sum of every frame byte modulo 2^64, read straight out of guest memory in compiled calls
        (a port that must read every byte and keep none, such as a reading sink); None when it cannot
        (then :meth:`gather` them)."""

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

    def push(self, frame: Buffer, *, pair: int | None = None) -> bool:
        """Queue one frame (copied); False if it was dropped. Without ``pair`` (``None``), the device
        picks one of the pairs the guest enabled by the frame's flow (:mod:`nicsim.virtio.steer`); a port
        answering a request passes the request's pair. The same holds for push_many and push_views."""

    def push_many(
        self,
        data: npt.NDArray[np.uint8],
        offsets: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.uint32],
        *,
        pair: int | None = None,
    ) -> int:
        """Queue frames ``data[offsets[i]:offsets[i] + lengths[i]]`` (copied); returns how many were kept."""

    def push_views(
        self, frames: Sequence[npt.NDArray[np.uint8]], *, pair: int | None = None, queue: bool = True,
        headers: npt.NDArray[np.uint8] | None = None,
    ) -> npt.NDArray[np.bool_]:
        """Frames given as views (of another guest's TX buffers, say): written into posted buffers with
        one copy when none wait before them, else queued or dropped as :meth:`push` (``queue=False``:
        dropped, never queued); returns which were kept. ``headers`` (a header-passing port's): each
        frame's virtio-net header apart, (n, 10) bytes, the frames bare."""

    def push_template(self, template: npt.NDArray[np.uint8], count: int, *, pair: int = 0) -> int:
        """Write ``template`` into up to ``count`` guest buffers now; returns how many were delivered.
        Nothing is queued or dropped: a pull-style port simply offers the rest again later."""

    def place_round(
        self, kernel: Callable[..., tuple[int, ...]], extra: tuple[Any, ...], *, pair: int = 0
    ) -> tuple[int, ...] | None:
        """Let another port's compiled round place frames into the pair's posted buffers, or queue
        them in its backlog, itself (the switch's forward, ``nicsim.ports.switch_kernel``): the
        kernel's result tuple, or None when the sink cannot (a hook must see the frames, several
        pairs to steer): then push them."""

    def rx_space(self, pair: int = 0) -> int:
        """Guest buffers currently posted on the pair's RX queue (an upper bound on frames deliverable)."""

    def rx_backlog(self, pair: int = 0) -> int:
        """Frames queued for the pair that wait for guest buffers (they take the next posted ones)."""

    def wake(self, pair: int = 0) -> None:
        """A pull-style port's source became ready (a readable fd): poll its RX soon."""


class SendTarget(NamedTuple):
    """Where a port that writes each TX frame to a file descriptor (the tap) lets the device write
    them itself (:meth:`DevicePort.send_target`): the compiled round that does it (``kernel``:
    ``nicsim.ports.fd_kernels``'s), the descriptor, the header checks' ``allow`` bits (the offloads
    the driver may ask for) and how many times a write is tried while the kernel says EAGAIN."""

    kernel: Callable[..., tuple[int, int, int, int, int]]
    fd: int
    allow: int
    tries: int


class RecvTarget(NamedTuple):
    """Where a pull-style port that reads its frames from a file descriptor (the tap) lets the device
    read them itself (:meth:`DevicePort.recv_target`): the compiled round that does it (``kernel``:
    ``nicsim.ports.fd_kernels``'s), the descriptor, the port's read buffer (a frame the round reads
    but cannot place stays there for :meth:`DevicePort.received`), how many bytes a round reads at
    most, and whether the port's end chose the pair (a multiqueue TAP: nothing for the device to
    steer)."""

    kernel: Callable[..., tuple[int, int, int, int, int]]
    fd: int
    buf: npt.NDArray[np.uint8]
    burst: int
    queue_chosen: bool


class LaneTarget(NamedTuple):
    """Where a port that reads and writes its frames through one file descriptor (the tap) lets a
    request lane serve a queue pair (:meth:`DevicePort.lane_target`): the compiled lane
    (``nicsim.ports.lane_kernel``'s), the descriptor, the send round's ``allow`` bits and tries
    (as :class:`SendTarget`), the port's read buffer and a receive round's byte budget (as
    :class:`RecvTarget`)."""

    kernel: Callable[..., None]
    fd: int
    allow: int
    tries: int
    buf: npt.NDArray[np.uint8]
    burst: int


class DevicePort(Protocol):
    """What a device calls on the port it is wired to (``nicsim.ports.base.Port`` implements it)."""

    @property
    def name(self) -> str: ...

    @property
    def vnet_hdr(self) -> bool:
        """True: frames the port pushes start with a virtio-net header of the negotiated length
        (§5.1.6), whose flags/gso fields the device keeps (it fills num_buffers); False: bare frames."""

    @property
    def small_frames(self) -> bool:
        """True: every frame the port sends the guest fits a receive buffer of Linux's small kind (no GSO
        frame, at most 1514 bytes): the device then offers no mergeable RX buffers (§5.1.6.3.1), and a
        Linux guest posts one small buffer per frame, whose receive path costs it less than the
        mergeable one (guest RX under TCG, generator frames: 11-24 % more frames)."""

    @property
    def absorbs(self) -> int:
        """``ABSORB_NONE``, or what the port needs of the frames it takes when it only absorbs them
        (the sink: ``ABSORB_COUNT``, or ``ABSORB_SUM`` when it reads every byte). A port that absorbs
        may be told a round's totals with :meth:`absorb` instead of getting a batch: on a split ring
        with the compiled kernels, the device then takes, reads and returns the round's chains in one
        compiled call (``rings.round_kernels._absorb_split_py``), every chain still held by a pool
        descriptor while it is read."""

    @property
    def compiled_rounds(self) -> bool:
        """True: the port does more with a compiled round (a batch with ``round_arrays``) than with a
        short one of plain ints, however few its frames (the switch, which forwards a compiled round
        in one compiled call): the device then takes even a round of a few chains the compiled way.
        Asked before each round."""

    @property
    def bulk_rx(self) -> bool:
        """True: :meth:`poll_rx` sends one frame written ``count`` times (``RxSink.push_template``),
        so the device may offer it several rounds' worth of buffers in one budget (up to
        ``fused_rounds`` of ``rx_batch``), which it fills in one compiled call as the guest posts
        them; the port is told how many it delivered, as ever."""

    def tx_budget(self, pair: int) -> int | None:
        """None (take a full round), or at most how many of the pair's TX chains the next round may
        take: the switch's port of a guest whose frames all go to one guest with no buffer left
        (:meth:`nicsim.ports.switch.Switch.tx_budget`). 0 leaves them in the ring for now: the round
        reports itself blocked and is tried again shortly. Asked before each round."""

    def send_target(self, pair: int) -> SendTarget | None:
        """None (the port takes batches through :meth:`transmit`), or a file descriptor the device
        may write the pair's TX frames to itself, header included, one ``writev`` each, with the
        port's compiled round (:class:`SendTarget`); the port is then told of them with :meth:`wrote`."""

    def wrote(self, frames: int, nbytes: int, failed: Sequence[tuple[int, int]]) -> None:
        """A round the device wrote to :meth:`send_target`'s descriptor: ``frames`` frames of
        ``nbytes`` bytes (no header) written, and for each frame not written, its ``(code, errno)``
        from the round's kernel (a header reason, or the write's failure). Must not raise."""

    def recv_target(self, pair: int) -> RecvTarget | None:
        """None (the device calls :meth:`poll_rx`), or a file descriptor the device may read the
        pair's frames from itself, each a virtio-net header of the negotiated length and a frame, with
        the port's compiled round (:class:`RecvTarget`); the port is then told of them with
        :meth:`received`."""

    def received(
        self, pair: int, frames: int, nbytes: int, pending: int, status: int, err: int,
        drops: npt.NDArray[np.int64],
    ) -> int:  # fmt: skip
        """A receive round the device read from :meth:`recv_target`'s descriptor: ``frames`` frames of
        ``nbytes`` bytes (headers included) placed; ``pending`` (if not 0) the length of a frame read
        into the port's buffer that no single posted buffer took, which the port pushes as its poll
        would; ``status`` how the round ended (``nicsim.ports.fd_kernels.RECV_*``, ``err`` the errno
        of a failed read); ``drops`` the reads dropped, by reason. Returns the frames it pushed."""

    def lane_target(self, pair: int) -> LaneTarget | None:
        """None, or what a request lane needs to serve the pair's frames itself (:class:`LaneTarget`):
        a port with one queue whose frames the send and receive rounds of :meth:`send_target` and
        :meth:`recv_target` carry. The port is told of them with :meth:`wrote` and :meth:`received`."""

    def hold_reads(self, pair: int) -> None:
        """A request lane reads :meth:`lane_target`'s descriptor now: the port stops watching it."""

    def release_reads(self, pair: int) -> None:
        """The lane returned: the port watches its descriptor again."""

    def absorb(self, count: int, frame_bytes: int, byte_sum: int) -> None:
        """A round of ``count`` frames the port absorbs, already returned to the guest: their bytes
        (no virtio-net header) and, with ``ABSORB_SUM``, the sum of those bytes modulo 2^64 (else 0).
        Must not raise: the frames are gone."""

    def attach(self, sink: RxSink) -> None:
        """Called by the device once it exists; the port may push frames through ``sink`` from then on."""

    def transmit(self, batch: TxFrames) -> bool:
        """Take a batch the guest sent. True: done with it now; False: will call ``batch.complete()``."""

    def features(self) -> int:
        """Offload feature bits (§5.1.3: CSUM, GUEST_CSUM, HOST_/GUEST_TSO4/6...) the port can honour;
        the device offers them on top of its base set."""

    def negotiated(self, features: int) -> None:
        """The driver's accepted features (SET_FEATURES), before any queue runs: the port configures
        its offloads to match. Raising OSError refuses the features."""

    def mtu_changed(self, mtu: int) -> None:
        """The host MTU the driver was given (vhost-user NET_SET_MTU, before SET_FEATURES): a port whose
        far end has an MTU of its own (a tap's TAP) follows it. Raising OSError refuses the MTU."""

    def pair_enabled(self, pair: int, enabled: bool) -> None:
        """The frontend enabled or disabled queue pair ``pair`` (vhost-user SET_VRING_ENABLE of its RX
        ring; QEMU does so when the guest picks how many pairs it uses): a port with a queue of its own
        per pair (a multiqueue tap) attaches or detaches it. Must not raise."""

    def poll_rx(self, pair: int, budget: int, now: float) -> int:
        """Pull-style ports produce up to ``budget`` frames for ``pair``; ``now`` is a monotonic time in
        seconds (the device reads no clock). Returns frames delivered. Push-style ports return 0."""

    def start_io(self, loop: asyncio.AbstractEventLoop) -> None:
        """The asyncio shell's call (never the device's), once, before any ring runs: a port that owns
        file descriptors registers its readers on ``loop`` here and removes them in :meth:`close`."""

    def close(self) -> None:
        """Release the port's resources; idempotent (the device calls it on shutdown)."""

    def stats(self) -> dict[str, Any]:
        """Port-specific counters, JSON-ready (part of the device's snapshot)."""
