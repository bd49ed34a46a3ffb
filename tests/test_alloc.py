"""Steady state allocates nothing per packet: 1 M packets through the device with the driver model
(TX -> sink, generator -> RX), and 40 k one-packet round trips (TX -> reflect -> RX, the short rounds),
traced with tracemalloc.

The device works in batches, so each round makes a few short-lived numpy arrays and frees them; what
must not happen is memory that grows with the packet count (a list of per-packet objects, a counter
dict that keeps keys, a cache without a bound). The assertion is on the traced memory between packet
100 k (warm: every cache filled, every pool descriptor used once) and packet 1 M, and on the peak in
between (what one round holds at once), both against small constants.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from nicsim.ports import GeneratorConfig, GeneratorPort, Port, ReflectPort, SinkPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF
from nicsim.virtio.policy import NotifyPolicy
from rings.driver import DriverQueue, GuestDriver

FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_NET_F_MRG_RXBUF)
RING = 256
BATCH = 128  # rounds of half a ring, as the pump makes them under a TCG guest
WARM = 100_000
TOTAL = 1_000_000
GROWTH_LIMIT = 64 * 1024  # bytes between packet WARM and TOTAL: far below 1 byte per packet
PEAK_LIMIT = 4 * 1024 * 1024  # bytes one round may hold at once above the steady state
PING_WARM = 5_000  # one packet a round (the short rounds' scalar path): fewer packets, more rounds
PING_TOTAL = 40_000


def _device(port: Port) -> tuple[DriverQueue, DriverQueue, VirtioNetDevice]:
    drv = GuestDriver()
    rx, tx = drv.add_queue(0, RING, event_idx=True), drv.add_queue(1, RING, event_idx=True)
    dev = VirtioNetDevice(port=port, policy=NotifyPolicy(tx_batch=BATCH, rx_batch=BATCH))
    dev.set_features(FEATURES)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return rx, tx, dev


def _tx(size: int) -> tuple[Callable[[], int], VirtioNetDevice]:
    sink = SinkPort()
    _, tx, dev = _device(sink)
    for _ in range(RING):
        tx.post_tx(bytes(size))

    def step() -> int:
        n = dev.process_tx(1).processed
        dev.rearm_kicks(1, after=BATCH)  # the pump's batch re-arm, every round
        dev.suppress_kicks(1)
        tx.recycle()
        return n

    return step, dev


def _rx(size: int) -> tuple[Callable[[], int], VirtioNetDevice]:
    gen = GeneratorPort(GeneratorConfig(size=size, mergeable=True))
    rx, _, dev = _device(gen)
    rx.post_rx(12 + 1514, count=RING)
    now = iter(range(1 << 62))

    def step() -> int:
        n = dev.poll_rx(0, float(next(now))).processed
        dev.rearm_kicks(0, after=BATCH)
        dev.suppress_kicks(0)
        rx.recycle()
        return n

    return step, dev


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def _run_to(step: Callable[[], int], done: int, target: int) -> int:
    while done < target:
        n = step()
        assert n > 0, "the device stopped moving packets"
        done += n
    return done


@pytest.mark.parametrize(("direction", "size"), [("tx", 64), ("rx", 64), ("rx", 1500)])
def test_a_million_packets_allocate_nothing_that_stays(traced: None, direction: str, size: int) -> None:
    step, dev = (_tx if direction == "tx" else _rx)(size)
    done = _run_to(step, 0, WARM)
    warm, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    done = _run_to(step, done, TOTAL)
    end, peak = tracemalloc.get_traced_memory()
    growth = end - warm
    print(
        f"{direction} {size} B: {done} packets, traced {warm} -> {end} bytes (growth {growth:+d}, "
        f"{growth / (done - WARM):+.4f} B/packet), peak {peak - warm} bytes above the warm state"
    )
    assert growth < GROWTH_LIMIT
    assert peak - warm < PEAK_LIMIT
    q = 1 if direction == "tx" else 0
    assert int(dev.stats.packets[q]) == done
    assert dev.pool.usage == 0 and dev.stats.drops_total() == 0


def test_ping_pong_rounds_allocate_nothing_that_stays(traced: None) -> None:
    """One frame each way per round (a guest pinging), through the short rounds' scalar path: the
    Python ints and small lists it makes per round must all go away again."""
    port = ReflectPort()
    rx, tx, dev = _device(port)
    rx.post_rx(12 + 1514, count=RING)
    tx.post_tx(bytes(98))

    def step() -> int:
        n = dev.process_tx(1).processed
        n += dev.deliver_rx(0).processed
        tx.recycle()
        rx.recycle()
        return n // 2

    done = _run_to(step, 0, PING_WARM)
    warm, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    done = _run_to(step, done, PING_TOTAL)
    end, peak = tracemalloc.get_traced_memory()
    print(f"ping-pong: {done} round trips, growth {end - warm:+d} bytes, peak {peak - warm} bytes")
    assert end - warm < GROWTH_LIMIT
    assert peak - warm < PEAK_LIMIT
    assert int(dev.stats.packets[0]) == int(dev.stats.packets[1]) == done
    assert dev.pool.usage == 0 and dev.stats.drops_total() == 0
