"""SplitQueue driven by the driver model: chain walking (good and every malformed kind), used ring,
u16 wraparound and the notification decisions in both directions."""

import numpy as np
import pytest

from rings.chains import ChainBatch, ErrorCode
from rings.driver import DriverQueue, GuestDriver, Malformed, TxLayout
from rings.errors import (
    AvailIndexError,
    ChainError,
    ChainTooLongError,
    DescriptorIndexError,
    DescriptorLoopError,
    DescriptorOrderError,
    GuestMemoryError,
    IndirectLengthError,
    MemoryReleasedError,
    NestedIndirectError,
    QueueConfigError,
)
from rings.layout import DESC_DTYPE, DESC_SIZE, vring_need_event
from rings.memory import GuestMemory
from rings.split import SplitQueue


def setup(
    size: int = 16, *, event_idx: bool = False, start_idx: int = 0
) -> tuple[GuestDriver, DriverQueue, SplitQueue]:
    g = GuestDriver()
    q = g.add_queue(0, size, event_idx=event_idx, start_idx=start_idx)
    return g, q, q.device_queue()


def chain_bytes(batch: ChainBatch, mem: GuestMemory, k: int) -> bytes:
    data, starts = batch.gather_readable(mem)
    return data[starts[k] : starts[k] + batch.readable_len[k]].tobytes()


HDR = bytes(12)


@pytest.mark.parametrize("layout", list(TxLayout))
def test_tx_chain_layouts_walk_to_header_plus_frame(layout: TxLayout) -> None:
    g, q, dq = setup()
    frame = bytes(range(60))
    head = q.post_tx(frame, layout=layout)
    heads = dq.pop_avail(g.memory, 8)
    assert heads.tolist() == [head]
    batch = dq.walk(g.memory, heads)
    assert batch.error.tolist() == [0]
    assert batch.seg_count.tolist() == [1 if layout is TxLayout.ONE else 2]
    assert batch.readable_len.tolist() == [72]
    assert batch.writable_len.tolist() == [0]
    assert chain_bytes(batch, g.memory, 0) == HDR + frame
    # Segment views are zero-copy windows on guest memory.
    seg = batch.segments(0)[-1]
    view = batch.segment_view(g.memory, seg)
    assert view.tobytes().endswith(frame[-10:])


def test_batch_mixing_depths_and_indirect_keeps_chain_order() -> None:
    g, q, dq = setup(32)
    frames = [bytes([i]) * (20 + i) for i in range(6)]
    layouts = [TxLayout.TWO, TxLayout.ONE, TxLayout.INDIRECT, TxLayout.ONE, TxLayout.TWO, TxLayout.INDIRECT]
    heads_posted = [q.post_tx(f, layout=lay) for f, lay in zip(frames, layouts, strict=True)]
    three = q.post_chain([(g.ram.alloc(8), 8, False), (g.ram.alloc(8), 8, False), (g.ram.alloc(8), 8, True)])
    batch = dq.walk(g.memory, dq.pop_avail(g.memory, 64))
    assert batch.heads.tolist() == [*heads_posted, three]
    assert batch.error.tolist() == [0] * 7
    for k, f in enumerate(frames):
        assert chain_bytes(batch, g.memory, k) == HDR + f
    assert batch.seg_count.tolist() == [2, 1, 2, 1, 2, 2, 3]
    assert batch.readable_len[6] == 16 and batch.writable_len[6] == 8
    assert batch.seg_writable[batch.segments(6)].tolist() == [False, False, True]
    assert (np.diff(batch.seg_chain) >= 0).all()


