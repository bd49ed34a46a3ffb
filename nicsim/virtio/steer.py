"""Which receive queue pair a frame goes to when the port does not say (virtio 1.2 §5.1.6.5.5, "Automatic
receive steering in multiqueue mode").

This module owns the choice the device makes for frames a port pushes without a ``pair``: the switch's
frames from another guest, the tap's and the vxlan tunnel's frames from the kernel. A frame goes to one
of the pairs whose RX ring runs and is enabled, picked by a hash of its flow (IPv4/IPv6 addresses and,
for an unfragmented TCP or UDP packet, ports; else the two MAC addresses), so that one flow stays on one
queue and keeps its order, and different flows spread over the pairs the guest enabled. This is what a
hardware NIC does with RSS, and what the guest expects without RSS: any queue may carry any flow, a
flow's packets should not be reordered. Delivering each flow on the pair its TX came from (what
``VIRTIO_NET_F_RSS``-less automatic steering describes) needs a flow table filled from every TX frame;
a hash needs no state and gives the same per-flow order. Ports that answer a request (the responder,
reflect) pass the pair the request came from: its RX ring is enabled, since the guest sent on that pair.
The hash reads a few header bytes per frame; with one queue pair nothing is read at all.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_IPV4 = (0x08, 0x00)
_IPV6 = (0x86, 0xDD)
_PORTS = (6, 17)  # TCP, UDP


def flow_hash(frame: npt.NDArray[np.uint8], hdr: int = 0) -> int:
    """A hash of the flow of ``frame`` (an Ethernet frame after ``hdr`` bytes of virtio-net header)."""
    f = frame[hdr:]
    n = int(f.shape[0])
    if n < 14:
        return zlib.crc32(f.tobytes())
    et = (int(f[12]), int(f[13]))
    if et == _IPV4 and n >= 34:
        key = f[23:24].tobytes() + f[26:34].tobytes()
        l4 = 14 + (int(f[14]) & 0xF) * 4
        fragment = (int(f[20]) & 0x3F) | int(f[21])  # MF or an offset: no ports in this packet
        if int(f[23]) in _PORTS and not fragment and n >= l4 + 4:
            key += f[l4 : l4 + 4].tobytes()
        return zlib.crc32(key)
    if et == _IPV6 and n >= 54:
        key = f[20:21].tobytes() + f[22:54].tobytes()
        if int(f[20]) in _PORTS and n >= 58:
            key += f[54:58].tobytes()
        return zlib.crc32(key)
    return zlib.crc32(f[:12].tobytes())


def pick_pair(frame: npt.NDArray[np.uint8], pairs: Sequence[int], hdr: int = 0) -> int:
    """The pair among ``pairs`` (the enabled ones, not empty) that ``frame``'s flow goes to."""
    if len(pairs) == 1:
        return pairs[0]
    return pairs[flow_hash(frame, hdr) % len(pairs)]
