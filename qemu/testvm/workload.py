"""Guest workloads on the kernel command line, and the result lines the guest prints back.

This module owns both ends of the ARCHITECTURE.md contract that ``qemu.testvm`` speaks:
``Workload(name, **params)`` renders to one ``nicsim.run=`` item (workloads joined by ``;``,
parameters by ``,`` as ``key=value``), refusing any value that would break that syntax or the kernel's
own space-separated command line; and ``parse_results`` turns the guest's ``NICSIM-RESULT {json}``
lines into ``WorkloadResult`` objects (reading the numbers out of the iperf3 document or sockperf
report a result carries: ``iperf3_summary``, :mod:`.sockperf`). It is pure: no QEMU, no asyncio.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import GuestOutputError, InvalidOptionError
from .sockperf import sockperf_summary

RESULT_MARKER = "NICSIM-RESULT"
READY_MARKER = "NICSIM-READY"
DONE_MARKER = "NICSIM-DONE"

# Names and keys are identifiers in the guest's shell /init; values only have to survive the kernel's
# whitespace split and our own ';' and ',' and '=' separators.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BAD_VALUE_CHARS = frozenset(" ,;\t\n\r\"'\\")

ParamValue = str | int | float | bool


def render_value(value: ParamValue) -> str:
    """One parameter value as the guest reads it: booleans are ``1``/``0`` (shell-friendly)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return value
    raise InvalidOptionError(f"workload parameter value {value!r} is not a str, int, float or bool")


class Workload:
    """One guest workload: a name and its ``key=value`` parameters, validated at construction."""

    __slots__ = ("name", "params")

    def __init__(self, name: str, /, **params: ParamValue) -> None:
        if not _NAME_RE.match(name):
            raise InvalidOptionError(f"workload name {name!r} must be letters, digits, '_', '.' or '-'")
        rendered: dict[str, str] = {}
        for key, value in params.items():
            if not _KEY_RE.match(key):
                raise InvalidOptionError(f"workload {name}: parameter name {key!r} is not an identifier")
            text = render_value(value)
            bad = sorted(set(text) & _BAD_VALUE_CHARS)
            if bad or text == "":
                raise InvalidOptionError(
                    f"workload {name}: value {text!r} of {key!r} is empty or contains {bad!r} "
                    "(spaces, commas, semicolons and quotes cannot cross the kernel command line)"
                )
            rendered[key] = text
        self.name = name
        self.params: Mapping[str, str] = rendered

    @classmethod
    def parse(cls, text: str) -> Workload:
        """Parse the command-line form ``name,key=value,...`` (as given to ``nicsim vm --workload``)."""
        name, *items = text.split(",")
        params: dict[str, ParamValue] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise InvalidOptionError(f"workload {text!r}: {item!r} is not key=value")
            params[key] = value
        return cls(name, **params)

    def render(self) -> str:
        return ",".join([self.name, *(f"{k}={v}" for k, v in self.params.items())])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Workload):
            return NotImplemented
        return self.name == other.name and dict(self.params) == dict(other.params)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params.items()))))

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"Workload({self.name!r}{args})"


def render_run(workloads: Iterable[Workload]) -> str:
    """The value of ``nicsim.run=``: workloads in order, joined by ``;``."""
    return ";".join(w.render() for w in workloads)


