"""Fuzzing the device side of split virtqueues with whatever a hostile guest can put in memory.

Hypothesis builds a guest memory of several regions (gaps, adjacent regions, one-byte regions, regions
ending at 2^64) backed by one numpy buffer with guard bytes around every region (the regions lie in
the buffer in a different order than in GPA space), a descriptor table, avail and used rings with any
indices and any heads, and indirect tables. Then ``SplitQueue.pop_avail`` / ``walk`` /
the RX path's ``scatter_template`` / ``push_used`` run on it and are checked against a plain-Python
reference walk written from virtio 1.2 §2.7.5 (differential test): the same chains are good, good
chains have exactly the segments the reference finds (translated inside the right region), bad chains
carry the exception class of the first rule they break, the only exception raised is
AvailIndexError, and nothing outside the device-writable segments and the used ring is written. The
short rounds' scalar reader (``SplitQueue.peek_short``) must return exactly the reference's segments
for a good chain of one or two descriptors (direct, or in the indirect table of its head) and decline
every other chain, and
``push_used_few`` must write what ``push_used`` writes.

``NICSIM_FUZZ_EXAMPLES`` (or ``scripts/fuzz.py --examples N``) sets the budget.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nicsim.virtio.rx import scatter_template
from rings.chains import ErrorCode
from rings.errors import (
    AvailIndexError,
    ChainTooLongError,
    DescriptorIndexError,
    DescriptorLoopError,
    DescriptorOrderError,
    GuestMemoryError,
    IndirectLengthError,
    NestedIndirectError,
)
from rings.layout import (
    DESC_DTYPE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    split_ring_sizes,
)
from rings.memory import U64_LIMIT, GuestMemory, MemoryRegion
from rings.split import SplitQueue

EXAMPLES = int(os.environ.get("NICSIM_FUZZ_EXAMPLES", "100"))
"""Hypothesis budget; ``scripts/fuzz.py --examples N`` raises it for long runs."""

GUARD = 32
GUARD_BYTE = 0xA5
U32_MAX = 0xFFFF_FFFF

_CLASS = {
    ErrorCode.DESCRIPTOR_INDEX: DescriptorIndexError,
    ErrorCode.LOOP: DescriptorLoopError,
    ErrorCode.NESTED_INDIRECT: NestedIndirectError,
    ErrorCode.INDIRECT_LENGTH: IndirectLengthError,
    ErrorCode.CHAIN_TOO_LONG: ChainTooLongError,
    ErrorCode.DESCRIPTOR_ORDER: DescriptorOrderError,
    ErrorCode.GUEST_MEMORY: GuestMemoryError,
}


# -- the guest's memory --------------------------------------------------------------------------------


@dataclass
class World:
    """Guest memory plus the queue's ring addresses, and where each region lives in ``backing``."""

    backing: npt.NDArray[np.uint8]
    regions: list[MemoryRegion]  # sorted by GPA, as GuestMemory.regions
    placement: list[int]  # backing offset of each region (same order)
    mem: GuestMemory
    size: int
    desc: int
    avail: int
    used: int
    tables: list[tuple[int, int]]  # (gpa, entries) of the indirect tables written into memory

    def inside(self, gpa: int, length: int) -> int | None:
        """Index of the region holding all of ``[gpa, gpa + length)``, by linear scan (the reference)."""
        for i, r in enumerate(self.regions):
            if r.guest_phys_addr <= gpa and gpa + length <= r.end:
                return i
        return None

    def read(self, gpa: int, length: int) -> bytes:
        i = self.inside(gpa, length)
        assert i is not None
        off = self.placement[i] + gpa - self.regions[i].guest_phys_addr
        return self.backing[off : off + length].tobytes()

    def guards_intact(self) -> bool:
        mask = np.ones(self.backing.shape[0], dtype=np.bool_)
        for r, off in zip(self.regions, self.placement, strict=True):
            mask[off : off + r.size] = False
        return bool((self.backing[mask] == GUARD_BYTE).all())


