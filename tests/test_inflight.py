"""Inflight I/O tracking (rings.inflight): the libvhost-user layout, and crash recovery that completes
every chain exactly once.

The crash tests run the real device side (SplitQueue + InflightQueue) against the driver model
(rings.driver) sending TX frames that carry a serial number; the device returns each chain with the
serial as its used length, so the driver can tell a late duplicate of an earlier posting of the same
head from the real completion. The backend "dies" at a chosen step of a batch (its Python state is
dropped, guest memory and the inflight buffer survive), the guest keeps posting, and a fresh backend
is built from the inflight buffer and the rings. Every posting must be completed exactly once: no
stall, no double completion.
"""

from __future__ import annotations

import enum
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rings.driver import VIRTIO_NET_HDR_SIZE, DriverQueue, GuestDriver, Malformed, TxLayout
from rings.errors import DeviceError
from rings.inflight import (
    DESC_STATE_DTYPE,
    INFLIGHT_ALIGNMENT,
    INFLIGHT_HEADER_DTYPE,
    INFLIGHT_VERSION,
    NO_HEAD,
    InflightQueue,
    InflightRegion,
    InflightRegionError,
    Recovery,
    inflight_size,
    queue_region_size,
    ring_used_idx,
)
from rings.split import SplitQueue

EXAMPLES = int(os.environ.get("NICSIM_FUZZ_EXAMPLES", "100"))
"""Hypothesis budget per test; ``scripts/fuzz.py --examples N`` raises it for long runs."""

GUARD = 64
GUARD_BYTE = 0xA5


# -- layout -------------------------------------------------------------------------------------------


def _offsets(dt: np.dtype[np.void]) -> dict[str, int]:
    assert dt.fields is not None
    return {name: spec[1] for name, spec in dt.fields.items()}


def test_dtypes_match_the_spec_structs_byte_for_byte() -> None:
    assert INFLIGHT_HEADER_DTYPE.itemsize == 16
    assert _offsets(INFLIGHT_HEADER_DTYPE) == {
        "features": 0,
        "version": 8,
        "desc_num": 10,
        "last_batch_head": 12,
        "used_idx": 14,
    }
    assert DESC_STATE_DTYPE.itemsize == 16
    assert _offsets(DESC_STATE_DTYPE) == {"inflight": 0, "padding": 1, "next": 6, "counter": 8}


def test_region_size_is_libvhost_users_for_every_queue_size() -> None:
    for qs in range(1, 32769):
        libvhost = -(-(16 * qs + 2) // 64) * 64  # vu_inflight_queue_size()
        assert queue_region_size(qs) == libvhost
        assert queue_region_size(qs) >= 16 + 16 * qs
    assert inflight_size(2, 256) == 2 * (16 * 256 + 64)
    assert queue_region_size(256) % INFLIGHT_ALIGNMENT == 0
    for bad in (0, 32769):
        with pytest.raises(ValueError):
            queue_region_size(bad)


def test_queue_regions_sit_back_to_back_at_their_aligned_offsets() -> None:
    buf = bytearray(inflight_size(3, 5))
    region = InflightRegion(buf, num_queues=3, queue_size=5)
    region.queue(2).mark_popped([4])
    step = queue_region_size(5)
    entry = 2 * step + 16 + 4 * 16
    assert buf[entry] == 1  # desc[4].inflight of queue 2, in the caller's own buffer
    assert sum(buf) == 1
    with pytest.raises(IndexError):
        region.queue(3)


def test_a_short_or_read_only_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="needed"):
        InflightRegion(bytearray(inflight_size(1, 8) - 1), num_queues=1, queue_size=8)
    with pytest.raises(ValueError, match="read-only"):
        InflightRegion(bytes(inflight_size(1, 8)), num_queues=1, queue_size=8)


def test_release_drops_the_views_so_the_owner_can_resize_its_buffer() -> None:
    buf = bytearray(inflight_size(1, 4))
    region = InflightRegion(buf, num_queues=1, queue_size=4)
    with pytest.raises(BufferError):
        buf.extend(b"x")  # exported: an mmap could not be closed either
    region.release()
    region.release()
    buf.extend(b"x")


# -- operations ---------------------------------------------------------------------------------------


