"""Impairment throughput: frames per second through ``Impairment.offer`` + ``due``, 64-byte frames.

Each call offers one batch on a simulated clock that advances as if frames arrived at ``--offered``
packets per second (so a delay holds rate x delay frames, under a limit raised to fit), then calls
``due``. Best of many short windows (the least disturbed by other work), with the median for
context. Runs on one core; absolute numbers vary by machine: compare rows within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nicsim.ports.impair import Impairment

CASES = {
    "none": "",
    "loss": "loss=10%",
    "delay+jitter": "delay=20ms jitter=5ms limit=100000",
    "rate": "rate=10gbit limit=100000",
    "everything": (
        "loss=1% duplicate=1% corrupt=0.1% delay=20ms jitter=5ms reorder=5% rate=10gbit limit=100000"
    ),
}


def measure(config: str, *, batch: int, size: int, offered: float, seconds: float) -> dict[str, float]:
    imp = Impairment(config)
    data = np.random.default_rng(0).integers(0, 256, batch * size, dtype=np.uint8)
    offsets = np.arange(batch, dtype=np.int64) * size
    lengths = np.full(batch, size, np.uint32)
    step = batch / offered
    clock = [0.0]

    def one_round() -> int:
        t = clock[0] = clock[0] + step
        out = imp.offer(t, data, offsets, lengths)[2].size
        return out + imp.due(t)[2].size

    for _ in range(2000):  # fill the delay line to its steady state first
        one_round()
    rates: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 5:
        start = time.perf_counter()
        for _ in range(200):
            one_round()
        rates.append(200 * batch / (time.perf_counter() - start))
    return {"mpps": max(rates) / 1e6, "median_mpps": statistics.median(rates) / 1e6, "held": imp.held}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="frame length in bytes")
    parser.add_argument("--offered", type=float, default=1e6, help="simulated arrival rate, frames/s")
    parser.add_argument("--seconds", type=float, default=1.0, help="time spent measuring each row")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    rows = [
        {"case": name, "config": CASES[name],
         **measure(CASES[name], batch=args.batch, size=args.size, offered=args.offered, seconds=args.seconds)}
        for name in args.cases
    ]
    if args.json:
        print(json.dumps({"batch": args.batch, "size": args.size, "results": rows}, indent=2))
        return 0
    print(f"impairment offer+due: {args.size} B frames, batches of {args.batch}, "
          f"{args.offered / 1e6:g} Mpps simulated arrivals")
    print(f"{'case':<14}{'Mpps':>7}{'median':>8}{'held':>8}  config")
    for row in rows:
        print(f"{row['case']!s:<14}{float(row['mpps']):>7.2f}{float(row['median_mpps']):>8.2f}"  # type: ignore[arg-type]
              f"{row['held']!s:>8}  {row['config']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
