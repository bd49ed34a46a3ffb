"""Inflight tracking for packed rings (vhost-user spec, "Inflight I/O tracking", QueueRegionPacked):
the layout, and a backend that dies at each point of a completion, restarts from the region, and
completes every chain exactly once, checked by the packed driver model reading the ring; the batch
operations byte for byte against the spec's one-descriptor-at-a-time steps; and regions that cannot be
trusted, refused without a byte changed."""

from __future__ import annotations

import enum
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rings.chains import ChainBatch
from rings.driver import VIRTIO_NET_HDR_SIZE, GuestRam, TxLayout
from rings.driver_packed import PackedDriverQueue
from rings.inflight import InflightRegionError
from rings.inflight_packed import (
    DESC_STATE_PACKED_DTYPE,
    PACKED_HEADER_DTYPE,
    InflightPackedQueue,
    InflightPackedRegion,
    PackedRecovery,
    packed_inflight_size,
    packed_region_size,
)
from rings.packed import PackedQueue
from rings.packed_layout import PDESC_DTYPE, advance

EXAMPLES = int(os.environ.get("NICSIM_FUZZ_EXAMPLES", "100"))
GUARD = 64
GUARD_BYTE = 0xA5


def test_layout_matches_the_c_structures() -> None:
    assert PACKED_HEADER_DTYPE.itemsize == 32  # 29 bytes of fields, desc[] aligned to 8
    assert (
        PACKED_HEADER_DTYPE.fields is not None
        and PACKED_HEADER_DTYPE.fields["old_used_wrap_counter"][1] == 21
    )
    assert DESC_STATE_PACKED_DTYPE.itemsize == 32
    offsets = {name: DESC_STATE_PACKED_DTYPE.fields[name][1] for name in DESC_STATE_PACKED_DTYPE.names or ()}  # type: ignore[index]
    assert offsets == {
        "inflight": 0, "padding": 1, "next": 2, "last": 4, "num": 6, "counter": 8, "id": 16, "flags": 18,
        "len": 20, "addr": 24,
    }  # fmt: skip
    # DPDK: ALIGN(32 * size + 29, 64).
    for size in (1, 2, 3, 255, 256, 1024, 32768):
        assert packed_region_size(size) == -(-(32 * size + 29) // 64) * 64
    assert packed_inflight_size(2, 256) == 2 * packed_region_size(256)


def _setup(
    size: int = 8, start_pos: int = 5
) -> tuple[GuestRam, PackedDriverQueue, PackedQueue, np.ndarray, InflightPackedQueue]:  # type: ignore[type-arg]
    ram = GuestRam()
    dq = PackedDriverQueue(ram, index=1, size=size, start_pos=start_pos)
    q = dq.device_queue()
    buf = np.zeros(packed_region_size(size), dtype=np.uint8)
    iq = InflightPackedQueue(buf, index=1, queue_size=size)
    rec = iq.recover(ram.memory, q.desc_addr, used_pos=start_pos, used_wrap=1)
    assert rec.fresh and rec.resubmit.ids.shape[0] == 0
    return ram, dq, q, buf, iq


@pytest.mark.parametrize("crash", ["before_push", "after_push", "after_post"])
def test_restart_at_each_point_of_a_completion_completes_every_chain_once(crash: str) -> None:
    ram, dq, q, buf, iq = _setup()
    mem = ram.memory
    frames = [b"zero", b"one", b"two", b"three"]
    layouts = [TxLayout.TWO, TxLayout.INDIRECT, TxLayout.ONE, TxLayout.TWO]
    ids = [dq.post_tx(f, layout=lay) for f, lay in zip(frames, layouts, strict=True)]
    got = q.pop_avail(mem, 8)
    assert got.tolist() == ids
    before = q.walk(mem, got)
    descs, nd = q.popped_descriptors(mem)
    assert nd.tolist() == [2, 1, 1, 2]
    iq.mark_popped(descs, nd)

    # One completion that finishes, then one the backend dies in.
    iq.pre_put([ids[1]])
    q.push_used(mem, [ids[1]], [0])
    iq.post_put([ids[1]])
    assert [c.id for c in dq.reap()] == [ids[1]]
    iq.pre_put([ids[0]])
    if crash != "before_push":
        q.push_used(mem, [ids[0]], [0])
    if crash == "after_post":
        iq.post_put([ids[0]])
    done = {ids[1]} | ({ids[0]} if crash != "before_push" else set())

    # Restart: a new process maps the same region.
    iq2 = InflightPackedQueue(buf, index=1, queue_size=8)
    rec = iq2.recover(mem, q.desc_addr, used_pos=0, used_wrap=0)
    assert not rec.fresh and rec.lost == 0
    assert rec.committed is (crash == "after_push")
    pending = [i for i in ids if i not in done]
    assert rec.resubmit.ids.tolist() == pending  # oldest first
    assert (rec.used_pos, rec.used_wrap) == (q.used_pos, q.used_wrap)
    assert (rec.avail_pos, rec.avail_wrap) == (q.avail_pos, q.avail_wrap)

    q2 = PackedQueue(
        index=1, size=8, desc_addr=q.desc_addr, driver_addr=q.driver_addr, device_addr=q.device_addr,
        avail_pos=rec.avail_pos, avail_wrap=rec.avail_wrap, used_pos=rec.used_pos, used_wrap=rec.used_wrap,
    )  # fmt: skip
    again = q2.resubmit(mem, rec.resubmit)
    assert again.heads.tolist() == pending and not again.error.any()
    data, starts = again.gather_readable(mem)
    old_data, old_starts = before.gather_readable(mem)
    for k, i in enumerate(pending):
        j = ids.index(i)
        want = old_data[int(old_starts[j]) : int(old_starts[j]) + int(before.readable_len[j])]
        assert np.array_equal(data[int(starts[k]) : int(starts[k]) + int(again.readable_len[k])], want)
    descs2, nd2 = np.empty(0, dtype=descs.dtype), np.empty(0, np.int64)
    iq2.mark_popped(descs2, nd2)
    iq2.pre_put(again.heads)
    q2.push_used(mem, again.heads, np.zeros(len(again), np.uint32))
    iq2.post_put(again.heads)
    # The driver reads every used descriptor where it expects it, each id once.
    # (ids[0] too when its used descriptor was written before the crash: the driver had not read it.)
    reaped = sorted(c.id for c in dq.reap())
    assert reaped == sorted(pending + ([ids[0]] if crash != "before_push" else []))
    assert dq.in_flight == 0 and dq.num_free == 8

    # And the queue goes on from there, with nothing left to resubmit.
    new = dq.post_tx(b"four")
    assert q2.pop_avail(mem, 8).tolist() == [new]
    iq3 = InflightPackedQueue(buf, index=1, queue_size=8)
    assert iq3.recover(mem, q.desc_addr, used_pos=0, used_wrap=0).resubmit.ids.shape[0] == 0


def test_a_corrupt_region_is_refused_unchanged() -> None:
    ram, dq, q, buf, iq = _setup(size=4, start_pos=0)
    mem = ram.memory
    dq.post_tx(b"x", layout=TxLayout.TWO)
    q.pop_avail(mem, 4)
    iq.mark_popped(*q.popped_descriptors(mem))
    e = iq.e
    head = int(np.flatnonzero(e["inflight"])[0])
    e["num"][head] = 200  # longer than the queue
    before = buf.copy()
    with pytest.raises(InflightRegionError) as err:
        InflightPackedQueue(buf, index=1, queue_size=4).recover(mem, q.desc_addr, used_pos=0, used_wrap=1)
    assert err.value.reason == "chain" and np.array_equal(buf, before)
    with pytest.raises(ValueError):
        InflightPackedQueue(buf, index=1, queue_size=8)  # a buffer too short for 8 entries
    iq.h["desc_num"] = 3
    with pytest.raises(InflightRegionError):
        InflightPackedQueue(buf, index=1, queue_size=4).recover(mem, q.desc_addr, used_pos=0, used_wrap=1)
    iq.h["desc_num"] = 4
    iq.h["version"] = 7
    with pytest.raises(InflightRegionError):
        InflightPackedQueue(buf, index=1, queue_size=4).recover(mem, q.desc_addr, used_pos=0, used_wrap=1)


def test_region_hands_out_one_queue_per_index() -> None:
    buf = bytearray(packed_inflight_size(2, 16))
    region = InflightPackedRegion(buf, num_queues=2, queue_size=16)
    assert region.queue(1).index == 1
    with pytest.raises(IndexError):
        region.queue(2)
    region.release()
    with pytest.raises(ValueError):
        InflightPackedRegion(bytearray(10), num_queues=2, queue_size=16)


def test_chains_beyond_the_free_list_are_left_untracked() -> None:
    # Only a driver reusing an id in flight gets here: more descriptors in flight than the queue size.
    ram, dq, q, buf, iq = _setup(size=2, start_pos=0)
    mem = ram.memory
    dq.post_tx(b"x", layout=TxLayout.TWO)
    q.pop_avail(mem, 2)
    descs, nd = q.popped_descriptors(mem)
    assert iq.mark_popped(descs, nd) == 0
    assert iq.mark_popped(descs, nd) == 1  # the free list is empty now
    rec = InflightPackedQueue(buf, index=1, queue_size=2).recover(mem, q.desc_addr, used_pos=0, used_wrap=1)
    assert rec.resubmit.ids.tolist() == [int(descs[-1]["id"])] and rec.lost == 0


# -- the batch operations are the spec's steps, byte for byte --------------------------------------------


def _spec_mark(iq: InflightPackedQueue, descs: np.ndarray, nd: list[int], counter: int) -> int:  # type: ignore[type-arg]
    """vhost-user spec, "When receiving available buffers", one descriptor at a time."""
    h, e = iq.h, iq.e
    at = 0
    for k in nd:
        for j in range(k):
            d = descs[at + j]
            ofh, fh = int(h["old_free_head"][0]), int(h["free_head"][0])
            if j == 0:
                e["num"][ofh] = 0
                e["counter"][ofh] = counter
                counter += 1
                e["inflight"][ofh] = 1
            if j == k - 1:
                e["last"][ofh] = fh
            e["num"][ofh] += 1
            for name in ("addr", "len", "flags", "id"):
                e[name][fh] = d[name]
            h["free_head"] = e["next"][fh]
            if j == k - 1:
                h["old_free_head"] = h["free_head"]
        at += k
    return counter


def _spec_put(iq: InflightPackedQueue, heads: list[int], used: tuple[int, int]) -> None:
    """vhost-user spec, "When supplying used buffers", one chain at a time."""
    h, e = iq.h, iq.e
    for head in heads:
        e["next"][e["last"][head]] = h["free_head"][0]
        h["free_head"] = head
    h["used_idx"], h["used_wrap_counter"] = used
    for head in heads:
        e["inflight"][head] = 0
    for name in ("free_head", "used_idx", "used_wrap_counter"):
        h["old_" + name] = h[name][0]


@settings(max_examples=EXAMPLES, deadline=None)
@given(size=st.sampled_from([1, 2, 5, 16]), seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 30))
def test_batch_operations_write_what_the_specs_steps_write(size: int, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    fast_buf = np.zeros(packed_region_size(size), np.uint8)
    ram = GuestRam()
    ring = PackedDriverQueue(ram, index=0, size=size).desc_addr
    fast = InflightPackedQueue(fast_buf, index=0, queue_size=size)
    fast.recover(ram.memory, ring, used_pos=0, used_wrap=1)
    spec_buf = fast_buf.copy()
    spec = InflightPackedQueue(spec_buf, index=0, queue_size=size)
    counter = 0
    head_of: dict[int, int] = {}  # id -> head entry, for the spec's side
    ndesc_of: dict[int, int] = {}
    pos, wrap = 0, 1
    free_ids = list(range(1000, 1000 + size))
    for _ in range(rounds):
        free = size - sum(ndesc_of.values())
        nd: list[int] = []
        while free and rng.random() < 0.7:
            k = rng.randint(1, free)
            nd.append(k)
            free -= k
        descs = np.zeros(sum(nd), PDESC_DTYPE)
        descs["addr"] = [rng.getrandbits(64) for _ in range(sum(nd))]
        descs["len"] = [rng.getrandbits(32) for _ in range(sum(nd))]
        descs["flags"] = [rng.getrandbits(16) for _ in range(sum(nd))]
        ends = np.cumsum(np.array(nd, np.int64)) - 1
        ids = [free_ids.pop(rng.randrange(len(free_ids))) for _ in nd]
        descs["id"][ends] = ids
        for i, k, end in zip(ids, nd, ends.tolist(), strict=True):
            head_of[i] = int(spec.h["old_free_head"][0])
            counter = _spec_mark(spec, descs[end + 1 - k : end + 1], [k], counter)
            ndesc_of[i] = k
        assert fast.mark_popped(descs, np.array(nd, np.int64)) == 0
        assert np.array_equal(fast_buf, spec_buf), "mark_popped"
        done = [i for i in ndesc_of if rng.random() < 0.5]
        rng.shuffle(done)
        for i in done:
            pos, wrap = advance(pos, wrap, ndesc_of.pop(i), size)
            free_ids.append(i)
        _spec_put(spec, [head_of.pop(i) for i in done], (pos, wrap))
        fast.pre_put(np.array(done, np.uint16), (pos, wrap))
        fast.post_put(np.array(done, np.uint16))
        assert np.array_equal(fast_buf, spec_buf), "pre_put/post_put"
    assert fast.free_entries == size - sum(ndesc_of.values())


# -- crashes at every step, against the packed driver model ------------------------------------------------


class Point(enum.Enum):
    """Where in one device batch the backend dies."""

    AFTER_POP = "popped, nothing recorded"
    MID_MARK = "chains recorded, old_free_head not moved"
    AFTER_MARK = "popped and recorded, nothing completed"
    MID_PRE_PUT = "entries freed, used position not recorded"
    AFTER_PRE_PUT = "completion recorded, ring untouched"
    MID_PUSH = "used descriptors written but the first one's flags"
    AFTER_PUSH = "used descriptors visible, not committed"
    MID_POST_PUT = "inflight cleared, not committed"
    AFTER_POST_PUT = "batch finished"


class Crash(Exception):
    pass


@dataclass(frozen=True)
class CrashPlan:
    round: int
    point: Point


_LAYOUT_DESCS = {TxLayout.ONE: 1, TxLayout.TWO: 2, TxLayout.INDIRECT: 1}


class Backend:
    """The device side of one packed TX queue with inflight tracking; its Python state dies in a crash.
    ``pushed`` (kept by the harness) is the serial each id was last completed with."""

    def __init__(self, dq: PackedDriverQueue, buf: np.ndarray, pushed: dict[int, int]) -> None:  # type: ignore[type-arg]
        self.mem = dq.ram.new_memory_table()  # a reconnect brings a new SET_MEM_TABLE
        self.iq = InflightPackedQueue(buf, index=0, queue_size=dq.size)
        self.rec = self.iq.recover(self.mem, dq.desc_addr, used_pos=dq.start_pos, used_wrap=dq.start_wrap)
        r = self.rec
        self.q = PackedQueue(
            index=0, size=dq.size, desc_addr=dq.desc_addr, driver_addr=dq.driver_addr,
            device_addr=dq.device_addr, avail_pos=r.avail_pos, avail_wrap=r.avail_wrap,
            used_pos=r.used_pos, used_wrap=r.used_wrap,
        )  # fmt: skip
        self.pushed = pushed
        self.held: dict[int, int] = {}  # id -> the serial its frame carries
        if r.resubmit.ids.shape[0]:
            self._take(self.q.resubmit(self.mem, r.resubmit))

    def _take(self, cb: ChainBatch) -> None:
        data, starts = cb.gather_readable(self.mem)
        for k, i in enumerate(cb.heads.tolist()):
            assert i not in self.held, f"id {i} taken twice"
            assert not cb.error[k]
            at = int(starts[k]) + VIRTIO_NET_HDR_SIZE
            self.held[i] = int.from_bytes(data[at : at + 4].tobytes(), "little")

    def step(self, rng: random.Random, point: Point | None) -> None:
        q, iq, mem = self.q, self.iq, self.mem
        ids = q.pop_avail(mem, rng.randrange(1, q.size + 1))
        if point is Point.AFTER_POP:
            raise Crash
        descs, nd = q.popped_descriptors(mem)
        if point is Point.MID_MARK:
            old = int(iq.h["old_free_head"][0])
            iq.mark_popped(descs, nd)
            iq.h["old_free_head"] = old
            raise Crash
        assert iq.mark_popped(descs, nd) == 0
        if point is Point.AFTER_MARK:
            raise Crash
        self._take(q.walk(mem, ids))
        done = [i for i in self.held if rng.random() < 0.6]
        rng.shuffle(done)  # out of order
        batch = np.array(done, np.uint16)
        if point is Point.MID_PRE_PUT:
            pos, wrap = int(iq.h["used_idx"][0]), int(iq.h["used_wrap_counter"][0])
            iq.pre_put(batch, q.used_after(batch))
            iq.h["used_idx"], iq.h["used_wrap_counter"] = pos, wrap
            raise Crash
        iq.pre_put(batch, q.used_after(batch))
        if point is Point.AFTER_PRE_PUT:
            raise Crash
        for i in done:
            self.pushed[i] = self.held[i]
        flags = self.mem.view_as(q.desc_addr, PDESC_DTYPE, q.size)["flags"]
        first_pos, first = q.used_pos, int(flags[q.used_pos])
        q.push_used(mem, batch, np.zeros(len(done), np.uint32))
        if point is Point.MID_PUSH:
            flags[first_pos] = first
            raise Crash
        if point is Point.AFTER_PUSH:
            raise Crash
        if point is Point.MID_POST_PUT:
            iq.e["inflight"][iq._freeing] = 0
            raise Crash
        iq.post_put(batch)
        for i in done:
            del self.held[i]
        if point is Point.AFTER_POST_PUT:
            raise Crash


@dataclass
class Guest:
    dq: PackedDriverQueue
    total: int
    pushed: dict[int, int]
    posted: int = 0
    expect: dict[int, int] = field(default_factory=dict)  # id -> serial
    completed: list[int] = field(default_factory=list)

    def post(self, rng: random.Random) -> None:
        for _ in range(rng.randrange(0, self.dq.size + 1)):
            layouts = [lay for lay, need in _LAYOUT_DESCS.items() if need <= self.dq.num_free]
            if self.dq.size == 1:  # an indirect header + frame is a table of two: not on a queue of one
                layouts = [lay for lay in layouts if lay is TxLayout.ONE]
            if self.posted == self.total or not layouts:
                return
            serial = self.posted + 1
            frame = serial.to_bytes(4, "little") + bytes(rng.randrange(0, 40))
            i = self.dq.post_tx(frame, layout=rng.choice(layouts))
            self.expect[i] = serial
            self.posted += 1

    def reap(self) -> None:
        for c in self.dq.reap():  # DeviceError on an id not in flight
            serial = self.expect.pop(c.id)
            assert self.pushed[c.id] == serial, f"id {c.id}: completion of another posting"
            self.completed.append(serial)

    @property
    def finished(self) -> bool:
        return self.posted == self.total and self.dq.in_flight == 0


def run_with_crashes(
    *, seed: int, size: int, start_pos: int, start_wrap: int, total: int, crashes: list[CrashPlan]
) -> list[PackedRecovery]:
    """Drive ``total`` postings through a backend that dies as ``crashes`` say; every restart's
    PackedRecovery. Fails on a double completion, a lost chain (stall) or a write outside the buffer."""
    rng = random.Random(seed)
    ram = GuestRam(region_sizes=(256 << 10, 256 << 10))
    dq = PackedDriverQueue(ram, index=0, size=size, start_pos=start_pos, start_wrap=start_wrap)
    pushed: dict[int, int] = {}
    guest = Guest(dq, total, pushed)
    buf = np.full(packed_region_size(size) + 2 * GUARD, GUARD_BYTE, dtype=np.uint8)
    region = buf[GUARD:-GUARD]
    region[:] = 0  # GET_INFLIGHT_FD hands out a zeroed buffer
    backend = Backend(dq, region, pushed)
    plan = {c.round: c.point for c in crashes}
    restarts: list[PackedRecovery] = []
    for rnd in range(20 * total + 100):
        guest.post(rng)
        try:
            backend.step(rng, plan.get(rnd))
        except Crash:
            guest.reap()  # the guest carries on while the backend is down
            guest.post(rng)
            backend = Backend(dq, region, pushed)
            restarts.append(backend.rec)
        guest.reap()
        if guest.finished:
            break
    assert guest.finished, f"stalled: {dq.in_flight} chains never completed, held {sorted(backend.held)}"
    assert sorted(guest.completed) == list(range(1, total + 1))
    assert not backend.held and backend.iq.in_flight().shape[0] == 0
    assert backend.iq.free_entries == size
    assert (buf[:GUARD] == GUARD_BYTE).all() and (buf[-GUARD:] == GUARD_BYTE).all()
    return restarts


def test_without_crashes_every_posting_completes_once() -> None:
    assert run_with_crashes(seed=1, size=8, start_pos=5, start_wrap=1, total=60, crashes=[]) == []


@pytest.mark.parametrize("start_wrap", [1, 0])
@pytest.mark.parametrize("point", list(Point))
def test_a_crash_at_each_step_of_a_batch_completes_every_chain_exactly_once(
    point: Point, start_wrap: int
) -> None:
    crashes = [CrashPlan(r, point) for r in (3, 4, 9)]  # twice in a row, then again later
    restarts = run_with_crashes(seed=7, size=8, start_pos=6, start_wrap=start_wrap, total=50, crashes=crashes)
    assert len(restarts) == 3 and not any(r.fresh for r in restarts)
    if point is Point.AFTER_PUSH:
        assert any(r.committed for r in restarts)  # the ring showed the batch: kept
    if point in (Point.AFTER_MARK, Point.AFTER_PRE_PUT, Point.MID_PUSH):
        assert any(r.resubmit.ids.shape[0] for r in restarts)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.sampled_from([1, 2, 3, 4, 8, 16]),
    start=st.integers(0, 15),
    start_wrap=st.integers(0, 1),
    total=st.integers(1, 40),
    crashes=st.lists(
        st.builds(CrashPlan, st.integers(0, 30), st.sampled_from(list(Point))),
        max_size=6,
        unique_by=lambda c: c.round,
    ),
)
def test_random_crash_schedules_complete_every_chain_exactly_once(
    seed: int, size: int, start: int, start_wrap: int, total: int, crashes: list[CrashPlan]
) -> None:
    run_with_crashes(seed=seed, size=size, start_pos=start % size, start_wrap=start_wrap, total=total,
                     crashes=crashes)  # fmt: skip