def _queue(size: int = 8) -> tuple[InflightQueue, npt.NDArray[np.uint8]]:
    buf = np.zeros(inflight_size(1, size), dtype=np.uint8)
    return InflightRegion(buf, num_queues=1, queue_size=size).queue(0), buf


def test_fresh_buffer_is_initialised_and_has_nothing_to_resubmit() -> None:
    q, _ = _queue()
    rec = q.recover(0x1234)
    assert rec.fresh and rec.resubmit.size == 0 and rec.used_idx == 0x1234
    assert (q.version, q.desc_num, q.used_idx, q.last_batch_head) == (INFLIGHT_VERSION, 8, 0x1234, NO_HEAD)
    again = q.recover(0x1234)
    assert not again.fresh and again.resubmit.size == 0 and again.last_avail_idx == 0x1234


def test_popped_heads_get_increasing_counters_and_come_back_oldest_first() -> None:
    q, _ = _queue()
    q.recover(0)
    q.mark_popped([5, 2])
    q.mark_popped([7, 0])
    assert q.counter[[5, 2, 7, 0]].tolist() == [0, 1, 2, 3]
    assert q.in_flight().tolist() == [5, 2, 7, 0]
    q.pre_put([2, 7])
    q.post_put([2, 7], 2)
    rec = q.recover(2)
    assert rec.resubmit.tolist() == [5, 0] and rec.last_avail_idx == 4
    assert q.next_counter == 4  # after the newest survivor (0 has counter 3)


def test_batch_published_but_not_cleared_is_cleared_from_the_last_batch_list() -> None:
    q, _ = _queue()
    q.recover(10)
    q.mark_popped([1, 3, 6, 4])
    q.pre_put([6, 1, 4])
    # used.idx moved 10 -> 13, then the process died before post_put.
    rec = q.recover(13)
    assert sorted(rec.cleared.tolist()) == [1, 4, 6]
    assert rec.resubmit.tolist() == [3]
    assert (rec.used_idx, rec.last_avail_idx, q.used_idx) == (13, 14, 13)


def test_the_last_batch_walk_never_reaches_an_older_batch() -> None:
    q, _ = _queue()
    q.recover(0)
    q.mark_popped([1, 2])
    q.pre_put([1])
    q.post_put([1], 1)
    q.mark_popped([1])  # head 1 posted again, in flight again
    q.pre_put([2])
    # A corrupt ring index two ahead: the list holds one head, and must not run on into head 1.
    rec = q.recover(3)
    assert rec.cleared.tolist() == [2]
    assert rec.resubmit.tolist() == [1]


def test_out_of_range_heads_are_not_tracked_and_an_all_bad_batch_empties_the_list() -> None:
    q, _ = _queue(4)
    q.recover(0)
    q.mark_popped([9, 2, 0xFFFF])
    assert q.in_flight().tolist() == [2]
    q.pre_put([2])
    q.post_put([2], 1)
    q.mark_popped([2])
    q.pre_put([9])  # only an untrackable head: the list must not still name head 2
    assert q.last_batch_head == NO_HEAD
    rec = q.recover(2)  # the bad head was published
    assert rec.cleared.size == 0 and rec.resubmit.tolist() == [2]


