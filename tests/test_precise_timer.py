"""PreciseTimer: a one-shot timerfd on a real event loop fires once, not before its time, and can be
moved, cancelled and closed."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from nicsim.server.precise_timer import PreciseTimer
from tests.hardening import until


async def test_it_fires_once_not_before_its_time_and_a_new_time_replaces_the_old() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    timer = PreciseTimer(loop, lambda: fired.append(time.monotonic()))
    try:
        first = time.monotonic() + 0.002
        timer.set_at(first)
        later = time.monotonic() + 0.004
        timer.set_at(later)  # replaces the first time
        assert timer.armed
        await until(lambda: fired, "the timer firing")
        assert fired[0] >= later and not timer.armed
        await asyncio.sleep(0.01)
        assert len(fired) == 1  # one-shot
        timer.set_at(time.monotonic() - 1.0)  # a past time: at once
        await until(lambda: len(fired) == 2, "a past time firing")
    finally:
        timer.close()


async def test_a_cancelled_timer_does_not_fire_and_close_closes_its_fd() -> None:
    loop = asyncio.get_running_loop()
    fired: list[bool] = []
    timer = PreciseTimer(loop, lambda: fired.append(True))
    timer.set_at(time.monotonic() + 0.002)
    timer.cancel()
    assert not timer.armed
    await asyncio.sleep(0.01)
    assert not fired
    timer.set_at(time.monotonic())  # an expiry the loop has not read yet...
    time.sleep(0.001)
    timer.cancel()  # ...is dropped by the cancel
    await asyncio.sleep(0.01)
    assert not fired
    fd = timer._fd
    assert fd is not None
    timer.close()
    timer.close()  # idempotent
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError, match="closed"):
        timer.set_at(time.monotonic())
