"""The responder port (the default): a tiny host that answers ARP, ICMP echo and UDP echo.

It owns one IPv4 address and MAC (default 10.0.2.2 / 52:54:00:00:00:02) so that a guest can ping
nicsim, or send to UDP port 7, with no host setup. Replies carry correct IPv4, ICMP and UDP checksums
and go back on the queue pair the request came from. Everything else is counted and ignored. Requests
are handled one frame at a time, which is fine for a port meant for reachability checks, not bulk data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nicsim.ports import frames as fr
from nicsim.ports.base import Port, TxFrames

UDP_ECHO_PORT = 7


@dataclass(frozen=True, kw_only=True)
class ResponderConfig:
    ip: str = "10.0.2.2"
    mac: str = "52:54:00:00:00:02"
    udp_echo_port: int = UDP_ECHO_PORT


class ResponderPort(Port):
    name = "responder"

    def __init__(self, config: ResponderConfig | None = None) -> None:
        super().__init__()
        self.config = config or ResponderConfig()
        self._ip = fr.ip_bytes(self.config.ip)
        self._mac = fr.mac_bytes(self.config.mac)
        self.counters = {"arp": 0, "icmp_echo": 0, "udp_echo": 0, "ignored": 0, "malformed": 0, "dropped": 0}

    def transmit(self, batch: TxFrames) -> bool:
        for i in range(batch.count):
            frame = batch.frame(i)
            # Cheap ethertype check on two bytes before turning the frame into Python bytes.
            ethertype = (int(frame[12]) << 8) | int(frame[13])
            if ethertype not in (fr.ETHERTYPE_ARP, fr.ETHERTYPE_IPV4):
                self.counters["ignored"] += 1
                continue
            try:
                reply, kind = self._answer(fr.parse_ethernet(frame))
            except fr.FrameError:
                self.counters["malformed"] += 1
                continue
            if reply is None:
                self.counters["ignored"] += 1
            elif self.sink.push(reply, pair=batch.pair):
                self.counters[kind] += 1
            else:
                self.counters["dropped"] += 1
        return True

    def _answer(self, eth: fr.EthernetFrame) -> tuple[bytes | None, str]:
        if eth.dst not in (self._mac, fr.BROADCAST_MAC):
            return None, "ignored"
        if eth.ethertype == fr.ETHERTYPE_ARP:
            req = fr.parse_arp(eth.payload)
            if req.op != fr.ARP_REQUEST or req.tpa != self._ip:
                return None, "ignored"
            body = fr.arp(fr.ARP_REPLY, self._mac, self._ip, req.sha, req.spa)
            return fr.ethernet(req.sha, self._mac, fr.ETHERTYPE_ARP, body), "arp"
        if eth.dst != self._mac:
            return None, "ignored"
        ip = fr.parse_ipv4(eth.payload)
        if ip.dst != self._ip or not ip.header_checksum_ok:
            return None, "ignored"
        if ip.proto == fr.IPPROTO_ICMP:
            icmp = fr.parse_icmp(ip.payload)
            if icmp.type != fr.ICMP_ECHO_REQUEST or not icmp.checksum_ok:
                return None, "ignored"
            body = fr.icmp_echo(fr.ICMP_ECHO_REPLY, icmp.ident, icmp.seq, icmp.data)
            kind = "icmp_echo"
        elif ip.proto == fr.IPPROTO_UDP:
            dgram = fr.parse_udp(ip)
            if dgram.dport != self.config.udp_echo_port or not dgram.checksum_ok:
                return None, "ignored"
            body = fr.udp(self._ip, ip.src, dgram.dport, dgram.sport, dgram.payload)
            kind = "udp_echo"
        else:
            return None, "ignored"
        packet = fr.ipv4(self._ip, ip.src, ip.proto, body, ident=ip.ident)
        return fr.ethernet(eth.src, self._mac, fr.ETHERTYPE_IPV4, packet), kind

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)