@pytest.mark.parametrize(
    ("poke", "reason"),
    [
        (lambda q: q._header.__setitem__("version", 7), "version"),
        (lambda q: q._header.__setitem__("desc_num", 9), "desc_num"),
        (lambda q: q._header.__setitem__("used_idx", 100), "used_idx"),
    ],
)
def test_an_unusable_region_is_refused_unchanged(poke: Callable[[InflightQueue], None], reason: str) -> None:
    q, buf = _queue()
    q.recover(0)
    q.mark_popped([3])
    poke(q)
    before = buf.copy()
    with pytest.raises(InflightRegionError) as err:
        q.recover(0)
    assert err.value.reason == reason and err.value.queue == 0
    assert np.array_equal(buf, before)


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(
    size=st.sampled_from([1, 2, 8, 64]),
    raw=st.binary(min_size=0, max_size=2048),
    used=st.integers(0, 0xFFFF),
    valid_header=st.booleans(),
)
def test_recovery_of_any_bytes_stays_inside_the_region_and_returns_distinct_heads(
    size: int, raw: bytes, used: int, valid_header: bool
) -> None:
    n = queue_region_size(size)
    buf = np.full(n + 2 * GUARD, GUARD_BYTE, dtype=np.uint8)
    body = np.frombuffer(raw.ljust(n, b"\0")[:n], dtype=np.uint8)
    buf[GUARD:-GUARD] = body
    q = InflightRegion(buf[GUARD:-GUARD], num_queues=1, queue_size=size).queue(0)
    if valid_header:
        q._header["version"] = INFLIGHT_VERSION
        q._header["desc_num"] = size
        q._header["used_idx"] = (used - (used % (size + 1))) & 0xFFFF
    try:
        rec = q.recover(used)
    except InflightRegionError as err:
        assert err.reason in {"version", "desc_num", "used_idx"}
    else:
        heads = rec.resubmit.tolist()
        assert len(set(heads)) == len(heads) and all(h < size for h in heads)
        assert set(heads).isdisjoint(rec.cleared.tolist())
        counters = q.counter[rec.resubmit.astype(np.int64)].tolist()
        assert counters == sorted(counters)
        assert rec.last_avail_idx == (used + len(heads)) & 0xFFFF
    assert (buf[:GUARD] == GUARD_BYTE).all() and (buf[-GUARD:] == GUARD_BYTE).all()


# -- crash recovery against the driver model ----------------------------------------------------------


class Point(enum.Enum):
    """Where in one device batch the backend dies."""

    AFTER_POP = "after pop_avail, nothing marked"
    MID_MARK = "part of the batch marked in flight"
    AFTER_MARK = "batch marked, nothing completed"
    MID_PRE_PUT = "part of the completions linked"
    AFTER_PRE_PUT = "completions linked, used ring untouched"
    AFTER_USED_ENTRIES = "used entries written, used.idx not yet"
    AFTER_USED_IDX = "used.idx published, inflight not cleared"
    MID_POST_PUT = "part of the completions cleared, used_idx not recorded"
    AFTER_POST_PUT = "batch finished"


class Crash(Exception):
    pass


@dataclass(frozen=True)
class CrashPlan:
    round: int
    point: Point
    fraction: float  # how far into the batch a MID_* crash happens


_GOOD_KINDS = {
    Malformed.LOOP: 2,
    Malformed.NEXT_OUT_OF_RANGE: 1,
    Malformed.READ_AFTER_WRITE: 3,
    Malformed.OUTSIDE_MEMORY: 2,
}
"""Malformed chains whose head is valid (so it is tracked like any other, and returned with length 0),
with the descriptors each takes."""
_LAYOUTS = {TxLayout.ONE: 1, TxLayout.TWO: 2, TxLayout.INDIRECT: 1}


