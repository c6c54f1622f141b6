"""Specifications for dynaconnd.durations."""

from __future__ import annotations

import pytest

from dynaconnd.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2.5", 2.5),
        ("30", 30.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        (" 10 s ", 10.0),
        (".5", 0.5),
        ("0", 0.0),
        ("2M", 120.0),
    ],
)
def test_parse_duration_reads_seconds_and_units(
    text: str, seconds: float
) -> None:
    """A bare number is seconds; ms, s, m and h scale it."""
    assert seconds == parse_duration(text)


@pytest.mark.parametrize(
    "text", ["", "abc", "5 minutes", "1e3", "nan", "inf", "1.2.3", "5d"]
)
def test_parse_duration_rejects_other_text_naming_accepted_forms(
    text: str,
) -> None:
    """Anything else is a ValueError that quotes it and lists the forms."""
    with pytest.raises(ValueError, match="500ms") as caught:
        parse_duration(text)

    assert repr(text) in str(caught.value)


def test_parse_duration_rejects_negative_values() -> None:
    """A negative duration is refused as negative."""
    with pytest.raises(ValueError, match="negative"):
        parse_duration("-5s")


def test_parse_duration_rejects_values_too_large_to_be_finite() -> None:
    """A literal that overflows to infinity is refused."""
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9" * 400)
