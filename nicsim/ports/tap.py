"""The tap port: forwards between the guest and a Linux TAP device inside a network namespace.

This module owns opening the TAP (``/dev/net/tun``, ``TUNSETIFF`` with ``IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR``) from a short-lived thread that ``setns()``-es into the namespace, so the process itself
never moves; the offloads it can honour (probed with ``TUNSETOFFLOAD`` at open) and their configuration
after the driver accepted features (``TUNSETOFFLOAD``, ``TUNSETVNETHDRSZ``, ``TUNSETVNETLE``); and the
two data paths. TX: every frame goes to the kernel with the guest's virtio-net header in front, unchanged
(one ``writev`` of guest-memory views, no copy; the kernel does the checksum and segmentation the
header asks for, virtio 1.2 §5.1.6.2), after a check that the header asks only for offloads the driver
negotiated. RX is pull-style: when the guest has buffers the device polls the port, which reads frames
(the kernel's virtio-net header in front, GSO frames up to 64 KB with GUEST_TSO4/6) and pushes them; the
device keeps that header (GUEST_CSUM) and fills ``num_buffers`` (§5.1.6.4). When the fd is drained the
port watches it with ``loop.add_reader`` and wakes the device once it is readable. Nothing blocks:
a write that would block is retried a bounded number of times, then dropped and counted.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from nicsim.errors import LocalError
from nicsim.ports import fd_kernels, lane_kernel
from nicsim.ports.base import Port, TxFrames
from nicsim.ports.vnet_hdr import (
    HDR_FIELDS,
    NONE,
    OFFLOADS,
    OK,
    REASONS,
    Offloads,
    check,
    check_one,
    read_headers,
)
from nicsim.virtio.features import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    has,
)
from nicsim.virtio.port import (
    ETH_HLEN,
    HDR_LEN_LEGACY,
    HDR_LEN_V1,
    MAX_FRAME,
    LaneTarget,
    RecvTarget,
    SendTarget,
    vnet_hdr_len,
)

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC
TUNSETQUEUE = 0x400454D9
SIOCSIFMTU = 0x8922  # <linux/sockios.h>
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
MAX_QUEUES = 16
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_ALL = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")  # where `ip netns add` puts its namespaces


MAX_READ = MAX_FRAME + HDR_LEN_V1 + 64  # a 64 KB GSO frame, its header, and slack to detect a longer one
RX_BURST_BYTES = 256 * 1024  # stop a poll after this much; the device's backlog holds more (8 x 64 KB)
WRITE_TRIES = 3
SCALAR_CHECK = 2  # a TX round of at most this many frames checks their headers without numpy
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")


def is_netns_name(name: str) -> bool:
    """Whether ``name`` can be a namespace under /run/netns (a file name, not a path or . / ..)."""
    return bool(_NAME_RE.match(name)) and name not in (".", "..")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

T = TypeVar("T")


class TapError(LocalError, OSError):
    """The TAP could not be opened or configured: ``step`` says which call, for ``netns``/``ifname``."""

    def __init__(self, message: str, *, step: str, netns: str, ifname: str, err: int = 0) -> None:
        super().__init__(err, f"tap {ifname} in netns {netns}: {step}: {message}")
        self.step = step
        self.netns = netns
        self.ifname = ifname


@dataclass(frozen=True, kw_only=True)
class TapConfig:
    """``netns``: the network namespace (``ip netns add NAME``) the TAP lives in; ``ifname``: the TAP,
    attached if it exists (``ip tuntap add``: persistent, keeps its address between guests), else
    created (it then disappears with the port); ``offload``: offer CSUM/TSO to the guest if the
    kernel can honour them; ``follow_mtu``: when the frontend gives the guest a host MTU (QEMU's
    ``host_mtu``, vhost-user NET_SET_MTU), set the TAP's MTU to it, so that the namespace's side sends
    and takes the same frames the guest does; ``queues``: more than 1 opens the TAP with
    IFF_MULTI_QUEUE, one fd (one kernel queue) per queue pair (an existing TAP must have been made
    with ``ip tuntap add ... multi_queue``)."""

    netns: str = ""
    ifname: str = "tap0"
    offload: bool = True
    follow_mtu: bool = True
    queues: int = 1

    def check(self) -> None:
        if not is_netns_name(self.netns):
            raise ValueError(f"tap: netns={self.netns!r}: the name of a network namespace is required")
        if not _IFNAME_RE.match(self.ifname):
            raise ValueError(f"tap: ifname={self.ifname!r} is not a Linux interface name (1-15 chars)")
        if not 1 <= self.queues <= MAX_QUEUES:
            raise ValueError(f"tap: queues={self.queues}: use 1..{MAX_QUEUES}")


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a short-lived thread that joined network namespace ``netns``: sockets and TAPs it
    opens belong there; the rest of the process never moves (setns changes only the calling thread)."""
    out: list[T] = []
    errs: list[BaseException] = []

    def run() -> None:
        try:
            nsfd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(nsfd)
            finally:
                os.close(nsfd)
            out.append(fn())
        except BaseException as err:  # handed to the caller's thread
            errs.append(err)

    t = threading.Thread(target=run, name=f"nicsim-netns-{netns}")
    t.start()
    t.join()
    if errs:
        raise errs[0]
    return out[0]


