"""The generator port: sends UDP frames of one size into the guest, as many or as fast as configured.

It builds one template frame at start and, each time the device polls it, asks the sink to write that
template into as many guest RX buffers as the budget, the remaining count and the rate allow: one
vectorised scatter per poll, nothing per packet. The rate is a token bucket fed by the ``now`` the
device passes in, so the port itself reads no clock.

Two options make it an RFC 2544 traffic generator (``nicsim bench --ndr``). With ``offered`` the
rate is an offered load, as on a wire: frames fall due at ``rate_pps`` whether or not the guest has
buffers posted, and a frame that falls due while the RX ring has no buffer left (beyond a FIFO of
``burst`` frames) is dropped and counted (``dropped``, reason ring full). Every frame of ``count`` is
then either ``sent`` (written into a guest buffer) or ``dropped``, so once ``finished`` the offered
count is exactly ``count`` and loss is ``count`` minus what the guest counted. With ``hold`` it
sends nothing until :meth:`GeneratorPort.start` (``nicsim serve`` calls it on SIGUSR1), so a trial's
burst starts inside the guest's counting window; the first poll after ``start`` is time zero.
``start`` may also give a new rate and count: each call is one burst (one trial), counted on its own
(``burst_sent``, ``burst_dropped``, ``bursts``) beside the running totals, so one guest can take a
whole search's trials.

With ``seq`` every frame is distinct: the first 8 bytes of its UDP payload are a running 64-bit
sequence number (big-endian, counting the frames delivered: the frames a guest receives are numbered
0, 1, 2... with no gap unless lost past the device) and its UDP checksum is the one for that payload.
A batch is built with numpy from the template: the numbers written into rows of a preallocated array,
each checksum the template's ones'-complement sum plus the number's four 16-bit words, folded
(RFC 1071 §2: the sum is incremental); the device copies the batch with :meth:`RxSink.push_many`.
A receiver that verifies checksums (a guest kernel: nicsim offers no GUEST_CSUM) then counts a frame
that reached it mixed with stale memory as a checksum error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

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
    # An offered load: frames due while the guest has no buffer posted are dropped and counted.
    offered: bool = False
    # Send nothing until start() is called (nicsim serve: SIGUSR1).
    hold: bool = False
    # Number every frame: a 64-bit sequence number leads the UDP payload, the checksum matches it.
    seq: bool = False
    # Offer mergeable RX buffers even when every frame fits a small one (DevicePort.small_frames).
    mergeable: bool = False


SEQ_OFFSET = fr.ETH_HLEN + fr.IPV4_HLEN + fr.UDP_HLEN  # the number: the UDP payload's first 8 bytes
SEQ_MIN_SIZE = SEQ_OFFSET + 8
_CSUM_OFFSET = fr.ETH_HLEN + fr.IPV4_HLEN + 6


def ones_sum(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Fold sums of 16-bit words to 16 bits (end-around carry, RFC 1071), element-wise."""
    for _ in range(4):  # 64 -> 49 -> 34 -> 19 -> 16 bits, at most
        words = (words & np.uint64(0xFFFF)) + (words >> np.uint64(16))
    return words


class SeqFrames:
    """Numbered copies of a UDP template, a batch at a time, into one preallocated array."""

    def __init__(self, template: npt.NDArray[np.uint8], *, checksum: bool) -> None:
        size = template.shape[0]
        if size < SEQ_MIN_SIZE:
            raise ValueError(f"generator seq=on: a numbered frame needs {SEQ_MIN_SIZE} bytes, not {size}")
        base = template.copy()
        base[SEQ_OFFSET : SEQ_OFFSET + 8] = 0
        self.checksum = checksum
        # The sum of the pseudo-header and the segment, checksum field 0, number 0 (uncomplemented).
        base[_CSUM_OFFSET : _CSUM_OFFSET + 2] = 0
        ip = fr.ETH_HLEN
        udp_len = size - fr.ETH_HLEN - fr.IPV4_HLEN
        pseudo = bytes(base[ip + 12 : ip + 20]) + bytes([0, fr.IPPROTO_UDP]) + udp_len.to_bytes(2, "big")
        seg = bytes(base[ip + fr.IPV4_HLEN :])
        self._base_sum = np.uint64((~fr.internet_checksum(pseudo + seg)) & 0xFFFF)
        self.template = base
        self.rows: npt.NDArray[np.uint8] = np.zeros((0, size), np.uint8)
        self.offsets: npt.NDArray[np.int64] = np.zeros(0, np.int64)
        self.lengths: npt.NDArray[np.uint32] = np.zeros(0, np.uint32)

    def build(self, first: int, n: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64],
                                                 npt.NDArray[np.uint32]]:  # fmt: skip
        """Frames numbered ``first .. first + n - 1``: (flat bytes, offsets, lengths), views valid
        until the next call."""
        if self.rows.shape[0] < n:
            cap = max(n, 2 * self.rows.shape[0])
            size = self.template.shape[0]
            self.rows = np.tile(self.template, (cap, 1))
            self.offsets = np.arange(cap, dtype=np.int64) * size
            self.lengths = np.full(cap, size, np.uint32)
        rows = self.rows[:n]
        seqs = np.arange(n, dtype=np.uint64) + np.uint64(first % 2**64)  # wraps at 2**64
        rows[:, SEQ_OFFSET : SEQ_OFFSET + 8] = seqs.astype(">u8").view(np.uint8).reshape(n, 8)
        if self.checksum:
            words = (seqs >> np.uint64(48)) + ((seqs >> np.uint64(32)) & np.uint64(0xFFFF)) \
                + ((seqs >> np.uint64(16)) & np.uint64(0xFFFF)) + (seqs & np.uint64(0xFFFF))
            csum = ~ones_sum(words + self._base_sum) & np.uint64(0xFFFF)
            csum[csum == 0] = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
            rows[:, _CSUM_OFFSET : _CSUM_OFFSET + 2] = csum.astype(">u2").view(np.uint8).reshape(n, 2)
        return self.rows.reshape(-1), self.offsets[:n], self.lengths[:n]