class Backend:
    """The device side of one TX queue with inflight tracking; all of its Python state dies in a crash."""

    def __init__(self, dq: DriverQueue, buf: npt.NDArray[np.uint8], *, base: int) -> None:
        self.dq = dq
        self.mem = dq.ram.new_memory_table()  # a reconnect brings a new SET_MEM_TABLE
        self.iq = InflightRegion(buf, num_queues=1, queue_size=dq.size).queue(0)
        self.recovery: Recovery = self.iq.recover(ring_used_idx(self.mem, dq.used_addr))
        rec = self.recovery
        self.q = SplitQueue(
            index=0,
            size=dq.size,
            desc_addr=dq.desc_addr,
            avail_addr=dq.avail_addr,
            used_addr=dq.used_addr,
            last_avail_idx=base if rec.fresh else rec.last_avail_idx,
            used_idx=rec.used_idx,
        )
        self.held: dict[int, int] = {}  # head -> the used length it will be returned with
        self._take(rec.resubmit)

    def _take(self, heads: npt.NDArray[np.uint16]) -> None:
        batch = self.q.walk(self.mem, heads)
        data, starts = batch.gather_readable(self.mem)
        for k, head in enumerate(heads.tolist()):
            assert head not in self.held, f"head {head} taken twice"
            if batch.error[k]:
                self.held[head] = 0
            else:
                at = int(starts[k]) + VIRTIO_NET_HDR_SIZE
                self.held[head] = int.from_bytes(data[at : at + 4].tobytes(), "little")

    def step(self, rng: random.Random, crash: CrashPlan | None) -> None:
        point = crash.point if crash else None

        def cut(n: int) -> int:
            return int(n * crash.fraction) if crash else n

        heads = self.q.pop_avail(self.mem, rng.randrange(1, self.q.size + 1))
        if point is Point.AFTER_POP:
            raise Crash
        if point is Point.MID_MARK:
            self.iq.mark_popped(heads[: cut(len(heads))])
            raise Crash
        self.iq.mark_popped(heads)
        if point is Point.AFTER_MARK:
            raise Crash
        self._take(heads)
        done = [h for h in self.held if rng.random() < 0.6]
        rng.shuffle(done)  # out of order
        ids = np.array(done, dtype=np.uint16)
        lens = np.array([self.held[h] for h in done], dtype=np.uint32)
        if point is Point.MID_PRE_PUT:
            self.iq.pre_put(ids[: cut(len(ids))])
            raise Crash
        self.iq.pre_put(ids)
        if point is Point.AFTER_PRE_PUT:
            raise Crash
        if point is Point.AFTER_USED_ENTRIES:
            old = self.q.used_idx
            self.q.push_used(self.mem, ids, lens)
            self.mem.view_as(self.q.used_addr + 2, "<u2", 1)[0] = old  # the idx store never happened
            raise Crash
        self.q.push_used(self.mem, ids, lens)
        if point is Point.AFTER_USED_IDX:
            raise Crash
        if point is Point.MID_POST_PUT:
            self.iq.inflight[ids[: cut(len(ids))].astype(np.int64)] = 0
            raise Crash
        self.iq.post_put(ids, self.q.used_idx)
        for h in done:
            del self.held[h]
        if point is Point.AFTER_POST_PUT:
            raise Crash


@dataclass
class Guest:
    """The driver posting serial-numbered frames and checking each completion against its posting."""

    dq: DriverQueue
    total: int
    posted: int = 0
    expect: dict[int, tuple[int, int]] = field(default_factory=dict)  # head -> (serial, used len)
    completed: list[int] = field(default_factory=list)

    def post(self, rng: random.Random) -> None:
        for _ in range(rng.randrange(0, self.dq.size + 1)):
            free = self.dq.num_free
            kinds = [k for k, need in _GOOD_KINDS.items() if need <= free]
            # An indirect header + frame is a two-descriptor chain (§2.7.5.3.1): not on a queue of one.
            layouts = [lay for lay, need in _LAYOUTS.items() if need <= free]
            if self.dq.size == 1:
                layouts = [lay for lay in layouts if lay is not TxLayout.INDIRECT]
            if self.posted == self.total or not layouts:
                return
            serial = self.posted + 1
            if kinds and rng.random() < 0.1:
                head = self.dq.post_malformed(rng.choice(kinds))
                self.expect[head] = (serial, 0)
            else:
                frame = serial.to_bytes(4, "little") + bytes(rng.randrange(0, 40))
                head = self.dq.post_tx(frame, layout=rng.choice(layouts))
                self.expect[head] = (serial, serial)
            self.posted += 1

    def reap(self) -> None:
        for c in self.dq.reap():  # DeviceError on an id not in flight
            serial, length = self.expect.pop(c.id)
            assert c.len == length, f"head {c.id}: completion of another posting (len {c.len}, want {length})"
            self.completed.append(serial)

    @property
    def finished(self) -> bool:
        return self.posted == self.total and self.dq.in_flight == 0