EXPECTED = {
    Malformed.LOOP: (DescriptorLoopError, ErrorCode.LOOP),
    Malformed.HEAD_OUT_OF_RANGE: (DescriptorIndexError, ErrorCode.DESCRIPTOR_INDEX),
    Malformed.NEXT_OUT_OF_RANGE: (DescriptorIndexError, ErrorCode.DESCRIPTOR_INDEX),
    Malformed.NESTED_INDIRECT: (NestedIndirectError, ErrorCode.NESTED_INDIRECT),
    Malformed.INDIRECT_EMPTY: (IndirectLengthError, ErrorCode.INDIRECT_LENGTH),
    Malformed.INDIRECT_MISALIGNED: (IndirectLengthError, ErrorCode.INDIRECT_LENGTH),
    Malformed.INDIRECT_LOOP: (DescriptorLoopError, ErrorCode.LOOP),
    Malformed.INDIRECT_NEXT_OUT_OF_RANGE: (DescriptorIndexError, ErrorCode.DESCRIPTOR_INDEX),
    Malformed.INDIRECT_OUTSIDE_MEMORY: (GuestMemoryError, ErrorCode.GUEST_MEMORY),
    Malformed.CHAIN_TOO_LONG: (ChainTooLongError, ErrorCode.CHAIN_TOO_LONG),
    Malformed.READ_AFTER_WRITE: (DescriptorOrderError, ErrorCode.DESCRIPTOR_ORDER),
    Malformed.OUTSIDE_MEMORY: (GuestMemoryError, ErrorCode.GUEST_MEMORY),
    Malformed.SPANS_REGIONS: (GuestMemoryError, ErrorCode.GUEST_MEMORY),
    Malformed.ADDRESS_OVERFLOW: (GuestMemoryError, ErrorCode.GUEST_MEMORY),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_malformed_chain_is_marked_not_raised_and_still_returned(kind: Malformed) -> None:
    g, q, dq = setup(16)
    q.index = dq.index = 0
    good1 = q.post_tx(b"x" * 50)
    bad = q.post_malformed(kind)
    good2 = q.post_tx(b"y" * 50, layout=TxLayout.INDIRECT)
    batch = dq.walk(g.memory, dq.pop_avail(g.memory, 16))
    cls, code = EXPECTED[kind]
    assert batch.error.tolist() == [0, code, 0]
    exc = batch.errors[1]
    assert type(exc) is cls
    assert set(batch.errors) == {1}
    assert exc.queue == 0
    assert exc.descriptor is not None
    if kind is not Malformed.HEAD_OUT_OF_RANGE:
        assert 0 <= exc.descriptor < dq.size
    else:
        assert exc.descriptor == bad
    if isinstance(exc, GuestMemoryError):
        assert exc.address >= 0 and exc.length > 0
    # A bad chain has no segments and no length; the good ones around it are intact.
    assert batch.seg_count[1] == 0 and batch.readable_len[1] == 0 and batch.writable_len[1] == 0
    assert chain_bytes(batch, g.memory, 0) == HDR + b"x" * 50
    assert chain_bytes(batch, g.memory, 2) == HDR + b"y" * 50
    # The head still goes back on the used ring (length 0), and the driver gets it back.
    dq.push_used(g.memory, batch.heads, np.zeros(3, np.uint32))
    assert [(c.id, c.len) for c in q.reap()] == [(good1, 0), (bad, 0), (good2, 0)]


def test_every_chain_error_class_is_a_chain_error_or_memory_error() -> None:
    for cls, _ in EXPECTED.values():
        assert issubclass(cls, (ChainError, GuestMemoryError))


def test_zero_length_descriptor_at_a_wild_address_is_not_translated() -> None:
    g, q, dq = setup()
    q.post_malformed(Malformed.ZERO_LENGTH_WILD)
    batch = dq.walk(g.memory, dq.pop_avail(g.memory, 4))
    assert batch.error.tolist() == [0]
    assert batch.seg_len.tolist() == [64, 0, 64]
    assert batch.seg_region[1] == -1 and batch.seg_offset[1] == 0
    assert batch.segment_view(g.memory, 1).shape == (0,)
    assert batch.readable_len.tolist() == [128]


def test_avail_index_moved_too_far_is_raised_with_queue() -> None:
    g, q, dq = setup(8)
    q.index = 3
    dq = q.device_queue()
    q.post_tx(b"a")
    q.overrun_avail_idx()
    with pytest.raises(AvailIndexError) as info:
        dq.pop_avail(g.memory, 8)
    assert info.value.queue == 3
    assert dq.last_avail_idx == 0  # nothing consumed


def test_full_ring_is_not_an_overrun() -> None:
    g, q, dq = setup(8)
    for _ in range(8):
        q.post_tx(b"z")
    assert dq.avail_pending(g.memory) == 8
    assert dq.pop_avail(g.memory, 100).shape == (8,)


def test_chain_of_exactly_queue_size_descriptors_is_legal() -> None:
    g, q, dq = setup(8)
    bufs = [g.ram.alloc(4) for _ in range(8)]
    q.post_chain([(b, 4, False) for b in bufs])
    batch = dq.walk(g.memory, dq.pop_avail(g.memory, 8))
    assert batch.error.tolist() == [0]
    assert batch.seg_count.tolist() == [8]


def test_indirect_flag_ignored_when_not_negotiated() -> None:
    g, q, dq = setup()
    q.post_tx(b"q" * 10, layout=TxLayout.INDIRECT)
    batch = dq.walk(g.memory, dq.pop_avail(g.memory, 4), indirect=False)
    assert batch.error.tolist() == [0]
    assert batch.seg_count.tolist() == [1]
    assert batch.readable_len.tolist() == [32]  # the table itself, read as a plain buffer


@pytest.mark.parametrize("start", [0, 65530, 65535, 0x7FFF])
def test_u16_wraparound_over_many_rounds(start: int) -> None:
    g, q, dq = setup(8, start_idx=start)
    for rnd in range(40):
        posted = [q.post_tx(bytes([rnd, i]) * 8) for i in range(1 + rnd % 8)]
        heads = dq.pop_avail(g.memory, 3)  # pop in pieces so ring positions wrap mid-batch
        heads = np.concatenate((heads, dq.pop_avail(g.memory, 8)))
        assert heads.tolist() == posted
        batch = dq.walk(g.memory, heads)
        for k in range(len(posted)):
            assert chain_bytes(batch, g.memory, k) == HDR + bytes([rnd, k]) * 8
        dq.push_used(g.memory, heads[:2], batch.readable_len[:2])
        dq.push_used(g.memory, heads[2:], batch.readable_len[2:])
        done = q.reap()
        assert [c.id for c in done] == posted
        assert [c.len for c in done] == [28] * len(posted)
    assert dq.last_avail_idx == q.avail_idx == dq.used_idx == q.last_used_idx
    assert q.avail_idx == (start + sum(1 + r % 8 for r in range(40))) & 0xFFFF


def test_push_used_more_than_size_is_refused() -> None:
    g, _, dq = setup(4)
    with pytest.raises(ValueError):
        dq.push_used(g.memory, np.zeros(5, np.uint16), np.zeros(5, np.uint32))


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),
        (1, 1, 0, False),
        (4, 6, 2, True),
        (6, 6, 2, False),
        (65535, 2, 65534, True),
        (1, 2, 65534, True),
        (2, 2, 65534, False),
        (100, 5, 3, False),
    ],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_interrupt_decision_without_event_idx_follows_no_interrupt() -> None:
    g, q, dq = setup()
    q.post_tx(b"a")
    q.post_tx(b"b")
    heads = dq.pop_avail(g.memory, 8)
    dq.push_used(g.memory, heads[:1], [0])
    assert dq.needs_interrupt(g.memory, old_used_idx=0, event_idx=False)
    q.disable_interrupts()
    dq.push_used(g.memory, heads[1:], [0])
    assert not dq.needs_interrupt(g.memory, old_used_idx=1, event_idx=False)
    assert not dq.needs_interrupt(g.memory, old_used_idx=2, event_idx=False)  # nothing new


