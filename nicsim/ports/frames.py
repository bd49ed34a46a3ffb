"""Ethernet, ARP, IPv4, ICMP and UDP: building and parsing the few frames nicsim's own ports speak.

This module owns the wire formats (RFC 826, RFC 791, RFC 792, RFC 768) and the Internet checksum
(RFC 1071). Builders return ``bytes``; parsers take ``bytes`` or a uint8 numpy view and return small
frozen dataclasses, raising :class:`FrameError` (with ``layer`` and ``reason``) on anything malformed.
It is not on the bulk hot path: the sink and the generator never parse, and the generator builds its
template frame once.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import numpy as np

from nicsim.errors import RemoteError

# The device layer needs these two as well, so it owns them (it may not import a port).
from nicsim.virtio.port import ETH_HLEN as ETH_HLEN
from nicsim.virtio.port import Buffer as Buffer

ETH_ZLEN = 60  # minimum frame length without FCS; shorter frames are padded by the sender
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
IPPROTO_ICMP = 1
IPPROTO_UDP = 17
ARP_REQUEST = 1
ARP_REPLY = 2
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
IPV4_HLEN = 20
UDP_HLEN = 8
BROADCAST_MAC = b"\xff" * 6


class FrameError(RemoteError, ValueError):
    """A frame could not be parsed: ``layer`` names the header, ``reason`` what was wrong with it."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ip_bytes(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def ip_str(ip: bytes) -> str:
    return str(ipaddress.IPv4Address(ip))


def internet_checksum(data: Buffer) -> int:
    """RFC 1071 one's complement sum, folded and complemented; a valid header sums to 0."""
    arr = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if arr.size % 2:
        arr = np.concatenate([arr, np.zeros(1, np.uint8)])
    total = int(arr.view(">u2").sum(dtype=np.uint64))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


# -- builders -------------------------------------------------------------------------------------


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes, *, pad: bool = True) -> bytes:
    frame = dst + src + struct.pack("!H", ethertype) + payload
    if pad and len(frame) < ETH_ZLEN:
        frame += bytes(ETH_ZLEN - len(frame))
    return frame


def arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    # htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4 (RFC 826)
    return struct.pack("!HHBBH", 1, ETHERTYPE_IPV4, 6, 4, op) + sha + spa + tha + tpa


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl: int = 64, ident: int = 0) -> bytes:
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, IPV4_HLEN + len(payload), ident, 0x4000, ttl, proto, 0, src, dst
        )
    )
    struct.pack_into("!H", header, 10, internet_checksum(bytes(header)))
    return bytes(header) + payload


def icmp_echo(icmp_type: int, ident: int, seq: int, data: bytes) -> bytes:
    msg = bytearray(struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + data)
    struct.pack_into("!H", msg, 2, internet_checksum(bytes(msg)))
    return bytes(msg)


def udp(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    length = UDP_HLEN + len(payload)
    seg = bytearray(struct.pack("!HHHH", sport, dport, length, 0) + payload)
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, IPPROTO_UDP, length)
    csum = internet_checksum(pseudo + bytes(seg))
    # RFC 768: a computed 0 is sent as all ones (0 means "no checksum").
    struct.pack_into("!H", seg, 6, csum or 0xFFFF)
    return bytes(seg)


def udp_frame(
    *,
    dst_mac: bytes,
    src_mac: bytes,
    src_ip: bytes,
    dst_ip: bytes,
    sport: int,
    dport: int,
    size: int,
    ident: int = 0,
) -> bytes:
    """A UDP/IPv4 Ethernet frame of exactly ``size`` bytes (no FCS), payload filled with a counter."""
    overhead = ETH_HLEN + IPV4_HLEN + UDP_HLEN
    if size < overhead:
        raise ValueError(f"frame size {size} below the {overhead}-byte UDP/IPv4 headers")
    payload = bytes(i & 0xFF for i in range(size - overhead))
    l4 = udp(src_ip, dst_ip, sport, dport, payload)
    l3 = ipv4(src_ip, dst_ip, IPPROTO_UDP, l4, ident=ident)
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, l3, pad=False)


