"""RFC 2544 throughput for ``nicsim bench --ndr``: the search for NDR and PDR over the offered rate.

This module is pure (no I/O, no clock). NDR (non-drop rate) is the highest offered rate at which a
trial loses nothing; PDR (partial-drop rate) the highest at which it loses at most 0.5 % (FD.io
CSIT's definitions; RFC 2544 §26.1 calls the first "throughput"). A trial offers ``offered`` frames
at one rate for one duration and the receiver counts ``received``; loss is the difference.

The search follows the idea of CSIT's MLRsearch: short, cheap trials first at a coarse precision,
longer ones last at the final precision, each phase starting from the bounds the previous one left.
For each target loss ratio (0 for NDR, 0.005 for PDR) a phase

1. re-measures the previous phase's lower and upper bound at the phase's trial duration (a bound
   found with short trials is a hint, not a result),
2. when one side is still unknown, moves away from the known side by a factor that doubles each step
   (down to ``min_rate``, up to ``max_rate``),
3. then bisects until ``(upper - lower) / upper`` is at most the phase's precision.

One trial answers both targets: a rate already measured at a duration is never measured again, and
the PDR search reuses every trial of the NDR search. The result is the last phase's lower bound per
target (0 when even ``min_rate`` lost too much, flagged ``below_min``; ``max_rate`` when nothing
lost too much, flagged ``at_max``), with every trial that led there.

:func:`search` is a generator: it yields ``(rate, duration)`` and is sent the :class:`Trial` that
measured it, so the same code runs against a synthetic loss curve in the tests and against guests in
:mod:`nicsim.bench.ndr_vm`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

NDR_LOSS = 0.0
PDR_LOSS = 0.005


@dataclass(frozen=True, kw_only=True)
class Trial:
    """One trial: ``offered`` frames at ``rate`` pps for ``duration`` s, ``received`` counted."""

    rate: float
    duration: float
    offered: int
    received: int

    @property
    def lost(self) -> int:
        return max(self.offered - self.received, 0)

    @property
    def loss_ratio(self) -> float:
        return self.lost / self.offered if self.offered > 0 else 1.0

    def passes(self, max_loss: float) -> bool:
        """The trial lost at most ``max_loss`` of what it offered (and offered something)."""
        return self.offered > 0 and self.lost <= max_loss * self.offered


@dataclass(frozen=True, kw_only=True)
class Phase:
    """Trials of ``duration`` seconds, bisected until ``(upper - lower) / upper <= precision``."""

    duration: float
    precision: float


@dataclass(kw_only=True)
class Bound:
    """What one target's search found: ``rate`` is the highest rate that passed at the final duration."""

    name: str
    max_loss: float
    rate: float = 0.0
    upper: float | None = None
    below_min: bool = False
    at_max: bool = False
    lower_trial: Trial | None = None
    #: final-duration trials that passed above ``upper`` (noise: ignored, the result stays below it)
    ignored_passes: int = 0

    def to_json(self) -> dict[str, Any]:
        t = self.lower_trial
        return {
            "name": self.name, "max_loss": self.max_loss, "pps": self.rate, "upper_pps": self.upper,
            "below_min": self.below_min, "at_max": self.at_max, "ignored_passes": self.ignored_passes,
            "loss_ratio": None if t is None else t.loss_ratio, "duration": None if t is None else t.duration,
        }  # fmt: skip


@dataclass(kw_only=True)
class SearchResult:
    ndr: Bound
    pdr: Bound
    trials: list[Trial] = field(default_factory=list)


SearchGen = Generator[tuple[float, float], Trial, SearchResult]


def _width(lower: float, upper: float) -> float:
    return (upper - lower) / upper if upper > 0 else 0.0


