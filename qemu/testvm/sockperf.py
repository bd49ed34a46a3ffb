"""The numbers of a ``sockperf ping-pong`` run, read from the report lines the guest sends as printed.

The guest's ``sockperf-ping-pong`` workload runs sockperf 3.7's client with ``--full-rtt`` and hands
its ``sockperf:`` lines to the host whole (as ``iperf3 -J``'s document is), because a parser here can
be tested against captured output and awk in the guest cannot. sockperf measures a *valid duration*:
the run without its 400 ms warm-up and 50 ms cool-down; its message counts, percentiles and maximum
cover that window only, and ``transactions`` (replies received) over ``seconds`` is the rate. The
``[Total Run]`` counts cover everything that crossed the wire, warm-up included. Colour escapes
(whose ESC byte the guest drops) are removed before parsing. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_COLOUR_RE = re.compile(r"\x1b?\[[0-9;]*m")
_RUN_RE = re.compile(
    r"\[(Total Run|Valid Duration)\] RunTime=([0-9.]+) sec;.*?SentMessages=(\d+); ReceivedMessages=(\d+)"
)
_AVG_RE = re.compile(r"====> avg-(rtt|latency)=([0-9.]+)")
_PERCENTILE_RE = re.compile(r"---> percentile +([0-9.]+) = +([0-9.]+)")
_EXTREME_RE = re.compile(r"---> <(MAX|MIN)> observation = +([0-9.]+)")
_ANOMALY_RE = re.compile(
    r"# dropped messages = (\d+); # duplicated messages = (\d+); # out-of-order messages = (\d+)"
)
# What sockperf says instead of statistics when nothing (valid) came back; it still exits with 0.
_NO_RESULT = ("No messages were received", "No valid observations")


def clean(line: str) -> str:
    """``line`` without sockperf's colour escapes."""
    return _COLOUR_RE.sub("", line)


def sockperf_summary(lines: Any) -> tuple[dict[str, Any], str | None]:
    """The fields of a ping-pong run's report ``lines`` and its error, if any.

    Fields: ``transactions`` and ``sent`` (messages of the valid duration), ``seconds`` (its length),
    ``tps`` (transactions per second), ``total_sent`` / ``total_received`` (the whole run),
    ``rtt_p50_us`` / ``rtt_p99_us`` / ``rtt_max_us`` / ``rtt_min_us`` / ``rtt_avg_us`` (microseconds;
    a half round trip unless ``round_trip``), ``dropped`` / ``duplicated`` / ``out_of_order``. A
    report without a valid duration or without a reply in it is a failed run.
    """
    if not isinstance(lines, Sequence) or isinstance(lines, str | bytes):
        return {}, "sockperf's report is not a list of lines"
    text = [clean(line) for line in lines if isinstance(line, str)]
    for line in text:
        for said in _NO_RESULT:
            if said in line:
                return {}, f"sockperf: {line.removeprefix('sockperf:').strip()}"
    runs: dict[str, tuple[float, int, int]] = {}
    percentiles: dict[float, float] = {}
    fields: dict[str, Any] = {}
    for line in text:
        if m := _RUN_RE.search(line):
            runs[m.group(1)] = (float(m.group(2)), int(m.group(3)), int(m.group(4)))
        elif m := _AVG_RE.search(line):
            fields["round_trip"] = m.group(1) == "rtt"
            fields["rtt_avg_us"] = float(m.group(2))
        elif m := _PERCENTILE_RE.search(line):
            percentiles[float(m.group(1))] = float(m.group(2))
        elif m := _EXTREME_RE.search(line):
            fields[f"rtt_{m.group(1).lower()}_us"] = float(m.group(2))
        elif m := _ANOMALY_RE.search(line):
            fields.update(dropped=int(m.group(1)), duplicated=int(m.group(2)), out_of_order=int(m.group(3)))
    valid = runs.get("Valid Duration")
    if valid is None:
        return {}, "sockperf produced no summary (no [Valid Duration] line)"
    seconds, sent, received = valid
    if received <= 0 or seconds <= 0:
        return {}, f"sockperf: {received} replies in {seconds} s"
    total = runs.get("Total Run")
    fields.update(
        transactions=received, sent=sent, seconds=seconds, tps=received / seconds,
        total_sent=None if total is None else total[1], total_received=None if total is None else total[2],
        rtt_p50_us=percentiles.get(50.0), rtt_p99_us=percentiles.get(99.0),
    )  # fmt: skip
    fields.setdefault("rtt_max_us", None)
    return fields, None
