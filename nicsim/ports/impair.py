"""One direction of an impaired link: loss, delay, jitter, reordering, duplication, corruption, a rate
and a queue limit, applied to batches of frames, pure and clock-driven.

This module owns :class:`Impairment`. The caller passes the time (``now``, seconds, any monotonic
origin) and frames as nicsim ports see them (flat uint8 buffer, offsets, lengths);
:meth:`Impairment.offer` returns the frames that leave now and keeps the delayed ones in a
:class:`~nicsim.ports.held_frames.HeldFrames` delay line, which :meth:`Impairment.due` drains when
:meth:`Impairment.next_deadline` comes. Nothing sleeps, nothing here does I/O.

Reproducibility: each random decision (loss, duplicate, corrupt, reorder, delay) has its own
``numpy.random.Generator`` spawned from ``seed``, and each draws a fixed count of numbers for *every*
offered frame, in frame order, whether or not an earlier stage dropped it. So the same seed and the
same frames give the same decisions however the frames are cut into batches, and turning one
impairment on does not change which frames another one picks.

Per frame: loss -> duplicate -> corrupt -> reorder (sent at once) or delay + jitter -> rate ->
limit. Times are integer nanoseconds inside, so that release times are exact and batch-independent.
Where netem is loose or differs, the choices made here:

- loss comes first: a lost frame is gone, duplicate or not (netem sends a lost duplicated packet once);
- a duplicate is an uncorrupted copy right behind its original, sharing its delay, reorder and
  rate fate (netem re-enqueues it at the root qdisc, where it draws its own delay);
- reorder (needs a delay, as in tc): a frame sent at once bypasses delay and rate and never counts
  toward the limit; netem's gap counter counts frames that survived loss;
- jitter reorders frames, which leave in release-time order (netem's tfifo); with a rate the
  queue is FIFO, so it does not (as netem);
- the limit counts frames whose release time is still ahead of ``now`` (due but not yet collected
  ones are on the wire already); a frame a full queue refuses is counted ``rate`` if the shaper
  had pushed it later than its delay alone would, else ``limit``.
"""

from __future__ import annotations

import math
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from nicsim.ports.held_frames import HeldFrames, flip_bits, pack
from nicsim.ports.impair_config import GilbertElliott, ImpairConfig
from nicsim.virtio.port import ETH_HLEN

__all__ = ["DROP_REASONS", "Frames", "ImpairConfig", "Impairment"]

DROP_REASONS: Final = ("loss", "limit", "rate")
_NS: Final = 1_000_000_000
_STREAMS: Final = ("loss", "duplicate", "corrupt", "reorder", "delay")
# rate bookkeeping multiplies bits by 1e9: keep one batch's bits far from int64's end.
_MAX_BATCH_BITS: Final = (1 << 62) // _NS

Frames = tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.uint32]]


def _ns(seconds: float) -> int:
    return round(seconds * _NS)


def _empty() -> Frames:
    return np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.uint32)


class _Shaped(NamedTuple):
    """The rate shaper's answer for one batch, committed up to the last frame it really sent."""

    departure: npt.NDArray[np.int64]
    tat: npt.NDArray[np.int64]
    scaled: npt.NDArray[np.int64]