def _ioctl_int(fd: int, request: int, value: int) -> None:
    """An ioctl whose argument points at an int (TUNSETVNETHDRSZ, TUNSETVNETLE)."""
    fcntl.ioctl(fd, request, struct.pack("i", value))


def _set_offload(fd: int, flags: int) -> None:
    # TUNSETOFFLOAD takes the TUN_F_* flags by value, not through a pointer.
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def _open_queues(ifname: str, queues: int) -> tuple[list[int], int]:
    """Open ``ifname`` ``queues`` times (IFF_MULTI_QUEUE when more than one): (fds, offloads)."""
    fds: list[int] = []
    try:
        offloads = TUN_ALL
        for _ in range(queues):
            fd, off = _open_tap(ifname, multi=queues > 1)
            fds.append(fd)
            offloads &= off
        return fds, offloads
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _open_tap(ifname: str, *, multi: bool = False) -> tuple[int, int]:
    """Open ``ifname`` with IFF_VNET_HDR; returns (fd, TUN_F_* offloads the kernel accepts)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        feats = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, bytes(4)))[0]
        if not feats & IFF_VNET_HDR:
            raise OSError(errno.ENOTSUP, "the kernel's tun has no IFF_VNET_HDR")
        if multi and not feats & IFF_MULTI_QUEUE:
            raise OSError(errno.ENOTSUP, "the kernel's tun has no IFF_MULTI_QUEUE")
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi else 0)
        ifr = struct.pack("16sH22x", ifname.encode(), flags)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        offloads = TUN_ALL
        try:
            _set_offload(fd, offloads)
        except OSError:
            offloads = 0
        _set_offload(fd, 0)  # nothing until the driver negotiates
        return fd, offloads
    except BaseException:
        os.close(fd)
        raise


def _set_mtu(ifname: str, mtu: int) -> None:
    """SIOCSIFMTU on ``ifname``, through a socket of the calling thread's namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        fcntl.ioctl(sock.fileno(), SIOCSIFMTU, struct.pack("16si20x", ifname.encode(), mtu))


