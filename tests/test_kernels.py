"""The compiled walk (``rings.kernels``) against numpy's walker, the reference.

On the hostile worlds of ``test_fuzz_rings`` (regions anywhere up to 2^64, loops, chains out of the
table, readable after writable, indirect tables, over-long chains): whenever the kernel takes a batch,
every field of its ChainBatch equals the walker's, dtype included, indirect tables followed; it
declines a batch only when the walker marks a chain bad; and a batch of good chains is taken. Both
the compiled kernel and its Python source are checked, so a numba quirk cannot hide behind the
source being right, nor the other way round.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rings import kernels, walk_kernel
from rings.chains import ChainBatch
from rings.driver import GuestDriver
from rings.split import SplitQueue, region_bytes
from rings.walker import ChainWalker
from tests.test_fuzz_rings import EXAMPLES, World, worlds

FIELDS = (
    "heads", "first_seg", "seg_count", "readable_len", "writable_len", "error", "seg_chain", "seg_desc",
    "seg_addr", "seg_len", "seg_writable", "seg_region", "seg_offset",
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def compiled() -> Iterator[None]:
    """The kernels on for this module (CI installs numba, so they must compile), off again after it:
    the rest of the suite runs serve's default, the numpy path."""
    assert kernels.enable(), kernels.engine()
    yield
    kernels.disable()


def assert_same(got: ChainBatch, want: ChainBatch) -> None:
    assert got.errors == {} and want.errors == {}
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype, name
        assert a.tolist() == b.tolist(), name


@settings(
    max_examples=EXAMPLES * 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    world=worlds(),
    heads=st.lists(st.one_of(st.integers(0, 15), st.integers(0, 15), st.integers(0, 0xFFFF)), max_size=40),
    indirect=st.booleans(),
)
def test_the_kernel_walks_exactly_like_the_walker_or_declines(
    world: World, heads: list[int], indirect: bool
) -> None:
    q = SplitQueue(
        index=3, size=world.size, desc_addr=world.desc, avail_addr=world.avail, used_addr=world.used
    )
    table = q._views(world.mem)
    starts, sizes = world.mem.bounds
    whole = np.array(heads, dtype=np.uint16)
    # The whole batch, then each chain on its own (one bad chain declines a whole batch, so most
    # chain shapes reach the kernel only in a batch of one).
    for h in [whole, *(whole[k : k + 1] for k in range(whole.shape[0]))]:
        want = ChainWalker(world.mem, table, h, queue=3, indirect=indirect).run()
        must_decline = bool(want.errors)
        for walk in (None, walk_kernel._walk_split_py):  # compiled, then its Python source
            got = kernels.walk_split(h, table, starts, sizes, datas=region_bytes(world.mem),
                                     indirect=indirect, walk=walk)  # fmt: skip
            if got is None:
                assert must_decline, f"a batch of good chains was declined ({walk})"
            else:
                assert not must_decline, f"took a batch the walker marks ({walk})"
                assert_same(got, want)
    assert world.guards_intact()


def test_the_split_queue_uses_the_kernel_for_good_batches_and_the_walker_for_bad_ones() -> None:
    """Through ``SplitQueue.walk``: a good TX batch comes back from the kernel, equal to the walker's;
    a batch with one bad chain is the walker's, with that chain marked (nothing else changes)."""
    drv = GuestDriver((1 << 20, 1 << 20))
    tx = drv.add_queue(1, 16)
    for size in (60, 1514, 200):
        tx.post_tx(bytes(12 + size))
    q = tx.device_queue()
    mem = drv.memory
    heads = q.pop_avail(mem, 3)
    table = q._views(mem)
    good = q.walk(mem, heads, indirect=True)
    assert_same(good, ChainWalker(mem, table, heads, queue=1, indirect=True).run())
    bad_heads = np.array([heads[0], 16, heads[1]], np.uint16)  # 16: outside a table of 16
    bad = q.walk(mem, bad_heads, indirect=True)
    assert bad.error.tolist()[1] != 0 and bad.error.tolist()[0] == bad.error.tolist()[2] == 0
    assert list(bad.errors) == [1]


