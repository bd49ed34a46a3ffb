"""The driver model itself: guest RAM layout, queue addresses, posting, kicking and reaping, and its
checks on the device (what it reports when the device breaks the rules)."""

import numpy as np
import pytest

from rings.driver import VIRTIO_NET_HDR_SIZE, GuestDriver, GuestRam, Malformed, TxLayout
from rings.errors import DeviceError, GuestMemoryError
from rings.layout import DESC_DTYPE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE


def test_ram_regions_are_gpa_adjacent_but_not_in_backing_or_frontend_space() -> None:
    ram = GuestRam((8192, 8192))
    r0, r1 = ram.regions
    assert r0.end == r1.guest_phys_addr
    assert r0.user_addr + r0.size != r1.user_addr
    # Region 1's bytes live before region 0's in the backing buffer.
    assert np.shares_memory(r1.data, ram.backing[: r1.size + 4096])
    ram.write(r1.guest_phys_addr, b"\x5a")
    assert r1.data[0] == 0x5A and r0.data[-1] == 0


def test_alloc_spreads_over_regions_and_reuses_freed_buffers() -> None:
    ram = GuestRam((8192, 8192))
    a, b = ram.alloc(100), ram.alloc(100)
    regions = {ram.memory.translate_batch([a], [100])[0][0], ram.memory.translate_batch([b], [100])[0][0]}
    assert regions == {0, 1}
    ram.free(a)
    assert ram.alloc(100) == a
    with pytest.raises(MemoryError):
        ram.alloc(1 << 20)


def test_queue_addresses_translate_between_gpa_and_frontend_space() -> None:
    g = GuestDriver()
    q = g.add_queue(1, 64)
    a = q.addresses
    mem = g.memory
    assert mem.uva_to_gpa(a.desc_uva, 16 * 64) == a.desc_gpa == q.desc_addr
    assert mem.uva_to_gpa(a.avail_uva, 6 + 2 * 64) == a.avail_gpa
    assert mem.uva_to_gpa(a.used_uva, 6 + 8 * 64) == a.used_gpa
    # The rings sit in both regions, so a device mixing up regions would notice.
    regions, _, _ = mem.translate_batch([a.desc_gpa, a.avail_gpa], [16, 16])
    assert sorted(regions.tolist()) == [0, 1]


def test_post_tx_writes_linux_style_chains() -> None:
    g = GuestDriver()
    q = g.add_queue(0, 8)
    desc = g.ram.view(q.desc_addr, 16 * 8).view(DESC_DTYPE)
    h1 = q.post_tx(b"abc")
    assert desc[h1]["len"] == VIRTIO_NET_HDR_SIZE + 3 and desc[h1]["flags"] == 0
    h2 = q.post_tx(b"abc", layout=TxLayout.TWO)
    assert desc[h2]["flags"] == VIRTQ_DESC_F_NEXT and desc[h2]["len"] == VIRTIO_NET_HDR_SIZE
    assert desc[desc[h2]["next"]]["len"] == 3
    h3 = q.post_tx(b"abc", layout=TxLayout.INDIRECT)
    assert desc[h3]["flags"] == VIRTQ_DESC_F_INDIRECT and desc[h3]["len"] == 32
    rx = q.post_rx(64, count=1)[0]
    assert desc[rx]["flags"] == VIRTQ_DESC_F_WRITE
    assert q.num_free == 8 - 5 and q.in_flight == 4


def test_post_fails_cleanly_when_the_table_is_full() -> None:
    g = GuestDriver()
    q = g.add_queue(0, 2)
    q.post_tx(b"a", layout=TxLayout.TWO)
    with pytest.raises(MemoryError):
        q.post_tx(b"b")


def test_reap_refuses_an_id_that_was_never_posted() -> None:
    g = GuestDriver()
    q = g.add_queue(4, 8)
    dq = q.device_queue()
    q.post_tx(b"a")
    dq.pop_avail(g.memory, 8)
    dq.push_used(g.memory, [7], [0])
    with pytest.raises(DeviceError) as info:
        q.reap()
    assert info.value.queue == 4 and info.value.descriptor == 7


def test_reap_refuses_a_length_beyond_the_writable_buffers() -> None:
    g = GuestDriver()
    q = g.add_queue(0, 8)
    dq = q.device_queue()
    (head,) = q.post_rx(64)
    dq.pop_avail(g.memory, 8)
    dq.push_used(g.memory, [head], [65])
    with pytest.raises(DeviceError):
        q.reap()


def test_reap_refuses_used_index_moved_too_far() -> None:
    g = GuestDriver()
    q = g.add_queue(0, 8)
    dq = q.device_queue()
    dq.used_idx = 9
    dq.push_used(g.memory, [0], [0])
    with pytest.raises(DeviceError):
        q.reap()


def test_reaped_descriptors_and_buffers_are_reused() -> None:
    g = GuestDriver()
    q = g.add_queue(0, 4)
    dq = q.device_queue()
    for _ in range(10):
        heads = [q.post_tx(b"p" * 100, layout=TxLayout.TWO) for _ in range(2)]
        assert q.num_free == 0
        popped = dq.pop_avail(g.memory, 4)
        dq.push_used(g.memory, popped, np.zeros(2))
        assert [c.id for c in q.reap()] == heads
        assert q.num_free == 4 and q.in_flight == 0


def test_kick_decision_is_only_for_new_entries() -> None:
    g = GuestDriver()
    q = g.add_queue(0, 8)
    assert not q.should_kick()
    q.post_tx(b"a")
    assert q.should_kick()
    assert not q.should_kick()


def test_recycle_reposts_the_same_chains() -> None:
    g = GuestDriver()
    q = g.add_queue(0, 8)
    dq = q.device_queue()
    posted = [q.post_tx(bytes([i]) * 4) for i in range(8)]
    for _ in range(5):
        heads = dq.pop_avail(g.memory, 8)
        assert sorted(heads.tolist()) == sorted(posted)
        dq.push_used(g.memory, heads, np.zeros(8))
        assert q.recycle() == 8


def test_malformed_outside_memory_really_points_outside() -> None:
    g = GuestDriver()
    q = g.add_queue(0, 8)
    q.post_malformed(Malformed.OUTSIDE_MEMORY)
    desc = g.ram.view(q.desc_addr, 16 * 8).view(DESC_DTYPE)
    second = desc[desc[0]["next"]]
    with pytest.raises(GuestMemoryError):
        g.memory.view(int(second["addr"]), int(second["len"]))


@pytest.mark.parametrize("kind", list(Malformed))
def test_every_malformed_kind_can_be_posted_and_reaped(kind: Malformed) -> None:
    g = GuestDriver()
    q = g.add_queue(0, 8)
    dq = q.device_queue()
    head = q.post_malformed(kind)
    (popped,) = dq.pop_avail(g.memory, 8).tolist()
    assert popped == head
    dq.push_used(g.memory, [head], [0])
    assert [c.id for c in q.reap()] == [head]
    assert q.num_free == 8


def test_the_driver_refuses_an_indirect_table_longer_than_the_queue() -> None:
    # virtio 1.2 §2.7.5.3.1: the driver must not; the model is product code and keeps the rule.
    q = GuestDriver().add_queue(1, 1)
    with pytest.raises(ValueError, match="exceeds queue size 1"):
        q.post_tx(b"\x00" * 60, layout=TxLayout.INDIRECT)
    q.post_tx(b"\x00" * 60, layout=TxLayout.ONE)  # a one-descriptor chain still fits
