"""The NDR/PDR search (nicsim.bench.ndr) against synthetic loss curves."""

from __future__ import annotations

import pytest

from nicsim.bench.ndr import Phase, Trial, run_synthetic, search

PHASES = (Phase(duration=0.5, precision=0.2), Phase(duration=2.0, precision=0.02))


def knee(ndr: float, pdr: float):
    """No loss up to ``ndr``, then loss rising linearly to 0.5 % at ``pdr`` and on."""

    def loss(rate: float, duration: float) -> float:
        if rate <= ndr:
            return 0.0
        return 0.005 * (rate - ndr) / (pdr - ndr)

    return loss


def test_search_finds_ndr_and_pdr_of_a_knee_within_the_final_precision() -> None:
    res = run_synthetic(search(max_rate=1e6, min_rate=1e3, phases=PHASES), knee(300e3, 400e3))
    assert 300e3 * 0.98 <= res.ndr.rate <= 300e3
    assert 400e3 * 0.98 <= res.pdr.rate <= 400e3
    assert res.ndr.upper is not None and (res.ndr.upper - res.ndr.rate) / res.ndr.upper <= 0.02
    assert res.ndr.lower_trial is not None and res.ndr.lower_trial.duration == 2.0


def test_results_are_confirmed_by_final_duration_trials() -> None:
    # Short trials lose nothing up to 500 kpps; long ones only up to 200 kpps.
    def loss(rate: float, duration: float) -> float:
        limit = 500e3 if duration < 1 else 200e3
        return 0.0 if rate <= limit else 0.01

    res = run_synthetic(search(max_rate=1e6, min_rate=1e3, phases=PHASES), loss)
    assert 200e3 * 0.98 <= res.ndr.rate <= 200e3
    assert all(t.passes(0.0) for t in res.trials if t.duration == 2.0 and t.rate <= res.ndr.rate)


def test_nothing_lost_reports_max_rate_flagged() -> None:
    res = run_synthetic(search(max_rate=1e5, min_rate=1e3, phases=PHASES), lambda r, d: 0.0)
    assert res.ndr.rate == 1e5 and res.ndr.at_max and res.pdr.at_max


def test_everything_lost_reports_zero_below_min() -> None:
    res = run_synthetic(search(max_rate=1e5, min_rate=1e3, phases=PHASES), lambda r, d: 0.5)
    assert res.ndr.rate == 0.0 and res.ndr.below_min and res.pdr.below_min


def test_trials_are_never_repeated_and_the_budget_holds() -> None:
    res = run_synthetic(search(max_rate=1e6, min_rate=1e3, phases=PHASES, max_trials=6), knee(3e5, 4e5))
    keys = [(t.rate, t.duration) for t in res.trials]
    assert len(keys) == len(set(keys)) <= 6


def test_loss_ratio_and_pass_counts_frames() -> None:
    t = Trial(rate=1e3, duration=1.0, offered=1000, received=995)
    assert t.lost == 5 and t.loss_ratio == 0.005 and t.passes(0.005) and not t.passes(0.0)
    assert not Trial(rate=1e3, duration=1.0, offered=0, received=0).passes(0.005)


def test_search_refuses_bad_bounds() -> None:
    with pytest.raises(ValueError):
        next(search(max_rate=1.0, min_rate=2.0, phases=PHASES))


def test_a_dip_under_the_limit_bounds_ndr_and_pdr_stays_at_least_ndr() -> None:
    # 1 % loss at exactly one rate the search measures: a dip under the real limit (noise).
    clean = run_synthetic(search(max_rate=1e6, min_rate=1e3, phases=PHASES), knee(300e3, 400e3))
    dip = next(t.rate for t in clean.trials if t.duration == 2.0 and t.rate < clean.ndr.rate)

    def loss(rate: float, duration: float) -> float:
        return 0.01 if rate == dip and duration == 2.0 else knee(300e3, 400e3)(rate, duration)

    res = run_synthetic(search(max_rate=1e6, min_rate=1e3, phases=PHASES), loss)
    assert res.ndr.rate < dip and res.pdr.rate >= res.ndr.rate and res.ndr.upper == dip


def test_a_later_target_starts_from_the_trials_an_earlier_one_made() -> None:
    res = run_synthetic(search(max_rate=1e6, min_rate=1e3, phases=PHASES), knee(300e3, 310e3))
    # PDR sits within NDR's final bracket: NDR's trials leave it little or nothing to measure.
    ndr_only = run_synthetic(
        search(max_rate=1e6, min_rate=1e3, phases=PHASES, targets=(("NDR", 0.0),)), knee(300e3, 310e3)
    )
    assert len(res.trials) - len(ndr_only.trials) <= 3