def search(
    *,
    max_rate: float,
    min_rate: float,
    phases: Sequence[Phase],
    targets: Sequence[tuple[str, float]] = (("NDR", NDR_LOSS), ("PDR", PDR_LOSS)),
    max_trials: int = 40,
) -> SearchGen:
    """Yield ``(rate, duration)`` trials, be sent each :class:`Trial`, return the NDR and PDR found.

    ``max_trials`` bounds the cost: when it is reached the bounds found so far are returned (still
    the highest passing rate measured at the last duration used, never an interpolation)."""
    if not 0 < min_rate < max_rate:
        raise ValueError(f"need 0 < min_rate < max_rate, got {min_rate} and {max_rate}")
    if not phases:
        raise ValueError("at least one phase")
    done: dict[tuple[float, float], Trial] = {}
    trials: list[Trial] = []
    bounds = [Bound(name=n, max_loss=loss) for n, loss in targets]
    hints: list[tuple[float | None, float | None]] = [(None, None) for _ in bounds]
    budget = [max_trials]

    def measure(rate: float, duration: float) -> Generator[tuple[float, float], Trial, Trial | None]:
        rate = float(round(rate, 3))
        key = (rate, duration)
        if key not in done:
            if budget[0] <= 0:
                return None
            budget[0] -= 1
            trial = yield key
            done[key] = trial
            trials.append(trial)
        return done[key]

    for phase in phases:
        d = phase.duration
        for i, bound in enumerate(bounds):
            hint_lo, hint_hi = hints[i]
            # What this duration already measured (for another target) comes first.
            lo, hi = _bounds(done, d, bound.max_loss)
            if lo is None and hi is None:
                first = hint_lo if hint_lo is not None else max_rate
                candidates = [first] if hint_hi is None or hint_lo is None else [hint_lo, hint_hi]
                for rate in candidates:
                    t = yield from measure(rate, d)
                    if t is None:
                        break
                    lo, hi = _bounds(done, d, bound.max_loss)
            step = 0.25
            while lo is None and hi is not None:  # go down until a rate passes
                rate = max(hi * (1 - step), min_rate)
                t = yield from measure(rate, d)
                if t is None:
                    break
                lo, hi = _narrowed(t, lo, hi, bound.max_loss)
                if lo is None and rate <= min_rate:
                    break
                step = min(step * 2, 0.9)
            step = 0.25
            while lo is not None and hi is None and lo.rate < max_rate:  # go up until a rate fails
                t = yield from measure(min(lo.rate * (1 + step), max_rate), d)
                if t is None:
                    break
                lo, hi = _narrowed(t, lo, hi, bound.max_loss)
                step *= 2
            while lo is not None and hi is not None and _width(lo.rate, hi) > phase.precision:
                mid = float(round((lo.rate + hi) / 2, 3))
                if mid in (lo.rate, hi):
                    break  # as narrow as rates are written
                t = yield from measure(mid, d)
                if t is None:
                    break
                lo, hi = _narrowed(t, lo, hi, bound.max_loss)
            hints[i] = (None if lo is None else lo.rate, hi)
        # Every rate this duration measured counts, whichever target asked for it (a later target's
        # trial may sit inside an earlier one's bracket).
        for i, bound in enumerate(bounds):
            lo, hi = _bounds(done, d, bound.max_loss)
            hints[i] = (None if lo is None else lo.rate, hi)
            bound.lower_trial, bound.upper = lo, hi
            bound.rate = 0.0 if lo is None else lo.rate
            bound.below_min = lo is None
            bound.at_max = lo is not None and hi is None and lo.rate >= max_rate
            bound.ignored_passes = sum(
                1 for (r, dur), t in done.items()
                if dur == d and hi is not None and r > hi and t.passes(bound.max_loss)
            )
    return SearchResult(ndr=bounds[0], pdr=bounds[1] if len(bounds) > 1 else bounds[0], trials=trials)


def _narrowed(
    t: Trial, lo: Trial | None, hi: float | None, max_loss: float
) -> tuple[Trial | None, float | None]:
    """The bracket after trial ``t``: a pass raises the lower bound, a failure lowers the upper one."""
    return (t, hi) if t.passes(max_loss) else (lo, t.rate)


def _bounds(
    done: dict[tuple[float, float], Trial], duration: float, max_loss: float
) -> tuple[Trial | None, float | None]:
    """From the trials of ``duration``: the lowest rate that lost too much (upper bound), and the
    highest that passed below it (lower bound). With noise a pass above the upper bound is ignored."""
    at = [t for (_, dur), t in done.items() if dur == duration]
    fails = [t.rate for t in at if not t.passes(max_loss)]
    hi = min(fails) if fails else None
    passes = [t for t in at if t.passes(max_loss) and (hi is None or t.rate < hi)]
    lo = max(passes, key=lambda t: t.rate) if passes else None
    return lo, hi


def run_synthetic(gen: SearchGen, loss_at: Any) -> SearchResult:
    """Drive ``gen`` with ``loss_at(rate, duration) -> loss ratio``: for tests and examples."""
    try:
        rate, duration = next(gen)
        while True:
            offered = max(int(rate * duration), 1)
            received = offered - round(offered * loss_at(rate, duration))
            rate, duration = gen.send(Trial(rate=rate, duration=duration, offered=offered, received=received))
    except StopIteration as stop:
        result: SearchResult = stop.value
        return result
