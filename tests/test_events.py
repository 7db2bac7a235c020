"""The Realtime event layer: client events parse or fail with the exact code and param."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sized_inputs import around, mutated, padded_json

from pipeline.providers import Message, ToolCall
from transceiver.realtime.client_events import (
    MAX_EVENT_BYTES,
    BufferCommand,
    ConversationItemCreate,
    EventError,
    FunctionCallOutput,
    ItemDelete,
    ItemRetrieve,
    ItemTruncate,
    ResponseCancel,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    TurnDetection,
    UserText,
    parse_client_event,
)
from transceiver.realtime.server_events import error_event, stored_item_bodies
from transceiver.store.journal import message_to_item


def parse(event: dict[str, Any]) -> Any:
    return parse_client_event(json.dumps(event))


def rejection(data: str | bytes) -> tuple[str, str | None]:
    with pytest.raises(EventError) as info:
        parse_client_event(data)
    return info.value.code, info.value.param


def test_session_update_applies_only_the_fields_present() -> None:
    event = parse(
        {
            "type": "session.update",
            "event_id": "c1",
            "session": {
                "type": "realtime",
                "instructions": "Be brief.",
                "audio": {
                    "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 700}},
                    "output": {"voice": "alloy"},
                },
                "tools": [{"type": "function", "name": "get_weather", "parameters": {}}],
            },
        }
    )
    assert isinstance(event, SessionUpdate) and event.event_id == "c1"
    config = event.apply(SessionConfig(id="sess_1", tool_choice="none"))
    assert config.instructions == "Be brief." and config.voice == "alloy"
    assert config.turn_detection == TurnDetection(silence_duration_ms=700)
    assert [t.name for t in config.tools] == ["get_weather"]
    assert config.tool_choice == "none"  # untouched


def test_turn_detection_null_switches_it_off() -> None:
    event = parse(
        {"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}
    )
    assert isinstance(event, SessionUpdate)
    assert event.apply(SessionConfig(id="s")).turn_detection is None


def test_session_json_has_the_ga_shape() -> None:
    body = SessionConfig(id="sess_1").to_json()
    assert body["object"] == "realtime.session" and body["type"] == "realtime"
    assert body["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    assert body["audio"]["output"]["voice"] == "joe"


def test_conversation_items() -> None:
    text = parse(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hi"}],
            },
        }
    )
    assert isinstance(text, ConversationItemCreate) and text.item == UserText("hi")
    assert text.item_id.startswith("item_")
    output = parse(
        {
            "type": "conversation.item.create",
            "item": {
                "id": "item_9",
                "type": "function_call_output",
                "call_id": "call_1",
                "output": "{}",
            },
        }
    )
    assert isinstance(output, ConversationItemCreate)
    assert output.item == FunctionCallOutput("call_1", "{}") and output.item_id == "item_9"


def test_the_agents_sdk_first_session_update_is_accepted() -> None:
    """The exact first event @openai/agents-realtime 0.20 sends when the channel opens."""
    event = parse(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": "Be kind.",
                "model": "gpt-realtime-2.1",
                "output_modalities": ["audio"],
                "tracing": "auto",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "noise_reduction": None,
                        "transcription": {"model": "gpt-4o-mini-transcribe"},
                        "turn_detection": {"type": "semantic_vad"},
                    },
                    "output": {"format": {"type": "audio/pcm", "rate": 24000}, "speed": 1},
                },
            },
        }
    )
    assert isinstance(event, SessionUpdate)
    config = event.apply(SessionConfig(id="s"))
    assert config.instructions == "Be kind."
    assert config.turn_detection == TurnDetection(type="semantic_vad")  # eagerness "auto"
    assert (config.noise_reduction, config.speed) == (None, 1.0)
    assert config.transcription is not None
    assert config.transcription.model == "gpt-4o-mini-transcribe"


def test_item_retrieve_truncate_delete() -> None:
    assert parse({"type": "conversation.item.retrieve", "item_id": "i"}) == ItemRetrieve(None, "i")
    assert parse({"type": "conversation.item.delete", "item_id": "i"}) == ItemDelete(None, "i")
    truncate = {"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": 1500}
    assert parse(truncate) == ItemTruncate(None, "i", 0, 1500)


def test_responses_and_buffer_commands() -> None:
    assert parse({"type": "response.create"}) == ResponseCreate(None, None)
    assert parse({"type": "response.cancel", "response_id": "r"}) == ResponseCancel(None, "r")
    cleared = parse({"type": "output_audio_buffer.clear", "event_id": "e"})
    assert cleared == BufferCommand("e", "output_audio_buffer.clear")


TD = "session.audio.input.turn_detection"


def session(**fields: Any) -> str:
    return json.dumps({"type": "session.update", "session": fields})


def turn_detection(**knobs: Any) -> str:
    return session(audio={"input": {"turn_detection": knobs}})


def item(**fields: Any) -> str:
    return json.dumps({"type": "conversation.item.create", "item": fields})


@pytest.mark.parametrize(
    ("data", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_event", None),
        ('{"event_id": "x"}', "missing_required_parameter", "type"),
        ('{"type": 7}', "invalid_type", "type"),
        ('{"type": "session.explode"}', "invalid_value", "type"),
        ('{"type": "session.update"}', "missing_required_parameter", "session"),
        (session(instructions=5), "invalid_type", "session.instructions"),
        (session(tools={}), "invalid_type", "session.tools"),
        (
            session(tools=[{"type": "function"}]),
            "missing_required_parameter",
            "session.tools[0].name",
        ),
        (turn_detection(threshold=2), "invalid_value", f"{TD}.threshold"),
        (turn_detection(type="near_vad"), "invalid_value", f"{TD}.type"),
        ('{"type": "conversation.item.retrieve"}', "missing_required_parameter", "item_id"),
        (
            '{"type": "conversation.item.truncate", "item_id": "i"}',
            "missing_required_parameter",
            "audio_end_ms",
        ),
        (
            '{"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": -1}',
            "invalid_value",
            "audio_end_ms",
        ),
        (turn_detection(create_response="yes"), "invalid_type", f"{TD}.create_response"),
        (item(type="message", role="tool", content=[]), "invalid_value", "item.role"),
        (item(type="message", role="assistant", content=[]), "invalid_type", "item.content"),
        (
            item(type="message", role="system", content=[{"type": "output_text", "text": "x"}]),
            "invalid_value",
            "item.content[0].type",
        ),
        (
            item(type="message", role="user", content=[{"type": "input_audio", "audio": "%"}]),
            "invalid_value",
            "item.content[0].audio",
        ),
        (item(type="function_call", call_id="c"), "missing_required_parameter", "item.name"),
        (item(type="message", role="user", content=[]), "invalid_type", "item.content"),
        (
            item(type="function_call_output", call_id="c"),
            "missing_required_parameter",
            "item.output",
        ),
        (item(type="audio"), "invalid_value", "item.type"),
        ('{"type": "response.create", "response": "now"}', "invalid_type", "response"),
    ],
)
def test_rejections_name_the_problem(data: str, code: str, param: str | None) -> None:
    assert rejection(data) == (code, param)


def test_oversized_event_is_refused_before_parsing() -> None:
    assert rejection("x" * (300 * 1024)) == ("event_too_large", None)


def test_error_event_carries_code_param_and_client_event_id() -> None:
    event = error_event(EventError("invalid_type", "bad", "session.tools"), "c7")
    assert event["type"] == "error" and event["event_id"].startswith("event_")
    assert event["error"] == {
        "type": "invalid_request_error",
        "code": "invalid_type",
        "message": "bad",
        "param": "session.tools",
        "event_id": "c7",
    }


def test_stored_history_replays_as_ga_items() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Oslo"}')
    history = [
        Message("user", "What is the weather in Oslo?"),
        Message("assistant", "", (call,)),
        Message("tool", '{"sky": "clear"}', (), "call_1"),
        Message("assistant", "It is clear in Oslo."),
        Message("system", "never shown"),
    ]
    bodies = [
        b
        for n, m in enumerate(history)
        for b in stored_item_bodies(message_to_item(f"h{n + 1}", m))
    ]
    assert [(b["id"], b["type"]) for b in bodies] == [
        ("h1", "message"),
        ("h2_call_1", "function_call"),
        ("h3", "function_call_output"),
        ("h4", "message"),
    ]
    assert bodies[0]["content"] == [{"type": "input_text", "text": "What is the weather in Oslo?"}]
    assert (bodies[1]["name"], bodies[1]["arguments"]) == ("get_weather", '{"city": "Oslo"}')
    assert (bodies[2]["call_id"], bodies[2]["output"]) == ("call_1", '{"sky": "clear"}')
    assert bodies[3]["role"] == "assistant"
    assert bodies[3]["content"] == [{"type": "output_audio", "transcript": "It is clear in Oslo."}]
    assert all(b["status"] == "completed" and b["object"] == "realtime.item" for b in bodies)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
event_types = st.sampled_from(
    ["session.update", "conversation.item.create", "response.create", "response.cancel",
     "input_audio_buffer.clear", "output_audio_buffer.clear", "nope"]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    kind=event_types,
    body=st.dictionaries(
        st.sampled_from(
            ["session", "item", "response", "event_id", "response_id", "audio", "tools"]
        ),
        json_values,
        max_size=4,
    ),
)
def test_any_json_event_parses_or_raises_event_error(kind: str, body: dict[str, Any]) -> None:
    try:
        parse({"type": kind, **body})
    except EventError as exc:
        assert exc.code and exc.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_escape_as_other_exceptions(data: bytes) -> None:
    try:
        parse_client_event(data)
    except EventError:
        pass


def user_text_event(size: int) -> bytes:
    """A valid conversation.item.create of exactly ``size`` bytes."""
    prefix = '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", '
    return padded_json(prefix + '"content": [{"type": "input_text", "text": ', "}]}}", size)


def test_an_event_of_exactly_the_limit_parses_and_one_byte_more_is_refused() -> None:
    event = parse_client_event(user_text_event(MAX_EVENT_BYTES))
    assert isinstance(event, ConversationItemCreate) and isinstance(event.item, UserText)
    assert rejection(user_text_event(MAX_EVENT_BYTES + 1)) == ("event_too_large", None)
    assert rejection(user_text_event(MAX_EVENT_BYTES + 1).decode()) == ("event_too_large", None)


def test_text_counts_its_utf8_bytes_not_its_characters() -> None:
    prefix = '{"type": "response.create", "response": {"instructions": "'
    wide = prefix + "é" * ((MAX_EVENT_BYTES - len(prefix)) // 2) + '"}}'
    assert len(wide) < MAX_EVENT_BYTES < len(wide.encode())
    assert rejection(wide) == ("event_too_large", None)
    assert isinstance(parse_client_event(wide[: MAX_EVENT_BYTES // 3] + '"}}'), ResponseCreate)


@pytest.mark.parametrize(
    "data",
    [
        "[" * 1000,
        '{"type": "session.update", "session": ' + "[" * 100_000,
        '{"type": "session.update", "session": {"tools": [{"name": "t", "parameters": '
        + '{"a":' * 70
        + "1"
        + "}" * 70
        + "}]}}",
        '{"a":' * (MAX_EVENT_BYTES // 5),
    ],
)
def test_deeply_nested_events_get_the_json_error(data: str) -> None:
    with pytest.raises(EventError) as info:
        parse_client_event(data)
    assert (info.value.code, info.value.param) == ("invalid_json", None)
    assert "nested deeper than 64 levels" in info.value.message


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(around(MAX_EVENT_BYTES).flatmap(lambda size: mutated(user_text_event(size))))
def test_mutated_events_at_the_size_limit_parse_or_get_their_error(data: bytes) -> None:
    try:
        parse_client_event(data)
    except EventError as exc:
        assert exc.code and exc.message
        assert (exc.code == "event_too_large") == (len(data) > MAX_EVENT_BYTES)
    else:
        assert len(data) <= MAX_EVENT_BYTES


def test_the_known_event_item_and_part_fields_are_the_sdks() -> None:
    """What ``unknown_parameter`` refuses in the other client events, their items and parts
    is exactly what OpenAI's GA event params do not have."""
    from openai.types import realtime as rt

    from transceiver.realtime import client_events as ce

    def keys(typed: Any) -> frozenset[str]:
        return frozenset(typed.__required_keys__ | typed.__optional_keys__)

    events = {
        "input_audio_buffer.append": rt.InputAudioBufferAppendEventParam,
        "input_audio_buffer.clear": rt.InputAudioBufferClearEventParam,
        "input_audio_buffer.commit": rt.InputAudioBufferCommitEventParam,
        "output_audio_buffer.clear": rt.OutputAudioBufferClearEventParam,
        "response.cancel": rt.ResponseCancelEventParam,
        "conversation.item.create": rt.ConversationItemCreateEventParam,
        "conversation.item.retrieve": rt.ConversationItemRetrieveEventParam,
        "conversation.item.delete": rt.ConversationItemDeleteEventParam,
        "conversation.item.truncate": rt.ConversationItemTruncateEventParam,
    }
    assert {kind: keys(typed) for kind, typed in events.items()} == ce.EVENT_KEYS
    assert {
        "message": keys(rt.RealtimeConversationItemUserMessageParam),
        "function_call": keys(rt.RealtimeConversationItemFunctionCallParam),
        "function_call_output": keys(rt.RealtimeConversationItemFunctionCallOutputParam),
    } == ce.ITEM_KEYS
    assert {
        "user": keys(rt.realtime_conversation_item_user_message_param.Content),
        "system": keys(rt.realtime_conversation_item_system_message_param.Content),
        "assistant": keys(rt.realtime_conversation_item_assistant_message_param.Content),
    } == ce.PART_KEYS
    stray = {"type": "response.cancel", "event_id": "e1", "reason": "x"}
    with pytest.raises(EventError) as refused:
        parse_client_event(json.dumps(stray))
    assert (refused.value.code, refused.value.param) == ("unknown_parameter", "reason")


