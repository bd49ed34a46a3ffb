"""The host's reading of ``sockperf ping-pong`` reports (``qemu.testvm.sockperf``), on real output.

The two reports in ``tests/data`` were captured from sockperf 3.7 over loopback (see its README):
one against a running ``sockperf server``, one with nothing listening.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemu.testvm import parse_result_line
from qemu.testvm.sockperf import clean, sockperf_summary

DATA = Path(__file__).parent / "data"


def report(name: str) -> list[str]:
    """The ``sockperf:`` lines of a captured run, as the guest's workload sends them."""
    text = (DATA / name).read_text()
    return [line for line in text.splitlines() if line.startswith("sockperf:")]


def as_guest_sends(lines: list[str]) -> list[str]:
    # The guest's jstr drops control characters: the ESC byte goes, "[2;35m" stays.
    return [line.replace("\x1b", "") for line in lines]


def test_a_loopback_run_gives_the_rate_and_the_percentiles_sockperf_printed() -> None:
    fields, error = sockperf_summary(report("sockperf-ping-pong-loopback.txt"))
    assert error is None
    assert fields["transactions"] == 44432 and fields["sent"] == 44432 and fields["seconds"] == 0.549
    assert fields["tps"] == pytest.approx(44432 / 0.549)
    assert (fields["total_sent"], fields["total_received"]) == (70934, 70933)
    assert fields["round_trip"] is True and fields["rtt_avg_us"] == 12.337
    assert (fields["rtt_p50_us"], fields["rtt_p99_us"]) == (9.854, 15.282)
    assert (fields["rtt_max_us"], fields["rtt_min_us"]) == (4826.271, 9.564)
    assert (fields["dropped"], fields["duplicated"], fields["out_of_order"]) == (0, 0, 0)


def test_colour_escapes_are_removed_with_or_without_their_esc_byte() -> None:
    assert clean("sockperf: \x1b[2;35m====> avg-rtt=12.337 (std-dev=82.747)\x1b[0m") == (
        "sockperf: ====> avg-rtt=12.337 (std-dev=82.747)"
    )
    without_esc = "sockperf: [2;35mTotal 44432 observations[0m; each"
    assert clean(without_esc) == "sockperf: Total 44432 observations; each"
    lines = report("sockperf-ping-pong-loopback.txt")
    assert sockperf_summary(as_guest_sends(lines)) == sockperf_summary(lines)


def test_line_order_and_trailing_garbage_do_not_change_the_numbers() -> None:
    lines = report("sockperf-ping-pong-loopback.txt")
    whole, _ = sockperf_summary(lines)
    # One line at a time, as a list growing: the numbers appear once their line is in.
    seen = [sockperf_summary(lines[:n])[0].get("transactions") for n in range(len(lines) + 1)]
    assert seen[-1] == 44432 and all(v in (None, 44432) for v in seen)
    garbage = [*lines, "sockperf: ---> percentile x = y", "not sockperf at all", "", "\x00\xff"]
    assert sockperf_summary(garbage) == (whole, None)


def test_a_run_without_a_server_is_a_failure_that_says_so() -> None:
    fields, error = sockperf_summary(report("sockperf-ping-pong-no-server.txt"))
    assert fields == {} and error is not None
    assert "No messages were received from the server" in error


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ([], "no summary"),
        (["sockperf: Starting test..."], "no summary"),
        (["sockperf: No valid observations found. Try tune parameters"], "No valid observations"),
        (["sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=5; ReceivedMessages=0"], "0 replies"),
        ("sockperf: a string, not lines", "not a list"),
        ({"lines": 1}, "not a list"),
    ],
)
def test_reports_without_a_reply_fail(lines: object, error: str) -> None:
    fields, said = sockperf_summary(lines)
    assert fields == {} and said is not None and error in said


def test_a_result_line_carrying_a_report_gets_its_numbers_and_loses_the_report() -> None:
    doc = {"workload": "sockperf-ping-pong", "ok": True, "server": "10.0.2.2",
           "sockperf": as_guest_sends(report("sockperf-ping-pong-loopback.txt"))}  # fmt: skip
    result = parse_result_line("NICSIM-RESULT " + json.dumps(doc))
    assert result.ok and result["transactions"] == 44432 and "sockperf" not in result.data
    doc["sockperf"] = report("sockperf-ping-pong-no-server.txt")
    failed = parse_result_line("NICSIM-RESULT " + json.dumps(doc))
    assert not failed.ok and failed.error is not None and "No messages" in failed.error
    assert failed.data["ok"] is False
