"""GuestMemory: every access stays inside one region, translation is right in both address spaces,
and the batch paths agree with the scalar ones."""

import numpy as np
import pytest

from rings.driver import GuestRam
from rings.errors import GuestMemoryError, MemoryReleasedError
from rings.memory import GuestMemory, MemoryRegion


def two_regions() -> tuple[GuestMemory, np.ndarray]:
    backing = np.zeros(0x3000, dtype=np.uint8)
    regions = [
        # GPA-adjacent regions whose backing bytes are not adjacent (region 1 comes first).
        MemoryRegion(guest_phys_addr=0x1000, size=0x1000, user_addr=0x7F00_0000_0000, data=backing[0x2000:]),
        MemoryRegion(guest_phys_addr=0x2000, size=0x1000, user_addr=0x7E00_0000_0000, data=backing[:0x1000]),
    ]
    return GuestMemory(regions), backing


def test_view_translates_gpa_to_the_right_backing_bytes() -> None:
    mem, backing = two_regions()
    mem.view(0x2010, 4)[:] = [1, 2, 3, 4]
    assert backing[0x10:0x14].tolist() == [1, 2, 3, 4]
    mem.view(0x1FFC, 4)[:] = 9
    assert backing[0x2FFC:0x3000].tolist() == [9, 9, 9, 9]


def test_view_across_adjacent_regions_is_refused_and_names_the_address() -> None:
    mem, _ = two_regions()
    with pytest.raises(GuestMemoryError) as info:
        mem.view(0x1FF0, 0x20)
    assert info.value.address == 0x1FF0
    assert info.value.length == 0x20
    assert "0x1ff0" in str(info.value)


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(0x0, 1), (0xFFF, 2), (0x3000, 1), (0x2FFF, 2), ((1 << 64) - 1, 2), ((1 << 64) - 8, 8), (-1, 1)],
)
def test_view_outside_memory_or_overflowing_u64_is_refused(gpa: int, length: int) -> None:
    mem, _ = two_regions()
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, length)


def test_zero_length_view_does_not_translate_a_wild_address() -> None:
    mem, _ = two_regions()
    assert mem.view(0xDEAD_BEEF_0000_0000, 0).shape == (0,)


def test_view_as_is_typed_and_cached() -> None:
    mem, backing = two_regions()
    a = mem.view_as(0x2000, "<u4", 4)
    a[1] = 0x01020304
    assert backing[4:8].tolist() == [4, 3, 2, 1]
    assert mem.view_as(0x2000, "<u4", 4) is a


@pytest.mark.parametrize(
    "regions",
    [
        [(0x1000, 0x1000, 0x10_0000), (0x1800, 0x1000, 0x20_0000)],  # GPA overlap
        [(0x1000, 0x1000, 0x10_0000), (0x4000, 0x1000, 0x10_0800)],  # user address overlap
    ],
)
def test_overlapping_regions_are_refused(regions: list[tuple[int, int, int]]) -> None:
    rs = [
        MemoryRegion(guest_phys_addr=g, size=s, user_addr=u, data=np.zeros(s, np.uint8))
        for g, s, u in regions
    ]
    with pytest.raises(ValueError, match="overlap"):
        GuestMemory(rs)


def test_zero_sized_or_mis_sized_region_is_refused() -> None:
    with pytest.raises(ValueError):
        MemoryRegion(guest_phys_addr=0, size=0, user_addr=0, data=np.zeros(0, np.uint8))
    with pytest.raises(ValueError):
        MemoryRegion(guest_phys_addr=0, size=16, user_addr=0, data=np.zeros(8, np.uint8))
    with pytest.raises(ValueError):
        MemoryRegion(guest_phys_addr=(1 << 64) - 8, size=16, user_addr=0, data=np.zeros(16, np.uint8))


def test_translate_batch_agrees_with_view() -> None:
    mem, _ = two_regions()
    gpas = np.array(
        [0x1000, 0x1FF0, 0x1FF0, 0x2000, 0x2FFF, 0x3000, 0x0, (1 << 64) - 4, 0xDEAD], dtype=np.uint64
    )
    lens = np.array([16, 16, 17, 0x1000, 1, 1, 1, 8, 0], dtype=np.uint64)
    region, offset, ok = mem.translate_batch(gpas, lens)
    expected_ok = []
    for g, n in zip(gpas.tolist(), lens.tolist(), strict=True):
        try:
            mem.view(g, n)
            expected_ok.append(True)
        except GuestMemoryError:
            expected_ok.append(False)
    assert ok.tolist() == expected_ok
    assert region.tolist() == [0, 0, -1, 1, 1, -1, -1, -1, -1]  # zero length: untranslated
    assert offset.tolist()[:5] == [0, 0xFF0, 0, 0, 0xFFF]