def test_disabled_kernels_leave_every_walk_to_numpy() -> None:
    drv = GuestDriver((1 << 20,))
    tx = drv.add_queue(1, 8)
    tx.post_tx(bytes(74))
    q = tx.device_queue()
    heads = q.pop_avail(drv.memory, 1)
    kernels.disable()
    try:
        assert kernels.engine() == "numpy (disabled)"
        table = q._views(drv.memory)
        assert kernels.walk_split(heads, table, *drv.memory.bounds, datas=region_bytes(drv.memory),
                                  indirect=True) is None  # fmt: skip
        reference = ChainWalker(drv.memory, table, heads, queue=1, indirect=True).run()
        assert_same(q.walk(drv.memory, heads, indirect=True), reference)
    finally:
        assert kernels.enable()
    assert kernels.engine() == "compiled"


class Table:
    """A descriptor table as the walker reads it: its four field arrays."""

    def __init__(self, addrs: list[int], lens: list[int], flags: list[int] | None = None) -> None:
        n = len(addrs)
        self.d_addr = np.array(addrs, np.uint64)
        self.d_len = np.array(lens, np.uint32)
        self.d_flags = np.array(flags or [0] * n, np.uint16)
        self.d_next = np.zeros(n, np.uint16)


@pytest.mark.parametrize(
    ("addr", "length", "inside"),
    [
        (0x2F00, 0x100, True),  # ends exactly at the end of the region at 0x2000
        (0x2F00, 0x101, False),  # one byte past it
        (0x1FF0, 0x20, False),  # crosses from one region into the adjacent one
        (0x1000, 0x1000, True),  # the whole first region
        (0x800, 0x10, False),  # below every region
        ((1 << 64) - 8, 0x10, False),  # wraps u64
        (0x4000, 0x10, False),  # in the gap after the last region
        (0xDEAD_0000, 0, True),  # zero length: never translated, so never wrong
    ],
)
def test_a_segment_is_taken_only_inside_one_region(addr: int, length: int, inside: bool) -> None:
    from rings.memory import GuestMemory, MemoryRegion

    backing = np.zeros(0x2000, np.uint8)
    mem = GuestMemory([
        MemoryRegion(guest_phys_addr=0x1000, size=0x1000, user_addr=1 << 40, data=backing[:0x1000]),
        MemoryRegion(guest_phys_addr=0x2000, size=0x1000, user_addr=1 << 41, data=backing[0x1000:]),
    ])  # fmt: skip
    table = Table([addr], [length])
    heads = np.zeros(1, np.uint16)
    want = ChainWalker(mem, table, heads, queue=1, indirect=True).run()
    assert (not want.errors) is inside
    for walk in (None, walk_kernel._walk_split_py):
        got = kernels.walk_split(heads, table, *mem.bounds, datas=region_bytes(mem), indirect=True, walk=walk)
        assert (got is not None) is inside
        if got is not None:
            assert_same(got, want)


