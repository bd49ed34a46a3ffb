"""Fuzzing the device side of packed virtqueues against a reference walk written from virtio 1.2 §2.8.

The guest memory is the split-ring fuzzer's (``tests.test_fuzz_rings.worlds``: several regions with
gaps, guard bytes, regions ending at 2^64, random indirect tables); on it goes a packed descriptor ring
of any size up to the world's queue size (so also sizes that are not powers of 2), the device at any
position and wrap counter, and descriptors that are mostly available for their lap (so long chains
and wrap-arounds occur) and otherwise anything. ``PackedQueue.pop_chains`` / ``pop_avail`` + ``walk``
/ ``push_used`` run on it and are checked against :func:`reference_pop`, a per-descriptor Python walk
that follows §2.8.1 (available: AVAIL matches the lap's wrap counter, USED does not), §2.8.6 (NEXT,
the id in the last descriptor), §2.8.7 (indirect tables: every entry, only WRITE counts), §2.8.17
(no list longer than the queue, readable before writable) and §2.8.19 (no INDIRECT in a NEXT list).
The notification decision is checked against a reference that lists the descriptors just used.
"""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rings.chains import ErrorCode
from rings.layout import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from rings.packed import PackedQueue
from rings.packed_layout import (
    AVAIL_USED_MASK,
    PDESC_DTYPE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    packed_need_event,
)
from rings.packed_walk import SavedChains
from tests.test_fuzz_rings import _CLASS, EXAMPLES, U32_MAX, World, _addresses, _lengths, worlds

_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Segment = tuple[int, int, bool]


def _lap_wrap(i: int, p: int, w: int) -> int:
    """The wrap counter the device expects at ring position ``i`` when it is at ``(p, w)``."""
    return w if i >= p else w ^ 1


def _avail_bits(wrap: int) -> int:
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


@st.composite
def packed_worlds(draw: st.DrawFn) -> tuple[World, int, int, int]:
    """A world with a packed ring of ``size`` at ``world.desc``, the device at ``(p, w)``."""
    world = draw(worlds())
    size = draw(st.one_of(st.just(world.size), st.integers(1, world.size)))
    p = draw(st.integers(0, size - 1))
    w = draw(st.integers(0, 1))
    entries = []
    for i in range(size):
        if draw(st.integers(0, 2)):
            r = draw(st.sampled_from(world.regions))
            length = draw(st.integers(0, min(r.size, 64)))
            addr = draw(st.integers(r.guest_phys_addr, r.end - max(length, 1)))
            kind = draw(st.sampled_from([VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0, 2]))
        else:
            addr, length = draw(_addresses(world)), draw(_lengths)
            kind = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
            if kind & VIRTQ_DESC_F_INDIRECT and world.tables and draw(st.booleans()):
                gpa, n = draw(st.sampled_from(world.tables))
                addr, length = gpa, draw(st.sampled_from([16 * n, 16 * n - 16, 16 * n + 3, 0]))
        mode = draw(st.sampled_from(["avail"] * 6 + ["used", "other", "random"]))
        wrap = _lap_wrap(i, p, w)
        if mode == "avail":
            bits = _avail_bits(wrap)
        elif mode == "used":
            bits = draw(st.sampled_from([0, AVAIL_USED_MASK]))
        elif mode == "other":
            bits = _avail_bits(wrap ^ 1)
        else:
            bits = draw(st.integers(0, 0xFFFF)) & ~7
        ident = draw(st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF)))
        entries.append((addr, length % (U32_MAX + 1), ident, bits | kind))
    world.mem.view(world.desc, 16 * size)[:] = np.array(entries, dtype=PDESC_DTYPE).view(np.uint8)
    return world, size, p, w


# -- the reference (virtio 1.2 §2.8, one descriptor at a time) -----------------------------------------


def _read(world: World, gpa: int) -> tuple[int, int, int, int]:
    addr, length, ident, flags = struct.unpack("<QIHH", world.read(gpa, 16))
    return addr, length, ident, flags


