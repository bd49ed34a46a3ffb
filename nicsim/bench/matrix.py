"""The benchmark matrix: which cells exist, how long they take, and how repeated samples are summarised.

This module is pure (no I/O). A *cell* is one backend, one direction and one frame size; each cell is
run ``repetitions`` times, every run booting a fresh guest, and reported as min / median / max. Frame
sizes follow RFC 2544: ``size`` is the Ethernet frame *including* its 4-byte FCS, so a 64-byte cell
hands 60 bytes to the NIC (``frame_len``), and Gbit/s counts those frame bytes (no FCS, preamble or
gap) — the bytes that cross the virtqueue. ``--quick`` is a small matrix (one repetition, 64 and 1500
bytes, short durations) meant to end within two minutes; the full one says its expected duration up
front from ``estimate_seconds``.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

FCS_LEN = 4
FULL_SIZES = (64, 512, 1500)
QUICK_SIZES = (64, 1500)
FULL_DURATION = 5.0
QUICK_DURATION = 2.0
# A guest boot under TCG plus teardown, per run; a planning figure for the estimate, not a promise.
BOOT_OVERHEAD = 6.0


class Direction(enum.Enum):
    """What one cell measures, seen from the guest."""

    TX = "tx"  # guest transmits with pktgen; the backend sinks
    RX = "rx"  # the backend sends UDP frames into the guest; the guest counts
    TCP_TX = "tcp-tx"  # iperf3, guest -> host
    TCP_RX = "tcp-rx"  # iperf3, host -> guest
    PING = "ping"  # guest pings the host address behind the backend every 10 ms; RTT percentiles
    PING_FLOOD = "ping-flood"  # the same back to back: the next request as soon as the reply is in
    UDP_RR = "udp-rr"  # sockperf ping-pong: UDP request/response, one outstanding; transactions/s

    @property
    def is_tcp(self) -> bool:
        return self in (Direction.TCP_TX, Direction.TCP_RX)

    @property
    def is_latency(self) -> bool:
        """A request/response cell (one outstanding request): RTTs (and udp-rr's transactions/s), not
        a throughput; sizeless like TCP."""
        return self in LATENCY_DIRECTIONS

    @property
    def sizeless(self) -> bool:
        return self.is_tcp or self.is_latency


LATENCY_DIRECTIONS = (Direction.PING, Direction.PING_FLOOD, Direction.UDP_RR)


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One row of the result table: ``size`` is 0 for TCP cells (iperf3 picks its segment size) and for
    latency cells (ping's 64-byte ICMP echo, sockperf's 64-byte UDP message)."""

    backend: str
    direction: Direction
    size: int = 0

    @property
    def frame_len(self) -> int:
        """Bytes handed to the NIC per frame (``size`` without the FCS)."""
        return max(self.size - FCS_LEN, 0)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.backend, self.direction.value, self.size)

    def label(self) -> str:
        size = f"{self.size} B" if self.size else "-"
        return f"{self.backend} {self.direction.value} {size}"


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything one ``nicsim bench`` run will do: cells in order, repetitions and durations."""

    cells: tuple[Cell, ...]
    repetitions: int
    duration: float

    @property
    def runs(self) -> int:
        return len(self.cells) * self.repetitions

    def estimate_seconds(self, boot_overhead: float = BOOT_OVERHEAD) -> float:
        return self.runs * (self.duration + boot_overhead)


def build_plan(
    backends: Sequence[str],
    *,
    quick: bool,
    sizes: Sequence[int] | None = None,
    directions: Sequence[Direction] | None = None,
    repetitions: int | None = None,
    duration: float | None = None,
    latency: bool = False,
) -> Plan:
    """The cells for ``backends``: every direction at every size (TCP once, sizeless), per backend.

    Quick defaults: 1 repetition, 64 and 1500 bytes, 2 s, no host->guest TCP row; full: 3 repetitions,
    64/512/1500 bytes, 5 s, all four directions. Explicit arguments override either; ``latency`` adds
    the latency rows (``--latency``: ping, ping-flood, udp-rr) to whichever directions there are.
    """
    if not backends:
        raise ValueError("no backend to benchmark")
    sizes = tuple(sizes) if sizes else (QUICK_SIZES if quick else FULL_SIZES)
    for size in sizes:
        if not 64 <= size <= 1518:
            raise ValueError(f"frame size {size}: between 64 and 1518 bytes (with FCS, MTU 1500)")
    if directions is None:
        directions = (Direction.TX, Direction.RX, Direction.TCP_TX)
        if not quick:
            directions = (*directions, Direction.TCP_RX)
    if latency:
        directions = (*directions, *(d for d in LATENCY_DIRECTIONS if d not in directions))
    reps = repetitions if repetitions is not None else (1 if quick else 3)
    if reps < 1:
        raise ValueError(f"repetitions={reps}: at least 1")
    secs = duration if duration is not None else (QUICK_DURATION if quick else FULL_DURATION)
    if secs <= 0:
        raise ValueError(f"duration={secs}: must be positive")
    cells: list[Cell] = []
    for backend in backends:
        for direction in directions:
            if direction.sizeless:
                cells.append(Cell(backend=backend, direction=direction))
            else:
                cells.extend(Cell(backend=backend, direction=direction, size=s) for s in sizes)
    return Plan(cells=tuple(cells), repetitions=reps, duration=secs)


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Min / median / max of one measure over a cell's successful repetitions."""

    min: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary | None:
        """``None`` for no values: a cell whose every run failed has no summary, not a zero."""
        if not values:
            return None
        return cls(min=min(values), median=statistics.median(values), max=max(values), n=len(values))


def ratio(reference: float | None, other: float | None) -> float | None:
    """``reference ÷ other``, or ``None`` when either is missing or ``other`` is not positive."""
    if reference is None or other is None or other <= 0:
        return None
    return reference / other
