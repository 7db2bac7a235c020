"""A clock's time in words, as a voice says it: ``clock_of`` reads hour and minute from a
``current_time`` result, ``spoken_time`` words them ("one oh five in the afternoon"). Pure."""

from __future__ import annotations

ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty"}


def clock_of(result: object) -> tuple[int, int] | None:
    """Hour and minute from a ``current_time`` result, which a client's tool may have written:
    ``{"time": "15:30"}`` as ours does, or ``{"hour": 15, "minute": 30}``; None otherwise."""
    if not isinstance(result, dict):
        return None
    parts: tuple[object, object] = (result.get("hour"), result.get("minute"))
    if isinstance(result.get("time"), str) and parts == (None, None):
        hour, _, minute = result["time"].strip().partition(":")
        parts = (hour, minute)
    hour, minute = (_whole(part) for part in parts)
    if hour is None or minute is None or not (0 <= hour < 24 and 0 <= minute < 60):
        return None
    return hour, minute


def _whole(value: object) -> int | None:
    """An integer given as a JSON number or a string of digits; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return int(value)
    except (ValueError, OverflowError):
        return None


def number_words(number: int) -> str:
    if number < 20:
        return ONES[number]
    tens, ones = divmod(number, 10)
    return TENS[tens] + (f" {ONES[ones]}" if ones else "")


def spoken_time(hour: int, minute: int) -> str:
    """13:05 -> 'one oh five in the afternoon'."""
    twelve = hour % 12 or 12
    if minute == 0:
        clock = f"{number_words(twelve)} o'clock"
    elif minute < 10:
        clock = f"{number_words(twelve)} oh {number_words(minute)}"
    else:
        clock = f"{number_words(twelve)} {number_words(minute)}"
    part = "in the morning" if hour < 12 else "in the afternoon" if hour < 18 else "in the evening"
    return f"{clock} {part}"
