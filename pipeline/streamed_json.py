"""The fields of the JSON a provider streams (a chat chunk, a transcription event), read with
their types checked.

Pure protocol layer. An OpenAI-compatible server is outside our control: a chunk that is a
list, a number, a string or null, or a field of another type than the API documents, would
otherwise surface deep in the turn as an ``AttributeError`` or ``TypeError``. Here an absent
or null field reads as its empty value (as the SDK's models read it), and anything else of the
wrong type is one ``StreamShapeError`` whose message names the field and what it was, so the
provider reports it as the provider's failure.
"""

from __future__ import annotations

import math
from typing import Any


class StreamShapeError(ValueError):
    """A streamed JSON value not of the shape its API documents; the message says where."""


def json_object(value: object, where: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else StreamShapeError."""
    if not isinstance(value, dict):
        raise StreamShapeError(f"{where} is {kind(value)}, not an object")
    return value


def object_field(value: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """The object at ``key`` ({} when absent or null)."""
    field = value.get(key)
    return {} if field is None else json_object(field, f"{where}.{key}")


def list_field(value: dict[str, Any], key: str, where: str) -> list[Any]:
    """The array at ``key`` ([] when absent or null)."""
    field = value.get(key)
    if field is None:
        return []
    if not isinstance(field, list):
        raise StreamShapeError(f"{where}.{key} is {kind(field)}, not an array")
    return field


def text_field(value: dict[str, Any], key: str, where: str) -> str:
    """The string at ``key`` ("" when absent or null)."""
    return text_of(value.get(key), f"{where}.{key}")


def text_of(value: object, where: str) -> str:
    """``value`` if it is a string, "" if it is None (absent or null), else StreamShapeError."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise StreamShapeError(f"{where} is {kind(value)}, not a string")
    return value


def number_field(value: dict[str, Any], key: str, where: str) -> float:
    """The finite number at ``key`` (0 when absent or null)."""
    field = value.get(key)
    if field is None:
        return 0.0
    if isinstance(field, bool) or not isinstance(field, int | float) or not math.isfinite(field):
        raise StreamShapeError(f"{where}.{key} is {kind(field)}, not a finite number")
    return float(field)


def count_field(value: dict[str, Any], key: str, where: str) -> int:
    """The non-negative integer at ``key`` (0 when absent or null)."""
    return count_of(value.get(key), f"{where}.{key}")


def count_of(value: object, where: str) -> int:
    """``value`` if it is a non-negative integer, 0 if it is None, else StreamShapeError."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StreamShapeError(f"{where} is {kind(value)}, not a non-negative integer")
    return value


def kind(value: object) -> str:
    """What a JSON value is, for a message: "an array", "a number", "null"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"