def reference_pop(
    world: World, size: int, p: int, w: int, max_count: int, indirect: bool
) -> list[tuple[int, int, list[Segment], ErrorCode]]:
    """Up to ``max_count`` chains from ``(p, w)``: (buffer id, descriptors taken, segments, error)."""
    out: list[tuple[int, int, list[Segment], ErrorCode]] = []
    pos, wrap = p, w
    while len(out) < max_count:
        descs: list[tuple[int, int, int, int]] = []
        cpos, cwrap = pos, wrap
        unended = False
        while True:
            if len(descs) == size:
                unended = True  # §2.8.17: no list is longer than the queue (never wraps onto itself)
                break
            d = _read(world, world.desc + 16 * cpos)
            # §2.8.1: available iff AVAIL == the lap's wrap counter and USED != it.
            if bool(d[3] & VIRTQ_DESC_F_AVAIL) != bool(cwrap) or bool(d[3] & VIRTQ_DESC_F_USED) == bool(
                cwrap
            ):
                return out  # not available (yet): the chain is not taken
            descs.append(d)
            cpos += 1
            if cpos == size:
                cpos, cwrap = 0, cwrap ^ 1
            if not d[3] & VIRTQ_DESC_F_NEXT:
                break
        segs, code = _reference_chain(world, size, descs, unended, indirect)
        out.append((descs[-1][2], len(descs), segs, code))  # §2.8.6: the id is the last descriptor's
        pos, wrap = cpos, cwrap
    return out


