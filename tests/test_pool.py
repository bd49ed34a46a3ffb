"""The packet pool keeps the NDIS 5.x packet-pool contract (rings/pool.py's docstring maps each NDIS
call), checked point by point and by a Hypothesis state machine that runs the pool against a plain
Python model."""

from __future__ import annotations

import ast
import contextlib
import os
import pathlib
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rings.errors import (
    DescriptorNotAllocatedError,
    DescriptorRangeError,
    DoubleFreeError,
    PoolBusyError,
    PoolClosedError,
    PoolError,
    PoolExhaustedError,
    PoolIndexError,
)
from rings.locked_pool import LockedPacketPool
from rings.pool import MAX_DESCRIPTORS, UNTRACKED, PacketPool

ROOT = pathlib.Path(__file__).resolve().parents[1]


def snapshot(pool: PacketPool) -> tuple[Any, ...]:
    """Everything a failed call must leave untouched: the table bytes, the free stacks, the counters."""
    return (
        pool.table.tobytes(),
        pool.free_indices().tolist(),
        pool.usage,
        pool.overflow_usage,
        pool.high_water,
        pool.holders(),
    )


# -- construction: NdisAllocatePacketPool[Ex], NdisPacketSize -----------------------------------------


def test_capacity_plus_overflow_is_capped_at_ndis_limit() -> None:
    PacketPool(MAX_DESCRIPTORS - 5, overflow=5)
    with pytest.raises(ValueError, match="65535"):
        PacketPool(MAX_DESCRIPTORS - 5, overflow=6)
    with pytest.raises(ValueError):
        PacketPool(0)
    with pytest.raises(ValueError):
        PacketPool(4, overflow=-1)
    with pytest.raises(ValueError):
        PacketPool(4, reserved=-1)


def test_descriptor_size_is_the_record_itemsize_and_grows_with_reserved() -> None:
    small, big = PacketPool(4), PacketPool(4, reserved=100)
    assert small.descriptor_size == small.table.dtype.itemsize
    assert big.descriptor_size == big.table.dtype.itemsize
    assert big.descriptor_size >= small.descriptor_size + 100 - 8  # alignment may absorb a few bytes
    assert big.table["reserved"].shape == (4, 100)
    assert big.descriptor_size % 8 == 0


# -- allocate: NdisAllocatePacket ---------------------------------------------------------------------


def test_allocate_hands_out_distinct_indices_then_reports_exhaustion_without_change() -> None:
    pool = PacketPool(3)
    assert sorted(pool.allocate() for _ in range(3)) == [0, 1, 2]
    before = snapshot(pool)
    with pytest.raises(PoolExhaustedError) as err:
        pool.allocate()
    assert isinstance(err.value, PoolExhaustedError)
    assert (err.value.requested, err.value.available) == (1, 0)
    assert snapshot(pool) == before


def test_free_stack_is_lifo_so_the_last_freed_goes_out_first() -> None:
    pool = PacketPool(8)
    got = pool.allocate_batch(5)
    pool.free(int(got[1]))
    pool.free(int(got[3]))
    assert pool.allocate() == got[3]
    assert pool.allocate() == got[1]


def test_overflow_descriptors_are_used_only_when_normal_ones_are_exhausted() -> None:
    pool = PacketPool(2, overflow=2)
    assert [pool.allocate(), pool.allocate()] == [0, 1]
    assert pool.overflow_usage == 0
    third = pool.allocate()
    assert third >= pool.capacity
    assert (pool.usage, pool.overflow_usage) == (3, 1)
    pool.free(0)
    assert pool.allocate() == 0  # a normal one is free again: overflow stays untouched
    assert pool.overflow_usage == 1
    pool.free(third)
    assert (pool.usage, pool.overflow_usage, pool.available) == (2, 0, 2)


def test_allocate_batch_is_all_or_nothing_by_default_and_partial_on_request() -> None:
    pool = PacketPool(4, overflow=1)
    first = pool.allocate_batch(3)
    assert first.dtype == np.int32
    assert first.tolist() == [0, 1, 2]
    before = snapshot(pool)
    with pytest.raises(PoolExhaustedError) as err:
        pool.allocate_batch(3)
    assert (err.value.requested, err.value.available) == (3, 2)  # type: ignore[attr-defined]
    assert snapshot(pool) == before
    rest = pool.allocate_batch(3, partial=True)
    assert rest.tolist() == [3, 4]  # the last normal one, then the overflow one
    assert pool.allocate_batch(3, partial=True).size == 0
    assert pool.allocate_batch(0).size == 0
    with pytest.raises(ValueError):
        pool.allocate_batch(-1)


