"""The delay line under an impaired link: frames come out byte-exact, in (release time, arrival) order,
through arena compaction and growth, checked against a plain sorted list."""

from __future__ import annotations

import numpy as np
import pytest

from nicsim.ports.held_frames import HeldFrames, flip_bits, pack


def test_pack_copies_frames_back_to_back() -> None:
    data = np.arange(20, dtype=np.uint8)
    out = pack(data, np.array([10, 2, 2], np.int64), np.array([3, 0, 2], np.uint32))
    assert out.tolist() == [10, 11, 12, 2, 3]
    assert pack(data, np.zeros(0, np.int64), np.zeros(0, np.uint32)).size == 0


@pytest.mark.parametrize("shape", ["same", "mixed", "spread", "one_jumbo", "back_to_back"])
def test_pack_matches_slicing_for_every_shape_of_batch(shape: str) -> None:
    rng = np.random.default_rng(len(shape))
    data = rng.integers(0, 256, 5000, dtype=np.uint8)
    n = 40
    lengths = {
        "same": np.full(n, 64), "mixed": rng.integers(60, 120, n), "spread": rng.integers(1, 1500, n),
        "back_to_back": rng.integers(0, 100, n), "one_jumbo": np.r_[4000, np.full(n - 1, 10)],
    }[shape].astype(np.uint32)
    if shape == "back_to_back":
        offsets = 7 + np.cumsum(lengths, dtype=np.int64) - lengths
    else:  # anywhere, in any order, some ending on the buffer's last byte
        offsets = rng.integers(0, data.size - lengths.astype(np.int64) + 1)
        offsets[:3] = data.size - lengths[:3]
    spans = zip(offsets.tolist(), lengths.tolist(), strict=True)
    expected = b"".join(data[o:o + n].tobytes() for o, n in spans)
    assert pack(data, offsets.astype(np.int64), lengths).tobytes() == expected


def test_flip_bits_counts_from_the_first_bytes_top_bit() -> None:
    buf = np.zeros(8, np.uint8)
    flip_bits(buf, np.array([0, 4], np.int64), np.array([0, 11], np.int64))
    assert buf.tolist() == [0x80, 0, 0, 0, 0, 0x10, 0, 0]


@pytest.mark.parametrize("scale", [1, 1000, 100_000])  # ns: all near the horizon, or spread across both rungs
def test_random_workload_matches_a_sorted_list_through_compaction_and_growth(scale: int) -> None:
    rng = np.random.default_rng(scale)
    held = HeldFrames(arena_bytes=4096, records=4)  # tiny: forces compaction, growth, record shifts
    reference: list[tuple[int, int, bytes]] = []  # (release, arrival number, bytes)
    arrival = 0
    now = 0
    for _ in range(400):
        n = int(rng.integers(0, 12))
        lengths = rng.integers(0, 300, n).astype(np.uint32)
        data = rng.integers(0, 256, int(lengths.sum()) + 50, dtype=np.uint8)
        offsets = (np.cumsum(lengths, dtype=np.int64) - lengths) + 50
        jittered = rng.random() < 0.5
        release = now + scale * (rng.integers(0, 2000, n) if jittered else np.full(n, 1000))
        held.add(release.astype(np.int64), data, offsets, lengths)
        for i in range(n):
            reference.append((int(release[i]), arrival, data[offsets[i]:offsets[i] + lengths[i]].tobytes()))
            arrival += 1
        assert held.count_after(now) == sum(1 for r, _, _ in reference if r > now)
        now += scale * int(rng.integers(0, 400))
        packed, lengths_out = held.pop_due(now)
        reference.sort()
        due = [f for f in reference if f[0] <= now]
        reference = reference[len(due):]
        assert lengths_out.tolist() == [len(f[2]) for f in due]
        assert packed.tobytes() == b"".join(f[2] for f in due)
        assert len(held) == len(reference)
        assert held.next_release() == (reference[0][0] if reference else None)
    assert held.arena_bytes > 4096  # it had to grow


def test_flip_corrupts_the_held_copy_only() -> None:
    held = HeldFrames()
    data = np.zeros(64, np.uint8)
    held.add(np.array([5, 5], np.int64), data, np.array([0, 0], np.int64), np.array([64, 64], np.uint32),
             np.array([120, -1], np.int64))
    packed, lengths = held.pop_due(5)
    assert lengths.tolist() == [64, 64]
    assert data.sum() == 0
    assert packed[:64].nonzero()[0].tolist() == [15] and packed[15] == 0x80
    assert packed[64:].sum() == 0


def test_an_empty_line_reuses_its_arena_from_the_start() -> None:
    held = HeldFrames(arena_bytes=1024)
    data = np.ones(600, np.uint8)
    for t in range(50):  # 50 x 600 bytes through a 1 KiB arena, one frame at a time
        held.add(np.array([t], np.int64), data, np.zeros(1, np.int64), np.array([600], np.uint32))
        assert held.pop_due(t)[1].tolist() == [600]
    assert held.arena_bytes == 1024