def test_interrupt_decision_with_event_idx_follows_used_event() -> None:
    g, q, dq = setup(16, event_idx=True)
    for _ in range(8):
        q.post_tx(b"e")
    heads = dq.pop_avail(g.memory, 8)
    # Driver: interrupt me only once 4 more entries are used (used_event = last_used + 3).
    q.enable_interrupts(after=3)
    dq.push_used(g.memory, heads[:3], np.zeros(3))
    assert not dq.needs_interrupt(g.memory, old_used_idx=0, event_idx=True)
    dq.push_used(g.memory, heads[3:5], np.zeros(2))
    assert dq.needs_interrupt(g.memory, old_used_idx=3, event_idx=True)
    q.reap()  # reaping writes used_event = last_used_idx (5)
    assert q.used_event == 5
    dq.push_used(g.memory, heads[5:6], np.zeros(1))
    assert dq.needs_interrupt(g.memory, old_used_idx=5, event_idx=True)
    q.reap()
    q.disable_interrupts()
    dq.push_used(g.memory, heads[6:], np.zeros(2))
    assert not dq.needs_interrupt(g.memory, old_used_idx=6, event_idx=True)


def test_suppress_kicks_without_event_idx_sets_no_notify() -> None:
    g, q, dq = setup()
    q.post_tx(b"a")
    assert q.should_kick()
    dq.suppress_kicks(g.memory, True, event_idx=False)
    q.post_tx(b"b")
    assert not q.should_kick()
    dq.suppress_kicks(g.memory, False, event_idx=False)
    q.post_tx(b"c")
    assert q.should_kick()