def test_the_pool_model_holds_on_the_numpy_path_too() -> None:
    """The suite runs the pool's compiled free and track; its numpy paths stay the reference, so the
    pool's model-based test runs once more with the kernels off."""
    from hypothesis.stateful import run_state_machine_as_test

    from tests.test_pool import PoolMachine

    kernels.disable()
    try:
        quick = settings(max_examples=100, stateful_step_count=40, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
        run_state_machine_as_test(PoolMachine, settings=quick)
    finally:
        assert kernels.enable()


def test_the_pools_compiled_track_and_free_refuse_what_numpy_refuses_and_write_nothing() -> None:
    """With the device's own array types (what the kernels take): a free or out-of-range index in a
    track, and a free, repeated or overflow index in a free, give the numpy path's error (or, for an
    overflow descriptor, its result), with nothing written by the declined kernel."""
    from rings.errors import DescriptorNotAllocatedError, DescriptorRangeError, DoubleFreeError
    from rings.pool import PacketPool

    pool = PacketPool(4, overflow=1, name="k")
    taken = pool.allocate_batch(3)
    args = {"queue": 1, "heads": np.arange(3, dtype=np.uint16), "addrs": np.arange(3, dtype=np.uint64),
            "lengths": np.full(3, 60, np.uint32)}  # fmt: skip
    before = pool._table.view(np.uint8).copy()  # the bytes, padding included
    refused = (([taken[0], taken[1], 3], DescriptorNotAllocatedError), ([0, 1, 9], DescriptorRangeError))
    for bad, error in refused:
        with pytest.raises(error):
            pool.track(np.array(bad, np.int32), **args)
        assert np.array_equal(pool._table.view(np.uint8), before)
    pool.track(taken, **args)
    assert pool.outstanding(queue=1).tolist() == sorted(taken.tolist())
    before = pool._table.view(np.uint8).copy()  # the bytes, padding included
    for bad, error in (([taken[0], 3], DescriptorNotAllocatedError), ([taken[0], taken[0]], DoubleFreeError)):
        with pytest.raises(error):
            pool.free_batch(np.array(bad, np.int32))
        assert np.array_equal(pool._table.view(np.uint8), before) and pool.usage == 3
    assert pool.allocate_batch(2).tolist() == [3, 4]  # the last normal one, then the overflow one
    pool.free_batch(np.array([4, 3], np.int32))  # an overflow descriptor: the numpy path takes it
    pool.free_batch(taken)
    assert pool.usage == 0
    assert pool.free_indices().tolist() == [*taken.tolist()[::-1], 3, 4]  # LIFO, as single frees give


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("carried", [False, True], ids=["sync-port", "carried"])
def test_device_rounds_with_the_kernels_match_the_numpy_rounds(seed: int, carried: bool) -> None:
    """The device as a whole: ``test_short_rounds``' random sequences of TX and RX rounds (malformed
    chains, a pool that runs out, a corrupted ``avail.idx``, ports that complete later) through two
    devices, one with the kernels on and one on numpy only: the same guest memory, used entries,
    stats, drops and port input after every step."""
    from tests.test_short_rounds import (
        EVT,
        IND,
        MRG,
        V1,
        apply,
        assert_same_step,
        drain,
        guest_view,
        make_ops,
        world,
        world_options,
    )  # fmt: skip

    features = V1 | MRG | IND | EVT
    ops = make_ops(seed * 104729 + int(carried), 400)
    kw = world_options(seed, carried)
    fast = world(features, short_round=0, **kw)
    ref = world(features, short_round=0, **kw)
    try:
        for step, op in enumerate(ops):
            assert kernels.enable()
            got = apply(fast, op)
            kernels.disable()
            assert_same_step(fast, ref, got, apply(ref, op), (step, op))
        drain(fast)
        drain(ref)
        assert guest_view(fast) == guest_view(ref)
    finally:
        assert kernels.enable()


def test_a_gso_frames_indirect_table_is_walked_by_the_kernel_as_the_walker_walks_it() -> None:
    # Linux sends a TCP stream's 64 KB frame as one INDIRECT descriptor: a table of ~18 entries (the
    # header, the linear part, the page fragments), across both memory regions here.
    drv = GuestDriver((1 << 20, 1 << 20))
    tx = drv.add_queue(1, 64)
    for n in (18, 3, 1):
        bufs = [drv.ram.alloc(4096, region=k % 2) for k in range(n)]
        tx.post_chain([(b, 12 if k == 0 else 4096, False) for k, b in enumerate(bufs)], indirect=True,
                      buffers=bufs)  # fmt: skip
    q = tx.device_queue()
    heads = q.pop_avail(drv.memory, 3)
    table = q._views(drv.memory)
    want = ChainWalker(drv.memory, table, heads, queue=1, indirect=True).run()
    assert not want.errors and want.seg_count.tolist() == [18, 3, 1]
    for walk in (None, walk_kernel._walk_split_py):
        got = kernels.walk_split(heads, table, *drv.memory.bounds, datas=region_bytes(drv.memory),
                                 indirect=True, walk=walk)  # fmt: skip
        assert got is not None
        assert_same(got, want)
        assert set(got.seg_region.tolist()) == {0, 1}
