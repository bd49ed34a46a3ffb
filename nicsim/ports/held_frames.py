"""Frames held back until a release time: the delay line of an impaired link.

This module owns :class:`HeldFrames`. Frame bytes are copied into one preallocated byte arena, in
arrival order; the records (release time in integer nanoseconds, arena start, length) are kept in
numpy arrays sorted by release time, ties in arrival order. That sorted array is the priority queue:
a batch is merged in with one ``searchsorted`` (or appended, when its times do not go backwards, the
common case of a fixed delay or a rate), and everything due is one prefix, popped with another
``searchsorted``. No Python object per frame; the arena is compacted (into a second, reused arena)
only when its end is reached, so steady state allocates nothing per frame.

Also here: :func:`pack`, the vectorised copy of frames given as (flat buffer, offsets, lengths), and
:func:`flip_bits`, which the corruption impairment applies to copies.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["HeldFrames", "flip_bits", "pack"]

Bytes = npt.NDArray[np.uint8]
Index = npt.NDArray[np.int64]


def pack(data: Bytes, offsets: Index, lengths: npt.NDArray[np.uint32]) -> Bytes:
    """Frames ``data[offsets[i]:offsets[i] + lengths[i]]`` copied back to back, in one copy."""
    lens = lengths.astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.uint8)
    first = int(offsets[0])
    end = int(offsets[-1]) + int(lens[-1])
    if end - first == total and np.array_equal(offsets[1:], offsets[:-1] + lens[:-1]):
        return data[first:first + total].copy()  # already back to back (a delay line in arrival order)
    if lens.size > 1 and int(lens.min()) == int(lens.max()):  # one size: a 2-D index, no repeat
        same: Bytes = data[offsets[:, None] + np.arange(int(lens[0]), dtype=np.int64)].reshape(-1)
        return same
    base = np.cumsum(lens) - lens
    within = np.arange(total, dtype=np.int64) - np.repeat(base, lens)
    packed: Bytes = data[np.repeat(offsets.astype(np.int64), lens) + within]
    return packed


def flip_bits(buf: Bytes, starts: Index, bits: Index) -> None:
    """Flip bit ``bits[i]`` of the frame at ``starts[i]`` (bit 0: the first byte's most significant)."""
    if bits.size:
        np.bitwise_xor.at(buf, starts + (bits >> 3), (0x80 >> (bits & 7)).astype(np.uint8))


class HeldFrames:
    """A delay line: frames in, each with a release time; out in (release time, arrival) order."""

    def __init__(self, *, arena_bytes: int = 1 << 20, records: int = 1024) -> None:
        self._arena: Bytes = np.zeros(arena_bytes, np.uint8)
        self._spare: Bytes | None = None  # the second arena compaction copies into, then swaps
        self._arena_end = 0  # bytes of the arena used, live or not
        self._release: Index = np.zeros(records, np.int64)
        self._start: Index = np.zeros(records, np.int64)
        self._length = np.zeros(records, np.uint32)
        self._head = 0  # records [head, tail) are held, sorted by release time
        self._tail = 0

    def __len__(self) -> int:
        return self._tail - self._head

    @property
    def arena_bytes(self) -> int:
        return int(self._arena.size)

    def next_release(self) -> int | None:
        """The earliest release time held (nanoseconds), or None."""
        return int(self._release[self._head]) if self._tail > self._head else None

    def count_after(self, now_ns: int) -> int:
        """Frames whose release time is still ahead of ``now_ns`` (what a queue limit counts)."""
        held = self._release[self._head:self._tail]
        return int(held.size - np.searchsorted(held, now_ns, side="right"))

    def add(
        self, release: Index, data: Bytes, offsets: Index, lengths: npt.NDArray[np.uint32],
        flip: Index | None = None,
    ) -> None:
        """Hold copies of the frames (given in arrival order); ``flip`` (bit per frame, -1 for none)
        corrupts the held copy, never the caller's buffer."""
        n = int(release.size)
        if n == 0:
            return
        packed = pack(data, offsets, lengths)
        starts = self._reserve(packed.size) + (np.cumsum(lengths, dtype=np.int64) - lengths)
        self._arena[self._arena_end:self._arena_end + packed.size] = packed
        self._arena_end += packed.size
        if flip is not None:
            hit = flip >= 0
            flip_bits(self._arena, starts[hit], flip[hit])
        order = np.argsort(release, kind="stable")  # ties stay in arrival order
        release, starts, lens = release[order], starts[order], lengths[order]
        self._insert(release, starts, lens)

    def pop_due(self, now_ns: int) -> tuple[Bytes, npt.NDArray[np.uint32]]:
        """Take every frame released at or before ``now_ns``: (packed bytes, lengths), release order."""
        held = self._release[self._head:self._tail]
        k = int(np.searchsorted(held, now_ns, side="right"))
        if k == 0:
            return np.zeros(0, np.uint8), np.zeros(0, np.uint32)
        span = slice(self._head, self._head + k)
        out = pack(self._arena, self._start[span], self._length[span]), self._length[span].copy()
        self._head += k
        if self._head == self._tail:  # empty: the whole arena is free again
            self._head = self._tail = self._arena_end = 0
        return out

    # -- storage ---------------------------------------------------------------------------------

    def _reserve(self, size: int) -> int:
        """Room for ``size`` more bytes at the arena's end; returns where they go."""
        if self._arena_end + size > self._arena.size:
            self._compact(size)
        return self._arena_end

    def _compact(self, need: int) -> None:
        # Released frames leave holes anywhere (jitter reorders); copy the live ones to the front of
        # the other arena. Grow when live data would fill more than half: compaction stays rare.
        span = slice(self._head, self._tail)
        live_lengths = self._length[span]
        live = int(live_lengths.sum(dtype=np.int64))
        size = self._arena.size
        while live + need > size // 2:
            size *= 2
        spare = self._spare
        target = spare if spare is not None and spare.size == size else np.zeros(size, np.uint8)
        packed = pack(self._arena, self._start[span], live_lengths)
        target[:live] = packed
        self._start[span] = np.cumsum(live_lengths, dtype=np.int64) - live_lengths
        self._spare = self._arena if self._arena.size == size else None
        self._arena, self._arena_end = target, live

    def _insert(self, release: Index, starts: Index, lens: npt.NDArray[np.uint32]) -> None:
        n, held = int(release.size), len(self)
        if held == 0 or release[0] >= self._release[self._tail - 1]:
            self._make_room(n)
            span = slice(self._tail, self._tail + n)
            self._release[span], self._start[span], self._length[span] = release, starts, lens
            self._tail += n
            return
        # A batch reaching back in time (jitter): merge. Side "right" puts new frames after held
        # ones with the same release time, which arrived earlier.
        old = slice(self._head, self._tail)
        at = np.searchsorted(self._release[old], release, side="right")
        merged = (
            np.insert(self._release[old], at, release),
            np.insert(self._start[old], at, starts),
            np.insert(self._length[old], at, lens),
        )
        self._head, self._tail = 0, 0
        self._make_room(held + n)
        span = slice(0, held + n)
        self._release[span], self._start[span], self._length[span] = merged
        self._tail = held + n

    def _make_room(self, n: int) -> None:
        """Records [tail, tail + n) writable: shift the held ones to the front, or grow."""
        if self._tail + n <= self._release.size:
            return
        held = len(self)
        size = self._release.size
        while held + n > size // 2:
            size *= 2
        for name in ("_release", "_start", "_length"):
            old = getattr(self, name)
            new = old if size == old.size else np.zeros(size, old.dtype)
            new[:held] = old[self._head:self._tail]  # a copy first: the ranges may overlap
            setattr(self, name, new)
        self._head, self._tail = 0, held