def test_suppress_kicks_with_event_idx_writes_avail_event() -> None:
    g, q, dq = setup(16, event_idx=True)
    dq.suppress_kicks(g.memory, False, event_idx=True)
    q.post_tx(b"a")
    assert q.should_kick()  # avail_event 0 passed
    q.post_tx(b"b")
    assert not q.should_kick()  # device has not asked again
    dq.pop_avail(g.memory, 16)
    dq.suppress_kicks(g.memory, True, event_idx=True)
    for _ in range(5):
        q.post_tx(b"s")
        assert not q.should_kick()
    dq.pop_avail(g.memory, 16)
    dq.suppress_kicks(g.memory, False, event_idx=True)
    assert q.avail_event == dq.last_avail_idx == 7
    q.post_tx(b"c")
    assert q.should_kick()


def test_bad_queue_configuration_is_refused() -> None:
    with pytest.raises(QueueConfigError) as info:
        SplitQueue(index=2, size=12, desc_addr=0, avail_addr=0, used_addr=0)
    assert info.value.queue == 2
    with pytest.raises(QueueConfigError):
        SplitQueue(index=0, size=16, desc_addr=8, avail_addr=0, used_addr=0)
    with pytest.raises(QueueConfigError):
        SplitQueue(index=0, size=16, desc_addr=0, avail_addr=0, used_addr=2)


def test_ring_outside_memory_raises_guest_memory_error_with_queue() -> None:
    g, q, _ = setup()
    dq = SplitQueue(index=5, size=16, desc_addr=q.desc_addr, avail_addr=q.avail_addr, used_addr=g.ram.end)
    with pytest.raises(GuestMemoryError) as info:
        dq.pop_avail(g.memory, 1)
    assert info.value.queue == 5


def test_new_memory_table_leaves_no_stale_view_in_the_queue() -> None:
    g, q, dq = setup()
    q.post_tx(b"1")
    dq.walk(g.memory, dq.pop_avail(g.memory, 4))
    old = g.memory
    new = g.ram.new_memory_table()  # SET_MEM_TABLE: same RAM, a fresh table; the old one released
    assert old.released and new is g.memory
    q.post_tx(b"2")
    batch = dq.walk(new, dq.pop_avail(new, 4))
    assert chain_bytes(batch, new, 0) == HDR + b"2"
    with pytest.raises(MemoryReleasedError):
        dq.pop_avail(old, 4)


