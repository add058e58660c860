"""Strict parsers for the unit-carrying values of the configuration file.

A bare `30` could mean seconds to one reader and milliseconds to another, and
`10M` could be bytes or bits; a typo here silently changes a timeout or a body
limit. So every value must carry an explicit unit from a short, case-sensitive
list, and anything else is refused with a message that says how to write it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction

from keyproxy.config.model import Rate

__all__ = ["UnitError", "parse_duration", "parse_rate", "parse_size"]

DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}

RATE_PERIODS: dict[str, float] = {
    "second": 1.0,
    "minute": 60.0,
    "hour": 3600.0,
    "day": 86400.0,
}

DURATION_HINT = "write a number and a unit, like 30s or 7d (units: ms, s, m, h, d)"
SIZE_HINT = "write a number and a unit, like 512B, 64KiB or 10MiB (also KB, MB, GB: powers of 1000)"
RATE_HINT = "write a count and a period, like 100/minute (periods: second, minute, hour, day)"

_NUMBER_UNIT = re.compile(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]+)")
_RATE = re.compile(r"([0-9]+)/([A-Za-z]+)")


class UnitError(ValueError):
    """A value that is not a valid duration, size or rate.

    `problem` names what is wrong without repeating the value, so a caller that
    must not echo the value (it may have come from a secret environment
    variable) can still report the reason; `hint` says how to write it.
    """

    def __init__(self, kind: str, text: str, problem: str, hint: str) -> None:
        self.kind = kind
        self.problem = problem
        self.hint = hint
        super().__init__(f"{text!r} is not a valid {kind}: {problem}; {hint}")


def _split(kind: str, text: object, units: Mapping[str, object], hint: str) -> tuple[str, str]:
    """Split `<number><unit>` or explain, in the user's terms, why it is not that shape."""
    if not isinstance(text, str):
        raise UnitError(kind, str(text), "expected text", hint)
    match = _NUMBER_UNIT.fullmatch(text)
    if match is not None:
        number, unit = match.groups()
        if unit not in units:
            raise UnitError(kind, text, f"unknown unit {unit!r}", hint)
        return number, unit
    stripped = text.strip()
    if not stripped:
        problem = "it is empty"
    elif stripped.startswith("-"):
        problem = f"a {kind} cannot be negative"
    elif re.fullmatch(r"[+-]?[0-9.]+", stripped):
        problem = "a number needs a unit"
    elif stripped != text or " " in text:
        problem = "spaces are not allowed"
    else:
        problem = "expected a number followed by a unit"
    raise UnitError(kind, text, problem, hint)


def parse_duration(text: str) -> float:
    """`"100ms"`, `"30s"`, `"5m"`, `"1.5h"`, `"7d"` -> seconds as a float."""
    number, unit = _split("duration", text, DURATION_UNITS, DURATION_HINT)
    return float(number) * DURATION_UNITS[unit]


def parse_size(text: str) -> int:
    """`"512B"`, `"64KiB"`, `"10MiB"`, `"1GiB"`, `"5MB"` -> bytes.

    Fractions are accepted only when they come out as whole bytes (`1.5KiB`),
    computed exactly so that `0.1MB` is 100000 and never 99999.
    """
    number, unit = _split("size", text, SIZE_UNITS, SIZE_HINT)
    value = Fraction(number) * SIZE_UNITS[unit]
    if value.denominator != 1:
        raise UnitError("size", text, "it is not a whole number of bytes", SIZE_HINT)
    return int(value)


def parse_rate(text: str) -> Rate:
    """`"1000/hour"` -> Rate(limit=1000, period=3600.0, text="1000/hour")."""
    if not isinstance(text, str):
        raise UnitError("rate", str(text), "expected text", RATE_HINT)
    match = _RATE.fullmatch(text)
    if match is None:
        stripped = text.strip()
        if stripped.startswith("-"):
            problem = "a rate cannot be negative"
        elif not stripped:
            problem = "it is empty"
        else:
            problem = "expected a count, a slash and a period"
        raise UnitError("rate", text, problem, RATE_HINT)
    count, period = match.groups()
    if period not in RATE_PERIODS:
        raise UnitError("rate", text, f"unknown period {period!r}", RATE_HINT)
    limit = int(count)
    if limit < 1:
        raise UnitError("rate", text, "the count must be at least 1", RATE_HINT)
    return Rate(limit=limit, period=RATE_PERIODS[period], text=f"{limit}/{period}")