def test_the_known_session_fields_are_the_sdks() -> None:
    """What ``unknown_parameter`` refuses is exactly what OpenAI's GA session does not have."""
    from openai.types.realtime import (
        audio_transcription_param,
        realtime_audio_config_input_param,
        realtime_audio_config_output_param,
        realtime_audio_config_param,
        realtime_audio_input_turn_detection_param,
        realtime_function_tool_param,
        realtime_session_create_request_param,
    )

    from transceiver.realtime import client_events as ce

    def keys(typed: Any) -> frozenset[str]:
        return frozenset(typed.__required_keys__ | typed.__optional_keys__)

    detection = realtime_audio_input_turn_detection_param
    assert (
        keys(realtime_session_create_request_param.RealtimeSessionCreateRequestParam)
        == ce.SESSION_KEYS
    )
    assert keys(realtime_audio_config_param.RealtimeAudioConfigParam) == ce.AUDIO_KEYS
    assert (
        keys(realtime_audio_config_input_param.RealtimeAudioConfigInputParam) == ce.AUDIO_INPUT_KEYS
    )
    assert (
        keys(realtime_audio_config_output_param.RealtimeAudioConfigOutputParam)
        == ce.AUDIO_OUTPUT_KEYS
    )
    assert keys(audio_transcription_param.AudioTranscriptionParam) == ce.TRANSCRIPTION_KEYS
    assert keys(detection.ServerVad) == ce.SERVER_VAD_KEYS
    assert keys(detection.SemanticVad) == ce.SEMANTIC_VAD_KEYS
    assert keys(realtime_function_tool_param.RealtimeFunctionToolParam) == ce.FUNCTION_TOOL_KEYS


