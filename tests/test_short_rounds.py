"""Short rounds (a few chains, plain ints) give the guest and the port exactly what the numpy path gives.

Two guests are driven through the same random sequence with the driver model: one device takes
rounds of up to ``SHORT_ROUND`` chains through the scalar path, the other (``short_round=0``) takes
every round through the numpy path, the reference. Posted chains come in every layout the driver
knows, with malformed chains, short headers and runts among them; frames come in every size, some too
big for the guest's buffers; a port holds some batches and completes them later, and answers some
frames on RX from inside ``transmit``; the pool is small enough to run out. After every step the two
must agree on what the guest sees (used ids and lengths, the bytes written into its RX buffers), what
the port got (frames, header iovecs, gathers, lengths), the round's result, the stats (drops by
reason included) and the inflight hooks' calls; at the end every pool descriptor is back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from nicsim.ports import Port, TxFrames
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MRG_RXBUF,
)
from nicsim.virtio.inflight import TrackedQueue
from nicsim.virtio.policy import NotifyPolicy
from nicsim.virtio.queues import SHORT_ROUND, QueueResult
from rings.driver import DriverQueue, GuestDriver, Malformed, TxLayout
from rings.memory import GuestMemory
from rings.pool import PacketPool

V1 = 1 << VIRTIO_F_VERSION_1
MRG = 1 << VIRTIO_NET_F_MRG_RXBUF
EVT = 1 << VIRTIO_F_EVENT_IDX
IND = 1 << VIRTIO_F_INDIRECT_DESC
GCSUM = 1 << VIRTIO_NET_F_GUEST_CSUM
RING = 32


class RecordingPort(Port):
    """Records everything a batch shows; holds some batches (completing them when told) and sends
    some frames straight back toward the guest, from inside ``transmit``."""

    name = "recording"

    def __init__(self, *, carried: bool) -> None:
        super().__init__()
        self.vnet_hdr = carried
        self.seen: list[Any] = []
        self.held: list[TxFrames] = []
        self.hold_next = False
        self.echo_next = False

    def features(self) -> int:
        return GCSUM if self.vnet_hdr else 0

    def transmit(self, batch: TxFrames) -> bool:
        data, starts = batch.gather()
        self.seen.append((
            batch.pair, batch.count, batch.lengths.tolist(), bytes(data), starts.tolist(),
            [bytes(batch.frame(i)) for i in range(batch.count)],
            [[bytes(v) for v in batch.iovec(i)] for i in range(batch.count)],
        ))  # fmt: skip
        if self.echo_next and batch.count:
            self.sink.push(b"".join(bytes(v) for v in batch.iovec(0)) if self.vnet_hdr else batch.frame(0))
        if self.hold_next:
            self.held.append(batch)
            return False
        return True


class RecordingHooks:
    """Inflight hooks that remember every call (the server's InflightStore, minus the memfd)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[int], int]] = []

    def popped(self, index: int, q: TrackedQueue, mem: GuestMemory, heads: npt.NDArray[np.uint16]) -> None:
        self.calls.append(("popped", index, heads.tolist(), -1))

    def filling(self, index: int, q: TrackedQueue, mem: GuestMemory, heads: npt.NDArray[np.uint16]) -> None:
        self.calls.append(("filling", index, heads.tolist(), -1))

    def before_used(self, index: int, q: TrackedQueue, heads: npt.NDArray[np.uint16]) -> None:
        self.calls.append(("before", index, heads.tolist(), -1))

    def after_used(self, index: int, q: TrackedQueue, heads: npt.NDArray[np.uint16]) -> None:
        self.calls.append(("after", index, heads.tolist(), q.used_idx))


@dataclass
class World:
    drv: GuestDriver
    rx: DriverQueue
    tx: DriverQueue
    dev: VirtioNetDevice
    port: RecordingPort
    hooks: RecordingHooks | None


def world(
    features: int, *, short_round: int, carried: bool, hooks: bool, pool: int, tx_batch: int, rx_batch: int
) -> World:
    drv = GuestDriver((1 << 20, 1 << 20))
    evt = bool(features & EVT)
    rx = drv.add_queue(0, RING, event_idx=evt, start_idx=65530)
    tx = drv.add_queue(1, RING, event_idx=evt, start_idx=65520)
    port = RecordingPort(carried=carried)
    policy = NotifyPolicy(tx_batch=tx_batch, rx_batch=rx_batch, rx_backlog=16)
    dev = VirtioNetDevice(port=port, pool=PacketPool(pool), short_round=short_round, policy=policy)
    dev.set_features(features)
    dev.set_memory(drv.memory)
    rec = RecordingHooks() if hooks else None
    dev.inflight = rec
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return World(drv, rx, tx, dev, port, rec)


def frame(n: int, seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


TX_LAYOUTS = (TxLayout.ONE, TxLayout.ONE, TxLayout.TWO, TxLayout.TWO, TxLayout.INDIRECT)
MALFORMED = tuple(Malformed)


def make_ops(seed: int, steps: int) -> list[tuple[Any, ...]]:
    """A random op sequence, drawn once and replayed on both worlds."""
    rng = np.random.default_rng(seed)
    ops: list[tuple[Any, ...]] = []
    for i in range(steps):
        r = int(rng.integers(0, 100))
        if r < 22:
            size = int(rng.choice([0, 5, 13, 40, 60, 98, 333, 1514]))
            ops.append(("post_tx", size, TX_LAYOUTS[int(rng.integers(0, len(TX_LAYOUTS)))], i))
        elif r < 26:
            ops.append(("malformed_tx", MALFORMED[int(rng.integers(0, len(MALFORMED)))]))
        elif r < 40:
            ops.append(("process_tx", bool(rng.integers(0, 4) == 0), bool(rng.integers(0, 3) == 0)))
        elif r < 44:
            ops.append(("complete_held", int(rng.integers(0, 3))))
        elif r < 56:
            size = int(rng.choice([12 + 60, 12 + 200, 12 + 1514, 2048]))
            layout = (TxLayout.ONE, TxLayout.TWO, TxLayout.INDIRECT)[int(rng.integers(0, 3))]
            ops.append(("post_rx", size, layout, int(rng.integers(1, 4))))
        elif r < 58:
            ops.append(("malformed_rx", MALFORMED[int(rng.integers(0, len(MALFORMED)))]))
        elif r < 74:
            count = int(rng.integers(1, 6))
            sizes = [int(rng.choice([0, 14, 60, 98, 500, 1514, 3000])) for _ in range(count)]
            ops.append(("push", sizes, i))
        elif r < 86:
            ops.append(("poll_rx", bool(rng.integers(0, 2))))
        elif r < 99:
            ops.append(("reap", bool(rng.integers(0, 2))))
        elif i > steps // 2:
            ops.append(("overrun", bool(rng.integers(0, 2))))  # the guest corrupts avail.idx
    return ops


def apply(w: World, op: tuple[Any, ...]) -> Any:
    """Run one op; return what the guest and the caller see of it (compared between the worlds)."""
    got = _apply(w, op)
    if isinstance(got, QueueResult):
        err = got.error
        return replace(got, error=None), None if err is None else (type(err).__name__, str(err))
    return got


def _apply(w: World, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    hdr = w.dev.hdr_len
    try:
        if kind == "post_tx":
            _, size, layout, seed = op
            if w.tx.num_free < 2:
                return "full"
            header = bytes((seed + j) & 0xFF for j in range(hdr))
            return w.tx.post_tx(frame(size, seed), layout=layout, header=header)
        if kind == "malformed_tx":
            return w.tx.post_malformed(op[1]) if w.tx.num_free >= 3 else "full"
        if kind == "malformed_rx":
            return w.rx.post_malformed(op[1]) if w.rx.num_free >= 3 else "full"
        if kind == "process_tx":
            _, hold, echo = op
            w.port.hold_next, w.port.echo_next = hold, echo
            return w.dev.process_tx(1)
        if kind == "complete_held":
            n = min(op[1], len(w.port.held))
            for b in w.port.held[:n]:
                b.complete()
            del w.port.held[:n]
            return n
        if kind == "post_rx":
            _, size, layout, count = op
            if w.rx.num_free < 2 * count:
                return "full"
            return w.rx.post_rx(size, count=count, layout=layout)
        if kind == "push":
            _, sizes, seed = op
            out = []
            for j, n in enumerate(sizes):
                body = frame(n, seed + j)
                if w.port.vnet_hdr:
                    body = bytes((seed + 3 * j + k) & 0xFF for k in range(hdr)) + body
                out.append(w.dev.push(np.frombuffer(body, np.uint8)))
            return out
        if kind == "poll_rx":
            return w.dev.poll_rx(0) if op[1] else w.dev.deliver_rx(0)
        if kind == "overrun":
            (w.tx if op[1] else w.rx).overrun_avail_idx()
            return None
        if kind == "reap":
            q = w.tx if op[1] else w.rx
            return [(c.id, c.len, c.data) for c in q.reap()]
    except Exception as err:  # compared: both worlds must fail the same way
        return ("raised", type(err).__name__, str(err))
    raise AssertionError(op)


def guest_view(w: World) -> Any:
    snap = w.dev.snapshot()
    for q in snap["queues"]:
        # The numpy path takes a full batch of RX chains with MRG_RXBUF and gives back the unused ones;
        # the scalar path takes only those it fills. Only the high-water marks can tell.
        q.pop("inflight_high")
    snap.pop("pool", None)
    return snap, w.dev.pool.usage, w.port.seen, None if w.hooks is None else w.hooks.calls


def drain(w: World) -> None:
    """Stop both queues: batches the port still holds are cancelled, waiting frames dropped."""
    w.dev.stop_queue(1)
    w.dev.stop_queue(0)


def world_options(seed: int, carried: bool) -> dict[str, Any]:
    """Seed ``seed``'s pool, batch sizes and hooks (0..3): batches above SHORT_ROUND and a pool that
    runs out mix both paths in the scalar world too."""
    return {"carried": carried, "hooks": seed % 2 == 0, "pool": (6, 9, 14, 40)[seed],
            "tx_batch": (3, 6, 12, 40)[seed], "rx_batch": (8, 12)[seed % 2]}  # fmt: skip


def assert_same_step(fast: World, ref: World, got: Any, want: Any, where: Any) -> None:
    """Two worlds given the same step: the same result, guest RAM and guest-visible state."""
    assert got == want, where
    assert np.array_equal(fast.drv.ram.backing, ref.drv.ram.backing), where
    assert guest_view(fast) == guest_view(ref), where


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("features", "carried"),
    [
        (V1 | IND | EVT, False),
        (V1 | MRG | IND, False),
        (MRG | EVT, False),  # legacy-free but no VERSION_1: still a 12-byte header (MRG_RXBUF)
        (0, False),  # the 10-byte legacy header, INDIRECT ignored as a flag
        (V1 | MRG | EVT | GCSUM, True),
        (V1 | IND, True),
    ],
    ids=["v1-ind-evt", "v1-mrg-ind", "mrg-evt", "legacy", "carried-mrg-csum", "carried-ind"],
)
def test_short_rounds_match_the_numpy_path(seed: int, features: int, carried: bool) -> None:
    ops = make_ops(seed * 7919 + features, 400)
    kw = world_options(seed, carried)
    fast = world(features, short_round=SHORT_ROUND, **kw)
    ref = world(features, short_round=0, **kw)
    for step, op in enumerate(ops):
        assert_same_step(fast, ref, apply(fast, op), apply(ref, op), (step, op))
    drain(fast)
    drain(ref)
    assert guest_view(fast) == guest_view(ref)
    for w in (fast, ref):
        assert w.dev.pool.usage == 0
        assert w.dev.stats.inflight == [0, 0]


@pytest.mark.parametrize(
    ("layout", "features", "carried"),
    [
        *((layout, features, carried) for layout in (TxLayout.ONE, TxLayout.TWO) for features, carried in (
            (V1 | IND | EVT, False), (V1 | MRG, False), (0, False), (V1 | MRG | GCSUM, True), (V1 | IND, True)
        )),
        (TxLayout.INDIRECT, V1 | IND | EVT, False),
        (TxLayout.INDIRECT, V1 | MRG | IND, False),
        (TxLayout.INDIRECT, V1 | IND | GCSUM, True),
    ],
)  # fmt: skip
def test_a_one_packet_round_of_a_common_shape_takes_no_numpy_walk(
    monkeypatch: pytest.MonkeyPatch, layout: TxLayout, features: int, carried: bool
) -> None:
    """Ping-pong traffic: one frame each way per round, in one or two descriptors (direct or in an
    indirect table), never walked by the numpy walker (tens of microseconds of numpy calls)."""
    w = world(features, short_round=SHORT_ROUND, carried=carried, hooks=False, pool=8, tx_batch=256,
              rx_batch=256)  # fmt: skip

    def no_walk(self: object) -> None:
        raise AssertionError("the numpy walker ran for a short round")

    monkeypatch.setattr("rings.walker.ChainWalker.run", no_walk)
    hdr = w.dev.hdr_len
    for i in range(3):
        w.tx.post_tx(frame(98, i), layout=layout, header=bytes(hdr))
        w.rx.post_rx(12 + 1514, layout=layout)
        w.port.echo_next = True
        assert w.dev.process_tx(1).processed == 1
        assert w.dev.deliver_rx(0).processed == 1
        (done,) = w.rx.reap()
        assert done.data is not None
        num_buffers = b"\x01\x00" if hdr == 12 else b""
        assert done.data == bytes(10) + num_buffers + frame(98, i)
        assert [c.len for c in w.tx.reap()] == [0]
    assert w.dev.pool.usage == 0 and w.dev.stats.drops_total() == 0
