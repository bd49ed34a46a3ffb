"""The packed virtqueue (virtio 1.2 §2.8) with the packed driver model: TX and RX round trips over many
laps of the ring (wrap counters), chains and indirect tables, every malformed kind marked with its
error and still returned, used descriptors in completion order, giving popped chains back, event
suppression in both directions with and without EVENT_IDX, and the SET/GET_VRING_BASE encoding."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rings.chains import ErrorCode
from rings.driver import VIRTIO_NET_HDR_SIZE, GuestRam, TxLayout
from rings.driver_packed import PackedDriverQueue, PackedMalformed
from rings.errors import DeviceError, GuestMemoryError, QueueConfigError
from rings.memory import GuestMemory
from rings.packed import PackedQueue
from rings.packed_layout import (
    AVAIL_USED_MASK,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
)
from tests.test_fuzz_rings import EXAMPLES

EXPECTED = {
    PackedMalformed.UNENDED: ErrorCode.LOOP,
    PackedMalformed.INDIRECT_IN_CHAIN: ErrorCode.NESTED_INDIRECT,
    PackedMalformed.INDIRECT_EMPTY: ErrorCode.INDIRECT_LENGTH,
    PackedMalformed.INDIRECT_MISALIGNED: ErrorCode.INDIRECT_LENGTH,
    PackedMalformed.INDIRECT_TOO_LONG: ErrorCode.INDIRECT_LENGTH,
    PackedMalformed.INDIRECT_OUTSIDE_MEMORY: ErrorCode.GUEST_MEMORY,
    PackedMalformed.CHAIN_TOO_LONG: ErrorCode.CHAIN_TOO_LONG,
    PackedMalformed.READ_AFTER_WRITE: ErrorCode.DESCRIPTOR_ORDER,
    PackedMalformed.OUTSIDE_MEMORY: ErrorCode.GUEST_MEMORY,
    PackedMalformed.SPANS_REGIONS: ErrorCode.GUEST_MEMORY,
    PackedMalformed.ADDRESS_OVERFLOW: ErrorCode.GUEST_MEMORY,
    PackedMalformed.ZERO_LENGTH_WILD: ErrorCode.OK,
    PackedMalformed.TABLE_FLAGS_IGNORED: ErrorCode.OK,
    PackedMalformed.ID_BEYOND_SIZE: ErrorCode.OK,
}


def _pair(size: int, **kw: int) -> tuple[GuestRam, PackedDriverQueue, PackedQueue]:
    ram = GuestRam()
    dq = PackedDriverQueue(ram, index=1, size=size, **kw)
    return ram, dq, dq.device_queue()


# A queue of one takes only one-segment chains (two segments do not fit, §2.8.17): no other layout.
LAPS = [((size, pos, wrap), layout) for size, pos, wrap in [(8, 0, 1), (7, 5, 0), (5, 4, 1), (1, 0, 0)]
        for layout in TxLayout if size > 1 or layout is TxLayout.ONE]  # fmt: skip


@pytest.mark.parametrize(("ring", "layout"), LAPS)
def test_tx_round_trips_over_many_laps(ring: tuple[int, int, int], layout: TxLayout) -> None:
    size, start_pos, start_wrap = ring
    ram, dq, q = _pair(size, start_pos=start_pos, start_wrap=start_wrap)
    mem = ram.memory
    per = 2 if layout is TxLayout.TWO else 1
    sent = 0
    for lap in range(4 * size):
        frames = [bytes([lap, j]) * (j + 3) for j in range(max(1, size // per))]
        ids = [dq.post_tx(f, layout=layout) for f in frames]
        assert q.avail_pending(mem) == len(frames)
        batch = q.pop_chains(mem, 64)
        assert batch.heads.tolist() == ids and not batch.error.any()
        data, starts = batch.gather_readable(mem)
        for k, f in enumerate(frames):
            got = data[int(starts[k]) : int(starts[k]) + int(batch.readable_len[k])].tobytes()
            assert got == bytes(VIRTIO_NET_HDR_SIZE) + f
        # Complete out of order: the used descriptors go in completion order.
        done = batch.heads[::-1]
        q.push_used(mem, done, np.zeros(len(done), np.uint32))
        assert [c.id for c in dq.reap()] == done.tolist()
        sent += len(frames)
        assert dq.num_free == size and q.avail_pending(mem) == 0
    assert q.last_avail_idx == q.used_idx == (sent * per) & 0xFFFF
    assert (q.avail_pos, q.avail_wrap) == (q.used_pos, q.used_wrap) == (dq.next_avail, dq.avail_wrap)


@pytest.mark.parametrize("layout", list(TxLayout))
def test_rx_buffers_are_written_and_reaped_with_their_length(layout: TxLayout) -> None:
    ram, dq, q = _pair(6, start_pos=3)
    mem = ram.memory
    for lap in range(5):
        dq.post_rx(100, count=2, layout=layout)
        ids = q.pop_avail(mem, 8)
        batch = q.walk(mem, ids)
        assert batch.writable_len.tolist() == [100, 100] and batch.readable_len.tolist() == [0, 0]
        lens = []
        for k in range(len(batch)):
            payload = bytes([lap + k]) * (20 + k)
            left = payload
            for s in batch.segments(k):
                view = batch.segment_view(mem, s)
                n = min(len(left), view.shape[0])
                view[:n] = np.frombuffer(left[:n], np.uint8)
                left = left[n:]
            lens.append(len(payload))
        q.push_used_few(mem, ids.tolist(), lens)
        got = dq.reap()
        assert [(c.id, c.len, c.data) for c in got] == [
            (int(i), n, bytes([lap + k]) * n) for k, (i, n) in enumerate(zip(ids, lens, strict=True))
        ]


@pytest.mark.parametrize("kind", list(PackedMalformed))
def test_malformed_chains_are_marked_and_returned(kind: PackedMalformed) -> None:
    ram, dq, q = _pair(4, start_pos=2)
    mem = ram.memory
    if kind is not PackedMalformed.UNENDED:
        dq.post_tx(b"before")
    bad = dq.post_malformed(kind)
    if kind is not PackedMalformed.UNENDED and dq.num_free:
        dq.post_tx(b"after")
    batch = q.pop_chains(mem, 8)
    k = batch.heads.tolist().index(bad)
    assert ErrorCode(int(batch.error[k])) is EXPECTED[kind]
    assert (k in batch.errors) == (EXPECTED[kind] is not ErrorCode.OK)
    assert sum(1 for e in batch.error.tolist() if e) == (EXPECTED[kind] is not ErrorCode.OK)
    q.push_used(mem, batch.heads, np.zeros(len(batch), np.uint32))
    assert sorted(c.id for c in dq.reap()) == sorted(batch.heads.tolist())
    assert dq.num_free == 4 and dq.in_flight == 0


def test_a_chain_is_not_taken_until_its_first_descriptor_is_available() -> None:
    ram, dq, q = _pair(4)
    mem = ram.memory
    dq.post_tx(b"abc", layout=TxLayout.TWO)
    first = dq.flags_at(0)
    dq._ring["flags"][0] = first ^ AVAIL_USED_MASK  # as if the driver had not written it yet
    assert q.avail_pending(mem) == 0 and len(q.pop_chains(mem, 4)) == 0
    dq._ring["flags"][0] = first
    assert q.avail_pending(mem) == 1 and len(q.pop_chains(mem, 4)) == 1


def test_unpop_gives_the_last_chains_back() -> None:
    ram, dq, q = _pair(5, start_pos=3)
    mem = ram.memory
    ids = [dq.post_tx(b"x", layout=TxLayout.TWO) for _ in range(2)]
    assert q.pop_avail(mem, 2).tolist() == ids
    q.unpop_avail(1)
    assert (q.avail_pos, q.avail_wrap, q.last_avail_idx) == (0, 0, 2)
    q.unpop_avail(1)
    assert (q.avail_pos, q.avail_wrap, q.last_avail_idx) == (3, 1, 0)
    with pytest.raises(ValueError):
        q.unpop_avail(1)
    assert q.pop_chains(mem, 5).heads.tolist() == ids


def test_used_flags_of_the_first_descriptor_are_written_last(monkeypatch: pytest.MonkeyPatch) -> None:
    ram, dq, q = _pair(8)
    mem = ram.memory
    dq.post_rx(64, count=3)
    ids = q.pop_avail(mem, 3)
    stores: list[list[int]] = []
    views = q._views(mem)
    real = views.d_flags

    class Spy(np.ndarray):  # type: ignore[type-arg]
        def __setitem__(self, key: object, value: object) -> None:
            stores.append(np.atleast_1d(np.arange(8)[key]).tolist())  # type: ignore[index]
            real[key] = value  # type: ignore[index]

    monkeypatch.setattr(views, "d_flags", real.view(Spy))
    q.push_used(mem, ids, [0, 5, 0])
    assert stores == [[1, 2], [0]]
    assert [c.id for c in dq.reap()] == ids.tolist()


def _complete(mem: GuestMemory, dq: PackedDriverQueue, q: PackedQueue) -> None:
    batch = q.pop_chains(mem, 4)
    q.push_used(mem, batch.heads, np.zeros(len(batch), np.uint32))
    dq.reap()


@pytest.mark.parametrize("event_idx", [False, True])
def test_kicks_follow_the_device_event_structure(event_idx: bool) -> None:
    ram, dq, q = _pair(4, start_pos=3)
    mem = ram.memory
    dq.event_idx = event_idx
    dq.post_tx(b"a")
    assert dq.should_kick()  # ENABLE (zero) at start
    q.suppress_kicks(mem, True, event_idx=event_idx)
    assert dq.device_event[1] == RING_EVENT_FLAGS_DISABLE
    dq.post_tx(b"b")
    assert not dq.should_kick()
    _complete(mem, dq, q)
    q.suppress_kicks(mem, False, event_idx=event_idx)
    flags = RING_EVENT_FLAGS_DESC if event_idx else RING_EVENT_FLAGS_ENABLE
    assert dq.device_event[1] == flags
    dq.post_tx(b"c")
    assert dq.should_kick()
    _complete(mem, dq, q)
    for _ in range(3):  # round the ring: the event names a position and a wrap counter
        if event_idx:
            q.kick_after(mem, 1)  # kick when the second descriptor from here is made available
            dq.post_tx(b"d")
            assert not dq.should_kick()
        dq.post_tx(b"e")
        assert dq.should_kick()
        _complete(mem, dq, q)


@pytest.mark.parametrize("event_idx", [False, True])
def test_interrupts_follow_the_driver_event_structure(event_idx: bool) -> None:
    ram, dq, q = _pair(4, start_pos=2, event_idx=event_idx)
    mem = ram.memory
    dq.post_rx(64, count=3)
    ids = q.pop_avail(mem, 3)
    dq.disable_interrupts()
    old = q.used_idx
    q.push_used(mem, ids[:1], [10])
    assert not q.needs_interrupt(mem, old_used_idx=old, event_idx=event_idx)
    assert dq.enable_interrupts()  # pending already
    assert len(dq.reap()) == 1
    assert not dq.enable_interrupts(after=1)
    old = q.used_idx
    q.push_used(mem, ids[1:2], [10])
    # EVENT_IDX: the driver asked for the descriptor after the next one.
    assert q.needs_interrupt(mem, old_used_idx=old, event_idx=event_idx) is (not event_idx)
    old = q.used_idx
    q.push_used(mem, ids[2:], [10])
    assert q.needs_interrupt(mem, old_used_idx=old, event_idx=event_idx)
    assert not q.needs_interrupt(mem, old_used_idx=q.used_idx, event_idx=event_idx)


def test_the_driver_model_catches_a_device_returning_an_unknown_id() -> None:
    ram, dq, q = _pair(4)
    mem = ram.memory
    dq.post_rx(64)
    q.pop_avail(mem, 1)
    q.push_used(mem, [3], [0])
    with pytest.raises(DeviceError):
        dq.reap()


def test_vring_base_round_trip_and_config_checks() -> None:
    q = PackedQueue(
        index=0, size=100, desc_addr=0x1000, driver_addr=0x2000, device_addr=0x3004,
        avail_pos=7, avail_wrap=0, used_pos=99, used_wrap=1,
    )  # fmt: skip
    assert q.vring_base == 7 | (99 | 0x8000) << 16
    again = PackedQueue.from_vring_base(
        q.vring_base, index=0, size=100, desc_addr=0x1000, driver_addr=0x2000, device_addr=0x3004
    )
    assert (again.avail_pos, again.avail_wrap, again.used_pos, again.used_wrap) == (7, 0, 99, 1)
    # QEMU sends both halves; the used side at 0 with wrap 0 is a real state (one lap used).
    lap = PackedQueue.from_vring_base(
        5 | 0x8000, index=0, size=100, desc_addr=0x1000, driver_addr=0x2000, device_addr=0x3004
    )
    assert (lap.avail_pos, lap.avail_wrap, lap.used_pos, lap.used_wrap) == (5, 1, 0, 0)
    for bad in (
        {"size": 0},
        {"size": 32769},
        {"desc_addr": 0x1008},
        {"driver_addr": 0x2002},
        {"used_pos": 100},
    ):
        kw = {"index": 0, "size": 100, "desc_addr": 0x1000, "driver_addr": 0x2000, "device_addr": 0x3000}
        kw.update(bad)
        with pytest.raises(QueueConfigError):
            PackedQueue(**kw)


def test_a_ring_outside_guest_memory_is_a_guest_memory_error() -> None:
    ram = GuestRam()
    q = PackedQueue(index=4, size=8, desc_addr=ram.end, driver_addr=0x4000_0000, device_addr=0x4000_0010)
    with pytest.raises(GuestMemoryError) as err:
        q.avail_pending(ram.memory)
    assert err.value.queue == 4


def test_recycle_reposts_used_buffers_unchanged_round_the_ring() -> None:
    ram, dq, q = _pair(5, start_pos=2)
    mem = ram.memory
    ids = dq.post_rx(64, count=2, layout=TxLayout.TWO)
    for _ in range(6):  # 2 chains of 2 descriptors in a ring of 5: every lap shifts them
        batch = q.pop_chains(mem, 8)
        assert sorted(batch.heads.tolist()) == sorted(ids) and not batch.error.any()
        assert batch.writable_len.tolist() == [64, 64]
        q.push_used(mem, batch.heads, [0, 0])
        assert dq.recycle() == 2
    assert dq.in_flight == 2 and dq.num_free == 1


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 9),
    start_pos=st.integers(0, 8),
    start_wrap=st.integers(0, 1),
    seed=st.integers(0, 2**32 - 1),
    n_ops=st.integers(100, 300),
)
def test_random_driver_and_device_sessions_agree(
    size: int, start_pos: int, start_wrap: int, seed: int, n_ops: int
) -> None:
    """Posting good and malformed chains, popping any number, completing in any order and reaping,
    round the ring many times: every chain comes back once, with its id and the length written, and
    the driver finds every used descriptor where it looks (it raises DeviceError otherwise)."""
    ram, dq, q = _pair(size, start_pos=start_pos % size, start_wrap=start_wrap)
    mem = ram.memory
    posted: dict[int, int] = {}  # id -> writable bytes
    popped: list[int] = []
    returned: dict[int, int] = {}
    kinds = [k for k in PackedMalformed if k is not PackedMalformed.UNENDED]
    rng = random.Random(seed)
    names = ["post"] * 4 + ["bad", "pop", "pop", "complete", "complete", "reap", "reap"]
    ops = [(rng.choice(names), rng.randrange(1 << 16)) for _ in range(n_ops)]
    for op, arg in ops:
        if op == "post" and dq.in_flight < size:
            layout = list(TxLayout)[arg % 3]
            n = 16 + arg % 50
            try:
                (i,) = dq.post_rx(n, layout=layout) if arg & 4 else [dq.post_tx(bytes(n), layout=layout)]
            except (MemoryError, ValueError):  # the ring is full, or two segments in a queue of one
                continue
            posted[i] = n if arg & 4 else 0
        elif op == "bad" and dq.in_flight < size:
            try:
                posted[dq.post_malformed(kinds[arg % len(kinds)])] = 0
            except MemoryError:
                continue
        elif op == "pop":
            batch = q.pop_chains(mem, arg % (size + 2))
            popped += batch.heads.tolist()
        elif op == "complete" and popped:
            k = 1 + arg % len(popped)
            order = sorted(range(len(popped)), key=lambda j: (j * (arg | 1)) % 97)[:k]
            done = [popped[j] for j in order]
            popped = [x for j, x in enumerate(popped) if j not in order]
            lens = [posted[i] // 2 for i in done]
            q.push_used(mem, done, lens)
            returned.update(zip(done, lens, strict=True))
        elif op == "reap":
            for c in dq.reap():
                assert returned.pop(c.id) == c.len
                del posted[c.id]
    # Drain: pop everything, complete it, reap it all.
    popped += q.pop_chains(mem, size + 1).heads.tolist()
    q.push_used(mem, popped, [posted[i] // 2 for i in popped])
    returned.update((i, posted[i] // 2) for i in popped)
    for c in dq.reap():
        assert returned.pop(c.id) == c.len
        del posted[c.id]
    assert not posted and not returned and dq.in_flight == 0 and dq.num_free == size
    assert (q.avail_pos, q.avail_wrap) == (q.used_pos, q.used_wrap) == (dq.next_avail, dq.avail_wrap)
    event(f"{min(q.used_idx // size, 4)}+ laps of the ring")
