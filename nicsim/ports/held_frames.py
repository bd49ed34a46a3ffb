"""Frames held back until a release time: the delay line of an impaired link.

This module owns :class:`HeldFrames`. Frame bytes are copied into one preallocated byte arena, in
arrival order; the records (release time in integer nanoseconds, arena start, length) are kept in
numpy arrays in two rungs of a ladder queue (Tang, Goh and Thng, "Ladder queue", ACM TOMACS 2005):
*near*, sorted by release time (ties in arrival order), holds every frame due before a horizon;
*far*, unsorted in arrival order, holds the rest. A batch is appended to far (or merged into near with
one ``searchsorted`` for the few due before the horizon); when the clock passes the horizon, it moves
on by an eighth of what far spans and the frames now before it are sorted into near in one pass. So
a frame is sorted once, among the frames due near its own time, not among everything held; and
everything due is one prefix of near, popped with one ``searchsorted``. No Python object per frame;
the arena is compacted (into a second, reused arena) only when its end is reached, so steady state
allocates nothing per frame.

Also here: :func:`pack`, the vectorised copy of frames given as (flat buffer, offsets, lengths), and
:func:`flip_bits`, which the corruption impairment applies to copies.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

__all__ = ["HeldFrames", "flip_bits", "pack"]

Bytes = npt.NDArray[np.uint8]
Index = npt.NDArray[np.int64]


def pack(data: Bytes, offsets: Index, lengths: npt.NDArray[np.uint32]) -> Bytes:
    """Frames ``data[offsets[i]:offsets[i] + lengths[i]]`` copied back to back.

    Byte-wise fancy indexing costs several ns a byte, so the common shapes take a row copy instead:
    frames already back to back are one slice; otherwise each frame is one row of a strided view of
    ``data`` (rows as wide as the longest frame, so numpy copies whole rows) and a mask keeps each
    frame's bytes. Rows that would run past the buffer's end start earlier, the mask shifted to match.
    Only when padding rows would copy over 4x the bytes is it a per-byte index.
    """
    lens = lengths.astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.uint8)
    offsets = offsets.astype(np.int64, copy=False)
    first = int(offsets[0])
    end = int(offsets[-1]) + int(lens[-1])
    if end - first == total and np.array_equal(offsets[1:], offsets[:-1] + lens[:-1]):
        return data[first:first + total].copy()  # already back to back (a delay line in arrival order)
    width = int(lens.max())
    if lens.size * width <= 4 * total:
        rows = as_strided(data, shape=(data.size - width + 1, width), strides=(1, 1), writeable=False)
        row_start = np.minimum(offsets, data.size - width)
        if int(lens.min()) == width:
            same: Bytes = rows[row_start].reshape(-1)  # one size: every row is exactly a frame
            return same
        skip = (offsets - row_start)[:, None]
        column = np.arange(width, dtype=np.int64)[None, :]
        masked: Bytes = rows[row_start][(column >= skip) & (column < skip + lens[:, None])]
        return masked
    base = np.cumsum(lens) - lens
    within = np.arange(total, dtype=np.int64) - np.repeat(base, lens)
    packed: Bytes = data[np.repeat(offsets, lens) + within]
    return packed


def flip_bits(buf: Bytes, starts: Index, bits: Index) -> None:
    """Flip bit ``bits[i]`` of the frame at ``starts[i]`` (bit 0: the first byte's most significant)."""
    if bits.size:
        np.bitwise_xor.at(buf, starts + (bits >> 3), (0x80 >> (bits & 7)).astype(np.uint8))


_MIN_SPAN = 50_000  # ns: the horizon moves at least this far, so a near-empty far is not re-scanned per call
_RUNGS = 8  # the horizon moves by 1/_RUNGS of the span far covers: each frame is scanned about that often


class _Records:
    """Release time, arena start and length of frames, as three columns that grow by doubling."""

    def __init__(self, capacity: int) -> None:
        self.release: Index = np.zeros(capacity, np.int64)
        self.start: Index = np.zeros(capacity, np.int64)
        self.length = np.zeros(capacity, np.uint32)
        self.head = 0  # records [head, tail) are live
        self.tail = 0

    def __len__(self) -> int:
        return self.tail - self.head

    def live(self) -> slice:
        return slice(self.head, self.tail)

    def make_room(self, n: int) -> None:
        """Records [tail, tail + n) writable: shift the live ones to the front, or grow."""
        if self.tail + n <= self.release.size:
            return
        held, size = len(self), self.release.size
        while held + n > size // 2:
            size *= 2
        for name in ("release", "start", "length"):
            old = getattr(self, name)
            new = old if size == old.size else np.zeros(size, old.dtype)
            new[:held] = old[self.head:self.tail]  # numpy copies overlapping ranges safely
            setattr(self, name, new)
        self.head, self.tail = 0, held

    def append(self, release: Index, start: Index, length: npt.NDArray[np.uint32]) -> None:
        self.make_room(release.size)
        span = slice(self.tail, self.tail + release.size)
        self.release[span], self.start[span], self.length[span] = release, start, length
        self.tail += release.size

    def replace(self, release: Index, start: Index, length: npt.NDArray[np.uint32]) -> None:
        self.head = self.tail = 0
        self.append(release, start, length)


class HeldFrames:
    """A delay line: frames in, each with a release time; out in (release time, arrival) order."""

    def __init__(self, *, arena_bytes: int = 1 << 20, records: int = 1024) -> None:
        self._arena: Bytes = np.zeros(arena_bytes, np.uint8)
        self._spare: Bytes | None = None  # the second arena compaction copies into, then swaps
        self._arena_end = 0  # bytes of the arena used, live or not
        self._near = _Records(records)  # sorted; every release < horizon
        self._far = _Records(records)  # arrival order; every release >= horizon
        self._horizon = -(1 << 62)
        self._far_min = self._far_max = 0  # meaningful while far holds anything

    def __len__(self) -> int:
        return len(self._near) + len(self._far)

    @property
    def arena_bytes(self) -> int:
        return int(self._arena.size)

    def next_release(self) -> int | None:
        """The earliest release time held (nanoseconds), or None."""
        if len(self._near):
            return int(self._near.release[self._near.head])
        return self._far_min if len(self._far) else None

    def count_after(self, now_ns: int) -> int:
        """Frames whose release time is still ahead of ``now_ns`` (what a queue limit counts)."""
        self._advance(now_ns)
        near = self._near.release[self._near.live()]
        return int(near.size - np.searchsorted(near, now_ns, side="right")) + len(self._far)

    def add(
        self, release: Index, data: Bytes, offsets: Index, lengths: npt.NDArray[np.uint32],
        flip: Index | None = None,
    ) -> None:
        """Hold copies of the frames (given in arrival order); ``flip`` (bit per frame, -1 for none)
        corrupts the held copy, never the caller's buffer."""
        if release.size == 0:
            return
        packed = pack(data, offsets, lengths)
        starts = self._reserve(packed.size) + (np.cumsum(lengths, dtype=np.int64) - lengths)
        self._arena[self._arena_end:self._arena_end + packed.size] = packed
        self._arena_end += packed.size
        if flip is not None:
            hit = flip >= 0
            flip_bits(self._arena, starts[hit], flip[hit])
        soon = release < self._horizon
        if soon.any():
            self._merge_near(release[soon], starts[soon], lengths[soon])
            later = ~soon
            release, starts, lengths = release[later], starts[later], lengths[later]
        if release.size:
            low, high = int(release.min()), int(release.max())
            empty = len(self._far) == 0
            self._far_min = low if empty else min(self._far_min, low)
            self._far_max = high if empty else max(self._far_max, high)
            self._far.append(release, starts, lengths)

    def pop_due(self, now_ns: int) -> tuple[Bytes, npt.NDArray[np.uint32]]:
        """Take every frame released at or before ``now_ns``: (packed bytes, lengths), release order."""
        self._advance(now_ns)
        near = self._near
        k = int(np.searchsorted(near.release[near.live()], now_ns, side="right"))
        if k == 0:
            return np.zeros(0, np.uint8), np.zeros(0, np.uint32)
        span = slice(near.head, near.head + k)
        out = pack(self._arena, near.start[span], near.length[span]), near.length[span].copy()
        near.head += k
        if len(self) == 0:  # empty: the whole arena is free again
            near.head = near.tail = self._arena_end = 0
        return out

    # -- the ladder ------------------------------------------------------------------------------

    def _advance(self, now_ns: int) -> None:
        """Once the clock reaches the horizon, move it on and sort what it passes into near."""
        if now_ns < self._horizon:
            return
        far = self._far
        self._horizon = now_ns + max(_MIN_SPAN, (self._far_max - now_ns) // _RUNGS if len(far) else 0)
        if not len(far):
            return
        live = far.live()
        moving = far.release[live] < self._horizon
        if not moving.any():
            return
        release, start, length = far.release[live], far.start[live], far.length[live]
        order = np.argsort(release[moving], kind="stable")  # far is in arrival order: ties stay so
        # Everything in near is before the old horizon, everything moving at or after it: append.
        self._near.append(release[moving][order], start[moving][order], length[moving][order])
        staying = ~moving
        far.replace(release[staying], start[staying], length[staying])
        if len(far):
            self._far_min = int(far.release[far.live()].min())

    def _merge_near(self, release: Index, starts: Index, lens: npt.NDArray[np.uint32]) -> None:
        order = np.argsort(release, kind="stable")  # ties stay in arrival order
        release, starts, lens = release[order], starts[order], lens[order]
        near = self._near
        if not len(near) or release[0] >= near.release[near.tail - 1]:
            near.append(release, starts, lens)
            return
        # Side "right": after held frames with the same release time, which arrived earlier.
        live = near.live()
        at = np.searchsorted(near.release[live], release, side="right")
        near.replace(
            np.insert(near.release[live], at, release),
            np.insert(near.start[live], at, starts),
            np.insert(near.length[live], at, lens),
        )

    # -- storage ---------------------------------------------------------------------------------

    def _reserve(self, size: int) -> int:
        """Room for ``size`` more bytes at the arena's end; returns where they go."""
        if self._arena_end + size > self._arena.size:
            self._compact(size)
        return self._arena_end

    def _compact(self, need: int) -> None:
        # Released frames leave holes anywhere (jitter reorders); copy the live ones to the front of
        # the other arena. Grow when live data would fill more than half: compaction stays rare.
        rungs = (self._near, self._far)
        live = sum(int(r.length[r.live()].sum(dtype=np.int64)) for r in rungs)
        size = self._arena.size
        while live + need > size // 2:
            size *= 2
        spare = self._spare
        target = spare if spare is not None and spare.size == size else np.zeros(size, np.uint8)
        end = 0
        for r in rungs:
            span = r.live()
            packed = pack(self._arena, r.start[span], r.length[span])
            target[end:end + packed.size] = packed
            r.start[span] = end + np.cumsum(r.length[span], dtype=np.int64) - r.length[span]
            end += packed.size
        self._spare = self._arena if self._arena.size == size else None
        self._arena, self._arena_end = target, live