class Impairment:
    """Apply an :class:`ImpairConfig` to a stream of frame batches."""

    def __init__(self, config: ImpairConfig | str = "", *, stream: tuple[int, ...] = ()) -> None:
        """``stream`` tells apart links that share a seed (e.g. ``(port, direction)``), so the two
        directions of a link, or two links, do not drop the very same frame numbers."""
        self.config = config if isinstance(config, ImpairConfig) else ImpairConfig.parse(config)
        root = np.random.SeedSequence(self.config.seed, spawn_key=stream)
        streams = root.spawn(len(_STREAMS))
        self._rng = {
            name: np.random.Generator(np.random.PCG64(s)) for name, s in zip(_STREAMS, streams, strict=True)
        }
        self._held = HeldFrames()
        self._now_ns = -(1 << 62)  # the latest time seen
        self._bad_state = False  # Gilbert-Elliott: in the bad state now
        self._since_reorder = 0  # netem's counter: frames delayed since the last reordered one
        self._last_jitter = 0.0  # the last frame's normal deviate, for a correlated jitter
        # The rate shaper (see _shape): theoretical arrival time of the next frame, the nanosecond
        # fraction carried between frames (in bit-nanoseconds), the last departure.
        self._tat = -(1 << 62)
        self._carry = 0
        self._last_departure = -(1 << 62)
        self.counters = dict.fromkeys(
            ("offered", "offered_bytes", "delivered", "delivered_bytes", "delayed", "reordered",
             "duplicated", "corrupted"), 0)
        self.dropped = dict.fromkeys(DROP_REASONS, 0)

    # -- the caller's interface ------------------------------------------------------------------

    def offer(
        self, now: float, data: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.uint32],
    ) -> Frames:
        """Take frames ``data[offsets[i]:offsets[i] + lengths[i]]`` at time ``now``; return every frame
        that leaves now (held ones that came due first, then this batch's, in release order).

        The returned buffer may be ``data`` itself (when no frame had to be copied); the caller must
        not change ``data`` until it is done with what was returned.
        """
        now_ns = self._clock(now)
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.uint32)
        n = int(lengths.size)
        self.counters["offered"] += n
        self.counters["offered_bytes"] += int(lengths.sum(dtype=np.int64))
        if not self.config.active:
            return self._deliver(self._release_due(now_ns), (data, offsets, lengths), None)
        cfg = self.config

        lost = self._losses(n)
        dup = self._draw("duplicate", n, cfg.duplicate)
        corrupt_draw = self._rng["corrupt"].random((n, 2)) if cfg.corrupt else None
        reorder_draw = self._rng["reorder"].random(n) if cfg.reorder else None
        delay = self._delays(n)

        kept = np.flatnonzero(~lost) if lost is not None else np.arange(n)
        self.dropped["loss"] += n - kept.size
        copies = 1 + dup[kept] if dup is not None else np.ones(kept.size, np.int64)
        frame = np.repeat(kept, copies)  # the offered frame each outgoing copy comes from
        first = np.cumsum(copies) - copies  # the original's position among the copies
        self.counters["duplicated"] += frame.size - kept.size

        flip = np.full(frame.size, -1, np.int64)
        if corrupt_draw is not None:
            payload_bits = (lengths[kept].astype(np.int64) - ETH_HLEN) * 8
            hit = (corrupt_draw[kept, 0] < cfg.corrupt) & (payload_bits > 0)  # a bare header: nothing to flip
            bit = ETH_HLEN * 8 + (corrupt_draw[kept, 1] * payload_bits).astype(np.int64)
            flip[first[hit]] = bit[hit]

        now_copy = np.zeros(frame.size, np.bool_)  # reordered: sent at once
        if reorder_draw is not None:
            reordered = self._reorders(reorder_draw[kept] < cfg.reorder)
            now_copy = np.repeat(reordered, copies)
            self.counters["reordered"] += int(reordered.sum())
        release = now_ns + (delay[frame] if delay is not None else np.zeros(frame.size, np.int64))
        release[now_copy] = now_ns
        eligible = release.copy()
        queued = ~now_copy
        if cfg.rate:
            shaped = self._shape(release[queued], lengths[frame[queued]])
            release[queued] = shaped.departure

        # The limit counts frames still ahead of their release time, held before or in this batch.
        later = release > now_ns
        room = cfg.limit - self._held.count_after(now_ns)
        over = later & (np.cumsum(later) > room)
        if over.any():
            by_rate = over & (release > eligible) if cfg.rate else np.zeros_like(over)
            self.dropped["rate"] += int(by_rate.sum())
            self.dropped["limit"] += int(over.sum() - by_rate.sum())
        keep = ~over
        self.counters["corrupted"] += int(np.count_nonzero(flip[keep] >= 0))
        if cfg.rate:
            # The frames the shaper sends are a prefix of those it saw: departures only grow, so
            # once one is over the limit, every later one is too.
            self._commit(shaped, int(np.count_nonzero(keep & queued)) - 1)

        hold = later & keep
        if hold.any():
            self._held.add(release[hold], data, offsets[frame[hold]], lengths[frame[hold]], flip[hold])
            self.counters["delayed"] += int(hold.sum())
        go = ~later & keep
        return self._deliver(
            self._release_due(now_ns), (data, offsets[frame[go]], lengths[frame[go]]), flip[go]
        )

    def due(self, now: float) -> Frames:
        """The held frames whose release time has come by ``now``, in release order."""
        return self._deliver(self._release_due(self._clock(now)), _empty(), None)

    def next_deadline(self) -> float | None:
        """When to call :meth:`due` next (seconds, the caller's clock), or None if nothing is held."""
        release = self._held.next_release()
        if release is None:
            return None
        # The float nearest release/1e9 may convert back a nanosecond early; step up until it does not.
        t = release / _NS
        while _ns(t) < release:
            t = math.nextafter(t, math.inf)
        return t

    def _clock(self, now: float) -> int:
        """``now`` in nanoseconds, never before a time already seen: a clock stepping back must not
        release a frame twice or let one overtake another."""
        self._now_ns = max(self._now_ns, _ns(now))
        return self._now_ns

    @property
    def held(self) -> int:
        return len(self._held)

    def stats(self) -> dict[str, Any]:
        """Counters, drops by reason and frames held now. Every offered frame (and duplicate) is
        delivered, held or dropped: offered + duplicated == delivered + held + sum(dropped).
        ``duplicated`` counts copies made (a full queue may drop one), ``corrupted`` and ``reordered``
        frames that were accepted."""
        return {**self.counters, "held": self.held, "dropped": dict(self.dropped)}

    # -- random decisions ------------------------------------------------------------------------

    def _draw(self, stream: str, n: int, probability: float) -> npt.NDArray[np.int64] | None:
        if not probability:
            return None
        picked: npt.NDArray[np.int64] = (self._rng[stream].random(n) < probability).astype(np.int64)
        return picked

    def _losses(self, n: int) -> npt.NDArray[np.bool_] | None:
        cfg = self.config
        if cfg.loss_model is not None:
            return self._gilbert_elliott(self._rng["loss"].random((n, 2)), cfg.loss_model)
        if cfg.loss:
            lost: npt.NDArray[np.bool_] = self._rng["loss"].random(n) < cfg.loss
            return lost
        return None

    def _gilbert_elliott(self, u: npt.NDArray[np.float64], model: GilbertElliott) -> npt.NDArray[np.bool_]:
        """netem's loss_gilb_ell: a frame is lost with its state's probability, then the state may
        change (column 0 decides the change, column 1 the loss). The loop runs once per state change,
        not per frame."""
        n = u.shape[0]
        bad = np.empty(n, np.bool_)
        leave = {False: np.flatnonzero(u[:, 0] < model.p), True: np.flatnonzero(u[:, 0] < model.r)}
        i, state = 0, self._bad_state
        while i < n:
            changes = leave[state]
            k = int(np.searchsorted(changes, i))
            j = int(changes[k]) if k < changes.size else n
            bad[i:j + 1] = state  # frame j still goes out in the old state, then the state flips
            if j < n:
                state = not state
            i = j + 1
        self._bad_state = state
        lost: npt.NDArray[np.bool_] = np.where(bad, u[:, 1] < model.loss_bad, u[:, 1] < model.loss_good)
        return lost

    def _reorders(self, candidate: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """netem's gap rule: a frame may be sent at once (if ``candidate``) only when at least gap-1
        frames were delayed since the last one that was; the count runs across batches."""
        gap = self.config.gap
        if gap == 1:
            return candidate.copy()  # every candidate qualifies: no count to keep
        reordered = np.zeros(candidate.size, np.bool_)
        last = -1 - self._since_reorder  # where the last reordered frame would have been
        for q in np.flatnonzero(candidate).tolist():  # one step per candidate, not per frame
            if q - last >= gap:
                reordered[q] = True
                last = q
        self._since_reorder = candidate.size - 1 - last
        return reordered

    def _delays(self, n: int) -> npt.NDArray[np.int64] | None:
        cfg = self.config
        if not cfg.delay and not cfg.jitter:
            return None
        if not cfg.jitter:
            return np.full(n, _ns(cfg.delay), np.int64)
        rng = self._rng["delay"]
        if cfg.distribution == "uniform":
            spread = cfg.delay + cfg.jitter * (2 * rng.random(n) - 1)
        elif cfg.jitter_correlation:
            spread = cfg.delay + cfg.jitter * self._correlated(rng.standard_normal(n))
        else:
            spread = cfg.delay + cfg.jitter * rng.standard_normal(n)
        # Clamped at 0: a frame never leaves before it was offered.
        delays: npt.NDArray[np.int64] = np.rint(np.maximum(spread, 0.0) * _NS).astype(np.int64)
        return delays

    def _correlated(self, noise: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """AR(1): ``z[i] = rho z[i-1] + sqrt(1 - rho^2) noise[i]``, still N(0, 1), carried across
        batches. Solved as a scan in log2(n) vectorised steps (Hillis-Steele) instead of a loop."""
        rho = self.config.jitter_correlation
        z: npt.NDArray[np.float64] = np.sqrt(1 - rho * rho) * noise
        if z.size:
            z[0] += rho * self._last_jitter
            step, factor = 1, rho
            while step < z.size and factor > 1e-300:
                z[step:] += factor * z[:-step]  # the right side is evaluated before the update
                step, factor = step * 2, factor * factor
            self._last_jitter = float(z[-1])
        return z

    # -- rate ------------------------------------------------------------------------------------

    def _shape(self, eligible: npt.NDArray[np.int64], lengths: npt.NDArray[np.uint32]) -> _Shaped:
        """Departure times through a token bucket of ``rate`` bits/s, depth ``burst`` bytes.

        The virtual-scheduling form of a token bucket (GCRA): ``tat[i] = max(tat[i-1], eligible[i]) +
        serialisation[i]``; frame i leaves at ``max(eligible[i], tat[i] - burst_time)``, and never
        before the frame ahead of it (FIFO, as netem's rate queue). With burst 0 that is netem's rate:
        a frame leaves once its last bit is on the wire. The max-plus recurrence is solved for the
        batch at once: ``tat[i] = S[i] + max(tat0, max_{j<=i}(eligible[j] - S[j-1]))`` with S the
        running sum of serialisation times, which are exact integers: the nanosecond fraction of each
        frame is carried to the next, so a long run sends exactly ``rate`` bits per second.
        """
        rate = self.config.rate
        bits = np.cumsum(lengths, dtype=np.int64) * 8
        if bits.size and int(bits[-1]) > _MAX_BATCH_BITS:
            raise ValueError(f"a batch of {int(bits[-1]) // 8} bytes is too large for the rate shaper")
        scaled = self._carry + bits * _NS  # bit-nanoseconds since the end of the last frame sent
        ends = scaled // rate
        serialisation = np.diff(ends, prepend=0)
        tat = ends + np.maximum(self._tat, np.maximum.accumulate(eligible - (ends - serialisation)))
        departure = np.maximum(eligible, tat - self.config.burst * 8 * _NS // rate)
        departure = np.maximum.accumulate(np.maximum(departure, self._last_departure))
        return _Shaped(departure, tat, scaled)

    def _commit(self, shaped: _Shaped, last: int) -> None:
        """Carry the shaper's state on from frame ``last`` of the batch (none sent: -1)."""
        if last >= 0:
            self._tat = int(shaped.tat[last])
            self._carry = int(shaped.scaled[last] % self.config.rate)
            self._last_departure = int(shaped.departure[last])

    # -- output ----------------------------------------------------------------------------------

    def _release_due(self, now_ns: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint32]]:
        return self._held.pop_due(now_ns)

    def _deliver(
        self, due: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint32]], fresh: Frames,
        flip: npt.NDArray[np.int64] | None,
    ) -> Frames:
        """Held frames that came due, then this batch's: one buffer, copied only when needed."""
        held_bytes, held_lengths = due
        data, offsets, lengths = fresh
        self.counters["delivered"] += int(held_lengths.size + lengths.size)
        self.counters["delivered_bytes"] += int(held_lengths.sum(dtype=np.int64)) + int(
            lengths.sum(dtype=np.int64))
        flips = flip is not None and bool((flip >= 0).any())
        if held_lengths.size == 0 and not flips:
            return data, offsets, lengths  # nothing to copy: offsets into the caller's buffer
        out = np.concatenate([held_bytes, pack(data, offsets, lengths)])
        out_lengths = np.concatenate([held_lengths, lengths])
        out_offsets = np.cumsum(out_lengths, dtype=np.int64) - out_lengths
        if flips:
            assert flip is not None
            hit = np.flatnonzero(flip >= 0)
            flip_bits(out, out_offsets[held_lengths.size + hit], flip[hit])
        return out, out_offsets, out_lengths
