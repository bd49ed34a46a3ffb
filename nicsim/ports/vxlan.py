"""The vxlan port: a VXLAN tunnel endpoint (RFC 7348) whose one remote VTEP is the other end of the wire.

This module owns the UDP socket and the two data paths; the header itself is :mod:`nicsim.ports.vxlan_wire`.
The socket is opened, like the tap port's TAP, by a short-lived thread that joined the network namespace
``netns`` (:func:`nicsim.ports.tap.in_netns`), so the process never moves; it is bound to
``local:port`` and sends to ``remote:port`` (Linux's ``dstport`` is likewise both the port a vxlan
device listens on and the one it sends to).

TX: every frame the guest sends goes out as one datagram, VXLAN header + frame, with one ``sendmsg`` of
two buffers (the header and a view of guest memory: no copy in Python). Source port: **fixed**, the
bound ``port``. RFC 7348 §5 recommends a source port hashed from the inner headers (Linux picks one in
its local port range) so that ECMP in the underlay spreads flows; one UDP socket has one port, and a
receiver must accept any source port, so a fixed one costs only that spreading. The socket sets
``IP_PMTUDISC_DO``: a datagram larger than the route's MTU is refused by the kernel (``EMSGSIZE``), so
the frame is dropped and counted (``tx_too_big``), never fragmented, as §4.3 asks of a VTEP ("VTEPs MUST
NOT fragment VXLAN packets"). Over a 1500-byte underlay the inner frame may be 1464 bytes: give the guest
an MTU of 1450 (``ip link set eth0 mtu 1450``, what Linux gives its own vxlan device), or the underlay
1550. A send that would block is dropped and counted (``tx_would_block``): nothing waits on the loop.

RX is pull-style, as the tap port's: when the device polls (the guest has buffers), datagrams are read
into one preallocated buffer until the socket is drained, checked, and the inner frame pushed to the sink
(the device; later, the switch, which uses this port as an uplink). Drained, the port watches the
socket with ``loop.add_reader`` and wakes the device when it is readable; the socket's receive queue is
the backlog. A datagram is accepted only from the configured ``remote`` IP (any source port: Linux hashes
it), with a valid header (see :func:`nicsim.ports.vxlan_wire.check`) and the configured VNI; anything else
is dropped and counted by reason (``rx_foreign_source``, ``rx_runt``, ``rx_bad_flags``,
``rx_bad_reserved``, ``rx_wrong_vni``). Datagrams the kernel dropped because the socket's receive queue
was full (the guest posted no buffers for a while) are counted too, as ``rx_socket_overflow``: read from
the socket's ``sk_drops`` (``SO_MEMINFO``) when stats are taken, so the hot path pays nothing for it.
There is no learning of remote VTEPs: one port, one remote.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.errors import LocalError
from nicsim.ports.base import Port, TxFrames
from nicsim.ports.tap import NETNS_DIR, in_netns, is_netns_name
from nicsim.ports.vxlan_wire import VXLAN_HLEN, VXLAN_PORT, check, check_vni, header

RX_BUF = 65536      # the largest UDP payload over IPv4 is 65507 bytes: a datagram is never truncated
RX_BURST_BYTES = 256 * 1024  # stop one poll after this much, so other rings get the loop
RX_BURST_READS = 1024  # ... or after this many reads, dropped ones included: junk cannot hold the loop
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
SO_MEMINFO = 55         # <asm-generic/socket.h>: the socket's memory counters, sk_drops among them
SK_MEMINFO_DROPS = 8    # <linux/sock_diag.h>: index of sk_drops in SO_MEMINFO's u32 array


class VxlanError(LocalError, OSError):
    """The tunnel's socket could not be opened or bound: ``step`` says which call."""

    def __init__(self, message: str, *, step: str, netns: str, err: int = 0) -> None:
        where = f" in netns {netns}" if netns else ""
        super().__init__(err, f"vxlan{where}: {step}: {message}")
        self.step = step
        self.netns = netns


@dataclass(frozen=True, kw_only=True)
class VxlanConfig:
    """``remote``: the other VTEP's IPv4 address (required); ``vni``: the 24-bit VXLAN network
    identifier (required, both ends must agree); ``local``: the address to bind (default: any);
    ``port``: the UDP port listened on, sent to and sent from (default 4789); ``netns``: the network
    namespace the socket lives in (default: nicsim's own)."""

    remote: str = ""
    vni: int = -1
    local: str = ""
    port: int = VXLAN_PORT
    netns: str = ""

    def check(self) -> None:
        try:
            ipaddress.IPv4Address(self.remote)
            if self.local:
                ipaddress.IPv4Address(self.local)
        except ValueError:
            raise ValueError(f"vxlan: remote={self.remote!r} local={self.local!r}: IPv4 addresses "
                             "are needed (remote= is required)") from None  # fmt: skip
        if self.vni < 0:
            raise ValueError("vxlan: vni= is required (0..16777215, the same at both ends)")
        check_vni(self.vni)
        if not 1 <= self.port <= 65535:
            raise ValueError(f"vxlan: port={self.port} is not a UDP port")
        if self.netns and not is_netns_name(self.netns):
            raise ValueError(f"vxlan: netns={self.netns!r} is not the name of a network namespace")


def _open_socket(config: VxlanConfig) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)  # refuse, never fragment
        sock.bind((config.local, config.port))
    except BaseException:
        sock.close()
        raise
    return sock


