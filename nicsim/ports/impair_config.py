"""What an impaired link does, written the way netem is (``loss=10% delay=20ms jitter=5ms rate=100mbit``).

This module owns :class:`ImpairConfig`, a frozen description of one direction of one link, and its
parser. Keys and units follow tc-netem(8) so users know them; where netem leaves something open the
choice is written next to the field. ``ImpairConfig.parse`` takes ``key=value`` items separated by
commas or blanks; a bare item continues the previous value, so ``loss=gemodel:1%,25%`` reads as one
value. ``str(config)`` writes the same syntax back, and ``parse(str(c)) == c``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Final

__all__ = ["DISTRIBUTIONS", "GilbertElliott", "ImpairConfig"]

DISTRIBUTIONS: Final = ("normal", "uniform")
# Divisors, not factors: 20 / 1e3 is the double nearest 0.02, so written-back values parse back equal.
_TIME_UNITS: Final[dict[str, float]] = {
    "s": 1.0, "sec": 1.0, "ms": 1e3, "msec": 1e3, "us": 1e6, "usec": 1e6, "ns": 1e9,
}
# tc(8): "bit" units are SI bits per second, "bps" units are bytes per second.
_RATE_UNITS: Final[dict[str, float]] = {
    "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9,
}
# tc(8) sizes: "kb"/"k" are kibibytes, "mb"/"m" mebibytes; a bare number is bytes.
_SIZE_UNITS: Final = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1 << 20, "mb": 1 << 20}
_NUMBER = re.compile(r"^([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)([a-z%]*)$")


@dataclass(frozen=True, kw_only=True)
class GilbertElliott:
    """netem's ``loss gemodel p [r [1-h [1-k]]]``: a two-state Markov chain per frame.

    ``p``: good -> bad transition probability; ``r``: bad -> good; ``loss_bad`` (netem's 1-h): loss
    probability in the bad state; ``loss_good`` (1-k): in the good state. tc's defaults apply to the
    parameters left out: r = 1 - p, 1-h = 100 %, 1-k = 0 %. With those, losses come in bursts of
    mean length 1/r and the long-run loss rate is p / (p + r).
    """

    p: float
    r: float
    loss_bad: float = 1.0
    loss_good: float = 0.0

    def mean_loss(self) -> float:
        bad_share = self.p / (self.p + self.r) if self.p + self.r > 0 else 0.0
        return bad_share * self.loss_bad + (1 - bad_share) * self.loss_good


@dataclass(frozen=True, kw_only=True)
class ImpairConfig:
    """One direction of a link's impairments. Probabilities are fractions in [0, 1], times are seconds,
    ``rate`` is bits per second (0: unlimited), ``burst`` bytes. All zero means a perfect wire."""

    loss: float = 0.0  # independent (Bernoulli) loss per frame
    loss_model: GilbertElliott | None = None  # burst loss instead of ``loss``
    delay: float = 0.0
    # Per frame: normal with standard deviation ``jitter`` (our default, as netem's "distribution
    # normal" table), or uniform on delay +- jitter (what netem does when tc is given no
    # distribution: to match a plain "delay 20ms 5ms", say distribution=uniform). A delay below 0 is
    # clamped to 0: a frame never leaves before it was offered, which raises the mean a little when
    # jitter is large next to delay.
    jitter: float = 0.0
    # ``jitter=5ms,25%``: successive frames' jitter correlated with coefficient 0.25 (netem's third
    # delay parameter). Unlike netem's, which blends uniform draws and so narrows the distribution,
    # this is an AR(1) on the normal deviates: the jitter keeps its standard deviation.
    jitter_correlation: float = 0.0
    distribution: str = "normal"
    # netem: with a delay, this share of frames is sent at once, ahead of the delayed ones; with
    # ``gap`` N, only every Nth frame or later after the last reordered one may be (tc's default gap: 1).
    reorder: float = 0.0
    gap: int = 1
    duplicate: float = 0.0  # a second, identical copy follows the frame (never itself corrupted)
    corrupt: float = 0.0  # one random bit past the Ethernet header flipped; checksums left stale
    rate: int = 0
    # Token-bucket depth: 0 (the default) is netem's rate, every frame leaves when its last bit has
    # been serialised at ``rate``; a burst lets up to that many bytes leave ahead of the serialisation.
    burst: int = 0
    limit: int = 1000  # frames held at once (netem's default); more are dropped
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("loss", "reorder", "duplicate", "corrupt"):
            _check_fraction(name, getattr(self, name))
        _check_fraction("jitter correlation", self.jitter_correlation)
        if self.jitter_correlation and self.distribution != "normal":
            raise ValueError("jitter: a correlation needs distribution=normal")
        if self.jitter_correlation and not self.jitter:
            raise ValueError("jitter: a correlation needs a jitter")
        if self.jitter_correlation == 1:
            raise ValueError("jitter: a correlation of 100% would never vary; use below 100%")
        if self.loss_model is not None:
            for name in ("p", "r", "loss_bad", "loss_good"):
                _check_fraction(f"loss gemodel {name}", getattr(self.loss_model, name))
            if self.loss:
                raise ValueError("loss: give a percentage or gemodel:..., not both")
        for name in ("delay", "jitter"):
            if not self._nonnegative(getattr(self, name)):
                raise ValueError(f"{name}: must be a time >= 0 (e.g. 20ms), got {getattr(self, name)!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution: {self.distribution!r} is not supported; allowed: {', '.join(DISTRIBUTIONS)}"
            )
        if self.reorder and self.delay <= 0:
            raise ValueError("reorder: needs a delay (as in netem: nothing can jump an empty queue)")
        if self.gap != 1 and not self.reorder:
            raise ValueError("gap: only means something with reorder (as in tc)")
        for name, low in (("gap", 1), ("limit", 1), ("rate", 0), ("burst", 0), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
        if self.burst and not self.rate:
            raise ValueError("burst: only means something with a rate")

    @staticmethod
    def _nonnegative(value: float) -> bool:
        return isinstance(value, int | float) and value >= 0 and value != float("inf")

    @property
    def active(self) -> bool:
        """True if any impairment is set (a perfect wire can be bypassed)."""
        return any((self.loss, self.loss_model, self.delay, self.jitter, self.reorder, self.duplicate,
                    self.corrupt, self.rate))

    # -- text ------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> ImpairConfig:
        """``"loss=10% delay=20ms jitter=5ms rate=100mbit limit=1000 seed=7"`` (commas work too)."""
        items: list[list[str]] = []
        for token in re.split(r"[,\s]+", text.strip()):
            if not token:
                continue
            if "=" in token:
                key, _, value = token.partition("=")
                items.append([key.strip().lower(), value.strip().lower()])
            elif items:
                items[-1][1] += "," + token.lower()  # a gemodel parameter list continues
            else:
                raise ValueError(f"{token!r}: expected key=value; keys: {', '.join(_PARSERS)}")
        values: dict[str, object] = {}
        for key, value in items:
            if key not in _PARSERS:
                raise ValueError(f"unknown impairment {key!r}; allowed: {', '.join(_PARSERS)}")
            if key in values or (key == "loss" and "loss_model" in values):
                raise ValueError(f"{key}: given twice")
            parsed = _PARSERS[key](key, value)
            if isinstance(parsed, GilbertElliott):
                values["loss_model"] = parsed
            elif isinstance(parsed, tuple):  # jitter, correlation
                values[key], values["jitter_correlation"] = parsed
            else:
                values[key] = parsed
        return cls(**values)  # type: ignore[arg-type]

    def __str__(self) -> str:
        default = ImpairConfig()
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            if f.name == "jitter_correlation":
                continue  # written with the jitter
            if f.name == "loss_model":
                m = value
                parts.append(f"loss=gemodel:{_pct(m.p)},{_pct(m.r)},{_pct(m.loss_bad)},{_pct(m.loss_good)}")
            elif f.name in ("loss", "reorder", "duplicate", "corrupt"):
                parts.append(f"{f.name}={_pct(value)}")
            elif f.name in ("delay", "jitter"):
                text = _unit_text(value, ("s", "ms", "us", "ns"), _TIME_UNITS, 1)
                if f.name == "jitter" and self.jitter_correlation:
                    text += f",{_pct(self.jitter_correlation)}"
                parts.append(f"{f.name}={text}")
            elif f.name == "rate":
                parts.append(f"rate={_unit_text(value, ('gbit', 'mbit', 'kbit', 'bit'), _RATE_UNITS, -1)}")
            else:
                parts.append(f"{f.name}={value}")
        return " ".join(parts)


def _unit_text(value: float, units: tuple[str, ...], table: dict[str, float], power: int) -> str:
    """``value`` in the largest unit that writes it as a whole number (table: divisors or factors),
    else exactly (``repr``) in the base unit, so that it parses back to the same float."""
    for unit in units:
        scaled = value * table[unit] ** power
        if scaled >= 1 and abs(scaled - round(scaled)) < 1e-6:
            return f"{round(scaled)}{unit}"
    if table[units[0]] == 1:
        return f"{value!r}{units[0]}"
    return f"{value * table[units[-1]] ** power:.12g}{units[-1]}"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.12g}%"


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name}: must be a probability between 0% and 100%, got {value!r}")


def _split(key: str, text: str, what: str) -> tuple[float, str]:
    if text.startswith("-"):
        raise ValueError(f"{key}: {text!r} is negative; must be >= 0")
    match = _NUMBER.match(text)
    if match is None:
        raise ValueError(f"{key}: {text!r} is not {what}")
    return float(match.group(1)), match.group(2)


def _fraction(key: str, text: str) -> float:
    number, unit = _split(key, text, "a percentage (e.g. 10% or 0.1)")
    if unit == "%":
        number /= 100
    elif unit:
        raise ValueError(f"{key}: {text!r} is not a percentage (e.g. 10% or 0.1)")
    if not 0 <= number <= 1:
        raise ValueError(f"{key}: {text!r} is outside 0%..100% (a bare number is a fraction: 0.1 = 10%)")
    return number


def _loss(key: str, text: str) -> float | GilbertElliott:
    if not text.startswith("gemodel"):
        return _fraction(key, text)
    _, _, args = text.partition(":")
    params = [_fraction("loss gemodel", a) for a in args.split(",") if a]
    if not 1 <= len(params) <= 4:
        raise ValueError(f"loss: gemodel takes p[,r[,1-h[,1-k]]] (1 to 4 percentages), got {text!r}")
    p = params[0]
    r, loss_bad, loss_good = (params[1:] + [1 - p, 1.0, 0.0][len(params) - 1:])[:3]
    return GilbertElliott(p=p, r=r, loss_bad=loss_bad, loss_good=loss_good)


def _time(key: str, text: str) -> float:
    number, unit = _split(key, text, f"a time with a unit ({', '.join(_TIME_UNITS)})")
    if unit not in _TIME_UNITS:
        raise ValueError(f"{key}: {text!r} needs a time unit: one of {', '.join(_TIME_UNITS)} (e.g. 20ms)")
    return number / _TIME_UNITS[unit]


def _jitter(key: str, text: str) -> float | tuple[float, float]:
    time, _, correlation = text.partition(",")
    if not correlation:
        return _time(key, time)
    return _time(key, time), _fraction("jitter correlation", correlation)


def _rate(key: str, text: str) -> int:
    number, unit = _split(key, text, f"a rate with a unit ({', '.join(_RATE_UNITS)})")
    if unit not in _RATE_UNITS:
        raise ValueError(f"{key}: {text!r} needs a rate unit: one of {', '.join(_RATE_UNITS)} (e.g. 100mbit)")
    bits = round(number * _RATE_UNITS[unit])
    if bits < 1:
        raise ValueError(f"{key}: {text!r} is below 1 bit/s")
    return bits


def _size(key: str, text: str) -> int:
    number, unit = _split(key, text, "a size in bytes (e.g. 1500, 32kb)")
    if unit not in _SIZE_UNITS:
        raise ValueError(f"{key}: {text!r} needs a size unit: bytes, k/kb or m/mb (e.g. 32kb)")
    return round(number * _SIZE_UNITS[unit])


def _integer(key: str, text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{key}: {text!r} is not a whole number >= 0")
    return int(text)


def _distribution(key: str, text: str) -> str:
    return text  # checked against DISTRIBUTIONS by ImpairConfig itself


_PARSERS: Final[dict[str, Callable[[str, str], object]]] = {
    "loss": _loss, "delay": _time, "jitter": _jitter, "distribution": _distribution, "reorder": _fraction,
    "gap": _integer, "duplicate": _fraction, "corrupt": _fraction, "rate": _rate, "burst": _size,
    "limit": _integer, "seed": _integer,
}
