"""Device throughput without a VM: TX -> sink and generator -> RX, in Mpps, at 64 and 1500 bytes, with
the driver model from ``rings.driver`` recycling the same chains (batch 256). Prints numbers only.

Run: ``python benchmarks/bench_device.py [--seconds S]``.
"""

from __future__ import annotations

import argparse
import time

from nicsim.ports import GeneratorConfig, GeneratorPort, Port, SinkPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from nicsim.virtio.policy import NotifyPolicy
from rings import kernels
from rings.driver import DriverQueue, GuestDriver

BATCH = 256
FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX)


def setup(port: Port) -> tuple[DriverQueue, DriverQueue, VirtioNetDevice]:
    drv = GuestDriver((16 << 20, 16 << 20))
    rx, tx = drv.add_queue(0, BATCH, event_idx=True), drv.add_queue(1, BATCH, event_idx=True)
    dev = VirtioNetDevice(port=port, policy=NotifyPolicy(tx_batch=BATCH, rx_batch=BATCH))
    dev.set_features(FEATURES)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return rx, tx, dev


def bench_tx(size: int, seconds: float) -> float:
    sink = SinkPort()
    _, tx, dev = setup(sink)
    for _ in range(BATCH):
        tx.post_tx(bytes(size))
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        dev.process_tx(1)
        tx.recycle()
    elapsed = time.perf_counter() - start
    assert dev.pool.usage == 0 and dev.stats.drops_total() == 0
    return sink.packets / elapsed / 1e6


def bench_rx(size: int, seconds: float) -> float:
    gen = GeneratorPort(GeneratorConfig(size=size))
    rx, _, dev = setup(gen)
    rx.post_rx(12 + 1514, count=BATCH)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        dev.poll_rx(0)
        rx.recycle()
    elapsed = time.perf_counter() - start
    assert dev.pool.usage == 0 and dev.stats.drops_total() == 0
    return gen.sent / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--engine", choices=("compiled", "numpy"), default="compiled",
                        help="as nicsim serve --engine (default: %(default)s)")
    args = parser.parse_args()
    if args.engine == "compiled":
        kernels.enable()
    print(f"batch {BATCH}, features VERSION_1|EVENT_IDX, {args.seconds:.1f} s per case, "
          f"engine {kernels.engine()}")
    for size in (64, 1500):
        tx = bench_tx(size, args.seconds)
        rx = bench_rx(size, args.seconds)
        print(f"{size:>5} B  TX->sink {tx:6.3f} Mpps ({tx * size * 8 / 1e3:6.2f} Gbit/s)   "
              f"generator->RX {rx:6.3f} Mpps ({rx * size * 8 / 1e3:6.2f} Gbit/s)")


if __name__ == "__main__":
    main()