_sizes = st.one_of(st.sampled_from([1, 2, 15, 16, 17, 64]), st.integers(1, 3000))
_gaps = st.one_of(st.just(0), st.integers(1, 64), st.integers(1, 1 << 40))


@st.composite
def worlds(draw: st.DrawFn) -> World:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    dsize, asize, usize = split_ring_sizes(size)
    ring_bytes = dsize + asize + usize + 16
    data_sizes = draw(st.lists(_sizes, min_size=0, max_size=4))
    sizes = [ring_bytes, *data_sizes]
    order = draw(st.permutations(range(len(sizes))))  # GPA order of the regions
    gaps = [draw(_gaps) for _ in sizes]
    total = sum(sizes) + sum(gaps)
    top = draw(st.booleans()) and total < U64_LIMIT
    gpa = (U64_LIMIT - total - draw(st.integers(0, 64))) if top else draw(st.integers(0, 1 << 32))
    gpas = [0] * len(sizes)
    for i in order:
        gpa += gaps[i]
        if i == 0:  # the ring region: the descriptor table needs 16-byte alignment (§2.7)
            gpa = -(-gpa // 16) * 16
        gpas[i] = gpa
        gpa += sizes[i]
    if gpas[order[-1]] + sizes[order[-1]] > U64_LIMIT:  # alignment pushed the top past 2^64
        shift = gpas[order[-1]] + sizes[order[-1]] - U64_LIMIT
        shift = -(-shift // 16) * 16
        gpas = [g - shift for g in gpas]
    # Backing: regions in yet another order, each with guard bytes on both sides.
    layout = draw(st.permutations(range(len(sizes))))
    backing = np.full(sum(sizes) + GUARD * (len(sizes) + 1), GUARD_BYTE, dtype=np.uint8)
    place = [0] * len(sizes)
    off = GUARD
    for i in layout:
        place[i] = off
        off += sizes[i] + GUARD
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    uva = 0x7F00_0000_0000
    regions = []
    for i, s in enumerate(sizes):
        backing[place[i] : place[i] + s] = rng.integers(0, 256, s, dtype=np.uint8)
        regions.append(
            MemoryRegion(
                guest_phys_addr=gpas[i], size=s, user_addr=uva, data=backing[place[i] : place[i] + s]
            )
        )
        uva += s + 4096
    by_gpa = sorted(range(len(sizes)), key=lambda i: gpas[i])
    ring = gpas[0]
    desc = ring
    avail = desc + dsize
    used = -(-(avail + asize) // 4) * 4
    world = World(
        backing=backing,
        regions=[regions[i] for i in by_gpa],
        placement=[place[i] for i in by_gpa],
        mem=GuestMemory(regions),
        size=size,
        desc=desc,
        avail=avail,
        used=used,
        tables=[],
    )
    _fill_tables(draw, world, [i for i in range(1, len(sizes))], gpas, sizes)
    _fill_descriptors(draw, world)
    return world


def _addresses(world: World) -> st.SearchStrategy[int]:
    """Addresses a hostile or buggy driver might write: inside, at the edges of and between regions,
    near 2^64, in indirect tables, anywhere."""
    edges: list[int] = []
    for r in world.regions:
        edges += [r.guest_phys_addr, r.end - 1, r.end, max(0, r.guest_phys_addr - 1)]
    inside = st.sampled_from(world.regions).flatmap(lambda r: st.integers(r.guest_phys_addr, r.end - 1))
    return st.one_of(
        inside,
        inside,
        st.sampled_from([e for e in edges if e < U64_LIMIT]),
        st.integers(U64_LIMIT - 64, U64_LIMIT - 1),
        st.integers(0, U64_LIMIT - 1),
        st.sampled_from([g for g, _ in world.tables] or [0]),
    )


_lengths = st.one_of(
    st.integers(0, 64), st.just(0), st.integers(0, 4096), st.sampled_from([U32_MAX, U32_MAX - 1, 1 << 31])
)
_flags = st.one_of(
    st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE]),
    st.sampled_from([VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT]),
    st.integers(0, 0xFFFF),
)


def _entry(draw: st.DrawFn, world: World, next_limit: int) -> tuple[int, int, int, int]:
    """One descriptor: half the time a well-formed buffer (inside one region, sane flags, a next in
    range), so that long good chains occur; otherwise anything."""
    if draw(st.integers(0, 2)):
        r = draw(st.sampled_from(world.regions))
        length = draw(st.integers(0, min(r.size, 64)))
        addr = draw(st.integers(r.guest_phys_addr, r.end - max(length, 1)))
        flags = draw(
            st.sampled_from(
                [VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0, 2]
            )
        )
        return addr, length, flags, draw(st.integers(0, max(0, next_limit - 1)))
    flags = draw(_flags)
    addr = draw(_addresses(world))
    length = draw(_lengths)
    if flags & VIRTQ_DESC_F_INDIRECT and world.tables and draw(st.booleans()):
        gpa, n = draw(st.sampled_from(world.tables))
        addr, length = gpa, draw(st.sampled_from([16 * n, 16 * n - 16, 16 * n + 3, 0]))
    nxt = draw(st.one_of(st.integers(0, next_limit + 1), st.integers(0, 0xFFFF)))
    return addr, length % (U32_MAX + 1), flags, nxt


def _fill_tables(draw: st.DrawFn, world: World, data: list[int], gpas: list[int], sizes: list[int]) -> None:
    """Indirect tables at random offsets in data regions (any alignment: §2.7.5.3.1 asks for none)."""
    for _ in range(draw(st.integers(0, 3))):
        fits = [i for i in data if sizes[i] >= 16]
        if not fits:
            return
        i = draw(st.sampled_from(fits))
        n = draw(st.integers(1, min(8, sizes[i] // 16)))
        off = draw(st.integers(0, sizes[i] - 16 * n))
        world.tables.append((gpas[i] + off, n))
    for gpa, n in world.tables:
        table = np.array([_entry(draw, world, n) for _ in range(n)], dtype=DESC_DTYPE)
        world.mem.view(gpa, 16 * n)[:] = table.view(np.uint8)


def _fill_descriptors(draw: st.DrawFn, world: World) -> None:
    size = world.size
    table = np.array([_entry(draw, world, size) for _ in range(size)], dtype=DESC_DTYPE)
    world.mem.view(world.desc, 16 * size)[:] = table.view(np.uint8)


# -- the reference walk (virtio 1.2 §2.7.5, one chain at a time) ---------------------------------------

Segment = tuple[int, int, bool]


def _unpack(raw: bytes) -> tuple[int, int, int, int]:
    addr, length, flags, nxt = struct.unpack("<QIHH", raw)
    return addr, length, flags, nxt


def reference_walk(world: World, head: int, indirect: bool) -> tuple[list[Segment], ErrorCode]:
    """The chain at ``head``: its segments, and the first rule it breaks (OK if none)."""
    size = world.size
    if head >= size:
        return [], ErrorCode.DESCRIPTOR_INDEX
    segs: list[Segment] = []
    cur, depth = head, 0
    while True:
        if depth == size:
            return [], ErrorCode.LOOP  # more descriptors than the queue holds
        addr, length, flags, nxt = _unpack(world.read(world.desc + 16 * cur, 16))
        if indirect and flags & VIRTQ_DESC_F_INDIRECT:
            code = _reference_indirect(world, addr, length, size - depth, segs)
            if code is not ErrorCode.OK:
                return [], code
            break
        segs.append((addr, length, bool(flags & VIRTQ_DESC_F_WRITE)))
        if not flags & VIRTQ_DESC_F_NEXT:
            break
        if nxt >= size:
            return [], ErrorCode.DESCRIPTOR_INDEX
        cur, depth = nxt, depth + 1
    writable_seen = False
    for _, _, w in segs:
        if writable_seen and not w:
            return [], ErrorCode.DESCRIPTOR_ORDER
        writable_seen |= w
    if sum(n for _, n, _ in segs) > U32_MAX:
        return [], ErrorCode.CHAIN_TOO_LONG
    if any(n and world.inside(a, n) is None for a, n, _ in segs):
        return [], ErrorCode.GUEST_MEMORY
    return segs, ErrorCode.OK


def _reference_indirect(world: World, addr: int, length: int, room: int, segs: list[Segment]) -> ErrorCode:
    if length == 0 or length % 16:
        return ErrorCode.INDIRECT_LENGTH
    if world.inside(addr, length) is None:
        return ErrorCode.GUEST_MEMORY
    count = length // 16
    limit = min(count, room)  # the whole chain, indirect entries included, fits the queue size
    j, steps = 0, 0
    while True:
        e_addr, e_len, e_flags, e_next = _unpack(world.read(addr + 16 * j, 16))
        if e_flags & VIRTQ_DESC_F_INDIRECT:
            return ErrorCode.NESTED_INDIRECT
        segs.append((e_addr, e_len, bool(e_flags & VIRTQ_DESC_F_WRITE)))
        steps += 1
        if not e_flags & VIRTQ_DESC_F_NEXT:
            return ErrorCode.OK
        if e_next >= count:
            return ErrorCode.DESCRIPTOR_INDEX
        if steps >= limit:
            return ErrorCode.LOOP
        j = e_next


# -- the test ------------------------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[World, SplitQueue, int, int, bool, bytes]:
    world = draw(worlds())
    size = world.size
    last_avail = draw(st.integers(0, 0xFFFF))
    pending = draw(st.one_of(st.integers(1, size), st.integers(1, size), st.integers(0, 0xFFFF)))
    heads = draw(
        st.lists(st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF)), min_size=size, max_size=size)
    )
    avail = world.mem.view_as(world.avail, np.dtype("<u2"), size + 3)
    avail[0] = draw(st.integers(0, 0xFFFF))
    avail[1] = (last_avail + pending) & 0xFFFF
    avail[2 : 2 + size] = heads
    q = SplitQueue(
        index=draw(st.integers(0, 7)),
        size=size,
        desc_addr=world.desc,
        avail_addr=world.avail,
        used_addr=world.used,
        last_avail_idx=last_avail,
        used_idx=draw(st.integers(0, 0xFFFF)),
    )
    max_count = draw(st.one_of(st.integers(1, size + 2), st.integers(1, size + 2), st.just(0)))
    template = draw(st.binary(max_size=200))
    return world, q, pending, max_count, draw(st.booleans()), template


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=scenarios())
def test_random_rings_and_memory_match_the_reference_walk_and_stay_in_bounds(
    case: tuple[World, SplitQueue, int, int, bool, bytes],
) -> None:
    world, q, pending, max_count, indirect, template = case
    mem, size = world.mem, world.size
    start = q.last_avail_idx
    try:
        heads = q.pop_avail(mem, max_count)
    except AvailIndexError as err:
        assert pending > size and err.queue == q.index  # §2.7.6: the only error pop_avail raises
        assert q.last_avail_idx == start
        return
    assert pending <= size
    assert heads.shape[0] == min(pending, max_count) <= size
    assert q.last_avail_idx == (start + heads.shape[0]) & 0xFFFF

    batch = q.walk(mem, heads, indirect=indirect)
    assert len(batch) == heads.shape[0]
    assert set(batch.errors) == set(np.flatnonzero(batch.error).tolist())
    for k, head in enumerate(heads.tolist()):
        segs, code = reference_walk(world, head, indirect)
        event(f"chain {code.name}" + (f" with {min(len(segs), 3)}+ segments" if segs else ""))
        assert ErrorCode(int(batch.error[k])) is code, f"chain {k} (head {head})"
        if code is not ErrorCode.OK:
            exc = batch.errors[k]
            assert type(exc) is _CLASS[code] and exc.queue == q.index
            assert batch.seg_count[k] == 0 and batch.readable_len[k] == 0 and batch.writable_len[k] == 0
            continue
        got = [
            (int(batch.seg_addr[s]), int(batch.seg_len[s]), bool(batch.seg_writable[s]))
            for s in batch.segments(k)
        ]
        assert got == segs
        assert batch.readable_len[k] == sum(n for _, n, w in segs if not w)
        assert batch.writable_len[k] == sum(n for _, n, w in segs if w)
        for s in batch.segments(k):
            addr, length, r = int(batch.seg_addr[s]), int(batch.seg_len[s]), int(batch.seg_region[s])
            if length == 0:
                assert r == -1  # never translated (CVE-2020-10725)
                continue
            region = world.regions[r]
            assert r == world.inside(addr, length)
            assert int(batch.seg_offset[s]) + length <= region.size
            assert region.guest_phys_addr + int(batch.seg_offset[s]) == addr

    # Reads come from the right bytes: the gathered TX data equals the reference's reading.
    data, starts = batch.gather_readable(mem)
    for k, head in enumerate(heads.tolist()):
        if batch.error[k]:
            continue
        expect = b"".join(
            world.read(a, n) for a, n, w in reference_walk(world, head, indirect)[0] if not w and n
        )
        got_bytes = data[int(starts[k]) : int(starts[k]) + int(batch.readable_len[k])].tobytes()
        assert got_bytes == expect

    # RX: the device writes only into good chains' device-writable segments.
    allowed = np.zeros(world.backing.shape[0], dtype=np.bool_)
    for k in np.flatnonzero(batch.ok).tolist():
        for s in batch.segments(k):
            if batch.seg_writable[s] and batch.seg_len[s]:
                at = world.placement[int(batch.seg_region[s])] + int(batch.seg_offset[s])
                allowed[at : at + int(batch.seg_len[s])] = True
    before = world.backing.copy()
    lengths = scatter_template(mem, batch, np.frombuffer(template, dtype=np.uint8))
    assert not (world.backing != before)[~allowed].any()
    expect_len = np.where(batch.ok, np.minimum(batch.writable_len, len(template)), 0)
    assert lengths.tolist() == expect_len.tolist()

    # The used ring: entries then idx, nothing else.
    before = world.backing.copy()
    old_used = q.used_idx
    q.push_used(mem, heads, lengths)
    changed = np.flatnonzero(world.backing != before)
    ri = world.inside(world.used, 6 + 8 * size)
    assert ri is not None
    ring_start = world.placement[ri] + world.used - world.regions[ri].guest_phys_addr
    assert ((changed >= ring_start + 2) & (changed < ring_start + 4 + 8 * size)).all()
    used = world.mem.view_as(world.used, np.dtype("<u2"), 2)
    assert q.used_idx == (old_used + heads.shape[0]) & 0xFFFF
    if heads.shape[0]:  # an empty batch publishes nothing
        assert int(used[1]) == q.used_idx
    ring = world.mem.view_as(world.used + 4, np.dtype("<u4"), 2 * size).reshape(size, 2)
    for i, (h, n) in enumerate(zip(heads.tolist(), lengths.tolist(), strict=True)):
        assert ring[(old_used + i) % size].tolist() == [h, n]
    assert world.guards_intact()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    world=worlds(),
    heads=st.lists(st.one_of(st.integers(0, 15), st.integers(0, 15), st.integers(0, 0xFFFF)), max_size=40),
    indirect=st.booleans(),
)
def test_walking_any_heads_marks_every_bad_chain_and_never_raises(
    world: World, heads: list[int], indirect: bool
) -> None:
    # walk() takes heads straight from the caller too (resubmitted heads after a restart): heads
    # beyond the table, repeated heads and batches longer than the queue are all just marked.
    q = SplitQueue(
        index=3, size=world.size, desc_addr=world.desc, avail_addr=world.avail, used_addr=world.used
    )
    batch = q.walk(world.mem, np.array(heads, dtype=np.uint16), indirect=indirect)
    for k, head in enumerate(heads):
        segs, code = reference_walk(world, head, indirect)
        event(f"chain {code.name}" + (f" with {min(len(segs), 3)}+ segments" if segs else ""))
        assert ErrorCode(int(batch.error[k])) is code
        assert (k in batch.errors) == (code is not ErrorCode.OK)
        assert int(batch.seg_count[k]) == len(segs)
    assert int(batch.seg_count.sum()) == batch.seg_addr.shape[0] <= world.size * max(1, len(heads))
    assert world.guards_intact()


