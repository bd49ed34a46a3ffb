"""A lab run as a person reads it (a table of checks, then the guests) and as a script reads it (JSON)."""

from __future__ import annotations

from typing import Any

from .plan import LabPlan
from .run import LabReport, guests_results_json


def render_table(report: LabReport) -> str:
    rows = [("check", "result", "measured", "expected")]
    rows += [(o.name, "pass" if o.passed else "FAIL", o.measured, o.expected) for o in report.outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows]
    lines.append("")
    lines.append(render_guests(report.plan))
    for err in report.errors:
        lines.append(f"error: {err}")
    n_fail = sum(not o.passed for o in report.outcomes)
    verdict = "PASSED" if report.passed else f"FAILED ({n_fail} of {len(report.outcomes)} failed)"
    lines.append(
        f"lab {report.plan.topology.name}: {verdict} in {report.seconds:.1f} s; "
        f"logs and consoles in {report.plan.run_dir}"
    )
    return "\n".join(lines)


def render_guests(lab: LabPlan) -> str:
    rows = [("guest", "switch", "address", "mac", "socket")]
    rows += [
        (g.name if i == 0 else "", nic.switch, nic.ip, nic.mac, str(nic.socket))
        for g in lab.guests.values()
        for i, nic in enumerate(g.nics)
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows
    )


def to_json(report: LabReport) -> dict[str, Any]:
    lab = report.plan
    return {
        "lab": lab.topology.name,
        "source": lab.topology.source,
        "passed": report.passed,
        "seconds": round(report.seconds, 2),
        "errors": report.errors,
        "checks": [o.as_json() for o in report.outcomes],
        "guests": {n: g.as_json() for n, g in lab.guests.items()},
        "results": guests_results_json(report.results),
        "switches": report.switch_stats,
        "run_dir": str(lab.run_dir),
    }
