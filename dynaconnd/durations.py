"""Durations as source.ini writes them: ``2.5``, ``500ms``, ``30s``, ``5m``."""

from __future__ import annotations

import math
import re

__all__ = ["UNITS", "parse_duration"]

#: Seconds per unit; a bare number is seconds.
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_DURATION = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-z]*)"
)

_ACCEPTED = "seconds such as 2.5, or a number with a unit: 500ms, 30s, 5m, 1h"


def parse_duration(text: str) -> float:
    """Return the number of seconds ``text`` stands for.

    Raise ``ValueError`` naming the text and the accepted forms when it
    is not a duration, or is negative, infinite or not a number.
    """
    cleaned = text.strip().lower()
    match = _DURATION.fullmatch(cleaned)
    if match is None:
        if cleaned.startswith("-"):
            raise ValueError(
                f"{text!r} is negative; a duration is {_ACCEPTED}"
            )
        raise ValueError(f"{text!r} is not a duration; expected {_ACCEPTED}")

    unit = match["unit"] or "s"
    if unit not in UNITS:
        raise ValueError(
            f"{text!r} has the unknown unit {unit!r}; expected {_ACCEPTED}"
        )

    seconds = float(match["number"]) * UNITS[unit]
    # A huge literal can overflow to inf; no schedule means "forever".
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is too large to be a duration")
    return seconds