def test_allocate_batch_gives_what_the_same_number_of_single_allocates_would() -> None:
    one, many = PacketPool(6, overflow=3), PacketPool(6, overflow=3)
    for pool in (one, many):
        pool.free_batch(pool.allocate_batch(7)[[5, 1, 6, 3]])
    singles = [one.allocate() for _ in range(6)]
    assert many.allocate_batch(6).tolist() == singles


def test_allocation_zeroes_reserved_bytes_and_forgets_the_previous_holder() -> None:
    pool = PacketPool(2, reserved=6)
    i = pool.allocate()
    pool.table["reserved"][i] = 0xAB
    pool.track([i], queue=3, heads=7, addrs=0x1000, lengths=60)
    pool.free(i)
    j = pool.allocate()
    assert j == i
    assert not pool.table["reserved"][j].any()
    assert (pool.table["queue"][j], pool.table["head"][j], pool.table["addr"][j]) == (UNTRACKED, 0, 0)
    batch = pool.allocate_batch(1)
    assert not pool.table["reserved"][batch].any()


# -- free: NdisFreePacket -----------------------------------------------------------------------------


def test_free_errors_name_the_descriptor_and_change_nothing() -> None:
    pool = PacketPool(4, overflow=1)
    a, b = pool.allocate(), pool.allocate()
    pool.free(b)
    before = snapshot(pool)
    with pytest.raises(DescriptorRangeError) as out_of_range:
        pool.free(5)
    assert isinstance(out_of_range.value, PoolIndexError) and isinstance(out_of_range.value, IndexError)
    assert (out_of_range.value.descriptor, out_of_range.value.size) == (5, 5)
    with pytest.raises(PoolIndexError):
        pool.free(-1)
    with pytest.raises(DescriptorNotAllocatedError) as never:
        pool.free(3)
    assert (never.value.descriptor, never.value.ever_allocated) == (3, False)
    with pytest.raises(DoubleFreeError) as double:
        pool.free(b)
    assert double.value.descriptor == b  # type: ignore[attr-defined]
    assert snapshot(pool) == before
    pool.free(a)
    assert pool.usage == 0


@pytest.mark.parametrize(
    ("batch", "error", "descriptor"),
    [
        ([0, 9, 1], PoolIndexError, 9),  # foreign index
        ([0, -3], PoolIndexError, -3),
        ([0, 4], PoolIndexError, 4),  # never allocated
        ([0, 2, 1], DoubleFreeError, 2),  # freed before
        ([0, 1, 0], DoubleFreeError, 0),  # twice in one batch
    ],
)
def test_free_batch_validates_everything_before_freeing_anything(
    batch: list[int], error: type[PoolError], descriptor: int
) -> None:
    pool = PacketPool(6)
    pool.allocate_batch(3)
    pool.free(2)
    before = snapshot(pool)
    with pytest.raises(error) as err:
        pool.free_batch(np.array(batch, dtype=np.int64))
    assert err.value.descriptor == descriptor  # type: ignore[attr-defined]
    assert snapshot(pool) == before


def test_duplicate_in_one_batch_is_marked_as_such() -> None:
    pool = PacketPool(4)
    got = pool.allocate_batch(2)
    with pytest.raises(DoubleFreeError) as err:
        pool.free_batch(np.concatenate([got, got[:1]]))
    assert err.value.in_batch
    assert pool.usage == 2


def test_free_batch_rejects_non_integer_indices_and_accepts_lists() -> None:
    pool = PacketPool(4)
    pool.allocate_batch(2)
    with pytest.raises(TypeError):
        pool.free_batch(np.array([True, False]))
    with pytest.raises(TypeError):
        pool.free_batch([0.0, 1.0])
    pool.free_batch([1, 0])
    pool.free_batch([])
    assert pool.usage == 0
    assert pool.free_indices().tolist()[:2] == [0, 1]  # pushed in order: 1 then 0, so 0 is on top


# -- track / outstanding / holders ---------------------------------------------------------------------


def test_track_records_what_each_descriptor_holds_and_outstanding_filters_by_queue() -> None:
    pool = PacketPool(8)
    rx, tx = pool.allocate_batch(3), pool.allocate_batch(2)
    untracked = pool.allocate()
    pool.track(rx, queue=0, heads=[4, 5, 6], addrs=[0x1000, 0x2000, 0x3000], lengths=1514)
    pool.track(tx, queue=1, heads=np.array([9, 10], np.uint16), addrs=0x9000, lengths=[60, 64])
    assert pool.outstanding(0).tolist() == rx.tolist()
    assert pool.outstanding(1).tolist() == tx.tolist()
    assert pool.outstanding().tolist() == sorted([*rx.tolist(), *tx.tolist(), untracked])
    assert pool.holders() == {0: 3, 1: 2, UNTRACKED: 1}
    assert pool.table["head"][rx].tolist() == [4, 5, 6]
    assert pool.table["addr"][rx].tolist() == [0x1000, 0x2000, 0x3000]
    assert pool.table["length"][tx].tolist() == [60, 64]
    pool.free_batch(rx)
    assert pool.outstanding(0).size == 0
    assert pool.holders() == {1: 2, UNTRACKED: 1}