class TapPort(Port):
    """A TAP in a network namespace as the other end of the wire. With ``queues`` > 1 (IFF_MULTI_QUEUE),
    queue pair ``p`` writes to and reads from the TAP's queue ``p`` (its own fd): the kernel sends a
    flow's frames back on the queue the flow was last written to (tun's flow steering), so they reach
    the guest on the pair it sent the flow on. A pair the guest disables has its queue detached
    (TUNSETQUEUE, IFF_DETACH_QUEUE, as QEMU's own tap backend does), so the kernel steers nothing to
    a queue nobody reads; queue 0 always stays attached."""

    name = "tap"
    vnet_hdr = True

    def __init__(self, config: TapConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        if not (NETNS_DIR / config.netns).exists():
            raise TapError("no such network namespace (ip netns add it first)", step="setns",
                           netns=config.netns, ifname=config.ifname, err=errno.ENOENT)  # fmt: skip
        try:
            fds, tun_offloads = in_netns(config.netns, lambda: _open_queues(config.ifname, config.queues))
        except OSError as err:
            multi = config.queues > 1 and err.errno == errno.EINVAL
            hint = " (an existing TAP needs multi_queue)" if multi else ""
            raise TapError((err.strerror or str(err)) + hint, step="open", netns=config.netns,
                           ifname=config.ifname, err=err.errno or 0) from err  # fmt: skip
        self._fds: list[int] = fds
        self._attached = [True] * len(fds)
        # Offered only when the kernel takes every TUN_F_* the virtio bits map to.
        self._offered = OFFLOADS if config.offload and tun_offloads == TUN_ALL else 0
        self._tx_offloads = NONE  # what the guest may ask of the kernel on TX
        self._tx_allow = 0  # the same, as the send kernel's bits
        self._hdr_len = HDR_LEN_LEGACY  # the kernel's default until negotiation says otherwise
        self.tun_offload = 0
        self.mtu: int | None = None  # the TAP's MTU once it followed the guest's host MTU
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = [False] * len(fds)  # each fd is watched (it was drained)
        self._idle = [True] * len(fds)
        self._polled = 0  # the queue polled last: ``finished`` speaks of it
        self._rxbuf: npt.NDArray[np.uint8] = np.zeros(MAX_READ, np.uint8)
        self.counters: dict[str, Any] = {"tx_frames": 0, "tx_bytes": 0, "rx_frames": 0, "rx_bytes": 0}
        self.drops: dict[str, int] = {}

    # -- configuration ----------------------------------------------------------------------------

    def features(self) -> int:
        return self._offered

    def negotiated(self, features: int) -> None:
        fd = self._require_fd()
        # The kernel reads and writes exactly the negotiated header in front of every frame.
        self._hdr_len = vnet_hdr_len(features)
        off = 0
        if has(features, VIRTIO_NET_F_GUEST_CSUM):
            off |= TUN_F_CSUM
            if has(features, VIRTIO_NET_F_GUEST_TSO4):
                off |= TUN_F_TSO4
            if has(features, VIRTIO_NET_F_GUEST_TSO6):
                off |= TUN_F_TSO6
        try:
            _ioctl_int(fd, TUNSETVNETHDRSZ, self._hdr_len)
            if has(features, VIRTIO_F_VERSION_1):
                # VERSION_1 headers are little-endian (§5.1.6); a no-op on a little-endian host.
                try:
                    _ioctl_int(fd, TUNSETVNETLE, 1)
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
            _set_offload(fd, off)
        except OSError as err:
            raise TapError(err.strerror or str(err), step="negotiate", netns=self.config.netns,
                           ifname=self.config.ifname, err=err.errno or 0) from err  # fmt: skip
        self.tun_offload = off
        # What the guest may ask of the kernel on TX (§5.1.6.2): only offloads it negotiated.
        self._tx_offloads = Offloads.tx(features)
        self._tx_allow = fd_kernels.allowed(self._tx_offloads)

    def mtu_changed(self, mtu: int) -> None:
        if not self.config.follow_mtu or mtu == self.mtu:
            return
        self._require_fd()
        try:
            in_netns(self.config.netns, lambda: _set_mtu(self.config.ifname, mtu))
        except OSError as err:
            raise TapError(err.strerror or str(err), step=f"set MTU {mtu}", netns=self.config.netns,
                           ifname=self.config.ifname, err=err.errno or 0) from err  # fmt: skip
        self.mtu = mtu

    def start_io(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for q in range(len(self._fds)):
            self._watch(q)

    # -- TX: guest -> kernel ----------------------------------------------------------------------

    def transmit(self, batch: TxFrames) -> bool:
        if not self._fds:
            self._drop("closed", batch.count)
            return True
        q = batch.pair if batch.pair < len(self._fds) and self._attached[batch.pair] else 0
        fd = self._fds[q]
        sizes = batch.lengths.tolist()
        if batch.count <= SCALAR_CHECK:
            # A request's round: the header checked with plain ints, read from the one iovec written.
            for i, n in enumerate(sizes):
                iov = batch.iovec(i)
                first = iov[0] if iov[0].shape[0] >= HDR_FIELDS else np.concatenate(iov)
                self._write(fd, iov, check_one(first, n, self._tx_offloads), n)
            return True
        codes = check(read_headers(batch), batch.lengths, self._tx_offloads).tolist()
        for i, n in enumerate(sizes):
            self._write(fd, batch.iovec(i), codes[i], n)
        return True

    def send_target(self, pair: int) -> SendTarget | None:
        """The pair's TAP queue (queue 0 when it has none attached, as :meth:`transmit` picks it),
        for the device to write frames to itself in one compiled call per round
        (:mod:`nicsim.ports.fd_kernels`): the same header checks, the same ``writev`` per frame and
        the same tries; :meth:`wrote` counts what :meth:`_write` would have."""
        kernel = fd_kernels.kernel()
        if kernel is None or not self._fds:
            return None
        q = pair if pair < len(self._fds) and self._attached[pair] else 0
        return SendTarget(kernel, self._fds[q], self._tx_allow, WRITE_TRIES)

    def wrote(self, frames: int, nbytes: int, failed: Sequence[tuple[int, int]]) -> None:
        self.counters["tx_frames"] += frames
        self.counters["tx_bytes"] += nbytes
        for code, err in failed:
            if code == fd_kernels.WOULD_BLOCK:
                self._drop("tx_would_block")
            elif code == fd_kernels.WRITE_ERROR:
                self._drop(f"tx_{errno.errorcode.get(err, 'error').lower()}")
            else:
                self._drop(REASONS[code])

    def recv_target(self, pair: int) -> RecvTarget | None:
        """The pair's TAP queue and this port's read buffer, for the device to read frames into the
        guest's buffers itself in one compiled call per round (:mod:`nicsim.ports.fd_kernels`): the
        same reads, runt and size checks and burst as :meth:`poll_rx`; :meth:`received` counts them
        and pushes what the call could not place."""
        kernel = fd_kernels.recv_kernel()
        if kernel is None or pair >= len(self._fds) or not self._attached[pair]:
            return None
        self._polled = pair
        chosen = self._chosen_pair(pair) is not None
        return RecvTarget(kernel, self._fds[pair], self._rxbuf, RX_BURST_BYTES, chosen)

    def lane_target(self, pair: int) -> LaneTarget | None:
        """A TAP with one queue, for a request lane (:mod:`nicsim.ports.lane_kernel`): the same
        writes and reads as :meth:`send_target` and :meth:`recv_target`, counted the same way."""
        kernel = lane_kernel.kernel()
        if kernel is None or len(self._fds) != 1 or pair != 0:
            return None
        self._polled = 0
        return LaneTarget(kernel, self._fds[0], self._tx_allow, WRITE_TRIES, self._rxbuf, RX_BURST_BYTES)

    def hold_reads(self, pair: int) -> None:
        self._unwatch(pair)

    def release_reads(self, pair: int) -> None:
        self._idle[pair] = True  # the lane read until EAGAIN, or the device's next poll will
        self._watch(pair)

    def received(
        self, pair: int, frames: int, nbytes: int, pending: int, status: int, err: int,
        drops: npt.NDArray[np.int64],
    ) -> int:  # fmt: skip
        counters = self.counters
        counters["rx_frames"] += frames
        counters["rx_bytes"] += nbytes - frames * self._hdr_len
        if drops[fd_kernels.DROP_RUNT]:
            self._drop("rx_runt", int(drops[fd_kernels.DROP_RUNT]))
        if drops[fd_kernels.DROP_TOO_BIG]:
            self._drop("rx_too_big", int(drops[fd_kernels.DROP_TOO_BIG]))
        pushed = 0
        if pending and self.sink.push(self._rxbuf[:pending], pair=self._chosen_pair(pair)):
            pushed = 1
            counters["rx_frames"] += 1
            counters["rx_bytes"] += pending - self._hdr_len
        if status == fd_kernels.RECV_ERROR:
            self._drop(f"rx_{errno.errorcode.get(err, 'error').lower()}")
        if status in (fd_kernels.RECV_DRAINED, fd_kernels.RECV_ERROR):
            self._idle[pair] = True
            self._watch(pair)
        return pushed

    def _write(self, fd: int, iov: list[npt.NDArray[np.uint8]], code: int, n: int) -> None:
        """One frame (``n`` bytes after its header) to the kernel, or dropped for ``code``'s reason."""
        if code != OK:
            self._drop(REASONS[code])
            return
        for _ in range(WRITE_TRIES):
            try:
                os.writev(fd, iov)  # type: ignore[arg-type]  # ndarrays are buffers (numpy stubs)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                self._drop(f"tx_{errno.errorcode.get(err.errno or 0, 'error').lower()}")
                return
            self.counters["tx_frames"] += 1
            self.counters["tx_bytes"] += n
            return
        self._drop("tx_would_block")

    # -- RX: kernel -> guest (pull) ---------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True while the TAP has nothing to read: the RX pump may sleep; the fd watch wakes it."""
        return self._idle[self._polled] if self._fds else True

    def poll_rx(self, pair: int, budget: int, now: float) -> int:
        if pair >= len(self._fds) or not self._attached[pair]:
            return 0
        self._polled = pair
        fd, buf, min_len = self._fds[pair], self._rxbuf, self._hdr_len + ETH_HLEN
        to = self._chosen_pair(pair)
        frames = nbytes = 0
        while frames < budget and nbytes < RX_BURST_BYTES:
            try:
                n = os.readv(fd, [buf])  # type: ignore[list-item]  # an ndarray is a writable buffer
            except InterruptedError:
                continue
            except BlockingIOError:
                self._idle[pair] = True
                self._watch(pair)
                break
            except OSError as err:
                self._drop(f"rx_{errno.errorcode.get(err.errno or 0, 'error').lower()}")
                self._idle[pair] = True
                self._watch(pair)
                break
            if n < min_len or n >= MAX_READ:
                self._drop("rx_runt" if n < min_len else "rx_too_big")
                continue
            if not self.sink.push(buf[:n], pair=to):
                continue  # the device counted it (no_rx_buffer / too_big)
            frames += 1
            nbytes += n
            self.counters["rx_frames"] += 1
            self.counters["rx_bytes"] += n - self._hdr_len
        return frames

    def _chosen_pair(self, pair: int) -> int | None:
        """The pair a frame read from ``pair``'s queue goes to: with one queue, None (the device steers
        each frame to a pair); with several, that pair (the kernel chose the queue)."""
        return pair if len(self._fds) > 1 else None

    def _on_readable(self, q: int) -> None:
        # Level-triggered: stop watching until the next poll drains the fd again, then let the device
        # poll us (it does so only while the guest has buffers: the kernel queue is the backlog).
        self._unwatch(q)
        self._idle[q] = False
        if self._sink is not None:
            self.sink.wake(q)

    def _watch(self, q: int) -> None:
        if self._loop is not None and q < len(self._fds) and self._attached[q] and not self._reading[q]:
            self._loop.add_reader(self._fds[q], self._on_readable, q)
            self._reading[q] = True

    def _unwatch(self, q: int) -> None:
        if self._loop is not None and q < len(self._fds) and self._reading[q]:
            self._loop.remove_reader(self._fds[q])
        if q < len(self._reading):
            self._reading[q] = False

    def pair_enabled(self, pair: int, enabled: bool) -> None:
        """QEMU enabled or disabled queue pair ``pair``: attach or detach its TAP queue (not queue 0)."""
        if pair == 0 or pair >= len(self._fds) or self._attached[pair] == enabled:
            return
        if not enabled:
            self._unwatch(pair)
        flags = IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self._fds[pair], TUNSETQUEUE, struct.pack("16sH22x", b"", flags))
        except OSError as err:
            what = "attach" if enabled else "detach"
            self._drop(f"queue_{what}_{errno.errorcode.get(err.errno or 0, 'error').lower()}")
            return
        self._attached[pair] = enabled
        if enabled:
            self._idle[pair] = True
            self._watch(pair)

    # -- bookkeeping ------------------------------------------------------------------------------

    def _require_fd(self) -> int:
        if not self._fds:
            raise TapError("the port is closed", step="use", netns=self.config.netns,
                           ifname=self.config.ifname, err=errno.EBADF)  # fmt: skip
        return self._fds[0]  # device-wide settings (offloads, header size) go through queue 0

    def _drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    def close(self) -> None:
        for q in range(len(self._fds)):
            self._unwatch(q)
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        super().close()

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "drops": dict(self.drops), "tun_offload": self.tun_offload,
                "offered": self._offered, "mtu": self.mtu, "netns": self.config.netns,
                "ifname": self.config.ifname, "queues": len(self._attached),
                "attached": sum(self._attached)}
