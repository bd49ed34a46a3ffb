"""Per-queue counters of a virtio-net device: packets, bytes, drops by reason, kicks, interrupts, stall
re-checks (a sleeping ring found with work pending and no progress, see
:func:`nicsim.virtio.policy.is_stalled`), and how many pool descriptors each queue holds (now and at
most).

This module owns the counters and their two renderings: :meth:`DeviceStats.snapshot` (a JSON-ready
dict, for tools and tests) and :meth:`DeviceStats.table` (a compact text table, for a person). Counters
are Python ints per queue, bumped once per batch; drops are a numpy uint64 array indexed by queue and
reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

COUNTERS = (
    "packets", "bytes", "kicks", "interrupts", "batches", "inflight", "inflight_high", "stall_rechecks",
)


class DeviceStats:
    def __init__(self, num_queues: int, reasons: Sequence[str]) -> None:
        self.num_queues = num_queues
        self.reasons = tuple(reasons)
        self._reason_index = {r: i for i, r in enumerate(self.reasons)}
        # Python ints, not numpy: each round bumps several of them, and an int add costs a tenth of a
        # numpy element update.
        self.packets: list[int] = [0] * num_queues
        self.bytes: list[int] = [0] * num_queues
        self.kicks: list[int] = [0] * num_queues
        self.interrupts: list[int] = [0] * num_queues
        self.batches: list[int] = [0] * num_queues
        self.inflight: list[int] = [0] * num_queues
        self.inflight_high: list[int] = [0] * num_queues
        self.stall_rechecks: list[int] = [0] * num_queues
        self.drops: npt.NDArray[np.uint64] = np.zeros((num_queues, len(self.reasons)), np.uint64)
        self._dropped: list[int] = [0] * num_queues  # each queue's row of ``drops`` summed (every round asks)

    def reason(self, name: str) -> int:
        """Column of a drop reason; KeyError for a reason the device did not declare."""
        return self._reason_index[name]

    def drop(self, queue: int, reason: str, n: int = 1) -> None:
        self.drops[queue, self._reason_index[reason]] += np.uint64(n)
        self._dropped[queue] += n

    def add_inflight(self, queue: int, n: int) -> None:
        """``n`` more (or, negative, fewer) pool descriptors held by ``queue``."""
        value = self.inflight[queue] + n
        if value < 0:
            raise ValueError(f"queue {queue} would hold {value} descriptors")
        self.inflight[queue] = value
        if value > self.inflight_high[queue]:
            self.inflight_high[queue] = value

    def held_briefly(self, queue: int, n: int) -> None:
        """``n`` pool descriptors that ``queue`` took and gave back within one compiled call: the
        high-water mark counts them, the number held now is unchanged."""
        self.add_inflight(queue, n)
        self.add_inflight(queue, -n)

    def count(self, queue: int, packets: int, nbytes: int) -> None:
        """A batch of ``packets`` frames of ``nbytes`` bytes moved on ``queue``."""
        self.packets[queue] += packets
        self.bytes[queue] += nbytes
        self.batches[queue] += 1

    def drops_total(self, queue: int | None = None) -> int:
        if queue is None:
            return int(self.drops.sum())
        return self._dropped[queue]

    def snapshot(self, *, pool: dict[str, int] | None = None) -> dict[str, Any]:
        """Plain ints and strings only. ``pool`` adds the pool-wide usage fields the caller read."""
        queues = []
        for q in range(self.num_queues):
            # "index" is the stats-file contract scripts read; "queue" is kept for readers of the table.
            entry: dict[str, Any] = {"index": q, "queue": q}
            for name in COUNTERS:
                entry[name] = int(getattr(self, name)[q])
            row = self.drops[q]
            entry["drops"] = {r: int(row[i]) for i, r in enumerate(self.reasons) if row[i]}
            queues.append(entry)
        out: dict[str, Any] = {"queues": queues, "drops_total": self.drops_total()}
        if pool is not None:
            out["pool"] = dict(pool)
        return out

    def table(self, *, pool: dict[str, int] | None = None) -> str:
        """A compact table: one line per queue, then drops by reason and the pool line."""
        lines = [
            f"{'queue':>5} {'packets':>12} {'bytes':>14} {'kicks':>9} {'irqs':>9} {'inflight':>8} {'high':>6}"
        ]
        for q in range(self.num_queues):
            lines.append(
                f"{q:>5} {int(self.packets[q]):>12} {int(self.bytes[q]):>14} {int(self.kicks[q]):>9} "
                f"{int(self.interrupts[q]):>9} {int(self.inflight[q]):>8} {int(self.inflight_high[q]):>6}"
            )
        for q in range(self.num_queues):
            if self.stall_rechecks[q]:
                lines.append(f"  stall re-checks q{q}: {int(self.stall_rechecks[q])}")
            for i, r in enumerate(self.reasons):
                if self.drops[q, i]:
                    lines.append(f"  drop q{q} {r}: {int(self.drops[q, i])}")
        if pool is not None:
            lines.append("  pool " + " ".join(f"{k}={v}" for k, v in pool.items()))
        return "\n".join(lines)