def _short_shape(world: World, head: int, indirect: bool, segs: list[Segment]) -> bool:
    """Whether a chain the reference walks without error has a shape the short reader takes: at most
    two descriptors, direct, or (with ``indirect``) all in the table its head points at."""
    _, _, flags, nxt = _unpack(world.read(world.desc + 16 * head, 16))
    if indirect and flags & VIRTQ_DESC_F_INDIRECT:
        return len(segs) <= 2
    if not flags & VIRTQ_DESC_F_NEXT:
        return True
    _, _, flags, _ = _unpack(world.read(world.desc + 16 * nxt, 16))
    return not (indirect and flags & VIRTQ_DESC_F_INDIRECT) and not flags & VIRTQ_DESC_F_NEXT


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=scenarios())
def test_random_rings_short_chains_are_the_reference_walk_or_declined(
    case: tuple[World, SplitQueue, int, int, bool, bytes],
) -> None:
    """The short rounds' scalar reader on hostile memory: a chain it returns is exactly what the
    reference walk finds (translated inside the right region), every other chain is declined (None),
    it raises nothing, writes nothing, and moves no index; ``push_used_few`` writes what ``push_used``
    writes."""
    world, q, pending, max_count, indirect, _ = case
    mem, size = world.mem, world.size
    if pending > size or max_count == 0:
        return  # pop_avail's own test covers a corrupt avail.idx
    count = min(pending, max_count)
    before = world.backing.copy()
    start = q.last_avail_idx
    heads = q.pop_avail(mem, count).tolist()
    q.last_avail_idx = start
    for k, head in enumerate(heads):
        q.last_avail_idx = (start + k) & 0xFFFF
        got = q.peek_short(mem, 1, indirect=indirect)
        segs, code = reference_walk(world, head, indirect)
        short = code is ErrorCode.OK and _short_shape(world, head, indirect, segs)
        event("short" if got is not None else f"declined {code.name}")
        if not short:
            assert got is None, f"chain {k} (head {head}, {code.name})"
            continue
        assert got is not None, f"chain {k} (head {head})"
        (chain,) = got
        assert chain.head == head and chain.addr == segs[0][0]
        assert chain.readable_len == sum(n for _, n, w in segs if not w)
        assert chain.writable_len == sum(n for _, n, w in segs if w)
        assert chain.writable == sum(w for _, _, w in segs)
        for (a, n, _), (r, off, length) in zip(segs, chain.segments, strict=True):
            assert length == n
            if n == 0:
                assert (r, off) == (-1, 0)  # never translated (CVE-2020-10725)
            else:
                assert r == world.inside(a, n) and world.regions[r].guest_phys_addr + off == a
    q.last_avail_idx = start
    assert np.array_equal(world.backing, before)

    lens = [(h * 2654435761) & U32_MAX for h in heads]
    used_idx = q.used_idx
    q.push_used(mem, np.array(heads, np.uint32), np.array(lens, np.uint32))
    after_batch = world.backing.copy()
    world.backing[:] = before
    q.used_idx = used_idx
    q.push_used_few(mem, heads, lens)
    assert np.array_equal(world.backing, after_batch)
