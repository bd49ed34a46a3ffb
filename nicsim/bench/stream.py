"""``--json-stream FILE``: one JSON line per finished cell, written and flushed as the cell finishes.

The lines follow iperf3's ``--json-stream``: each is ``{"event": NAME, "data": {...}}``. ``start``
comes first (the stream's format, the mode, the plan), then one ``cell`` per cell in plan order —
its ``data`` has exactly the fields of a cell in the ``--json`` document, the ratio to the
reference backend included once the reference's cell of that direction and size has run —, with
``--ndr`` one ``ndr`` per guest-RX cell searched (the ``--json`` document's ``ndr`` entry), and
``end`` last, with the exit status and the cells that failed or regressed. A stream without an
``end`` line is a run that was interrupted; every line before it is complete. ``-`` is stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .matrix import Plan, ratio
from .ndr_vm import NdrCell
from .report import cell_json, headline
from .runner import CellResult

FORMAT = "nicsim-bench-stream/1"


def reference_for(plan: Plan, preferred: str = "nicsim") -> str | None:
    """The reference backend of the finished run, known before it starts (``report.reference_of``
    picks it from the same cells)."""
    names = [c.backend for c in plan.cells]
    if preferred in names:
        return preferred
    return names[0] if names else None


class JsonStream:
    """Writes the stream to ``out``; ``close`` closes it unless it is stdout."""

    def __init__(self, out: TextIO, *, reference: str | None) -> None:
        self.out = out
        self.reference = reference
        self._ref_medians: dict[tuple[str, int], float | None] = {}

    @classmethod
    def open(cls, target: str, *, reference: str | None) -> JsonStream:
        """``-`` for stdout, else a file created (or truncated) now; ``OSError`` if it cannot be."""
        out = sys.stdout if target == "-" else Path(target).open("w", encoding="utf-8")  # noqa: SIM115
        return cls(out, reference=reference)

    def event(self, name: str, data: dict[str, Any]) -> None:
        self.out.write(json.dumps({"event": name, "data": data}) + "\n")
        self.out.flush()

    def start(self, plan: Plan, *, mode: str) -> None:
        self.event("start", {
            "format": FORMAT, "mode": mode, "repetitions": plan.repetitions, "duration": plan.duration,
            "reference": self.reference,
            "cells": [{"backend": c.backend, "direction": c.direction.value, "size": c.size}
                      for c in plan.cells],
        })  # fmt: skip

    def cell(self, result: CellResult) -> None:
        """One finished cell, with the fields ``report.cell_json`` gives it in the ``--json`` document."""
        where = (result.cell.direction.value, result.cell.size)
        if result.cell.backend == self.reference:
            self._ref_medians[where] = headline(result)
            value = None
        else:
            value = ratio(self._ref_medians.get(where), headline(result))
        self.event("cell", cell_json(result, value))

    def ndr(self, found: NdrCell) -> None:
        """One finished NDR/PDR search (``--ndr``), as the ``--json`` document's ``ndr`` entry."""
        self.event("ndr", found.to_json())

    def end(self, *, status: int, failed: Sequence[str], regressed: Sequence[str]) -> None:
        self.event("end", {"status": status, "failed": list(failed), "regressed": list(regressed)})

    def close(self) -> None:
        if self.out is not sys.stdout:
            self.out.close()