# -- parsers --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EthernetFrame:
    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes


@dataclass(frozen=True, kw_only=True)
class ArpPacket:
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes


@dataclass(frozen=True, kw_only=True)
class Ipv4Packet:
    src: bytes
    dst: bytes
    proto: int
    ttl: int
    ident: int
    header_checksum_ok: bool
    payload: bytes  # trimmed to total_length: Ethernet padding removed


@dataclass(frozen=True, kw_only=True)
class IcmpMessage:
    type: int
    code: int
    ident: int
    seq: int
    data: bytes
    checksum_ok: bool


@dataclass(frozen=True, kw_only=True)
class UdpDatagram:
    sport: int
    dport: int
    payload: bytes
    checksum_ok: bool  # True also when the sender sent no checksum (0)


def parse_ethernet(frame: Buffer) -> EthernetFrame:
    raw = bytes(frame)
    if len(raw) < ETH_HLEN:
        raise FrameError("ethernet", f"{len(raw)} bytes, shorter than the 14-byte header")
    (ethertype,) = struct.unpack_from("!H", raw, 12)
    return EthernetFrame(dst=raw[0:6], src=raw[6:12], ethertype=ethertype, payload=raw[ETH_HLEN:])


def parse_arp(payload: bytes) -> ArpPacket:
    if len(payload) < 28:
        raise FrameError("arp", f"{len(payload)} bytes, shorter than an Ethernet/IPv4 ARP packet")
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", payload)
    if (htype, ptype, hlen, plen) != (1, ETHERTYPE_IPV4, 6, 4):
        raise FrameError("arp", "not Ethernet/IPv4")
    return ArpPacket(op=op, sha=payload[8:14], spa=payload[14:18], tha=payload[18:24], tpa=payload[24:28])


def parse_ipv4(payload: bytes) -> Ipv4Packet:
    if len(payload) < IPV4_HLEN:
        raise FrameError("ipv4", f"{len(payload)} bytes, shorter than the header")
    ver_ihl, _, total, ident, frag, ttl, proto = struct.unpack_from("!BBHHHBB", payload)
    ihl = (ver_ihl & 0xF) * 4
    if ver_ihl >> 4 != 4 or ihl < IPV4_HLEN:
        raise FrameError("ipv4", f"bad version/IHL byte 0x{ver_ihl:02x}")
    if total < ihl or total > len(payload):
        raise FrameError("ipv4", f"total length {total} outside [{ihl}, {len(payload)}]")
    if frag & 0x3FFF:
        raise FrameError("ipv4", "fragment (not reassembled)")
    return Ipv4Packet(
        src=payload[12:16],
        dst=payload[16:20],
        proto=proto,
        ttl=ttl,
        ident=ident,
        header_checksum_ok=internet_checksum(payload[:ihl]) == 0,
        payload=payload[ihl:total],
    )


def parse_icmp(payload: bytes) -> IcmpMessage:
    if len(payload) < 8:
        raise FrameError("icmp", f"{len(payload)} bytes, shorter than an echo header")
    icmp_type, code, _, ident, seq = struct.unpack_from("!BBHHH", payload)
    return IcmpMessage(
        type=icmp_type, code=code, ident=ident, seq=seq, data=payload[8:],
        checksum_ok=internet_checksum(payload) == 0,
    )


def parse_udp(ip: Ipv4Packet) -> UdpDatagram:
    seg = ip.payload
    if len(seg) < UDP_HLEN:
        raise FrameError("udp", f"{len(seg)} bytes, shorter than the header")
    sport, dport, length, csum = struct.unpack_from("!HHHH", seg)
    if length < UDP_HLEN or length > len(seg):
        raise FrameError("udp", f"length field {length} outside [8, {len(seg)}]")
    seg = seg[:length]
    ok = True
    if csum:
        pseudo = ip.src + ip.dst + struct.pack("!BBH", 0, IPPROTO_UDP, length)
        ok = internet_checksum(pseudo + seg) == 0
    return UdpDatagram(sport=sport, dport=dport, payload=seg[UDP_HLEN:], checksum_ok=ok)