# -- regions that cannot be trusted ----------------------------------------------------------------------


def _busy_region(size: int = 8) -> tuple[GuestRam, PackedQueue, np.ndarray, InflightPackedQueue]:  # type: ignore[type-arg]
    """A region with chains in flight: a two-descriptor one, then a one-descriptor one, one completed."""
    ram = GuestRam()
    dq = PackedDriverQueue(ram, index=0, size=size, start_pos=0)
    q = dq.device_queue()
    buf = np.zeros(packed_region_size(size), np.uint8)
    iq = InflightPackedQueue(buf, index=0, queue_size=size)
    iq.recover(ram.memory, q.desc_addr, used_pos=0, used_wrap=1)
    a = dq.post_tx(b"a", layout=TxLayout.TWO)
    dq.post_tx(b"b", layout=TxLayout.ONE)
    c = dq.post_tx(b"c", layout=TxLayout.TWO)
    q.pop_avail(ram.memory, 8)
    iq.mark_popped(*q.popped_descriptors(ram.memory))
    iq.pre_put([c], q.used_after([c]))
    q.push_used(ram.memory, [c], [0])
    iq.post_put([c])
    assert sorted(int(i) for i in iq.e["id"][iq.e["last"][iq.in_flight()]]) == sorted([a, a + 1])
    return ram, q, buf, iq


