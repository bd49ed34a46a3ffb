"""The scalar ring helpers of short rounds agree with the numpy ones they stand in for: one-range
translation with ``translate_batch``, ``walk_short`` with the chain walker (and it declines every chain
the walker marks bad), ``push_used_few`` with ``push_used``, ``track_one`` with ``track``."""

from __future__ import annotations

import numpy as np
import pytest

from rings.driver import GuestDriver, Malformed, TxLayout
from rings.errors import DescriptorNotAllocatedError, DescriptorRangeError
from rings.memory import GuestMemory, MemoryRegion
from rings.pool import PacketPool
from rings.short_chains import MAX_SHORT_DESCS

U64 = 1 << 64


@pytest.mark.parametrize(
    "layout",
    [
        [(0, 4096)],
        [(1 << 20, 8192)],
        [(U64 - 4096, 4096)],
        [(5, 1)],
        [(0, 4096), (4096, 4096)],
        [(4096, 100), (1 << 30, 1 << 12), (U64 - 10, 10)],
    ],
)
def test_translate_one_matches_translate_batch(layout: list[tuple[int, int]]) -> None:
    mem = GuestMemory([
        MemoryRegion(guest_phys_addr=s, size=z, user_addr=i << 40, data=np.zeros(z, np.uint8))
        for i, (s, z) in enumerate(layout)
    ])  # fmt: skip
    edges = {0, 1, 2, U64 - 1, U64 - 2}
    for s, z in layout:
        for d in (-2, -1, 0, 1, 2):
            edges |= {(s + d) % U64, (s + z + d) % U64, (z + d) % U64}
    values = sorted(v for v in edges if v < 1 << 32) + sorted(edges)  # lengths are u32 in a descriptor
    for g in sorted(edges):
        lens = [n for n in values if n < 1 << 32]
        region, offset, ok = mem.translate_batch(np.full(len(lens), g, np.uint64), np.array(lens, np.uint64))
        for n, r, o, good in zip(lens, region.tolist(), offset.tolist(), ok.tolist(), strict=True):
            assert mem.translate_one(g, n) == ((r, o) if good else None), (g, n)


def _walk_both(drv: GuestDriver, q_index: int, count: int, *, indirect: bool) -> None:
    """Every head: walk_short gives the walker's segments for a good chain of at most MAX_SHORT_DESCS
    descriptors (direct, or in its head's indirect table), and None for every other chain (bad,
    longer, or an indirect descriptor behind a direct one)."""
    dq = drv.queues[q_index].device_queue()
    mem = drv.memory
    shorts = []
    for i in range(count):
        dq.last_avail_idx = i
        shorts.append(dq.peek_short(mem, 1, indirect=indirect))
    dq.last_avail_idx = 0
    cb = dq.walk(mem, dq.pop_avail(mem, count), indirect=indirect)
    flags = dq._views(mem).d_flags
    declined = 0
    for k, got in enumerate(shorts):
        segs = cb.segments(k)
        head = int(cb.heads[k])
        late_table = indirect and any(
            int(cb.seg_desc[s]) != head and int(flags[int(cb.seg_desc[s])]) & 4 for s in segs
        )
        if cb.error[k] != 0 or late_table or len(segs) > MAX_SHORT_DESCS:
            assert got is None, k
            declined += 1
            continue
        assert got is not None, k
        (chain,) = got
        assert chain.head == int(cb.heads[k])
        assert chain.readable_len == int(cb.readable_len[k])
        assert chain.writable_len == int(cb.writable_len[k])
        assert chain.writable == int(cb.seg_writable[segs.start : segs.stop].sum())
        assert chain.addr == int(cb.seg_addr[segs.start])
        want = [(int(cb.seg_region[s]), int(cb.seg_offset[s]), int(cb.seg_len[s])) for s in segs]
        assert list(chain.segments) == want
    assert 0 < declined < count  # both answers were exercised


@pytest.mark.parametrize("indirect", [True, False])
def test_walk_short_reads_what_the_walker_reads_and_declines_the_rest(indirect: bool) -> None:
    drv = GuestDriver()
    q = drv.add_queue(0, 128)
    count = 0
    for layout in TxLayout:
        for n in (0, 1, 60, 1514):
            q.post_tx(bytes(n), layout=layout)
            count += 1
        q.post_rx(12 + 1514, layout=layout)
        count += 1
    for kind in Malformed:
        q.post_malformed(kind)
        count += 1
    buf = drv.ram.alloc(256)
    q.post_chain([(buf, 10, False), (buf + 10, 10, False), (buf + 20, 10, True)])  # three: too long
    q.post_chain([(buf, 0, True), (0xDEAD << 40, 0, True)])  # zero lengths, never translated
    q.post_chain([(buf, 16, False), (buf + 16, 64, True)])  # readable then writable: fine
    count += 3
    _walk_both(drv, 0, count, indirect=indirect)


def test_push_used_few_writes_what_push_used_writes_across_the_wrap() -> None:
    rings = []
    for few in (False, True):
        drv = GuestDriver((1 << 20, 1 << 20))
        q = drv.add_queue(0, 8, start_idx=65533)
        dq = q.device_queue()
        for ids, lens in (([1, 2, 3], [10, 0, 2**32 - 1]), ([7], [5]), ([0, 4, 5, 6], [1, 2, 3, 4])):
            if few:
                dq.push_used_few(drv.memory, ids, lens)
            else:
                dq.push_used(drv.memory, np.array(ids, np.uint32), np.array(lens, np.uint32))
        rings.append((dq.used_idx, drv.ram.backing.copy()))
    assert rings[0][0] == rings[1][0] == (65533 + 8) & 0xFFFF
    assert np.array_equal(rings[0][1], rings[1][1])


def test_push_used_few_refuses_more_entries_than_the_ring() -> None:
    drv = GuestDriver((1 << 20, 1 << 20))
    dq = drv.add_queue(0, 2).device_queue()
    before = drv.ram.backing.copy()
    with pytest.raises(ValueError):
        dq.push_used_few(drv.memory, [0, 1, 0], [0, 0, 0])
    with pytest.raises(ValueError):
        dq.push_used_few(drv.memory, [0, 1], [0])
    assert np.array_equal(before, drv.ram.backing) and dq.used_idx == 0


def test_track_one_writes_what_track_writes_and_checks_the_same() -> None:
    a, b = PacketPool(4, reserved=8), PacketPool(4, reserved=8)
    ia, ib = a.allocate(), b.allocate()
    a.track(np.array([ia]), queue=3, heads=np.array([7], np.uint16), addrs=np.array([2**64 - 1], np.uint64),
            lengths=np.array([2**32 - 1], np.uint32))  # fmt: skip
    b.track_one(ib, queue=3, head=7, addr=2**64 - 1, length=2**32 - 1)
    assert a.table.tobytes() == b.table.tobytes()
    before = b.table.tobytes()
    with pytest.raises(DescriptorRangeError):
        b.track_one(4, queue=0, head=0, addr=0, length=0)
    with pytest.raises(DescriptorNotAllocatedError):
        b.track_one(ib + 1, queue=0, head=0, addr=0, length=0)
    for bad in ({"queue": 1 << 16}, {"head": 1 << 16}, {"addr": 1 << 64}, {"length": 1 << 32}, {"head": -1}):
        fields = {"queue": 0, "head": 0, "addr": 0, "length": 0, **bad}
        with pytest.raises(ValueError):
            b.track_one(ib, **fields)
    assert b.table.tobytes() == before
