"""The host-speed probe every bench run prints: a fixed Python loop's best time, in milliseconds."""

from __future__ import annotations

import math

from nicsim.bench.speed import python_loop_ms


def test_the_loop_time_is_a_positive_number_of_milliseconds() -> None:
    ms = python_loop_ms(steps=10_000, repeat=2)
    assert 0 < ms < 60_000 and math.isfinite(ms)


def test_a_loop_of_no_steps_takes_less_than_one_of_many() -> None:
    assert python_loop_ms(steps=0, repeat=3) < python_loop_ms(steps=200_000, repeat=3)
