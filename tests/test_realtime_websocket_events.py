"""The WebSocket transport's events: ``input_audio_buffer.append`` parses or fails with OpenAI's
code, at the transport's real size limit (``MAX_WEBSOCKET_EVENT_BYTES``, not the data channel's),
and the translator puts the engine's audio in ``response.output_audio.delta`` events."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sized_inputs import around, mutated

from pipeline import events as ev
from transceiver.realtime.client_events import (
    MAX_EVENT_BYTES,
    MAX_WEBSOCKET_EVENT_BYTES,
    AudioAppend,
    EventError,
    parse_client_event,
)
from transceiver.realtime.translation import EngineEventTranslator

LIMIT = MAX_WEBSOCKET_EVENT_BYTES
PREFIX, SUFFIX = '{"type": "input_audio_buffer.append", "audio": ', "}"


def append_event(size: int) -> bytes:
    """A valid append of exactly ``size`` bytes: base64 of silence ('A' is six zero bits), the
    rest JSON whitespace."""
    room = size - len(PREFIX) - len(SUFFIX) - 2
    length = room // 4 * 4
    return f'{PREFIX}"{"A" * length}"{" " * (room - length)}{SUFFIX}'.encode()


def code_of(data: str | bytes, max_bytes: int = LIMIT) -> str:
    with pytest.raises(EventError) as info:
        parse_client_event(data, max_bytes)
    return info.value.code


def test_an_append_of_exactly_the_limit_parses_and_one_byte_more_is_refused() -> None:
    at_limit = append_event(LIMIT)
    assert len(at_limit) == LIMIT
    event = parse_client_event(at_limit, LIMIT)
    assert isinstance(event, AudioAppend) and set(event.pcm) == {0}
    assert len(event.pcm) > LIMIT * 3 // 4 - 64
    assert code_of(append_event(LIMIT + 1)) == "event_too_large"
    assert code_of(append_event(LIMIT + 1).decode()) == "event_too_large"


def test_the_data_channel_keeps_its_own_limit() -> None:
    event = append_event(MAX_EVENT_BYTES + 1)
    assert code_of(event, MAX_EVENT_BYTES) == "event_too_large"
    assert isinstance(parse_client_event(event, LIMIT), AudioAppend)


@pytest.mark.parametrize(
    ("audio", "code", "param"),
    [
        ("not base64!", "invalid_value", "audio"),
        ("QU=JD", "invalid_value", "audio"),
        ("QUJ", "invalid_value", "audio"),
        (5, "invalid_type", "audio"),
        (None, "missing_required_parameter", "audio"),
    ],
)
def test_bad_audio_is_named(audio: object, code: str, param: str) -> None:
    with pytest.raises(EventError) as info:
        parse_client_event(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
    assert (info.value.code, info.value.param) == (code, param)


def test_an_unknown_type_gets_openais_invalid_value() -> None:
    with pytest.raises(EventError) as info:
        parse_client_event('{"type": "session.explode"}')
    assert (info.value.code, info.value.param) == ("invalid_value", "type")
    assert "'input_audio_buffer.append'" in info.value.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=96))
def test_any_audio_bytes_round_trip(pcm: bytes) -> None:
    event = json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}
    )
    assert parse_client_event(event, LIMIT) == AudioAppend(None, pcm)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(around(LIMIT).flatmap(lambda size: mutated(append_event(size))))
def test_mutated_appends_at_the_limit_parse_or_get_their_error(data: bytes) -> None:
    try:
        event = parse_client_event(data, LIMIT)
    except EventError as exc:
        assert exc.code and exc.message
        assert (exc.code == "event_too_large") == (len(data) > LIMIT)
    else:
        assert len(data) <= LIMIT and isinstance(event, AudioAppend)


def test_engine_audio_becomes_deltas_and_no_output_buffer_events() -> None:
    translator = EngineEventTranslator(media_track=False)
    translator.translate(ev.ResponseStarted("r1", 1))
    translator.translate(ev.ResponseTextDelta("r1", "Hello there friend"))
    (delta,) = translator.audio_delta("r1", b"\x01\x00" * 2400)
    assert delta["type"] == "response.output_audio.delta" and delta["content_index"] == 0
    assert base64.b64decode(delta["delta"]) == b"\x01\x00" * 2400
    assert translator.translate(ev.OutputStarted("r1")) == []
    assert translator.translate(ev.OutputCleared("r1", 100)) == []
    translator.translate(ev.ResponseDone("r1", "completed", "Hello there friend"))
    assert translator.truncate(delta["item_id"], 40) == ("Hello there friend", "Hello")
    with pytest.raises(EventError) as info:
        translator.truncate(delta["item_id"], 1000)
    assert info.value.param == "audio_end_ms"