def test_uva_to_gpa_uses_each_regions_frontend_mapping() -> None:
    mem, _ = two_regions()
    assert mem.uva_to_gpa(0x7F00_0000_0010, 8) == 0x1010
    assert mem.uva_to_gpa(0x7E00_0000_0FF8, 8) == 0x2FF8
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0x7E00_0000_0FF8, 9)
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0x1010, 8)  # a GPA is not a frontend address


def test_gather_and_scatter_round_trip_across_regions() -> None:
    mem, _ = two_regions()
    region = np.array([1, 0, 1], dtype=np.int32)
    offset = np.array([0x10, 0x20, 0x800], dtype=np.uint64)
    lens = np.array([3, 5, 2], dtype=np.int64)
    src = np.arange(10, dtype=np.uint8)
    mem.scatter(region, offset, lens, src, np.array([0, 3, 8]))
    assert mem.view(0x2010, 3).tolist() == [0, 1, 2]
    assert mem.view(0x1020, 5).tolist() == [3, 4, 5, 6, 7]
    assert mem.gather(region, offset, lens).tolist() == list(range(10))


def test_gather_of_long_segments_copies_the_same_bytes_as_of_short_ones() -> None:
    mem, _ = two_regions()
    rng = np.random.default_rng(7)
    mem.scatter(np.array([0, 1], np.int32), np.array([0, 0], np.uint64), np.array([4096, 4096]),
                rng.integers(0, 256, 8192, dtype=np.uint8), np.array([0, 4096]))  # fmt: skip
    backing = {0: mem.view(0x1000, 4096).copy(), 1: mem.view(0x2000, 4096).copy()}
    for lens in ([1500, 0, 700, 1024], [3, 9, 0, 60]):  # by slices (long), by byte index (short)
        region = np.array([1, 0, 1, 0], dtype=np.int32)
        offset = np.array([100, 2000, 3000, 5], dtype=np.uint64)
        parts = zip(region.tolist(), offset.astype(int).tolist(), lens, strict=True)
        want = np.concatenate([backing[r][o : o + n] for r, o, n in parts])
        assert mem.gather(region, offset, np.array(lens)).tolist() == want.tolist()


def test_scatter_one_template_into_many_buffers() -> None:
    mem, _ = two_regions()
    template = np.array([7, 8, 9], dtype=np.uint8)
    mem.scatter(
        np.array([0, 0, 1], np.int32), np.array([0, 100, 5], np.uint64), np.array([3, 2, 3]), template
    )
    assert mem.view(0x1000, 3).tolist() == [7, 8, 9]
    assert mem.view(0x1064, 3).tolist() == [7, 8, 0]
    assert mem.view(0x2005, 3).tolist() == [7, 8, 9]


def test_release_drops_views_and_refuses_further_use() -> None:
    ram = GuestRam((4096, 4096))
    mem = ram.memory
    mem.view_as(ram.regions[0].guest_phys_addr, "<u2", 4)
    mem.release()
    mem.release()  # idempotent
    assert mem.released
    with pytest.raises(MemoryReleasedError):
        mem.view(ram.regions[0].guest_phys_addr, 4)
    with pytest.raises(MemoryReleasedError):
        _ = mem.regions


def test_release_lets_the_owner_close_its_mmap() -> None:
    import mmap

    mm = mmap.mmap(-1, 8192)
    backing = np.frombuffer(mm, dtype=np.uint8)
    mem = GuestMemory([MemoryRegion(guest_phys_addr=0, size=8192, user_addr=0x7F00_0000_0000, data=backing)])
    mem.view_as(0x100, "<u8", 4)[0] = 1
    mem.cached("ring", lambda m: m.view(0x200, 16))
    del backing
    with pytest.raises(BufferError):
        mm.close()  # views still exported: exactly what release() is for
    mem.release()
    mm.close()
    assert mm.closed