@dataclass(frozen=True, kw_only=True)
class WorkloadResult:
    """One ``NICSIM-RESULT`` line: the workload's name, whether it succeeded, and every field it printed."""

    workload: str
    ok: bool
    error: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def parse_result_line(line: str) -> WorkloadResult:
    """Parse one line that starts with ``NICSIM-RESULT``; anything malformed is a GuestOutputError."""
    _, sep, payload = line.strip().partition(RESULT_MARKER)
    if not sep:
        raise GuestOutputError(f"not a result line: {line!r}")
    try:
        data = json.loads(payload)
    except ValueError as err:
        raise GuestOutputError(f"result line is not JSON: {line!r}") from err
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("workload"), str)
        or not isinstance(data.get("ok"), bool)
    ):
        raise GuestOutputError(f"result line lacks 'workload' (str) or 'ok' (bool): {line!r}")
    ok, error = data["ok"], data.get("error")
    # Tools whose own output the guest sends whole; the host reads the numbers out of it.
    for key, summary in (("iperf3", iperf3_summary), ("sockperf", sockperf_summary)):
        doc = data.pop(key, None)
        if doc is None:
            continue
        fields, tool_error = summary(doc)
        data.update(fields)
        if tool_error is not None and ok:
            ok, error = False, tool_error
            data.update(ok=False, error=error)
    return WorkloadResult(
        workload=data["workload"], ok=ok, error=None if error is None else str(error), data=data
    )


def _path(doc: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def iperf3_summary(doc: Any) -> tuple[dict[str, Any], str | None]:
    """The numbers of an ``iperf3 -J`` document (sent by the guest whole) and its error, if any.

    TCP reports ``end.sum_sent`` / ``end.sum_received``; UDP reports ``end.sum`` (with loss and jitter).
    A document with iperf3's own ``error``, or without a summary, is a failed run.
    """
    if not isinstance(doc, dict):
        return {}, "iperf3 printed something that is not a JSON object"
    if doc.get("error"):
        return {}, f"iperf3: {doc['error']}"
    sent, received, udp = (_path(doc, "end", k) for k in ("sum_sent", "sum_received", "sum"))
    if not any(isinstance(part, dict) and "seconds" in part for part in (sent, received, udp)):
        return {}, "iperf3 produced no summary"
    fields: dict[str, Any] = {
        "sent_bps": _path(sent, "bits_per_second") or _path(udp, "bits_per_second"),
        "received_bps": _path(received, "bits_per_second") or _path(udp, "bits_per_second"),
        "sent_bytes": _path(sent, "bytes"),
        "received_bytes": _path(received, "bytes"),
        "seconds": _path(received, "seconds"),
        "cpu_host_pct": _path(doc, "end", "cpu_utilization_percent", "host_total"),
        "cpu_remote_pct": _path(doc, "end", "cpu_utilization_percent", "remote_total"),
    }
    if _path(sent, "retransmits") is not None:  # TCP only
        fields["retransmits"] = _path(sent, "retransmits")
    if isinstance(udp, dict) and ("lost_packets" in udp or "packets" in udp):
        for key, name in (("lost_packets", "lost_packets"), ("packets", "packets"),
                          ("lost_percent", "lost_pct"), ("jitter_ms", "jitter_ms")):  # fmt: skip
            fields[name] = udp.get(key)
    return fields, None


def parse_results(console_text: str) -> list[WorkloadResult]:
    """Every result line in a console transcript, in order (lines without the marker are ignored)."""
    return [parse_result_line(line) for line in console_text.splitlines() if RESULT_MARKER in line]


def kernel_params(
    *,
    mac: str | None,
    ip: str | None,
    mtu: int | None,
    workloads: Sequence[Workload],
    more: Sequence[tuple[str, object]] = (),
) -> list[str]:
    """The ``nicsim.*`` kernel parameters of the contract, in contract order (only those that are set):
    eth0's ``mac``, ``ip``, ``mtu``, then ``more`` (``(key, value)`` pairs: the other NICs, forwarding,
    routes; a key may repeat), then ``run``."""
    params: list[str] = []
    for key, value in (("mac", mac), ("ip", ip), ("mtu", mtu), *more):
        if value is None:
            continue
        text = str(value)
        # A route's own syntax has a comma (10.2.0.0/24,via=10.1.0.1); nothing else may.
        if not text or set(text) & (_BAD_VALUE_CHARS - {","} if key == "route" else _BAD_VALUE_CHARS):
            raise InvalidOptionError(f"nicsim.{key}={text!r} cannot go on the kernel command line")
        params.append(f"nicsim.{key}={text}")
    if workloads:
        params.append(f"nicsim.run={render_run(workloads)}")
    return params