def _heads(iq: InflightPackedQueue) -> tuple[int, int]:
    two, one = (int(h) for h in iq.in_flight())
    assert iq.e["num"][two] == 2 and iq.e["num"][one] == 1
    return two, one


def _poke_cycle(iq: InflightPackedQueue) -> None:
    f = int(iq.h["old_free_head"][0])
    iq.e["next"][int(iq.e["next"][f])] = f


def _poke_member_free(iq: InflightPackedQueue) -> None:
    two, _ = _heads(iq)
    iq.h["old_free_head"] = iq.e["last"][two]


POKES: dict[str, tuple[Callable[[InflightPackedQueue], None], str]] = {
    "version": (lambda iq: iq.h.__setitem__("version", 2), "version"),
    "desc_num": (lambda iq: iq.h.__setitem__("desc_num", 7), "desc_num"),
    "used_idx": (lambda iq: iq.h.__setitem__("old_used_idx", 8), "used_idx"),
    "wrap": (lambda iq: iq.h.__setitem__("old_used_wrap_counter", 2), "wrap"),
    "free_list_cycle": (_poke_cycle, "free_list"),
    "num_zero": (lambda iq: iq.e["num"].__setitem__(_heads(iq)[1], 0), "chain"),
    "num_too_big": (lambda iq: iq.e["num"].__setitem__(_heads(iq)[1], 9), "chain"),
    "link_out_of_table": (lambda iq: iq.e["next"].__setitem__(_heads(iq)[0], 200), "chain"),
    "wrong_last": (lambda iq: iq.e["last"].__setitem__(_heads(iq)[0], _heads(iq)[0]), "chain"),
    "chains_share_an_entry": (lambda iq: iq.e["next"].__setitem__(_heads(iq)[0], _heads(iq)[1]), "chain"),
    "chain_loops": (lambda iq: iq.e["next"].__setitem__(_heads(iq)[0], _heads(iq)[0]), "chain"),
    "member_on_the_free_list": (_poke_member_free, "chain"),
}


