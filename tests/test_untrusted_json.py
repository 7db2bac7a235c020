"""The one decoder of untrusted JSON: pathological text gets JsonInputError, nothing else."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sized_inputs import mutated, nested_json, padded_json

from pipeline.untrusted_json import MAX_DEPTH, JsonInputError, decode
from transceiver.realtime.client_events import MAX_EVENT_BYTES

BIG = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def refusal(text: str | bytes) -> str:
    with pytest.raises(JsonInputError) as info:
        decode(text)
    return str(info.value)


def arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_nesting_up_to_the_limit_decodes_and_one_more_is_refused() -> None:
    assert decode(arrays(MAX_DEPTH)) is not None
    assert decode('{"a":' * (MAX_DEPTH - 1) + "{}" + "}" * (MAX_DEPTH - 1)) is not None
    assert refusal(arrays(MAX_DEPTH + 1)) == f"nested deeper than {MAX_DEPTH} levels"
    assert refusal(b'{"a":' * MAX_DEPTH + b"[]" + b"}" * MAX_DEPTH).startswith("nested deeper")


@pytest.mark.parametrize("depth", [1_000, 10_000, MAX_EVENT_BYTES])
def test_what_overflows_the_interpreter_is_the_same_refusal(depth: int) -> None:
    assert refusal("[" * depth) == f"nested deeper than {MAX_DEPTH} levels"
    assert refusal(arrays(depth).encode()) == f"nested deeper than {MAX_DEPTH} levels"


def test_deep_inside_a_wide_document_is_found() -> None:
    wide = [[i] for i in range(5_000)]
    assert decode(json.dumps(wide)) == wide
    wide[4_321] = json.loads(arrays(MAX_DEPTH))
    assert refusal(json.dumps(wide)).startswith("nested deeper")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("NaN", "NaN is not a JSON number"),
        ('{"x": [1, Infinity]}', "Infinity is not a JSON number"),
        ("-Infinity", "-Infinity is not a JSON number"),
        ('"\\ud800"', "a string holds a lone surrogate (U+D800), not text"),
        ('{"\\udfff": 1}', "a string holds a lone surrogate (U+DFFF), not text"),
        ("1" * 5_000, "Exceeds the limit (4300 digits)"),
        ("{not json", "Expecting property name enclosed in double quotes"),
        (b"\xff\xfe\x00", "codec can't decode"),
    ],
)
def test_values_no_other_reader_takes_are_refused(text: str | bytes, message: str) -> None:
    assert message in refusal(text)


def test_surrogate_pairs_are_text() -> None:
    assert decode('"\\ud83d\\ude00"') == "\U0001f600"


@settings(max_examples=300, deadline=None)
@given(nested_json(max_depth=3 * MAX_DEPTH))
def test_any_nesting_decodes_within_the_limit_or_is_refused(text: str) -> None:
    try:
        value: Any = decode(text)
    except JsonInputError:
        return
    depth = 0
    while isinstance(value, list | dict):
        value = value[0] if isinstance(value, list) else value["k"]
        depth += 1
    assert depth <= MAX_DEPTH


@BIG
@given(st.integers(MAX_EVENT_BYTES - 1024, MAX_EVENT_BYTES + 1).flatmap(
    lambda size: mutated(padded_json('{"type": "x", "text": ', "}", size))
))  # fmt: skip
def test_large_mutated_documents_decode_or_are_refused(data: bytes) -> None:
    try:
        decode(data)
    except JsonInputError as exc:
        assert str(exc)


@BIG
@given(st.integers(MAX_DEPTH + 8, MAX_EVENT_BYTES // 2).flatmap(
    lambda depth: mutated(arrays(depth).encode(), max_changes=4)
))  # fmt: skip
def test_mutated_deep_documents_are_refused_whatever_the_depth(data: bytes) -> None:
    try:
        decode(data)
    except JsonInputError:
        return
    raise AssertionError("a document that deep decoded")
