"""The VXLAN header (RFC 7348 §5), I/O-free: build it for a VNI, and check a received datagram's.

This module owns the 8 bytes a VTEP puts in front of an Ethernet frame inside a UDP payload::

    byte 0      flags: 0x08, the I bit (the VNI is valid); the other 7 bits are reserved
    bytes 1-3   reserved, 0
    bytes 4-6   VNI, 24 bits, big-endian
    byte 7      reserved, 0

and the rule a receiver applies to one. RFC 7348 says reserved bits are "ignored on receipt"; Linux's
``vxlan`` driver (``vxlan_rcv``) instead drops a datagram with any reserved bit set unless an extension
(GBP, GPE, RCO) that defines it was configured, because such a datagram may not carry an Ethernet frame
at all (VXLAN-GPE's next-protocol field). We interoperate with Linux and follow it: any reserved bit set
is a drop (``bad_flags`` in the flags word, ``bad_reserved`` in the last byte). Nothing here raises on
input from the wire: :func:`check` returns a drop reason or ``None``.
"""

from __future__ import annotations

import struct

from nicsim.virtio.port import ETH_HLEN

Bytes = bytes | bytearray | memoryview  # what struct reads (an ndarray: pass its .data)

VXLAN_PORT = 4789       # IANA's port for VXLAN (RFC 7348 §5); Linux's `ip link ... type vxlan` default too
VXLAN_HLEN = 8
FLAG_I = 0x08           # the I bit of the flags byte: the VNI field is valid
VNI_MAX = (1 << 24) - 1
# What an IPv4 underlay carries besides the inner frame: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
# With a 1500-byte underlay MTU the inner frame may be 1464 bytes (inner IP MTU 1450), the figure Linux
# gives a vxlan device it creates over a 1500-byte lower device.
OVERHEAD = 14 + 20 + 8 + VXLAN_HLEN
MIN_DATAGRAM = VXLAN_HLEN + ETH_HLEN  # a header and at least an Ethernet header behind it

_WORDS = struct.Struct("!II")  # flags + reserved (32 bits), VNI << 8 | reserved (32 bits)
_FLAGS_WORD = FLAG_I << 24


def check_vni(vni: int) -> int:
    if not 0 <= vni <= VNI_MAX:
        raise ValueError(f"vxlan: vni={vni} is outside 0..{VNI_MAX} (24 bits)")
    return vni


def header(vni: int) -> bytes:
    """The 8-byte VXLAN header for ``vni`` (the I bit set, every reserved bit 0, as §5 requires)."""
    return _WORDS.pack(_FLAGS_WORD, check_vni(vni) << 8)


def check(datagram: Bytes, length: int, vni: int) -> str | None:
    """Why the first ``length`` bytes of a UDP payload are not a VXLAN frame for ``vni``, or ``None`` if
    they are (the inner frame is then ``datagram[VXLAN_HLEN:length]``). Reasons, in the order checked:
    ``runt`` (shorter than a header plus an Ethernet header), ``bad_flags`` (I bit clear or a reserved
    bit of the first word set), ``bad_reserved`` (the last byte not 0), ``wrong_vni``."""
    if length < MIN_DATAGRAM:
        return "runt"
    flags, word = _WORDS.unpack_from(datagram, 0)
    if flags != _FLAGS_WORD:
        return "bad_flags"
    if word & 0xFF:
        return "bad_reserved"
    if word >> 8 != vni:
        return "wrong_vni"
    return None


def vni_of(datagram: Bytes) -> int:
    """The VNI field of a header (whatever its flags say)."""
    return int(_WORDS.unpack_from(datagram, 0)[1] >> 8)