@pytest.mark.parametrize("name", list(POKES))
def test_a_region_that_cannot_be_trusted_is_refused_and_nothing_changes(name: str) -> None:
    ram, q, buf, iq = _busy_region()
    poke, reason = POKES[name]
    poke(iq)
    before, ring = buf.copy(), ram.read(q.desc_addr, 16 * q.size)
    with pytest.raises(InflightRegionError) as err:
        fresh = InflightPackedQueue(buf, index=0, queue_size=8)
        fresh.recover(ram.memory, q.desc_addr, used_pos=0, used_wrap=1)
    assert err.value.reason == reason and err.value.queue == 0
    assert "inflight region" in str(err.value)
    assert np.array_equal(buf, before) and ram.read(q.desc_addr, 16 * q.size) == ring


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(
    size=st.sampled_from([1, 2, 8, 32]),
    raw=st.binary(min_size=0, max_size=1200),
    used=st.integers(0, 31),
    sparse=st.booleans(),
)
def test_recovery_of_any_bytes_stays_inside_the_region_and_is_consistent(
    size: int, raw: bytes, used: int, sparse: bool
) -> None:
    n = packed_region_size(size)
    buf = np.full(n + 2 * GUARD, GUARD_BYTE, dtype=np.uint8)
    body = np.frombuffer(raw.ljust(n, b"\0")[:n], dtype=np.uint8)
    if sparse:  # mostly zeros: plausible links and counts instead of noise
        body = np.where(np.arange(n) % 7 == 0, body, 0).astype(np.uint8)
    buf[GUARD:-GUARD] = body
    ram = GuestRam()
    dq = PackedDriverQueue(ram, index=0, size=size)
    iq = InflightPackedQueue(buf[GUARD:-GUARD], index=0, queue_size=size)
    iq.h["version"], iq.h["desc_num"] = 1, size
    iq.h["used_idx"] = iq.h["old_used_idx"] = used % size
    iq.h["used_wrap_counter"] &= 1
    iq.h["old_used_wrap_counter"] &= 1
    try:
        rec = iq.recover(ram.memory, dq.desc_addr, used_pos=0, used_wrap=1)
    except InflightRegionError as err:
        assert err.reason in {"free_list", "chain", "used_idx", "wrap"}
    else:
        ids = rec.resubmit.ids.tolist()
        assert len(set(ids)) == len(ids)
        nd = rec.resubmit.ndesc
        assert (nd >= 1).all() and int(nd.sum()) <= size and iq.free_entries == size - int(nd.sum())
        # What recovery wrote is a consistent region: a second recovery finds the same chains.
        again = InflightPackedQueue(buf[GUARD:-GUARD], index=0, queue_size=size)
        rec2 = again.recover(ram.memory, dq.desc_addr, used_pos=0, used_wrap=1)
        assert rec2.resubmit.ids.tolist() == ids
        assert (rec2.used_pos, rec2.used_wrap) == (rec.used_pos, rec.used_wrap)
    assert (buf[:GUARD] == GUARD_BYTE).all() and (buf[-GUARD:] == GUARD_BYTE).all()
