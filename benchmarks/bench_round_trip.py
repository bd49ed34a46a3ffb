"""Per-round latency without a VM: one 98-byte frame each way per round, as a guest pinging makes them.
TX is ``process_tx`` with one chain posted; RX is ``push`` of one frame and ``poll_rx`` into one posted
buffer. Prints the device's own microseconds per round (the driver model's reposting excluded),
median and minimum of several runs, for the short rounds' scalar path and for the numpy path
(``short_round=0``) side by side.

Run: ``python benchmarks/bench_round_trip.py [--rounds N] [--runs R] [--chains K]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from nicsim.ports import SinkPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from nicsim.virtio.policy import NotifyPolicy
from nicsim.virtio.queues import SHORT_ROUND
from rings.driver import GuestDriver

RING = 256
FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX)


def measure(short_round: int, chains: int, rounds: int, runs: int) -> tuple[list[float], list[float]]:
    """Microseconds per TX round and per RX round, one value per run."""
    drv = GuestDriver((16 << 20, 16 << 20))
    rx, tx = drv.add_queue(0, RING, event_idx=True), drv.add_queue(1, RING, event_idx=True)
    dev = VirtioNetDevice(port=SinkPort(), policy=NotifyPolicy(tx_batch=RING, rx_batch=RING),
                          short_round=short_round)  # fmt: skip
    dev.set_features(FEATURES)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    rx.post_rx(12 + 1514, count=RING)
    for _ in range(chains):
        tx.post_tx(bytes(98))
    frame = np.zeros(98, np.uint8)
    clock = time.perf_counter
    tx_us: list[float] = []
    rx_us: list[float] = []
    for run in range(runs + 1):  # the first run warms up and is not reported
        t_tx = t_rx = 0.0
        for _ in range(rounds):
            t0 = clock()
            dev.process_tx(1)
            t1 = clock()
            tx.recycle()
            for _ in range(chains):
                dev.push(frame)
            t2 = clock()
            dev.poll_rx(0)
            t3 = clock()
            rx.recycle()
            t_tx += t1 - t0
            t_rx += t3 - t2
        if run:
            tx_us.append(t_tx / rounds * 1e6)
            rx_us.append(t_rx / rounds * 1e6)
    assert dev.pool.usage == 0 and dev.stats.drops_total() == 0
    return tx_us, rx_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chains", type=int, default=1, help="frames per round, each way")
    args = parser.parse_args()
    print(f"{args.chains} x 98 B frame(s) a round each way, {args.runs} runs of {args.rounds} rounds")
    for label, short in ((f"short rounds (<= {SHORT_ROUND})", SHORT_ROUND), ("numpy path", 0)):
        tx_us, rx_us = measure(short, args.chains, args.rounds, args.runs)
        print(f"{label:<22} TX {statistics.median(tx_us):6.1f} us (min {min(tx_us):6.1f})   "
              f"RX {statistics.median(rx_us):6.1f} us (min {min(rx_us):6.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
