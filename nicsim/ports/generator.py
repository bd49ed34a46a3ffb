"""The generator port: sends UDP frames of one size into the guest, as many or as fast as configured.

It builds one template frame at start and, each time the device polls it, asks the sink to write that
template into as many guest RX buffers as the budget, the remaining count and the rate allow: one
vectorised scatter per poll, nothing per packet. The rate is a token bucket fed by the ``now`` the
device passes in, so the port itself reads no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nicsim.ports import frames as fr
from nicsim.ports.base import Port, TxFrames


@dataclass(frozen=True, kw_only=True)
class GeneratorConfig:
    size: int = 64                  # frame length handed to the guest, no FCS
    count: int | None = None        # None: unbounded
    rate_pps: float | None = None   # None: as fast as the guest posts buffers
    burst: int = 256                # token bucket depth when rate-limited
    dst_mac: str = "52:54:00:12:34:56"
    src_mac: str = "52:54:00:00:00:02"
    src_ip: str = "10.0.2.2"
    dst_ip: str = "10.0.2.15"
    sport: int = 9
    dport: int = 9
    # 0: send UDP checksum 0 ("none", RFC 768), as DPDK testpmd's txonly does. A guest verifies a
    # real checksum in software (nicsim offers no GUEST_CSUM), which costs it per byte under TCG.
    udp_checksum: bool = True


class GeneratorPort(Port):
    name = "generator"

    def __init__(self, config: GeneratorConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or GeneratorConfig()
        frame = fr.udp_frame(
            dst_mac=fr.mac_bytes(c.dst_mac), src_mac=fr.mac_bytes(c.src_mac),
            src_ip=fr.ip_bytes(c.src_ip), dst_ip=fr.ip_bytes(c.dst_ip),
            sport=c.sport, dport=c.dport, size=c.size,
        )
        self.template = np.frombuffer(frame, dtype=np.uint8).copy()
        if not c.udp_checksum:
            self.template[fr.ETH_HLEN + fr.IPV4_HLEN + 6 : fr.ETH_HLEN + fr.IPV4_HLEN + 8] = 0
        self.sent = 0
        self.tx_ignored = 0
        self._tokens = float(c.burst)
        self._last: float | None = None

    @property
    def finished(self) -> bool:
        return self.config.count is not None and self.sent >= self.config.count

    def transmit(self, batch: TxFrames) -> bool:
        self.tx_ignored += batch.count
        return True

    def poll_rx(self, pair: int, budget: int, now: float) -> int:
        n = budget
        if self.config.count is not None:
            n = min(n, self.config.count - self.sent)
        rate = self.config.rate_pps
        if rate is not None:
            if self._last is not None:
                self._tokens = min(float(self.config.burst), self._tokens + (now - self._last) * rate)
            self._last = now
            n = min(n, int(self._tokens))
        if n <= 0:
            return 0
        delivered = self.sink.push_template(self.template, n, pair=pair)
        self.sent += delivered
        if rate is not None:
            self._tokens -= delivered
        return delivered

    def stats(self) -> dict[str, Any]:
        return {"sent": self.sent, "size": self.config.size, "tx_ignored": self.tx_ignored}