def test_track_refuses_free_indices_and_out_of_range_values_without_writing() -> None:
    pool = PacketPool(4)
    a, b = pool.allocate(), pool.allocate()
    pool.free(b)
    before = snapshot(pool)
    with pytest.raises(DescriptorNotAllocatedError):
        pool.track([a, b], queue=0, heads=[1, 2], addrs=0, lengths=0)
    with pytest.raises(DescriptorRangeError):
        pool.track([a, 7], queue=0, heads=[1, 2], addrs=0, lengths=0)
    with pytest.raises(ValueError):
        pool.track([a], queue=0, heads=[70000], addrs=0, lengths=0)
    with pytest.raises(ValueError):
        pool.track([a], queue=0, heads=[1], addrs=0, lengths=[-1])
    with pytest.raises(ValueError):
        pool.track([a], queue=0, heads=[1, 2], addrs=0, lengths=0)  # wrong length
    with pytest.raises(ValueError):
        pool.track([a], queue=-1, heads=1, addrs=0, lengths=0)
    assert snapshot(pool) == before


# -- usage counters: NdisPacketPoolUsage ---------------------------------------------------------------


def test_usage_available_and_high_water_follow_allocations() -> None:
    pool = PacketPool(5, overflow=2)
    got = pool.allocate_batch(6)
    assert (pool.usage, pool.available, pool.high_water, pool.overflow_usage) == (6, 1, 6, 1)
    pool.free_batch(got[:4])
    assert (pool.usage, pool.available, pool.high_water) == (2, 5, 6)
    assert pool.reset_high_water() == 6
    assert pool.high_water == 2
    pool.allocate()
    assert pool.high_water == 3


# -- close: NdisFreePacketPool ---------------------------------------------------------------------------


def test_close_refuses_while_outstanding_and_says_who_holds_them() -> None:
    pool = PacketPool(8, name="tx")
    held = pool.allocate_batch(3)
    pool.track(held[:2], queue=1, heads=[0, 1], addrs=0, lengths=0)
    before = snapshot(pool)
    with pytest.raises(PoolBusyError) as err:
        pool.close()
    assert err.value.outstanding == 3
    assert err.value.holders == {1: 2, UNTRACKED: 1}
    assert "3 descriptors outstanding" in str(err.value) and "queue 1: 2" in str(err.value)
    assert not pool.closed
    assert snapshot(pool) == before


def test_every_call_after_close_raises_and_a_second_close_is_harmless() -> None:
    pool = PacketPool(4, overflow=1)
    pool.free_batch(pool.allocate_batch(3))
    pool.close()
    assert pool.closed
    pool.close()
    calls = [
        pool.allocate,
        lambda: pool.allocate_batch(1),
        lambda: pool.free(0),
        lambda: pool.free_batch([0]),
        lambda: pool.track([0], queue=0, heads=0, addrs=0, lengths=0),
        pool.outstanding,
        pool.holders,
        pool.free_indices,
        pool.reset_high_water,
        lambda: pool.on_drained(lambda: None),
        lambda: pool.usage,
        lambda: pool.available,
        lambda: pool.high_water,
        lambda: pool.overflow_usage,
        lambda: pool.capacity,
        lambda: pool.overflow,
        lambda: pool.descriptor_size,
        lambda: pool.table,
        LockedPacketPool(pool).allocate,
    ]
    for call in calls:
        with pytest.raises(PoolClosedError):
            call()


# -- drained: graceful shutdown (awaiting it is tested in test_server_drain.py) ---------------------------


def test_on_drained_fires_once_when_usage_reaches_zero_and_can_be_unregistered() -> None:
    pool = PacketPool(4)
    a, b = pool.allocate(), pool.allocate()
    fired: list[str] = []
    pool.on_drained(lambda: fired.append("first"))
    unregister = pool.on_drained(lambda: fired.append("unregistered"))
    unregister()
    pool.free(a)
    assert fired == []
    pool.free_batch([b])
    assert fired == ["first"]
    pool.free(pool.allocate())
    assert fired == ["first"]  # one shot
    pool.on_drained(lambda: fired.append("now"))  # already drained: called at once
    assert fired == ["first", "now"]


