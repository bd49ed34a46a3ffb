"""Which receive queue pair a frame goes to when the port does not say (virtio 1.2 §5.1.6.5.5, "Automatic
receive steering in multiqueue mode").

This module owns the choice the device makes for frames a port pushes without a ``pair``: the switch's
frames from another guest, the tap's and the vxlan tunnel's frames from the kernel. §5.1.6.5.5: after the
driver transmitted a packet of a flow on transmitqX, the device SHOULD steer the flow's incoming packets
to receiveqX. :class:`FlowSteering` does that with a small table, indexed by a hash of the flow that is
the same in both directions (IPv4/IPv6 addresses and, for an unfragmented TCP or UDP packet, ports;
else the two MAC addresses), holding the pair each flow last transmitted on. A flow the guest has not
sent on yet (the first packet from outside), or whose pair is no longer enabled, goes to one of the
enabled pairs by the same hash: one flow stays on one queue, in order, and flows spread over the pairs
the guest enabled, as RSS would spread them. Two flows that share a table slot share a queue, which costs
nothing but balance. Ports that answer a request (the responder, reflect) pass the pair the request came
from themselves. Only a device with several pairs hashes anything: one header slice and a CRC per frame.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_IPV4 = (0x08, 0x00)
_IPV6 = (0x86, 0xDD)
_PORTS = (6, 17)  # TCP, UDP
SLOTS = 4096


def _ordered(a: bytes, b: bytes) -> bytes:
    return a + b if a <= b else b + a


def flow_hash(frame: npt.NDArray[np.uint8], hdr: int = 0) -> int:
    """A hash of the flow of ``frame`` (an Ethernet frame after ``hdr`` bytes of virtio-net header),
    the same for both directions of the flow."""
    f = frame[hdr:]
    n = int(f.shape[0])
    if n < 14:
        return zlib.crc32(f.tobytes())
    et = (int(f[12]), int(f[13]))
    if et == _IPV4 and n >= 34:
        proto = int(f[23])
        src, dst = f[26:30].tobytes(), f[30:34].tobytes()
        l4 = 14 + (int(f[14]) & 0xF) * 4
        fragment = (int(f[20]) & 0x3F) | int(f[21])  # MF or an offset: no ports in this packet
        if proto in _PORTS and not fragment and n >= l4 + 4:
            src += f[l4 : l4 + 2].tobytes()
            dst += f[l4 + 2 : l4 + 4].tobytes()
        return zlib.crc32(bytes([proto]) + _ordered(src, dst))
    if et == _IPV6 and n >= 54:
        proto = int(f[20])
        src, dst = f[22:38].tobytes(), f[38:54].tobytes()
        if proto in _PORTS and n >= 58:
            src += f[54:56].tobytes()
            dst += f[56:58].tobytes()
        return zlib.crc32(bytes([proto]) + _ordered(src, dst))
    return zlib.crc32(_ordered(f[0:6].tobytes(), f[6:12].tobytes()))


def pick_pair(frame: npt.NDArray[np.uint8], pairs: Sequence[int], hdr: int = 0) -> int:
    """The pair among ``pairs`` (the enabled ones, not empty) that ``frame``'s flow hashes to."""
    if len(pairs) == 1:
        return pairs[0]
    return pairs[flow_hash(frame, hdr) % len(pairs)]


class FlowSteering:
    """The pair each flow last transmitted on (by hash slot), and the choice of an RX pair from it."""

    def __init__(self, slots: int = SLOTS) -> None:
        self._last: npt.NDArray[np.int16] = np.full(slots, -1, np.int16)

    def transmitted(self, frame: npt.NDArray[np.uint8], pair: int) -> None:
        """The guest sent ``frame`` (no virtio-net header) on ``pair``."""
        self._last[flow_hash(frame) % self._last.shape[0]] = pair

    def pick(self, frame: npt.NDArray[np.uint8], pairs: Sequence[int], hdr: int = 0) -> int:
        """The RX pair for ``frame``: its flow's TX pair if that is among ``pairs`` (the enabled ones,
        not empty), else the one the flow hashes to."""
        h = flow_hash(frame, hdr)
        last = int(self._last[h % self._last.shape[0]])
        if last in pairs:
            return last
        return pairs[h % len(pairs)]

    def clear(self) -> None:
        self._last[:] = -1
