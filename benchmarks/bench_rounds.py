"""Where a device round's time goes: CPU time per round of TX and RX (256 chains, the driver model
recycling them) and how many C calls (numpy's among them) and Python calls one round makes. CPU time
(min of several passes), so a busy host moves it less than wall time; compare engines in one run.

Run: ``python benchmarks/bench_rounds.py [--engine compiled|numpy|both]``. Prints numbers only.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.bench_device import BATCH, setup
from nicsim.ports import GeneratorConfig, GeneratorPort, SinkPort
from rings import kernels


def make_round(kind: str, size: int) -> Callable[[], None]:
    """One device round plus the driver model's recycling of what it returned."""
    if kind == "tx":
        _, tx, dev = setup(SinkPort())
        for _ in range(BATCH):
            tx.post_tx(bytes(size))

        def tx_round() -> None:
            dev.process_tx(1)
            tx.recycle()

        return tx_round
    rx, _, dev = setup(GeneratorPort(GeneratorConfig(size=size)))
    rx.post_rx(12 + 1514, count=BATCH)

    def rx_round() -> None:
        dev.poll_rx(0)
        rx.recycle()

    return rx_round


def cpu_us_per_round(step: Callable[[], None], rounds: int = 3000, passes: int = 5) -> float:
    for _ in range(200):
        step()
    best = float("inf")
    for _ in range(passes):
        start = time.process_time()
        for _ in range(rounds):
            step()
        best = min(best, (time.process_time() - start) / rounds)
    return best * 1e6


def calls_per_round(step: Callable[[], None]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call":
            counts["C"] += 1
        elif event == "call":
            counts["Python"] += 1

    step()
    sys.setprofile(profile)
    step()
    sys.setprofile(None)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=("compiled", "numpy", "both"), default="both")
    args = parser.parse_args()
    engines = ("numpy", "compiled") if args.engine == "both" else (args.engine,)
    print(f"rounds of {BATCH} chains, CPU time per round (min of 5 x 3000), calls per round")
    for engine in engines:
        if engine == "compiled":
            kernels.enable()
        else:
            kernels.disable()
        for kind in ("tx", "rx"):
            for size in (64, 1500):
                step = make_round(kind, size)
                us = cpu_us_per_round(step)
                calls = calls_per_round(step)
                print(f"{kernels.engine():<20} {kind} {size:>5} B  {us:6.1f} us/round  {BATCH / us:5.2f} Mpps"
                      f"  C calls {calls['C']:3d}  Python calls {calls['Python']:3d}")


if __name__ == "__main__":
    main()
