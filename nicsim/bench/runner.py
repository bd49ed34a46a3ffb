"""What both modes of ``nicsim bench`` share: a run's sample, a cell's result, the plan loop, the workdir.

The VM mode (:mod:`nicsim.bench.vm`, a guest per run) and the backend-only mode
(:mod:`nicsim.bench.backend_only`, DPDK's virtio-user as the frontend) differ only in how one run of
one cell is measured; ``run_cells`` is the one loop over the plan around that: it runs the backends of a
row in turn, repetition after repetition (:func:`run_order`), records a cell
that cannot run ("skipped", "n/a") without running it, tells ``on_run`` before each repetition,
marks a cell "failed" with its last error when no repetition worked or when any repetition's backend
count check did not hold (:mod:`nicsim.bench.counts`), and hands each finished cell to ``on_cell``
(``--json-stream``). ``run_directory`` is where the
runs keep their sockets and logs: the ``--log-dir`` when one is given (kept), otherwise a temporary
directory removed at the end; never both, so nothing is left behind in either case.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .matrix import Cell, Plan, Summary

SENDER_BOUND_PCT = 90.0  # a sender at or above this share of its core is flagged as maybe the bottleneck


@dataclass(kw_only=True)
class Sample:
    """One repetition of one cell."""

    ok: bool
    error: str | None = None
    pps: float | None = None
    gbps: float | None = None
    packets: int | None = None
    bytes: int | None = None
    seconds: float | None = None
    cpu_qemu_pct: float | None = None
    cpu_backend_pct: float | None = None
    #: the traffic helper outside QEMU and the backend (``BenchRun.sender_pid``), if the run has one
    cpu_sender_pct: float | None = None
    #: every measured process together (QEMU + backend + sender): 100 is one core busy all window
    cpu_total_pct: float | None = None
    #: where those cores went, by process and thread (two-guest mode: ``pair_run.cpu_fields``)
    cpu_threads: dict[str, float] | None = None
    pool_high_water: int | None = None
    guest: dict[str, Any] = field(default_factory=dict)
    backend: dict[str, Any] = field(default_factory=dict)
    #: the guest's (or frontend's) count against the backend's own (``counts.check_counts``)
    counts: dict[str, Any] | None = None
    #: the negotiated virtio features (``counts.features_record``), when something reported them
    features: dict[str, Any] | None = None
    #: latency cells (``latency.rtt_measures``): RTT percentiles over the run's replies, and the loss
    rtt_p50_ms: float | None = None
    rtt_p99_ms: float | None = None
    rtt_max_ms: float | None = None
    loss_pct: float | None = None
    #: udp-rr (``latency.rr_measures``): replies per second of sockperf's window, one outstanding
    tps: float | None = None

    @property
    def sender_bound(self) -> bool:
        """The sender used at least ``SENDER_BOUND_PCT`` of its core: it may have set the rate."""
        return self.cpu_sender_pct is not None and self.cpu_sender_pct >= SENDER_BOUND_PCT

    @property
    def miscounted(self) -> bool:
        """The backend count check ran and did not hold."""
        return self.counts is not None and self.counts.get("ok") is False


@dataclass(kw_only=True)
class CellResult:
    """A cell's samples; ``status`` is "ok", "failed" (every run failed), "n/a" or "skipped"."""

    cell: Cell
    status: str = "ok"
    reason: str | None = None
    samples: list[Sample] = field(default_factory=list)

    def good(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def sender_bound(self) -> bool:
        """Some successful run's sender was at or above ``SENDER_BOUND_PCT`` of its core."""
        return any(s.sender_bound for s in self.good())

    def summary(self, measure: str) -> Summary | None:
        values = [getattr(s, measure) for s in self.good()]
        return Summary.of([float(v) for v in values if v is not None])


async def run_cells(
    plan: Plan,
    run_once: Callable[[Cell], Awaitable[Sample]],
    *,
    on_run: Callable[[Cell, int], None] | None = None,
    not_run: Callable[[Cell], tuple[str, str] | None] | None = None,
    on_cell: Callable[[CellResult], None] | None = None,
) -> list[CellResult]:
    """Every repetition of every cell of ``plan`` through ``run_once``, interleaved (:func:`run_order`).
    ``not_run(cell)`` gives ``(status, reason)`` for a cell that must not run ("skipped", "n/a"), or
    ``None``; ``on_cell`` is told each cell's result as soon as the cell is finished (its last
    repetition). Returns the results in the plan's order."""
    out = [CellResult(cell=cell) for cell in plan.cells]
    runnable: list[CellResult] = []
    for result in out:
        why = None if not_run is None else not_run(result.cell)
        if why is None:
            runnable.append(result)
            continue
        result.status, result.reason = why
        if on_cell is not None:
            on_cell(result)
    for rep, result in run_order(runnable, plan.repetitions):
        if on_run is not None:
            on_run(result.cell, rep)
        result.samples.append(await run_once(result.cell))
        if rep == plan.repetitions - 1:
            conclude(result)
            if on_cell is not None:
                on_cell(result)
    return out


def run_order(results: list[CellResult], repetitions: int) -> list[tuple[int, CellResult]]:
    """The order of the runs: repetition by repetition, and within one, row by row (a direction and
    size, in the plan's order), each backend's run of the row next to the others'. A comparison is
    then made of runs seconds apart, not minutes: a host whose speed drifts during the run (a shared
    machine's neighbours; measured here, DPDK's backend-only TX moved 18 -> 33 M pps within minutes)
    moves both sides of a ratio alike, and each repetition samples the drift again."""
    rows: dict[tuple[str, int], list[CellResult]] = {}
    for result in results:
        rows.setdefault((result.cell.direction.value, result.cell.size), []).append(result)
    return [(rep, result) for rep in range(repetitions) for row in rows.values() for result in row]


def conclude(result: CellResult) -> None:
    """A run cell's status: "failed" when no repetition worked, or when any repetition's count
    check did not hold (its figures cannot be trusted, however many runs worked); else "ok"."""
    miscounted = [s for s in result.samples if s.miscounted]
    if miscounted:
        result.status, result.reason = "failed", miscounted[-1].error or "backend count check failed"
    elif not result.good():
        result.status = "failed"
        errors = [s.error for s in result.samples if s.error]
        result.reason = errors[-1] if errors else "no successful run"


@contextlib.contextmanager
def run_directory(log_dir: Path | None) -> Iterator[Path]:
    """``log_dir`` (created if need be, kept afterwards), or a fresh temporary directory removed on
    the way out; a temporary one is made only when there is no ``log_dir``."""
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        yield log_dir
        return
    workdir = Path(tempfile.mkdtemp(prefix="nicsim-bench-"))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