def run_with_crashes(
    *, seed: int, size: int, start_idx: int, total: int, crashes: list[CrashPlan]
) -> list[Recovery]:
    """Drive ``total`` postings through a backend that dies as ``crashes`` say; return each restart's
    Recovery. Fails on a double completion, a lost chain (stall) or a write outside the buffer."""
    rng = random.Random(seed)
    drv = GuestDriver(region_sizes=(64 << 10, 64 << 10))
    guest = Guest(drv.add_queue(0, size, start_idx=start_idx), total)
    buf = np.full(inflight_size(1, size) + 2 * GUARD, GUARD_BYTE, dtype=np.uint8)
    region = buf[GUARD:-GUARD]
    region[:] = 0  # GET_INFLIGHT_FD hands out a zeroed buffer
    backend = Backend(guest.dq, region, base=start_idx)
    plan = {c.round: c for c in crashes}
    restarts: list[Recovery] = []
    for rnd in range(20 * total + 100):
        guest.post(rng)
        try:
            backend.step(rng, plan.get(rnd))
        except Crash:
            guest.reap()  # the guest carries on while the backend is down
            guest.post(rng)
            backend = Backend(guest.dq, region, base=start_idx)
            restarts.append(backend.recovery)
        guest.reap()
        if guest.finished:
            break
    assert guest.finished, (
        f"stalled: {guest.dq.in_flight} chains never completed, held {sorted(backend.held)}"
    )
    assert sorted(guest.completed) == list(range(1, total + 1))
    assert not backend.held and backend.iq.in_flight().size == 0
    assert (buf[:GUARD] == GUARD_BYTE).all() and (buf[-GUARD:] == GUARD_BYTE).all()
    return restarts


def test_without_crashes_every_posting_completes_once() -> None:
    assert run_with_crashes(seed=1, size=8, start_idx=0, total=60, crashes=[]) == []


@pytest.mark.parametrize("start_idx", [0, 0xFFFE])
@pytest.mark.parametrize("point", list(Point))
def test_a_crash_at_each_step_of_a_batch_completes_every_chain_exactly_once(
    point: Point, start_idx: int
) -> None:
    crashes = [CrashPlan(r, point, 0.5) for r in (3, 4, 9)]  # twice in a row, then again later
    restarts = run_with_crashes(seed=7, size=8, start_idx=start_idx, total=50, crashes=crashes)
    assert len(restarts) == 3
    if point in (Point.AFTER_USED_IDX, Point.MID_POST_PUT):
        # The interrupted batch was on the used ring: recovery must have found it in the list.
        assert any(r.cleared.size for r in restarts)
    if point in (Point.AFTER_MARK, Point.AFTER_PRE_PUT, Point.AFTER_USED_ENTRIES):
        assert any(r.resubmit.size for r in restarts)


def test_resubmitting_every_marked_head_without_the_used_index_check_double_completes() -> None:
    # The control for the test above: a recovery that ignores used_idx / last_batch_head would
    # resubmit the interrupted batch, whose heads the guest has already reaped; the driver model
    # refuses the second completion.
    drv = GuestDriver(region_sizes=(64 << 10, 64 << 10))
    guest = Guest(drv.add_queue(0, 8), total=6)
    region = np.zeros(inflight_size(1, 8), dtype=np.uint8)
    backend = Backend(guest.dq, region, base=0)
    rng = random.Random(3)
    for _ in range(4):
        guest.post(rng)
    assert guest.dq.in_flight >= 2
    with pytest.raises(Crash):
        backend.step(rng, CrashPlan(0, Point.AFTER_USED_IDX, 1.0))
    flagged = np.flatnonzero(backend.iq.inflight).tolist()
    guest.reap()
    reaped = [h for h in flagged if h not in guest.expect]
    assert reaped, "the interrupted batch was empty: pick another seed"
    naive = SplitQueue(
        index=0,
        size=8,
        desc_addr=guest.dq.desc_addr,
        avail_addr=guest.dq.avail_addr,
        used_addr=guest.dq.used_addr,
        used_idx=backend.q.used_idx,
    )
    naive.push_used(guest.dq.ram.memory, reaped, [backend.held[h] for h in reaped])
    with pytest.raises(DeviceError, match="not in flight"):
        guest.reap()
    # The real recovery clears exactly that batch instead.
    rec = Backend(guest.dq, region, base=0).recovery
    assert sorted(rec.cleared.tolist()) == sorted(reaped)


_points = st.sampled_from(list(Point))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.sampled_from([1, 2, 4, 8, 16]),
    start_idx=st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF)),
    total=st.integers(1, 40),
    crashes=st.lists(
        st.builds(CrashPlan, st.integers(0, 30), _points, st.floats(0.0, 1.0)),
        max_size=6,
        unique_by=lambda c: c.round,
    ),
)
def test_random_crash_schedules_complete_every_chain_exactly_once(
    seed: int, size: int, start_idx: int, total: int, crashes: list[CrashPlan]
) -> None:
    run_with_crashes(seed=seed, size=size, start_idx=start_idx, total=total, crashes=crashes)