def _reference_chain(
    world: World, size: int, descs: list[tuple[int, int, int, int]], unended: bool, indirect: bool
) -> tuple[list[Segment], ErrorCode]:
    if unended:
        return [], ErrorCode.LOOP
    segs: list[Segment] = []
    if indirect and any(f & VIRTQ_DESC_F_INDIRECT for _, _, _, f in descs):
        if len(descs) > 1:
            return [], ErrorCode.NESTED_INDIRECT  # §2.8.19: not in a NEXT-linked list
        addr, length, _, _ = descs[0]
        if length == 0 or length % 16 or length // 16 > size:
            return [], ErrorCode.INDIRECT_LENGTH
        if world.inside(addr, length) is None:
            return [], ErrorCode.GUEST_MEMORY
        for j in range(length // 16):
            e_addr, e_len, _, e_flags = _read(world, addr + 16 * j)
            segs.append((e_addr, e_len, bool(e_flags & VIRTQ_DESC_F_WRITE)))  # §2.8.7: the only flag
    else:
        segs = [(a, n, bool(f & VIRTQ_DESC_F_WRITE)) for a, n, _, f in descs]
    writable_seen = False
    for _, _, wr in segs:
        if writable_seen and not wr:
            return [], ErrorCode.DESCRIPTOR_ORDER
        writable_seen |= wr
    if sum(n for _, n, _ in segs) > U32_MAX:
        return [], ErrorCode.CHAIN_TOO_LONG
    if any(n and world.inside(a, n) is None for a, n, _ in segs):
        return [], ErrorCode.GUEST_MEMORY
    return segs, ErrorCode.OK


# -- the tests -----------------------------------------------------------------------------------------


@_SETTINGS
@given(case=packed_worlds(), max_count=st.integers(0, 18), indirect=st.booleans(), by_id=st.booleans())
def test_random_packed_rings_match_the_reference_walk_and_stay_in_bounds(
    case: tuple[World, int, int, int], max_count: int, indirect: bool, by_id: bool
) -> None:
    world, size, p, w = case
    mem = world.mem
    q = PackedQueue(
        index=2, size=size, desc_addr=world.desc, driver_addr=world.avail, device_addr=world.used,
        avail_pos=p, avail_wrap=w, used_pos=p, used_wrap=w,
    )  # fmt: skip
    expect = reference_pop(world, size, p, w, max_count, indirect)
    assert q.avail_pending(mem) == len(reference_pop(world, size, p, w, size + 1, indirect))
    before = world.backing.copy()
    ids_unique = len({i for i, _, _, _ in expect}) == len(expect)
    if by_id and ids_unique:
        ids = q.pop_avail(mem, max_count)
        batch = q.walk(mem, ids, indirect=indirect)
    else:
        batch = q.pop_chains(mem, max_count, indirect=indirect)
    assert np.array_equal(world.backing, before)  # reading writes nothing
    assert batch.heads.tolist() == [i for i, _, _, _ in expect]
    taken = sum(n for _, n, _, _ in expect)
    assert (q.avail_pos, q.avail_wrap) == ((p + taken) % size, w ^ ((p + taken) // size))
    assert q.last_avail_idx == taken & 0xFFFF
    assert set(batch.errors) == set(np.flatnonzero(batch.error).tolist())
    for k, (ident, _, segs, code) in enumerate(expect):
        event(f"chain {code.name}" + (f" with {min(len(segs), 3)}+ segments" if segs else ""))
        assert ErrorCode(int(batch.error[k])) is code, f"chain {k} (id {ident})"
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
        for s in batch.segments(k):
            addr, length, r = int(batch.seg_addr[s]), int(batch.seg_len[s]), int(batch.seg_region[s])
            if length == 0:
                assert r == -1  # never translated (CVE-2020-10725)
                continue
            assert r == world.inside(addr, length)
            assert world.regions[r].guest_phys_addr + int(batch.seg_offset[s]) == addr
    data, starts = batch.gather_readable(mem)
    for k, (_, _, segs, code) in enumerate(expect):
        if code is ErrorCode.OK:
            want = b"".join(world.read(a, n) for a, n, wr in segs if not wr and n)
            assert data[int(starts[k]) : int(starts[k]) + int(batch.readable_len[k])].tobytes() == want

    # The same chains walked from saved copies of their descriptors (inflight resubmission) are the
    # same batch.
    saved, ndesc = q.popped_descriptors(mem)
    assert ndesc.tolist() == [n for _, n, _, _ in expect]
    chains = SavedChains(
        ids=batch.heads, ndesc=ndesc, d_addr=saved["addr"], d_len=saved["len"], d_flags=saved["flags"]
    )
    q2 = PackedQueue(
        index=2, size=size, desc_addr=world.desc, driver_addr=world.avail, device_addr=world.used
    )
    again = q2.resubmit(mem, chains, indirect=indirect)
    for k, (_, _, segs, code) in enumerate(expect):
        if code is ErrorCode.LOOP:
            continue  # a saved chain has an end by construction
        assert ErrorCode(int(again.error[k])) is code
        got = [
            (int(again.seg_addr[s]), int(again.seg_len[s]), bool(again.seg_writable[s]))
            for s in again.segments(k)
        ]
        assert got == segs

    # Give the last chains back and pop them again: the same chains.
    if len(expect) > 1:
        q.unpop_avail(1)
        again = q.pop_chains(mem, 1, indirect=indirect)
        assert again.heads.tolist() == [expect[-1][0]]
        assert (q.avail_pos, q.avail_wrap) == ((p + taken) % size, w ^ ((p + taken) // size))

    # Used descriptors: in completion order (here: reversed), each where the previous one's chain
    # ends, with id, len and flags; nothing else in memory changes.
    order = list(range(len(expect)))[::-1]
    if expect and ids_unique:
        lens = [(7 * k) % 3 * 100 for k in order]
        before = world.backing.copy()
        q.push_used(mem, np.array([expect[k][0] for k in order], np.uint16), np.array(lens, np.uint32))
        ring = mem.view_as(world.desc, PDESC_DTYPE, size).copy()
        pos, wrap = p, w
        written: set[int] = set()
        for k, n in zip(order, lens, strict=True):
            ident, ndesc = expect[k][0], expect[k][1]
            d = ring[pos]
            assert int(d["id"]) == ident and int(d["len"]) == n
            assert int(d["flags"]) & AVAIL_USED_MASK == (AVAIL_USED_MASK if wrap else 0)
            assert bool(int(d["flags"]) & VIRTQ_DESC_F_WRITE) == (n != 0)
            written.add(pos)
            pos += ndesc
            if pos >= size:
                pos, wrap = pos - size, wrap ^ 1
        assert (q.used_pos, q.used_wrap) == (pos, wrap)
        changed = np.flatnonzero(world.backing != before)
        ri = world.inside(world.desc, 16 * size)
        assert ri is not None
        base = world.placement[ri] + world.desc - world.regions[ri].guest_phys_addr
        assert all((c - base) // 16 in written and (c - base) % 16 >= 8 for c in changed.tolist())
    assert world.guards_intact()


def reference_need_event(event_word: int, new_pos: int, new_wrap: int, moved: int, size: int) -> bool:
    """§2.8.10 read literally: the event fires when the descriptor at its offset is used with the wrap
    counter it names. List every descriptor just used, stepping back from ``(new_pos, new_wrap)``."""
    off, ew = event_word & 0x7FFF, event_word >> 15
    pos, wrap = new_pos, new_wrap
    for _ in range(min(moved, size)):
        pos -= 1
        if pos < 0:
            pos, wrap = size - 1, wrap ^ 1
        if (pos, wrap) == (off, ew):
            return True
    return moved >= size and off < size  # a full lap uses every descriptor of the ring


@_SETTINGS
@given(
    size=st.integers(1, 40),
    data=st.data(),
)
def test_packed_event_suppression_matches_the_spec(size: int, data: st.DataObject) -> None:
    new_pos = data.draw(st.integers(0, size - 1))
    new_wrap = data.draw(st.integers(0, 1))
    moved = data.draw(st.integers(0, 2 * size))
    ev = data.draw(st.one_of(st.integers(0, size - 1), st.integers(0, 0x7FFF))) | data.draw(
        st.sampled_from([0, 0x8000])
    )
    want = moved > 0 and reference_need_event(ev, new_pos, new_wrap, moved, size)
    assert packed_need_event(ev, new_pos, new_wrap, moved, size) == want


@_SETTINGS
@given(case=packed_worlds(), used=st.integers(1, 16), flags=st.integers(0, 3), event_idx=st.booleans())
def test_needs_interrupt_reads_the_driver_event_structure(
    case: tuple[World, int, int, int], used: int, flags: int, event_idx: bool
) -> None:
    world, size, p, w = case
    mem = world.mem
    q = PackedQueue(
        index=0, size=size, desc_addr=world.desc, driver_addr=world.avail, device_addr=world.used,
        used_pos=p, used_wrap=w,
    )  # fmt: skip
    drv = mem.view_as(world.avail, np.dtype("<u2"), 2)
    drv[1] = flags
    used = min(used, size)
    q.push_used(mem, np.arange(used, dtype=np.uint16), np.zeros(used, np.uint32))
    got = q.needs_interrupt(mem, old_used_idx=0, event_idx=event_idx)
    if flags == RING_EVENT_FLAGS_DISABLE:
        assert not got
    elif flags == RING_EVENT_FLAGS_ENABLE or not event_idx or flags != RING_EVENT_FLAGS_DESC:
        assert got
    else:
        assert got == reference_need_event(int(drv[0]), q.used_pos, q.used_wrap, used, size)


@_SETTINGS
@given(case=packed_worlds(), indirect=st.booleans())
def test_packed_short_chains_are_the_reference_walk_or_declined(
    case: tuple[World, int, int, int], indirect: bool
) -> None:
    """The short rounds' scalar reader: a chain it returns is exactly the reference's (a good chain of
    at most two ring descriptors, or one indirect descriptor with a table of at most two), every other
    chain is declined, it writes nothing, and ``skip_avail`` pops what ``pop_avail`` would."""
    world, size, p, w = case
    mem = world.mem
    expect = reference_pop(world, size, p, w, size, indirect)
    before = world.backing.copy()
    pos, wrap = p, w
    for ident, ndesc, segs, code in expect:
        q = PackedQueue(
            index=0, size=size, desc_addr=world.desc, driver_addr=world.avail, device_addr=world.used,
            avail_pos=pos, avail_wrap=wrap,
        )  # fmt: skip
        _, _, _, flags = _read(world, world.desc + 16 * pos)
        via_table = indirect and bool(flags & VIRTQ_DESC_F_INDIRECT)
        short = code is ErrorCode.OK and ndesc <= 2 and (not via_table or len(segs) <= 2)
        got = q.peek_short(mem, 1, indirect=indirect)
        event("short" if got is not None else f"declined {code.name}")
        if not short:
            assert got is None
        else:
            assert got is not None
            (chain,) = got
            assert chain.head == ident
            assert chain.readable_len == sum(n for _, n, wr in segs if not wr)
            assert chain.writable_len == sum(n for _, n, wr in segs if wr)
            for (a, n, _), (r, off, length) in zip(segs, chain.segments, strict=True):
                assert length == n
                assert (r, off) == (-1, 0) if n == 0 else world.regions[r].guest_phys_addr + off == a
            q.skip_avail(1)
            assert q.avail_pos == (pos + ndesc) % size and q.last_avail_idx == ndesc
        pos += ndesc
        if pos >= size:
            pos, wrap = pos - size, wrap ^ 1
    assert np.array_equal(world.backing, before)
