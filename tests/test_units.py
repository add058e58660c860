"""Durations, sizes and rates: exact values for every unit, and refusals that explain themselves."""

from __future__ import annotations

import pytest

from keyproxy.config.model import Rate
from keyproxy.config.units import UnitError, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("100ms", 0.1),
        ("0s", 0.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("7d", 604800.0),
        ("250ms", 0.25),
    ],
)
def test_duration_values(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("30", "a number needs a unit"),
        ("0", "a number needs a unit"),
        ("-5s", "cannot be negative"),
        ("5x", "unknown unit 'x'"),
        ("5S", "unknown unit 'S'"),
        ("5sec", "unknown unit 'sec'"),
        ("30 s", "spaces are not allowed"),
        (" 30s", "spaces are not allowed"),
        ("", "it is empty"),
        ("s", "expected a number followed by a unit"),
        ("1h30m", "expected a number followed by a unit"),
        (".5s", "expected a number followed by a unit"),
        ("1e3s", "expected a number followed by a unit"),
    ],
)
def test_duration_refusals(text: str, problem: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_duration(text)
    assert problem in caught.value.problem
    assert caught.value.kind == "duration"
    assert "30s or 7d" in caught.value.hint
    assert repr(text) in str(caught.value)


def test_unit_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="is not a valid duration"):
        parse_duration("soon")


def test_non_text_is_refused() -> None:
    with pytest.raises(UnitError, match="expected text"):
        parse_duration(30)  # type: ignore[arg-type]
    with pytest.raises(UnitError, match="expected text"):
        parse_size(1024)  # type: ignore[arg-type]
    with pytest.raises(UnitError, match="expected text"):
        parse_rate(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0B", 0),
        ("512B", 512),
        ("64KiB", 64 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("2TiB", 2 * 1024**4),
        ("1KB", 1000),
        ("5MB", 5_000_000),
        ("1GB", 1_000_000_000),
        ("1.5KiB", 1536),
        ("0.1MB", 100_000),
    ],
)
def test_size_values(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1024", "a number needs a unit"),
        ("10M", "unknown unit 'M'"),
        ("10mb", "unknown unit 'mb'"),
        ("10Mb", "unknown unit 'Mb'"),
        ("10kib", "unknown unit 'kib'"),
        ("-1KiB", "cannot be negative"),
        ("0.3B", "not a whole number of bytes"),
        ("10 MiB", "spaces are not allowed"),
    ],
)
def test_size_refusals(text: str, problem: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_size(text)
    assert problem in caught.value.problem
    assert "KiB" in caught.value.hint


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("1000/hour", Rate(1000, 3600.0, "1000/hour")),
        ("1/second", Rate(1, 1.0, "1/second")),
        ("100/minute", Rate(100, 60.0, "100/minute")),
        ("5/day", Rate(5, 86400.0, "5/day")),
    ],
)
def test_rate_values(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate
    assert str(parse_rate(text)) == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0/hour", "at least 1"),
        ("-1/hour", "cannot be negative"),
        ("100/min", "unknown period 'min'"),
        ("100/hours", "unknown period 'hours'"),
        ("100/Hour", "unknown period 'Hour'"),
        ("100", "expected a count, a slash and a period"),
        ("100 / hour", "expected a count, a slash and a period"),
        ("1.5/hour", "expected a count, a slash and a period"),
        ("", "it is empty"),
    ],
)
def test_rate_refusals(text: str, problem: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_rate(text)
    assert problem in caught.value.problem
    assert "100/minute" in caught.value.hint
