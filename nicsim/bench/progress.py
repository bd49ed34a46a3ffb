"""Live progress of a benchmark on stderr: run k of n, time elapsed, and an estimate of what is left.

The estimate starts from the plan's own figure and, once runs have finished, uses their mean
duration instead. On a terminal the line is redrawn in place; into a file or a pipe each run gets
its own line, so a CI log still shows where a long run was.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .matrix import Cell


def clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for a duration in seconds."""
    s = max(round(seconds), 0)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    def __init__(
        self, total: int, *, estimate: float, repetitions: int, stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.estimate = estimate
        self.repetitions = repetitions
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._t0 = time.monotonic()
        self._live = self.stream.isatty()
        self._started = False

    def remaining(self, now: float | None = None) -> float:
        elapsed = (time.monotonic() if now is None else now) - self._t0
        if self.done == 0:
            return max(self.estimate - elapsed, 0.0)
        return elapsed / self.done * (self.total - self.done)

    def line(self, cell: Cell, rep: int, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self._t0
        return (
            f"[{self.done + 1}/{self.total}] {cell.label()} (run {rep + 1}/{self.repetitions})"
            f"  elapsed {clock(elapsed)}, ~{clock(self.remaining(now))} left"
        )

    def start_run(self, cell: Cell, rep: int) -> None:
        """Called as run ``rep`` of ``cell`` starts; the previous run is counted as done."""
        if self._started:
            self.done += 1
        self._started = True
        text = self.line(cell, rep)
        if self._live:
            self.stream.write("\r\x1b[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._started:
            self.done += 1
        elapsed = time.monotonic() - self._t0
        end = "\r\x1b[K" if self._live else ""
        self.stream.write(f"{end}{self.done} runs in {clock(elapsed)}\n")
        self.stream.flush()