def test_walking_in_a_batch_gives_each_chain_what_walking_it_alone_gives() -> None:
    # The lockstep walk must not let chains of different depths, indirect tables or errors in one
    # batch disturb each other: compare every chain walked in a random batch with it walked alone.
    rng = np.random.default_rng(7)
    kinds = [*EXPECTED, Malformed.ZERO_LENGTH_WILD]
    for _ in range(25):
        g, q, dq = setup(256)
        for i in range(int(rng.integers(1, 40))):
            pick = int(rng.integers(0, 6))
            if pick < 3:
                q.post_tx(
                    bytes(rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8)),
                    layout=list(TxLayout)[pick],
                )
            elif pick == 3:
                q.post_rx(int(rng.integers(13, 300)), layout=list(TxLayout)[i % 3])
            elif pick == 4:
                segs = [(g.ram.alloc(16), 16, bool(k >= 3)) for k in range(int(rng.integers(1, 7)))]
                q.post_chain(segs, indirect=bool(rng.integers(0, 2)))
            else:
                q.post_malformed(kinds[int(rng.integers(0, len(kinds)))])
        heads = dq.pop_avail(g.memory, 256)
        batch = dq.walk(g.memory, heads)
        data, starts = batch.gather_readable(g.memory)
        for k, head in enumerate(heads.tolist()):
            alone = dq.walk(g.memory, [head])
            assert batch.error[k] == alone.error[0]
            assert type(batch.errors.get(k)) is type(alone.errors.get(0))
            assert batch.readable_len[k] == alone.readable_len[0]
            assert batch.writable_len[k] == alone.writable_len[0]
            mine = slice(batch.first_seg[k], batch.first_seg[k] + batch.seg_count[k])
            assert batch.seg_addr[mine].tolist() == alone.seg_addr.tolist()
            assert batch.seg_len[mine].tolist() == alone.seg_len.tolist()
            assert batch.seg_writable[mine].tolist() == alone.seg_writable.tolist()
            one, _ = alone.gather_readable(g.memory)
            assert data[starts[k] : starts[k] + batch.readable_len[k]].tobytes() == one.tobytes()


def test_unpop_gives_heads_back_to_the_next_pop() -> None:
    g = GuestDriver()
    dq = g.add_queue(0, 4, start_idx=0xFFFE)
    q = dq.device_queue()
    heads = [dq.post_tx(b"x") for _ in range(3)]
    assert q.pop_avail(g.memory, 3).tolist() == heads
    q.unpop_avail(2)
    assert q.last_avail_idx == 0xFFFF
    assert q.pop_avail(g.memory, 4).tolist() == heads[1:]
    with pytest.raises(ValueError):
        q.unpop_avail(5)


def test_indirect_tables_in_table_order_and_out_of_it_walk_to_the_same_bytes() -> None:
    """Linux fills an indirect table in order (entry k chains to k + 1): such tables are read whole,
    at once; a table chained in another order takes the walk entry by entry. Both give the chain's
    bytes in chain order, in one batch with tables in both regions."""
    g, q, dq = setup(32)
    parts = [bytes([k]) * (7 + 13 * k) for k in range(18)]  # a GSO frame: header, linear part, frags
    segs = []
    for k, p in enumerate(parts):
        buf = g.ram.alloc(len(p), region=k % 2)
        g.ram.write(buf, p)
        segs.append((buf, len(p), False))
    for _ in range(2):
        q.post_chain(segs, indirect=True)
    shuffled = q.post_chain(segs[:3], indirect=True)
    # Rewrite the last table so that entry 0 chains to 2 and 2 to 1: the chain is parts 0, 2, 1.
    view = g.ram.view(int(q._desc[shuffled]["addr"]), 3 * DESC_SIZE).view(DESC_DTYPE)
    view["next"][0], view["next"][2] = 2, 1
    view["flags"][1], view["flags"][2] = 0, view["flags"][0]
    heads = dq.pop_avail(g.memory, 8)
    for batch in (dq.walk(g.memory, heads[:2]), dq.walk(g.memory, heads)):  # read whole; entry by entry
        assert batch.error.tolist() == [0] * len(batch)
        assert [chain_bytes(batch, g.memory, k) for k in range(2)] == [b"".join(parts)] * 2
        assert batch.seg_count[:2].tolist() == [18, 18]
        assert (np.diff(batch.seg_chain) >= 0).all()
    assert chain_bytes(batch, g.memory, 2) == parts[0] + parts[2] + parts[1]
