"""Packet-pool throughput: allocate + free round trips per second, one at a time and in batches.

One "op" here is one descriptor allocated *and* freed (a full round trip through the pool), so a
batch of 64 is 64 ops. ``calls/s`` counts the allocate+free call pairs. Runs on one core, prints a
table, or JSON with ``--json``. Absolute numbers vary by machine: compare rows within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rings.locked_pool import LockedPacketPool
from rings.pool import PacketPool


def _measure(round_trip: Callable[[], None], per_call: int, seconds: float) -> dict[str, float]:
    """Best of many short windows within ``seconds``: the window least disturbed by other work
    (the minimum time is the usual estimator on a shared machine), plus the median for context."""
    for _ in range(200):  # warm up caches and numpy's dispatch
        round_trip()
    rates: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 5:
        start = time.perf_counter()
        for _ in range(500):
            round_trip()
        rates.append(500 / (time.perf_counter() - start))
    best, median = max(rates), statistics.median(rates)
    return {
        "calls_per_s": best,
        "ops_per_s": best * per_call,
        "us_per_call": 1e6 / best,
        "median_ops_per_s": median * per_call,
        "windows": len(rates),
    }


def run(capacity: int, seconds: float, batches: list[int], reserved: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []

    pool = PacketPool(capacity, reserved=reserved, name="bench")
    pool.allocate_batch(capacity // 2)  # a half-full pool, as in steady state

    def single() -> None:
        pool.free(pool.allocate())

    rows.append({"mode": "single", "batch": 1, **_measure(single, 1, seconds)})

    locked = LockedPacketPool(pool)

    def single_locked() -> None:
        locked.free(locked.allocate())

    rows.append({"mode": "single, locked", "batch": 1, **_measure(single_locked, 1, seconds)})

    for n in batches:

        def batch(n: int = n) -> None:
            pool.free_batch(pool.allocate_batch(n))

        rows.append({"mode": "batch", "batch": n, **_measure(batch, n, seconds)})

        def batch_locked(n: int = n) -> None:
            locked.free_batch(locked.allocate_batch(n))

        rows.append({"mode": "batch, locked", "batch": n, **_measure(batch_locked, n, seconds)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--reserved", type=int, default=16, help="ProtocolReservedLength per descriptor")
    parser.add_argument("--seconds", type=float, default=1.0, help="time spent measuring each row")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args(argv)
    rows = run(args.capacity, args.seconds, args.batches, args.reserved)
    if args.json:
        print(json.dumps({"capacity": args.capacity, "reserved": args.reserved, "results": rows}, indent=2))
        return 0
    print(f"packet pool: capacity {args.capacity}, reserved {args.reserved} B, half full; op = alloc+free")
    print(f"{'mode':<16}{'batch':>6}{'M ops/s':>10}{'median':>9}{'k calls/s':>11}{'us/call':>9}")
    for row in rows:
        print(
            f"{row['mode']!s:<16}{row['batch']!s:>6}{float(row['ops_per_s']) / 1e6:>10.2f}"  # type: ignore[arg-type]
            f"{float(row['median_ops_per_s']) / 1e6:>9.2f}"  # type: ignore[arg-type]
            f"{float(row['calls_per_s']) / 1e3:>11.1f}{float(row['us_per_call']):>9.2f}"  # type: ignore[arg-type]
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
