"""The virtio-net header a guest puts before every TX frame (virtio 1.2 §5.1.6), read and checked.

This module owns the header's layout (:data:`HDR_DTYPE`, the ten bytes before ``num_buffers``), its flags
and GSO types, :class:`Offloads` (what negotiated features let a driver ask for on TX, or take on RX),
:func:`check` (a batch of headers against what the driver may ask: one reason code per frame,
:data:`REASONS`; :func:`check_one` for one frame, with plain ints), :func:`tcp_layout` (where a GSO
frame's IP and TCP headers are, every offset checked against the frame's length) and :func:`split_frames`
(a header-passing port's TX batch as bare frames and a header array). The tap checks a guest's headers
here before its kernel does the work they ask for; the switch checks them here before it passes them on or
does the work itself (:mod:`nicsim.ports.gso`). Nothing here trusts a header: every field is bounded
before it is used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from nicsim.virtio.features import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    has,
    mask,
)
from nicsim.virtio.port import ETH_HLEN, MAX_FRAME, TxFrames
from nicsim.virtio.tx import TxBatch

__all__ = [
    "F_DATA_VALID",
    "F_NEEDS_CSUM",
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "HDR_DTYPE",
    "HDR_FIELDS",
    "NONE",
    "OFFLOADS",
    "OK",
    "REASONS",
    "Headers",
    "Offloads",
    "TcpLayout",
    "check",
    "check_one",
    "fields",
    "read_headers",
    "reason_code",
    "split_frames",
    "tcp_layout",
]  # fmt: skip

# The offloads a port can honour by passing the header on (virtio 1.2 §5.1.3; no ECN, no UFO).
OFFLOADS: Final = mask((
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
))  # fmt: skip
HDR_FIELDS: Final = 10  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: what travels
HDR_DTYPE: Final = np.dtype([("flags", "u1"), ("gso_type", "u1"), ("hdr_len", "<u2"), ("gso_size", "<u2"),
                             ("csum_start", "<u2"), ("csum_offset", "<u2")])  # fmt: skip
F_NEEDS_CSUM: Final = 1  # §5.1.6.2: the checksum from csum_start on is to be completed
F_DATA_VALID: Final = 2
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80

# Reason codes of :func:`check` and :func:`tcp_layout`; REASONS[code] is the drop reason counted.
OK: Final = 0
NOT_NEGOTIATED, BAD_CSUM, BAD_GSO_SIZE, BAD_HDR_LEN, TOO_BIG, BAD_GSO_FRAME = 1, 2, 3, 4, 5, 6
REASONS: Final = ("ok", "tx_offload_not_negotiated", "bad_csum_offset", "bad_gso_size", "bad_hdr_len",
                  "too_big", "bad_gso_frame")  # fmt: skip

ETH_P_IPV4, ETH_P_IPV6, ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
IPPROTO_TCP = 6

Headers = npt.NDArray[np.uint8]  # (n, HDR_FIELDS)
Frame = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Offloads:
    """Checksum and TCP segmentation offloads, one way: what a driver may ask of the other side on TX
    (:meth:`tx`), or what it takes on RX (:meth:`rx`). TSO needs the checksum offload (§5.1.3.1)."""

    csum: bool = False
    tso4: bool = False
    tso6: bool = False

    @classmethod
    def tx(cls, features: int) -> Offloads:
        csum = has(features, VIRTIO_NET_F_CSUM)
        return cls(csum, csum and has(features, VIRTIO_NET_F_HOST_TSO4),
                   csum and has(features, VIRTIO_NET_F_HOST_TSO6))  # fmt: skip

    @classmethod
    def rx(cls, features: int) -> Offloads:
        csum = has(features, VIRTIO_NET_F_GUEST_CSUM)
        return cls(csum, csum and has(features, VIRTIO_NET_F_GUEST_TSO4),
                   csum and has(features, VIRTIO_NET_F_GUEST_TSO6))  # fmt: skip

    @property
    def any(self) -> bool:
        return self.csum or self.tso4 or self.tso6

    def names(self) -> list[str]:
        """The offloads on, by name (``csum``, ``tso4``, ``tso6``): for stats."""
        return [n for n, on in (("csum", self.csum), ("tso4", self.tso4), ("tso6", self.tso6)) if on]


NONE: Final = Offloads()


def fields(headers: Headers) -> npt.NDArray[np.void]:
    """The (n, HDR_FIELDS) byte rows as n structured records (a view)."""
    return np.ascontiguousarray(headers).view(HDR_DTYPE).reshape(-1)


def check(headers: Headers, lengths: npt.NDArray[np.uint32], allowed: Offloads) -> npt.NDArray[np.uint8]:
    """A reason code per frame (:data:`OK` or an index into :data:`REASONS`) for TX headers ``headers``
    of frames ``lengths`` long (header excluded), from a driver that may ask for ``allowed``: only the
    offloads it negotiated (§5.1.6.2.1), a checksum field inside the frame, a GSO size, a header length
    within the frame, no frame longer than :data:`~nicsim.virtio.port.MAX_FRAME`."""
    h = fields(headers)
    n = lengths.astype(np.int64)
    flags, gso = h["flags"], h["gso_type"]
    csum = (flags & F_NEEDS_CSUM) != 0
    known = (gso == GSO_NONE) | ((gso == GSO_TCPV4) & allowed.tso4) | ((gso == GSO_TCPV6) & allowed.tso6)
    refused = ~known | (csum & (not allowed.csum))
    bad_csum = csum & (h["csum_start"].astype(np.int64) + h["csum_offset"] + 2 > n)
    is_gso = gso != GSO_NONE
    codes = np.zeros(n.shape[0], np.uint8)
    # The first problem found is the one counted: later assignments lose to earlier ones.
    for code, hit in ((BAD_HDR_LEN, is_gso & (h["hdr_len"] > n)),
                      (BAD_GSO_SIZE, is_gso & (h["gso_size"] == 0)), (BAD_CSUM, bad_csum),
                      (TOO_BIG, n > MAX_FRAME), (NOT_NEGOTIATED, refused)):  # fmt: skip
        codes[hit] = code
    return codes


_HDR = struct.Struct("<BBHHHH")  # HDR_DTYPE's fields, for one header read with plain ints


def check_one(header: npt.NDArray[np.uint8], length: int, allowed: Offloads) -> int:
    """:func:`check` for one frame, with plain ints (a request's round of one or two frames, where
    numpy's per-call cost is most of the work): ``header`` holds at least :data:`HDR_FIELDS` bytes,
    ``length`` is the frame's, header excluded. The same code, by the same precedence."""
    flags, gso, hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(header)  # type: ignore[arg-type]
    return reason_code(flags, gso, hdr_len, gso_size, csum_start, csum_offset, length, allowed.csum,
                       allowed.tso4, allowed.tso6)  # fmt: skip


def reason_code(
    flags: int, gso: int, hdr_len: int, gso_size: int, csum_start: int, csum_offset: int, length: int,
    csum_ok: bool, tso4_ok: bool, tso6_ok: bool,
) -> int:  # fmt: skip
    """:func:`check_one` on the header's fields as ints, the allowed offloads as flags: plain Python
    that numba also compiles (the tap's send kernel, ``nicsim.ports.fd_kernels``, checks with it)."""
    csum = flags & F_NEEDS_CSUM != 0
    known = gso == GSO_NONE or (gso == GSO_TCPV4 and tso4_ok) or (gso == GSO_TCPV6 and tso6_ok)
    if not known or (csum and not csum_ok):
        return NOT_NEGOTIATED
    if length > MAX_FRAME:
        return TOO_BIG
    if csum and csum_start + csum_offset + 2 > length:
        return BAD_CSUM
    if gso != GSO_NONE and gso_size == 0:
        return BAD_GSO_SIZE
    if gso != GSO_NONE and hdr_len > length:
        return BAD_HDR_LEN
    return OK


@dataclass(frozen=True)
class TcpLayout:
    """Where a TCP/IP frame's headers are: IP at ``l3`` (version 4 or 6), TCP at ``l4``, payload at
    ``payload`` (all offsets into the Ethernet frame)."""

    l3: int
    l4: int
    payload: int
    ipv6: bool


def tcp_layout(frame: Frame, gso_type: int) -> TcpLayout | None:
    """The headers of a GSO frame of ``gso_type`` (TCPV4: IPv4 + TCP; TCPV6: IPv6 + TCP, no extension
    headers), or None when the frame is not that (too short, another protocol, a bad header length)."""
    n = int(frame.shape[0])
    l3 = ETH_HLEN
    if n < l3 + 20:
        return None
    ethertype = int(frame[12]) << 8 | int(frame[13])
    if ethertype == ETH_P_8021Q:
        l3 += 4
        ethertype = int(frame[16]) << 8 | int(frame[17])
    if gso_type == GSO_TCPV4:
        if ethertype != ETH_P_IPV4 or n < l3 + 20 or int(frame[l3]) >> 4 != 4:
            return None
        ihl = (int(frame[l3]) & 0xF) * 4
        if ihl < 20 or int(frame[l3 + 9]) != IPPROTO_TCP:
            return None
        l4 = l3 + ihl
    elif gso_type == GSO_TCPV6:
        if ethertype != ETH_P_IPV6 or n < l3 + 40 or int(frame[l3]) >> 4 != 6:
            return None
        if int(frame[l3 + 6]) != IPPROTO_TCP:
            return None
        l4 = l3 + 40
    else:
        return None
    if n < l4 + 20:
        return None
    thl = (int(frame[l4 + 12]) >> 4) * 4
    if thl < 20 or n < l4 + thl:
        return None
    return TcpLayout(l3=l3, l4=l4, payload=l4 + thl, ipv6=gso_type == GSO_TCPV6)


def split_frames(batch: TxFrames, hdr_len: int) -> tuple[list[Frame], Headers]:
    """A header-passing port's batch as bare frames (views of guest memory when a frame sits in one
    segment, else gathered) and their headers, (count, HDR_FIELDS) bytes; ``hdr_len``: the header
    length negotiated (10 or 12)."""
    if isinstance(batch, TxBatch) and batch.count > 2:  # (a frame or two: the loop below costs less)
        bare = batch.bare_frames(hdr_len)
        if bare is not None:
            return bare[0], np.ascontiguousarray(bare[1][:, :HDR_FIELDS])
    count = batch.count
    headers = np.empty((count, HDR_FIELDS), np.uint8)
    frames: list[Frame] = []
    for i in range(count):
        parts = batch.iovec(i)
        first = parts[0]
        if first.shape[0] < HDR_FIELDS:
            first = np.concatenate(parts)
            parts = [first]
        headers[i] = first[:HDR_FIELDS]
        # Linux puts the header in a descriptor of its own when it cannot push it in front of the
        # frame (TCP's cloned skbs): the frame is then often one view.
        skip = hdr_len
        while parts and skip >= parts[0].shape[0]:
            skip -= parts[0].shape[0]
            parts = parts[1:]
        if not parts:
            frames.append(first[:0])
        elif len(parts) == 1:
            frames.append(parts[0][skip:])
        else:
            frames.append(np.concatenate(parts)[skip:])
    return frames, headers


def read_headers(batch: TxFrames) -> Headers:
    """The headers of a header-passing port's batch, (count, HDR_FIELDS) bytes; the frames untouched."""
    headers = np.empty((batch.count, HDR_FIELDS), np.uint8)
    for i in range(batch.count):
        parts = batch.iovec(i)
        first = parts[0] if parts[0].shape[0] >= HDR_FIELDS else np.concatenate(parts)
        headers[i] = first[:HDR_FIELDS]
    return headers
