"""Inflight tracking for packed rings (vhost-user spec, "Inflight I/O tracking", QueueRegionPacked):
the layout, and a backend that dies at each point of a completion, restarts from the region, and
completes every chain exactly once, checked by the packed driver model reading the ring."""

from __future__ import annotations

import numpy as np
import pytest

from rings.driver import GuestRam, TxLayout
from rings.driver_packed import PackedDriverQueue
from rings.inflight import InflightRegionError
from rings.inflight_packed import (
    DESC_STATE_PACKED_DTYPE,
    PACKED_HEADER_DTYPE,
    InflightPackedQueue,
    InflightPackedRegion,
    packed_inflight_size,
    packed_region_size,
)
from rings.packed import PackedQueue


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


def test_a_corrupt_region_is_refused_or_bounded() -> None:
    ram, dq, q, buf, iq = _setup(size=4, start_pos=0)
    mem = ram.memory
    dq.post_tx(b"x", layout=TxLayout.TWO)
    q.pop_avail(mem, 4)
    iq.mark_popped(*q.popped_descriptors(mem))
    e = iq.e
    head = int(np.flatnonzero(e["inflight"])[0])
    e["num"][head] = 200  # longer than the queue
    rec = InflightPackedQueue(buf, index=1, queue_size=4).recover(mem, q.desc_addr, used_pos=0, used_wrap=1)
    assert rec.lost == 1 and rec.resubmit.ids.shape[0] == 0
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
