"""What capture costs: device throughput without a VM, capture off vs pcap vs pcapng, in Mpps.

The cases of ``bench_device.py`` (TX -> sink, generator -> RX; batch 256; the driver model recycling the
same chains), each run with no capture (no wrapper at all) and with the port wrapped by
``nicsim.ports.capture.capturing`` writing to a real file in a temporary directory (rotating at 100 MB,
two files, so the disk use stays bounded; the rotations are part of the cost). Prints numbers only.

Run: ``python benchmarks/bench_capture.py [--seconds S] [--repeat R] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.bench_device import BATCH, setup
from nicsim.ports import GeneratorConfig, GeneratorPort, Port, SinkPort
from nicsim.ports.capture import CaptureConfig, CaptureWriter, Format, capturing

MODES = ("off", "pcap", "pcapng")


def wrapped(port: Port, mode: str, directory: Path) -> tuple[Port, CaptureWriter | None]:
    if mode == "off":
        return port, None
    writer = CaptureWriter(CaptureConfig(path=directory / f"bench.{mode}", format=Format(mode),
                                         max_bytes=100_000_000, files=2))  # fmt: skip
    return capturing(port, writer, writer.add_interface("bench")), writer


def run(step: Callable[[], None], seconds: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
    return time.perf_counter() - start


def bench_tx(size: int, mode: str, seconds: float, directory: Path) -> float:
    sink = SinkPort()
    port, writer = wrapped(sink, mode, directory)
    _, tx, dev = setup(port)
    for _ in range(BATCH):
        tx.post_tx(bytes(size))

    def step() -> None:
        dev.process_tx(1)
        tx.recycle()

    elapsed = run(step, seconds)
    assert dev.pool.usage == 0 and dev.stats.drops_total() == 0
    if writer is not None:
        assert writer.stats()["frames"] == sink.packets
        writer.close()
    return sink.packets / elapsed / 1e6


def bench_rx(size: int, mode: str, seconds: float, directory: Path) -> float:
    gen = GeneratorPort(GeneratorConfig(size=size))
    port, writer = wrapped(gen, mode, directory)
    rx, _, dev = setup(port)
    rx.post_rx(12 + 1514, count=BATCH)

    def step() -> None:
        dev.poll_rx(0)
        rx.recycle()

    elapsed = run(step, seconds)
    assert dev.pool.usage == 0 and dev.stats.drops_total() == 0
    if writer is not None:
        assert writer.stats()["frames"] == gen.sent
        writer.close()
    return gen.sent / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per case, interleaved; the best is printed (other load only slows)")
    parser.add_argument("--dir", type=Path, help="where the capture files go (default: a temporary dir)")
    args = parser.parse_args()
    print(f"batch {BATCH}, best of {args.repeat} x {args.seconds:.1f} s per case; Mpps, and (in brackets) "
          "the share of 'off' kept")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in (64, 1500):
            for name, bench in (("TX->sink", bench_tx), ("generator->RX", bench_rx)):
                rates = dict.fromkeys(MODES, 0.0)
                for _ in range(args.repeat):
                    for mode in MODES:
                        rates[mode] = max(rates[mode], bench(size, mode, args.seconds, Path(tmp)))
                off = rates["off"]
                cells = [f"off {off:6.3f}"]
                cells += [f"{m} {rates[m]:6.3f} ({rates[m] / off:4.0%})" for m in MODES[1:]]
                print(f"{size:>5} B  {name:<14} " + "   ".join(cells))


if __name__ == "__main__":
    main()
