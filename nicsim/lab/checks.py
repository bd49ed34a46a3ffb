"""A lab's verdict: each check of the topology, and every workload the guests ran, passed or failed.

Pure: it reads the results the runner collected (and, for a capture check, the number of matching
frames the runner counted with tcpdump). A workload that failed or never reported fails the run even
when no check reads it, so a typo in a workload cannot pass unnoticed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qemu.testvm.workload import WorkloadResult

from .plan import LabPlan
from .topology import CheckSpec


@dataclass(frozen=True, kw_only=True)
class Outcome:
    name: str
    kind: str
    passed: bool
    measured: str  # what was seen, for a person
    expected: str
    value: float | None = None  # the number compared, for a script

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "passed": self.passed,
            "measured": self.measured,
            "expected": self.expected,
            "value": self.value,
        }


def evaluate(
    lab: LabPlan,
    results: Mapping[str, Sequence[WorkloadResult]],
    capture_counts: Mapping[int, int | str] | None = None,
) -> list[Outcome]:
    """One outcome per check, in file order, then one per workload that failed or did not report."""
    out = [_check(i, c, lab, results, capture_counts or {}) for i, c in enumerate(lab.topology.checks)]
    for name, g in lab.guests.items():
        got = results.get(name, ())
        for i, label in enumerate(g.labels):
            r = got[i] if i < len(got) else None
            if r is None:
                out.append(
                    Outcome(
                        name=f"{name}: {label}",
                        kind="workload",
                        passed=False,
                        measured="no result",
                        expected="ran",
                    )
                )
            elif not r.ok:
                out.append(
                    Outcome(
                        name=f"{name}: {label}",
                        kind="workload",
                        passed=False,
                        measured=f"failed: {r.error}",
                        expected="ran",
                    )
                )
    return out


def _check(
    i: int,
    c: CheckSpec,
    lab: LabPlan,
    results: Mapping[str, Sequence[WorkloadResult]],
    captures: Mapping[int, int | str],
) -> Outcome:
    if c.kind == "capture":
        got = captures.get(i)
        if not isinstance(got, int):
            return Outcome(
                name=c.name, kind=c.kind, passed=False, measured=str(got or "not read"), expected=_range(c)
            )
        return _in_range(c, float(got), f"{got} frames")
    guest, at = lab.check_results[i]
    got_list = results.get(guest, ())
    r = got_list[at] if at < len(got_list) else None
    if r is None or not r.ok:
        why = "no result" if r is None else f"failed: {r.error}"
        return Outcome(name=c.name, kind=c.kind, passed=False, measured=why, expected=_expected(c))
    if c.kind == "ping":
        loss = float(r.get("loss_pct", 100))
        rtt = r.get("rtt_avg_ms")
        ok = loss <= c.get("max_loss_pct", 0)
        if c.get("max_rtt_ms") is not None:
            ok = ok and rtt is not None and float(rtt) <= c.get("max_rtt_ms")
        seen = f"{r.get('received')}/{r.get('transmitted')} replies, {loss:g} % loss" + (
            f", avg RTT {float(rtt):.2f} ms" if rtt is not None else ""
        )
        return Outcome(name=c.name, kind=c.kind, passed=ok, measured=seen, expected=_expected(c), value=loss)
    if c.kind == "iperf3":
        bps = r.get("received_bps")
        if bps is None:
            return Outcome(
                name=c.name,
                kind=c.kind,
                passed=False,
                measured="no rate in iperf3's report",
                expected=_expected(c),
            )
        mbps = float(bps) / 1e6
        ok = mbps >= c.get("min_mbps", 0)
        return Outcome(
            name=c.name,
            kind=c.kind,
            passed=ok,
            measured=f"{mbps:.1f} Mbit/s",
            expected=_expected(c),
            value=mbps,
        )
    value = r.get(c.get("field"))
    if not isinstance(value, int | float) or isinstance(value, bool):
        return Outcome(
            name=c.name,
            kind=c.kind,
            passed=False,
            expected=_range(c),
            measured=f"{c.get('field')} is {value!r}, not a number",
        )
    return _in_range(c, float(value), f"{value:g}")


def _in_range(c: CheckSpec, value: float, seen: str) -> Outcome:
    ok = (c.get("min") is None or value >= c.get("min")) and (c.get("max") is None or value <= c.get("max"))
    return Outcome(name=c.name, kind=c.kind, passed=ok, measured=seen, expected=_range(c), value=value)


def _range(c: CheckSpec) -> str:
    lo, hi = c.get("min"), c.get("max")
    if lo is not None and hi is not None:
        return f"{lo:g} .. {hi:g}"
    return f">= {lo:g}" if lo is not None else f"<= {hi:g}"


def _expected(c: CheckSpec) -> str:
    if c.kind == "ping":
        text = f"loss <= {c.get('max_loss_pct', 0):g} %"
        return text + (f", avg RTT <= {c.get('max_rtt_ms'):g} ms" if c.get("max_rtt_ms") is not None else "")
    if c.kind == "iperf3":
        return f">= {c.get('min_mbps'):g} Mbit/s" if c.get("min_mbps") is not None else "a rate"
    return _range(c)
