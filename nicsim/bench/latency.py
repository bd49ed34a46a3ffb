"""Latency cells: the ping or sockperf ping-pong the guest runs, and what the host makes of the result.

A latency cell is one ICMP echo request outstanding at a time, from the guest to the host address
behind the backend (``ctx.host_ip``): ``ping`` sends one every 10 ms, ``ping-flood`` sends the next
as soon as the reply is in (busybox ``ping -A``). The guest sends every reply's RTT back as it
printed it (``rtt_ms``, in arrival order); this module, pure, turns them into p50 / p99 / max with
the nearest-rank percentile (the value of a real reply, never an interpolation), so a p99 over 200
replies is the second-largest. Loss is requests sent minus replies received.

The ``udp-rr`` cell is UDP request/response: the guest's sockperf client sends a 64-byte message to a
``sockperf server`` at the same address (``RR_PORT``) and the next one as soon as the reply is in,
for the run's duration. sockperf computes its own percentiles (the reply at rank round(q × n), also
a value that occurred) over the replies of its valid window (the run without its 400 ms warm-up and
50 ms cool-down), and the rate is its replies over that window: transactions per second, one
outstanding. The replies of the whole run,
warm-up included, are the count the backend's is checked against: all of them crossed it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .matrix import Direction

INTERVAL = 0.01  # seconds between requests in the "ping" cell
RATE = 100  # requests per second of duration: the count of both cells (the flood ends sooner)
# Busybox ping -A still waits up to -i seconds for a reply that did not come before the next request.
FLOOD_FALLBACK = 1.0
RR_PORT = 11111  # sockperf's default port, on the host address behind the backend
RR_SIZE = 64  # bytes of UDP payload per request and reply: sockperf's header and padding


def ping_params(direction: Direction, duration: float) -> dict[str, Any]:
    """The ``ping`` workload's parameters for a latency cell of ``duration`` seconds."""
    count = max(int(duration * RATE), 10)
    if direction is Direction.PING:
        return {"count": count, "interval": INTERVAL, "rtts": True}
    if direction is Direction.PING_FLOOD:
        return {"count": count, "interval": FLOOD_FALLBACK, "adaptive": True, "rtts": True}
    raise ValueError(f"{direction.value} is not a ping direction")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0 < q <= 100) of ``values``: a value that occurred."""
    if not values:
        raise ValueError("no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q}: between 0 (excluded) and 100")
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def rtt_measures(guest: dict[str, Any]) -> dict[str, Any]:
    """p50 / p99 / max RTT (ms), replies and loss from a ping result's ``rtt_ms`` list; ``None``s when
    there is no reply to compute them from."""
    raw = guest.get("rtt_ms")
    rtts = [float(v) for v in raw if isinstance(v, int | float)] if isinstance(raw, list) else []
    sent, received = guest.get("transmitted"), guest.get("received")
    loss = None
    if isinstance(sent, int) and isinstance(received, int) and sent > 0:
        loss = 100.0 * (sent - received) / sent
    if not rtts:
        return {"rtt_p50_ms": None, "rtt_p99_ms": None, "rtt_max_ms": None, "packets": received,
                "loss_pct": loss}  # fmt: skip
    return {
        "rtt_p50_ms": percentile(rtts, 50), "rtt_p99_ms": percentile(rtts, 99), "rtt_max_ms": max(rtts),
        "packets": received if isinstance(received, int) else len(rtts), "loss_pct": loss,
    }  # fmt: skip


def rr_params(duration: float) -> dict[str, Any]:
    """The ``sockperf-ping-pong`` workload's parameters for a udp-rr cell of ``duration`` seconds
    (sockperf takes whole seconds: at least one)."""
    return {"port": RR_PORT, "size": RR_SIZE, "time": max(round(duration), 1)}


def _ms(us: Any) -> float | None:
    return us / 1000 if isinstance(us, int | float) else None


def rr_measures(guest: dict[str, Any]) -> dict[str, Any]:
    """Transactions per second, p50 / p99 / max round trip (ms, from sockperf's microseconds), the
    replies of the whole run (``packets``), the window's length and loss, from a sockperf result."""
    sent, received = guest.get("sent"), guest.get("transactions")
    loss = None
    if isinstance(sent, int) and isinstance(received, int) and sent > 0:
        loss = 100.0 * max(sent - received, 0) / sent
    total = guest.get("total_received")
    return {
        "tps": guest.get("tps"), "seconds": guest.get("seconds"),
        "rtt_p50_ms": _ms(guest.get("rtt_p50_us")), "rtt_p99_ms": _ms(guest.get("rtt_p99_us")),
        "rtt_max_ms": _ms(guest.get("rtt_max_us")),
        "packets": total if isinstance(total, int) else received, "loss_pct": loss,
    }  # fmt: skip