def test_an_unknown_session_field_is_named_by_its_path() -> None:
    for session, param in [
        ({"voice": "alloy"}, "session.voice"),
        ({"turn_detection": None}, "session.turn_detection"),
        ({"max_response_output_tokens": 5}, "session.max_response_output_tokens"),
        ({"audio": {"output": {"voice": "alloy", "pitch": 1}}}, "session.audio.output.pitch"),
        ({"audio": {"input": {"transcription": {"model": "m", "x": 1}}}},
         "session.audio.input.transcription.x"),
        ({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "threshold": 0.5}}}},
         "session.audio.input.turn_detection.threshold"),
        ({"tools": [{"type": "function", "name": "f", "strict": True}]}, "session.tools[0].strict"),
    ]:  # fmt: skip
        with pytest.raises(EventError) as refused:
            parse({"type": "session.update", "session": session})
        assert (refused.value.code, refused.value.param) == ("unknown_parameter", param)
    with pytest.raises(EventError) as extra:
        parse({"type": "session.update", "session": {}, "sesion": {}})
    assert (extra.value.code, extra.value.param) == ("unknown_parameter", "sesion")


def test_modalities_token_limit_and_transcription_parse() -> None:
    def config(session: dict[str, Any]) -> SessionConfig:
        event = parse({"type": "session.update", "session": session})
        assert isinstance(event, SessionUpdate)
        return event.apply(SessionConfig(id="s"))

    assert config({"output_modalities": ["text"]}).output_modalities == ("text",)
    assert config({"max_output_tokens": 7}).max_output_tokens == 7
    assert config({"max_output_tokens": "inf"}).to_json()["max_output_tokens"] == "inf"
    off = config({"audio": {"input": {"transcription": None}}})
    assert off.transcription is None and off.to_json()["audio"]["input"]["transcription"] is None
    hints = config({"audio": {"input": {"transcription": {"language": "fr", "prompt": "p"}}}})
    assert hints.to_json()["audio"]["input"]["transcription"]["language"] == "fr"
    for session, param in [
        ({"output_modalities": ["text", "audio"]}, "session.output_modalities"),
        ({"max_output_tokens": 4097}, "session.max_output_tokens"),
        ({"max_output_tokens": True}, "session.max_output_tokens"),
    ]:
        with pytest.raises(EventError) as refused:
            parse({"type": "session.update", "session": session})
        assert (refused.value.code, refused.value.param) == ("invalid_value", param)