SMALL_FRAME = 1514
"""The longest frame a Linux guest's small receive buffer holds (an MTU of 1500 and its Ethernet header)."""


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
        self._seq = SeqFrames(self.template, checksum=c.udp_checksum) if c.seq else None
        # One frame over and over, unpaced by an offered load: the device may offer several rounds.
        self.bulk_rx = self._seq is None and not c.offered
        # One frame size, never a GSO frame: up to a standard Ethernet frame it fits a small buffer.
        self.small_frames = self.template.shape[0] <= SMALL_FRAME and not c.mergeable
        if c.offered and c.rate_pps is None:
            raise ValueError("generator offered=on needs a rate (rate_pps): an offered load has a rate")
        self.sent = 0
        self.dropped = 0  # offered mode: frames that fell due with no guest buffer to take them
        self.tx_ignored = 0
        self.held = c.hold
        self.bursts = 0
        self._burst_base = (0, 0)  # sent, dropped when the current burst started
        # An offered load starts from an empty bucket: the first frames fall due at the rate.
        self._tokens = 0.0 if c.offered else float(c.burst)
        self._last: float | None = None

    def start(self, *, rate_pps: float | None = None, count: int | None = None) -> None:
        """Start a burst: release a ``hold`` (the next poll is time zero), at a new ``rate_pps`` and
        ``count`` when given (a new burst of its own then, even if the last one has finished)."""
        if rate_pps is not None or count is not None:
            self.config = replace(self.config, rate_pps=rate_pps or self.config.rate_pps,
                                  count=count if count is not None else self.config.count)  # fmt: skip
            self._burst_base = (self.sent, self.dropped)
            self._tokens = 0.0 if self.config.offered else float(self.config.burst)
            self._last = None
        elif not self.held:
            return
        self.held = False
        self.bursts += 1
        self.sink.wake(0)

    @property
    def burst_sent(self) -> int:
        return self.sent - self._burst_base[0]

    @property
    def burst_dropped(self) -> int:
        return self.dropped - self._burst_base[1]

    @property
    def offered_count(self) -> int:
        """Frames this burst offered so far: sent into the guest's buffers or dropped for want of one."""
        return self.burst_sent + self.burst_dropped

    @property
    def finished(self) -> bool:
        return self.config.count is not None and self.offered_count >= self.config.count

    def transmit(self, batch: TxFrames) -> bool:
        self.tx_ignored += batch.count
        return True

    def poll_rx(self, pair: int, budget: int, now: float) -> int:
        if self.held:
            return 0
        if self.config.offered:
            return self._poll_offered(pair, budget, now)
        n = budget
        if self.config.count is not None:
            n = min(n, self.config.count - self.burst_sent)
        rate = self.config.rate_pps
        if rate is not None:
            if self._last is not None:
                self._tokens = min(float(self.config.burst), self._tokens + (now - self._last) * rate)
            self._last = now
            n = min(n, int(self._tokens))
        if n <= 0:
            return 0
        delivered = self._push(n, pair)
        self.sent += delivered
        if rate is not None:
            self._tokens -= delivered
        return delivered

    def _push(self, n: int, pair: int) -> int:
        if self._seq is None:
            return self.sink.push_template(self.template, n, pair=pair)
        # Numbered frames are distinct: copied through the backlog, which the round flushes at once
        # (n is within the buffers posted). A prefix is kept, so the numbers delivered stay consecutive.
        data, offsets, lengths = self._seq.build(self.sent, n)
        return self.sink.push_many(data, offsets, lengths, pair=pair)

    def _poll_offered(self, pair: int, budget: int, now: float) -> int:
        rate = self.config.rate_pps
        assert rate is not None  # checked in __init__
        if self._last is not None:
            self._tokens += (now - self._last) * rate
        self._last = now
        due = int(self._tokens)
        if self.config.count is not None:
            due = min(due, self.config.count - self.offered_count)
        if due <= 0:
            return 0
        delivered = self._push(min(due, budget), pair) if budget else 0
        self.sent += delivered
        self._tokens -= delivered
        left = due - delivered
        if left > 0 and self.sink.rx_space(pair) == 0:
            # No guest buffer: what the FIFO cannot hold is lost, as on a wire into a full ring.
            lost = max(left - self.config.burst, 0)
            self.dropped += lost
            self._tokens -= lost
        return delivered

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sent": self.sent, "size": self.config.size, "tx_ignored": self.tx_ignored}
        if self._seq is not None:
            out["next_seq"] = self.sent  # the number the next frame carries
        if self.config.offered:
            out.update(dropped=self.dropped, dropped_reason="ring_full", bursts=self.bursts,
                       burst={"count": self.config.count, "rate_pps": self.config.rate_pps,
                              "offered": self.offered_count, "sent": self.burst_sent,
                              "dropped": self.burst_dropped, "finished": self.finished})  # fmt: skip
        return out
