"""``nicsim.bench.matrix``: min/median/max, ratios, and the cells of --quick versus the full matrix."""

from __future__ import annotations

import pytest

from nicsim.bench.matrix import (
    FULL_SIZES,
    QUICK_SIZES,
    Cell,
    Direction,
    Summary,
    build_plan,
    ratio,
)


def test_summary_of_odd_count_is_min_middle_max() -> None:
    s = Summary.of([300.0, 100.0, 200.0])
    assert s == Summary(min=100.0, median=200.0, max=300.0, n=3)


def test_summary_of_even_count_takes_the_mean_of_the_middle_two() -> None:
    s = Summary.of([4.0, 1.0, 3.0, 2.0])
    assert s is not None and s.median == 2.5 and (s.min, s.max, s.n) == (1.0, 4.0, 4)


def test_summary_of_nothing_is_none_not_zero() -> None:
    assert Summary.of([]) is None


def test_ratio_divides_reference_by_other() -> None:
    assert ratio(150.0, 300.0) == 0.5
    assert ratio(300.0, 150.0) == 2.0


@pytest.mark.parametrize(("ref", "other"), [(None, 1.0), (1.0, None), (1.0, 0.0), (1.0, -2.0)])
def test_ratio_is_none_when_undefined(ref: float | None, other: float | None) -> None:
    assert ratio(ref, other) is None


def test_frame_len_excludes_the_fcs() -> None:
    assert Cell(backend="x", direction=Direction.TX, size=64).frame_len == 60
    assert Cell(backend="x", direction=Direction.TCP_TX).frame_len == 0


def test_quick_plan_is_one_repetition_two_sizes_short_and_no_reverse_tcp() -> None:
    plan = build_plan(["nicsim", "qemu-tap"], quick=True)
    assert plan.repetitions == 1 and plan.duration == 2.0
    per_backend = [c for c in plan.cells if c.backend == "nicsim"]
    assert [(c.direction, c.size) for c in per_backend] == [
        (Direction.TX, 64), (Direction.TX, 1500), (Direction.RX, 64), (Direction.RX, 1500),
        (Direction.TCP_TX, 0),
    ]  # fmt: skip
    assert len(plan.cells) == 10 and plan.runs == 10
    assert {c.size for c in plan.cells if not c.direction.is_tcp} == set(QUICK_SIZES)


def test_full_plan_has_three_sizes_three_repetitions_and_both_tcp_directions() -> None:
    plan = build_plan(["nicsim"], quick=False)
    assert plan.repetitions == 3 and plan.duration == 5.0
    assert sorted({c.size for c in plan.cells if not c.direction.is_tcp}) == list(FULL_SIZES)
    assert [c.direction for c in plan.cells if c.direction.is_tcp] == [Direction.TCP_TX, Direction.TCP_RX]
    assert len(plan.cells) == 3 + 3 + 2 and plan.runs == 24


def test_quick_plan_is_estimated_well_under_two_minutes_for_nicsim_alone() -> None:
    assert build_plan(["nicsim"], quick=True).estimate_seconds() < 120


def test_full_plan_estimate_grows_with_repetitions_and_backends() -> None:
    one = build_plan(["nicsim"], quick=False).estimate_seconds()
    three = build_plan(["nicsim", "qemu-tap", "dpdk"], quick=False).estimate_seconds()
    assert three == pytest.approx(3 * one)


def test_explicit_options_override_the_presets() -> None:
    plan = build_plan(["dpdk"], quick=True, sizes=[512], directions=[Direction.RX], repetitions=2,
                      duration=1.5)  # fmt: skip
    assert plan.cells == (Cell(backend="dpdk", direction=Direction.RX, size=512),)
    assert (plan.repetitions, plan.duration, plan.runs) == (2, 1.5, 2)


@pytest.mark.parametrize("kwargs", [{"sizes": [63]}, {"sizes": [9000]}, {"repetitions": 0},
                                    {"duration": 0.0}])  # fmt: skip
def test_impossible_plans_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_plan(["nicsim"], quick=True, **kwargs)  # type: ignore[arg-type]


def test_no_backend_is_refused() -> None:
    with pytest.raises(ValueError):
        build_plan([], quick=True)