def test_on_drained_fires_after_the_last_free_of_the_overflow_too() -> None:
    pool = PacketPool(1, overflow=1)
    a, b = pool.allocate(), pool.allocate()  # the second comes from the overflow descriptors
    assert pool.overflow_usage == 1
    fired: list[int] = []
    pool.on_drained(lambda: fired.append(pool.usage))
    pool.free(a)
    assert fired == []  # the overflow descriptor is still out
    pool.free(b)
    assert fired == [0]


# -- the interlocked variant ----------------------------------------------------------------------------


def test_locked_pool_under_threads_never_hands_a_descriptor_to_two_owners() -> None:
    pool = PacketPool(64, overflow=16, reserved=8)
    locked = LockedPacketPool(pool)
    errors: list[str] = []
    start = threading.Barrier(4, timeout=30)

    def hammer(tag: int) -> None:
        try:
            _hammer(tag)
        except Exception as err:  # a thread's exception would otherwise only be printed
            errors.append(f"thread {tag}: {err!r}")

    def _hammer(tag: int) -> None:
        start.wait()
        for round_ in range(400):
            got = locked.allocate_batch(1 + round_ % 23, partial=True)
            single = None
            with contextlib.suppress(PoolExhaustedError):  # the other threads may hold the rest
                single = locked.allocate()
            mine = got.tolist() + ([single] if single is not None else [])
            # Allocation zeroes the reserved bytes: another owner of the same index would wipe our tag.
            pool.table["reserved"][mine, 0] = tag
            if mine and not (pool.table["reserved"][mine, 0] == tag).all():
                errors.append(f"thread {tag}: descriptor handed out twice")
            locked.free_batch(got)
            if single is not None:
                locked.free(single)

    threads = [threading.Thread(target=hammer, args=(tag,), daemon=True) for tag in (1, 2, 3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)  # a deadline: a thread stuck in the pool fails the test instead of hanging it
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert (locked.usage, locked.overflow_usage, locked.available) == (0, 0, 80)
    assert sorted(locked.free_indices().tolist()) == list(range(80))
    assert 0 < locked.high_water <= 80
    assert not pool.table["state"].any()
    locked.close()
    assert pool.closed


# -- purity: rings does no I/O ---------------------------------------------------------------------------


def test_pool_module_imports_no_event_loop_or_io_module() -> None:
    tree = ast.parse((ROOT / "rings" / "pool.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        (node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"asyncio", "socket", "os", "mmap", "selectors", "trio"}
    code = "import sys, rings.pool; print(sorted({'asyncio', 'socket', 'selectors'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the pool against a plain Python model ----------------------------------------------------------------


class PoolMachine(RuleBasedStateMachine):
    """Random sequences of pool calls, valid and invalid, against lists and sets."""

    pool: PacketPool

    @initialize(capacity=st.integers(1, 6), overflow=st.integers(0, 3), reserved=st.integers(0, 5))
    def create(self, capacity: int, overflow: int, reserved: int) -> None:
        self.pool = PacketPool(capacity, overflow=overflow, reserved=reserved, name="model")
        self.capacity, self.size = capacity, capacity + overflow
        self.normal = list(range(capacity))[::-1]  # LIFO stacks, top at the end
        self.over = list(range(capacity, self.size))[::-1]
        self.in_use: set[int] = set()
        self.ever: set[int] = set()
        self.queue_of: dict[int, int] = {}
        self.high_water = 0
        self.closed = False

    # -- model helpers
    def _pop(self) -> int:
        i = self.normal.pop() if self.normal else self.over.pop()
        self.in_use.add(i)
        self.ever.add(i)
        self.queue_of[i] = UNTRACKED
        self.high_water = max(self.high_water, len(self.in_use))
        return i

    def _push(self, i: int) -> None:
        self.in_use.discard(i)
        (self.normal if i < self.capacity else self.over).append(i)

    def _expect_unchanged_error(self, error: type[BaseException], call: Any) -> None:
        before = snapshot(self.pool)
        with pytest.raises(error):
            call()
        assert snapshot(self.pool) == before

    def _check_overflow_rule(self, got: list[int]) -> None:
        if any(i >= self.capacity for i in got):  # then every normal descriptor must be in use
            assert self.pool.table["state"][: self.capacity].all()

    # -- rules on an open pool
    @precondition(lambda self: not self.closed)
    @rule()
    def allocate(self) -> None:
        if not self.normal and not self.over:
            self._expect_unchanged_error(PoolExhaustedError, self.pool.allocate)
            return
        expected = self._pop()
        got = self.pool.allocate()
        assert got == expected
        self._check_overflow_rule([got])

    @precondition(lambda self: not self.closed)
    @rule(n=st.integers(0, 9), partial=st.booleans())
    def allocate_batch(self, n: int, partial: bool) -> None:
        free = len(self.normal) + len(self.over)
        if n > free and not partial:
            self._expect_unchanged_error(PoolExhaustedError, lambda: self.pool.allocate_batch(n))
            return
        expected = [self._pop() for _ in range(min(n, free))]
        got = self.pool.allocate_batch(n, partial=partial)
        assert got.dtype == np.int32
        assert got.tolist() == expected
        self._check_overflow_rule(expected)

    @precondition(lambda self: not self.closed)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        pick_held = bool(self.in_use) and data.draw(st.booleans())
        candidates = st.sampled_from(sorted(self.in_use)) if pick_held else st.integers(-2, self.size + 1)
        i = data.draw(candidates)
        if i in self.in_use:
            self.pool.free(i)
            self._push(i)
        elif not 0 <= i < self.size or i not in self.ever:
            self._expect_unchanged_error(PoolIndexError, lambda: self.pool.free(i))
        else:
            self._expect_unchanged_error(DoubleFreeError, lambda: self.pool.free(i))

    @precondition(lambda self: not self.closed)
    @rule(data=st.data())
    def free_batch(self, data: st.DataObject) -> None:
        held = sorted(self.in_use)
        valid = data.draw(st.lists(st.sampled_from(held), unique=True) if held else st.just([]))
        extra = data.draw(st.lists(st.integers(-2, self.size + 1), max_size=2))
        batch = data.draw(st.permutations(valid + extra))
        bad_range = [i for i in batch if not 0 <= i < self.size]
        never = [i for i in batch if 0 <= i < self.size and i not in self.ever]
        not_held = [i for i in batch if i not in self.in_use]
        duplicated = len(set(batch)) != len(batch)
        if bad_range or never:
            self._expect_unchanged_error(PoolIndexError, lambda: self.pool.free_batch(batch))
        elif not_held or duplicated:
            self._expect_unchanged_error(DoubleFreeError, lambda: self.pool.free_batch(batch))
        else:
            self.pool.free_batch(np.array(batch, dtype=np.int32))
            for i in batch:
                self._push(i)

    @precondition(lambda self: not self.closed and bool(self.in_use))
    @rule(data=st.data(), queue=st.integers(0, 3))
    def track(self, data: st.DataObject, queue: int) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.in_use)), min_size=1, unique=True))
        self.pool.track(chosen, queue=queue, heads=np.arange(len(chosen)), addrs=0x1000, lengths=64)
        for i in chosen:
            self.queue_of[i] = queue

    @precondition(lambda self: not self.closed)
    @rule()
    def reset_high_water(self) -> None:
        assert self.pool.reset_high_water() == self.high_water
        self.high_water = len(self.in_use)

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        if self.in_use:
            self._expect_unchanged_error(PoolBusyError, self.pool.close)
        else:
            self.pool.close()
            self.closed = True

    @precondition(lambda self: self.closed)
    @rule()
    def use_after_close(self) -> None:
        for call in (self.pool.allocate, lambda: self.pool.free(0), lambda: self.pool.free_batch([0])):
            with pytest.raises(PoolClosedError):
                call()
        self.pool.close()  # harmless

    # -- invariants
    @invariant()
    def counters_match_the_model(self) -> None:
        if self.closed:
            assert self.pool.closed
            return
        assert self.pool.usage == len(self.in_use)
        assert self.pool.overflow_usage == sum(1 for i in self.in_use if i >= self.capacity)
        assert self.pool.available == self.size - len(self.in_use)
        assert self.pool.high_water == self.high_water
        assert self.pool.outstanding().tolist() == sorted(self.in_use)
        assert self.pool.free_indices().tolist() == self.normal[::-1] + self.over[::-1]
        holders: dict[int, int] = {}
        for i in self.in_use:
            holders[self.queue_of[i]] = holders.get(self.queue_of[i], 0) + 1
        assert self.pool.holders() == holders

    @invariant()
    def no_index_is_both_free_and_in_use(self) -> None:
        if self.closed:
            return
        free = self.pool.free_indices().tolist()
        assert len(set(free)) == len(free)
        assert not set(free) & set(self.pool.outstanding().tolist())
        assert len(free) + self.pool.usage == self.size


PoolMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("NICSIM_FUZZ_EXAMPLES", "400")),  # scripts/fuzz.py raises it
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pool_against_model = PoolMachine.TestCase
