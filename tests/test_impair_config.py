"""The netem-style impairment syntax: every key with its units, tc's defaults, the text written back,
and an error naming the key and what is allowed for everything else."""

from __future__ import annotations

import pytest

from nicsim.ports.impair_config import GilbertElliott, ImpairConfig


def test_every_key_with_netem_units() -> None:
    c = ImpairConfig.parse(
        "loss=10% delay=20ms jitter=5ms distribution=uniform reorder=25% gap=5 duplicate=1% "
        "corrupt=0.1% rate=100mbit burst=32kb limit=500 seed=7"
    )
    assert c == ImpairConfig(
        loss=0.1, delay=0.02, jitter=0.005, distribution="uniform", reorder=0.25, gap=5, duplicate=0.01,
        corrupt=0.001, rate=100_000_000, burst=32 * 1024, limit=500, seed=7,
    )
    assert c.active


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("1.5ms", 0.0015), ("250us", 0.00025), ("10usec", 1e-5), ("100ns", 1e-7)],
)
def test_time_units(text: str, seconds: float) -> None:
    assert ImpairConfig.parse(f"delay={text}").delay == seconds


@pytest.mark.parametrize(
    ("text", "bits"),
    [("1gbit", 10**9), ("2.5mbit", 2_500_000), ("64kbit", 64_000), ("9600bit", 9600), ("1mbps", 8_000_000),
     ("100kbps", 800_000)],
)
def test_rate_units_bits_and_bytes_as_tc(text: str, bits: int) -> None:
    assert ImpairConfig.parse(f"rate={text}").rate == bits


def test_percentages_and_bare_fractions() -> None:
    assert ImpairConfig.parse("loss=0.1").loss == ImpairConfig.parse("loss=10%").loss == 0.1
    assert ImpairConfig.parse("loss=100%").loss == 1.0


def test_gemodel_with_tcs_defaults_for_what_is_left_out() -> None:
    assert ImpairConfig.parse("loss=gemodel:1%").loss_model == GilbertElliott(p=0.01, r=0.99)
    assert ImpairConfig.parse("loss=gemodel:1%,25%").loss_model == GilbertElliott(p=0.01, r=0.25)
    full = ImpairConfig.parse("loss=gemodel:1%,25%,70%,0.1%,delay=1ms")  # commas separate keys too
    assert full.loss_model == GilbertElliott(p=0.01, r=0.25, loss_bad=0.7, loss_good=0.001)
    assert full.delay == 0.001
    assert GilbertElliott(p=0.01, r=0.25).mean_loss() == pytest.approx(0.01 / 0.26)


def test_jitter_takes_netems_correlation_as_a_second_value() -> None:
    c = ImpairConfig.parse("delay=20ms jitter=5ms,25% loss=1%")
    assert (c.jitter, c.jitter_correlation, c.loss) == (0.005, 0.25, 0.01)
    assert str(c) == "loss=1% delay=20ms jitter=5ms,25%"


def test_empty_text_is_a_perfect_wire() -> None:
    c = ImpairConfig.parse("")
    assert c == ImpairConfig() and not c.active and str(c) == ""
    assert ImpairConfig.parse("limit=10 seed=3").active is False


@pytest.mark.parametrize(
    "text",
    [
        "loss=10% delay=20ms jitter=5ms rate=100mbit burst=32kb",
        "loss=gemodel:1%,25%,70%,0.1% delay=1.5ms reorder=25% gap=3",
        "delay=0.1234567us duplicate=0.5% corrupt=0.01% rate=1234567bit distribution=uniform seed=99",
        "jitter=3s limit=1",
        "delay=20ms jitter=5ms,25% loss=1%",
    ],
)
def test_text_written_back_parses_to_the_same_config(text: str) -> None:
    c = ImpairConfig.parse(text)
    assert ImpairConfig.parse(str(c)) == c


def test_text_written_back_uses_readable_units() -> None:
    c = ImpairConfig.parse("delay=20ms jitter=250us rate=100mbit loss=10%")
    assert str(c) == "loss=10% delay=20ms jitter=250us rate=100mbit"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("loss=abc", r"loss: 'abc' is not a percentage"),
        ("loss=10", r"loss: '10' is outside 0%\.\.100%"),
        ("loss=120%", r"loss: '120%' is outside"),
        ("loss=10kbit", r"loss: '10kbit' is not a percentage"),
        ("delay=-1ms", r"delay: '-1ms' is negative"),
        ("delay=20", r"delay: '20' needs a time unit: one of s, sec, ms"),
        ("delay=20parsecs", r"delay: .* needs a time unit"),
        ("jitter=fast", r"jitter: 'fast' is not a time"),
        ("rate=100", r"rate: '100' needs a rate unit: one of bit, kbit, mbit"),
        ("rate=0bit", r"rate: .* below 1 bit/s"),
        ("burst=1kb", r"burst: only means something with a rate"),
        ("burst=3gb rate=1mbit", r"burst: .* needs a size unit"),
        ("limit=0", r"limit: must be an integer >= 1"),
        ("limit=1.5", r"limit: '1.5' is not a whole number"),
        ("gap=0 delay=1ms reorder=1%", r"gap: must be an integer >= 1"),
        ("gap=5 delay=1ms", r"gap: only means something with reorder"),
        ("seed=-3", r"seed: '-3' is not a whole number"),
        ("reorder=25%", r"reorder: needs a delay"),
        ("distribution=pareto", r"distribution: 'pareto' is not supported; allowed: normal, uniform"),
        ("colour=blue", r"unknown impairment 'colour'; allowed: loss, delay, jitter"),
        ("20ms", r"'20ms': expected key=value"),
        ("delay=1ms delay=2ms", r"delay: given twice"),
        ("loss=1% loss=gemodel:1%", r"loss: given twice"),
        ("loss=gemodel:", r"loss: gemodel takes p\[,r\[,1-h\[,1-k\]\]\]"),
        ("loss=gemodel:1%,2%,3%,4%,5%", r"loss: gemodel takes"),
        ("loss=gemodel:1%,x", r"loss gemodel: 'x' is not a percentage"),
        ("delay=1ms jitter=1ms,25% distribution=uniform", r"jitter: a correlation needs distribution=normal"),
        ("delay=1ms jitter=0ms,25%", r"jitter: a correlation needs a jitter"),
        ("delay=1ms jitter=1ms,100%", r"jitter: a correlation of 100% would never vary"),
        ("delay=1ms jitter=1ms,abc", r"jitter correlation: 'abc' is not a percentage"),
    ],
)
def test_bad_input_names_the_key_and_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImpairConfig.parse(text)


def test_the_constructor_checks_too() -> None:
    with pytest.raises(ValueError, match="duplicate: must be a probability"):
        ImpairConfig(duplicate=1.5)
    with pytest.raises(ValueError, match="delay: must be a time >= 0"):
        ImpairConfig(delay=-0.001)
    with pytest.raises(ValueError, match="not both"):
        ImpairConfig(loss=0.1, loss_model=GilbertElliott(p=0.1, r=0.5))
    with pytest.raises(ValueError, match="loss gemodel r: must be a probability"):
        ImpairConfig(loss_model=GilbertElliott(p=0.1, r=2.0))