class VxlanPort(Port):
    """A VXLAN tunnel to one remote VTEP as the other end of the wire (one queue pair, bare frames)."""

    name = "vxlan"

    def __init__(self, config: VxlanConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        if config.netns and not (NETNS_DIR / config.netns).exists():
            raise VxlanError("no such network namespace (ip netns add it first)", step="setns",
                             netns=config.netns, err=errno.ENOENT)  # fmt: skip
        try:
            if config.netns:
                sock = in_netns(config.netns, lambda: _open_socket(config))
            else:
                sock = _open_socket(config)
        except OSError as err:
            raise VxlanError(err.strerror or str(err), step=f"bind {config.local or '*'}:{config.port}",
                             netns=config.netns, err=err.errno or 0) from err  # fmt: skip
        self._sock: socket.socket | None = sock
        self._remote = (config.remote, config.port)
        self._hdr = header(config.vni)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False  # the socket is watched (it was drained)
        self._idle = True
        self._rxbuf: npt.NDArray[np.uint8] = np.zeros(RX_BUF, np.uint8)
        self._rxview = self._rxbuf.data  # recvfrom_into's target, made once
        self.counters: dict[str, int] = {"tx_frames": 0, "tx_bytes": 0, "rx_frames": 0, "rx_bytes": 0}
        self.drops: dict[str, int] = {}
        self._closed_socket_drops = 0

    def start_io(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watch()

    # -- TX: guest -> remote VTEP -----------------------------------------------------------------

    def transmit(self, batch: TxFrames) -> bool:
        sock = self._sock
        if sock is None:
            self._drop("closed", batch.count)
            return True
        hdr, remote, lengths = self._hdr, self._remote, batch.lengths
        sent = nbytes = 0
        for i in range(batch.count):
            try:
                sock.sendmsg([hdr, batch.frame(i).data], (), 0, remote)
            except BlockingIOError:
                self._drop("tx_would_block")
                continue
            except OSError as err:
                reason = "too_big" if err.errno == errno.EMSGSIZE else \
                    errno.errorcode.get(err.errno or 0, "error").lower()  # fmt: skip
                self._drop(f"tx_{reason}")
                continue
            sent += 1
            nbytes += int(lengths[i])
        self.counters["tx_frames"] += sent
        self.counters["tx_bytes"] += nbytes
        return True

    # -- RX: remote VTEP -> guest (pull) ----------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True while the socket has nothing to read: the RX pump may sleep; the fd watch wakes it."""
        return self._idle

    def poll_rx(self, pair: int, budget: int, now: float) -> int:
        sock = self._sock
        if pair != 0 or sock is None:
            return 0
        buf, view, vni, remote_ip = self._rxbuf, self._rxview, self.config.vni, self.config.remote
        frames = nbytes = reads = 0
        while frames < budget and nbytes < RX_BURST_BYTES and reads < RX_BURST_READS:
            reads += 1
            try:
                n, (src, _sport) = sock.recvfrom_into(view)
            except InterruptedError:
                continue
            except BlockingIOError:
                self._idle = True
                self._watch()
                break
            except OSError as err:  # e.g. ECONNREFUSED from an ICMP port unreachable the remote sent
                self._drop(f"rx_{errno.errorcode.get(err.errno or 0, 'error').lower()}")
                continue
            if src != remote_ip:
                self._drop("rx_foreign_source")
                continue
            reason = check(view, n, vni)
            if reason is not None:
                self._drop(f"rx_{reason}")
                continue
            if not self.sink.push(buf[VXLAN_HLEN:n]):  # the device steers it to a pair
                continue  # the device counted it (no_rx_buffer / too_big)
            frames += 1
            nbytes += n - VXLAN_HLEN
        self.counters["rx_frames"] += frames
        self.counters["rx_bytes"] += nbytes
        return frames

    def _on_readable(self) -> None:
        # Level-triggered: stop watching until a poll drains the socket again, and let the device poll
        # us (it does so only while the guest has buffers: the socket's queue is the backlog).
        self._unwatch()
        self._idle = False
        if self._sink is not None:
            self.sink.wake(0)

    def _watch(self) -> None:
        if self._loop is not None and self._sock is not None and not self._reading:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._reading = True

    def _unwatch(self) -> None:
        if self._loop is not None and self._sock is not None and self._reading:
            self._loop.remove_reader(self._sock.fileno())
        self._reading = False

    # -- bookkeeping ------------------------------------------------------------------------------

    def _drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    def close(self) -> None:
        self._unwatch()
        if self._sock is not None:
            self._closed_socket_drops = self._socket_drops()  # keep the count the stats showed
            self._sock.close()
            self._sock = None
        super().close()

    def _socket_drops(self) -> int:
        """Datagrams the kernel dropped before we read them (a full receive queue): ``sk_drops``."""
        if self._sock is None:
            return self._closed_socket_drops
        try:
            info = self._sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (SK_MEMINFO_DROPS + 1))
        except OSError:  # a kernel without SO_MEMINFO (before 4.6): not counted
            return 0
        return int(struct.unpack_from("=I", info, 4 * SK_MEMINFO_DROPS)[0])

    def stats(self) -> dict[str, Any]:
        c = self.config
        drops = dict(self.drops)
        if overflow := self._socket_drops():
            drops["rx_socket_overflow"] = overflow
        return {**self.counters, "drops": drops, "remote": c.remote, "local": c.local,
                "port": c.port, "vni": c.vni, "netns": c.netns}  # fmt: skip
