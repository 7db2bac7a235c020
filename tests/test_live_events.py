"""The GPT-Live contract's pure layers: the strict client-event parser (at its real size limit,
on any JSON) and the translation of engine events into events the SDK's types accept."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.live.server_event import ServerEvent
from sized_inputs import around, mutated

from pipeline import events as ev
from pipeline.providers import ToolCall
from pipeline.turns import TurnRecorder
from transceiver.live.client_events import (
    MAX_LIVE_EVENT_BYTES,
    AudioAppend,
    EventError,
    ResponseItemCreate,
    SessionStart,
    SessionUpdate,
    ToolOutput,
    parse_live_event,
    parse_stored,
)
from transceiver.live.translation import LiveTranslator
from transceiver.realtime.client_events import ForcedFunction
from transceiver.realtime.policy import session_update_from
from transceiver.store.contracts import CONTRACT_KEY, contract_type, split_contract, with_contract

LIMIT = MAX_LIVE_EVENT_BYTES
PREFIX, SUFFIX = '{"type": "session.input_audio.append", "audio": ', "}"
SERVER_EVENT = pydantic.TypeAdapter(ServerEvent)
FORMAT = "session.audio.format."
TOOL = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}


def append_event(size: int) -> bytes:
    """A valid append of exactly ``size`` bytes: base64 silence, the rest JSON whitespace."""
    room = size - len(PREFIX) - len(SUFFIX) - 2
    length = room // 4 * 4
    return f'{PREFIX}"{"A" * length}"{" " * (room - length)}{SUFFIX}'.encode()


def refused(event: dict[str, Any] | str | bytes) -> tuple[str, str | None]:
    data = event if isinstance(event, str | bytes) else json.dumps(event)
    with pytest.raises(EventError) as info:
        parse_live_event(data)
    return info.value.code, info.value.param


def start(**session: Any) -> dict[str, Any]:
    return {"type": "session.start", "session": {"model": "gpt-live-1", **session}}


def test_an_append_of_exactly_the_limit_parses_and_one_byte_more_is_refused() -> None:
    at_limit = append_event(LIMIT)
    assert len(at_limit) == LIMIT
    event = parse_live_event(at_limit)
    assert isinstance(event, AudioAppend) and set(event.pcm) == {0}
    assert refused(append_event(LIMIT + 1)) == ("event_too_large", None)
    assert refused(append_event(LIMIT + 1).decode()) == ("event_too_large", None)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(around(LIMIT).flatmap(lambda size: mutated(append_event(size))))
def test_mutated_appends_at_the_limit_parse_or_get_their_error(data: bytes) -> None:
    try:
        event = parse_live_event(data)
    except EventError as exc:
        assert exc.code and exc.message
        assert (exc.code == "event_too_large") == (len(data) > LIMIT)
    else:
        assert len(data) <= LIMIT and isinstance(event, AudioAppend)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
KINDS = st.sampled_from(
    ["session.start", "session.update", "session.input_audio.append", "response.item.create",
     "session.instructions.append", "response.create", "session.close", "nope"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(KINDS, st.dictionaries(st.sampled_from(["session", "item", "audio", "content",
       "delegation_id", "event_id", "x"]), JSON, max_size=4))  # fmt: skip
def test_any_json_event_parses_or_gets_an_event_error(kind: str, fields: dict[str, Any]) -> None:
    try:
        parse_live_event(json.dumps({"type": kind, **fields}))
    except EventError as exc:
        assert exc.code and exc.message


@pytest.mark.parametrize(
    ("event", "param"),
    [
        (start(voice="marin"), "session.voice"),
        (start(audio={"output": {"voice": "marin", "speed": 1}}), "session.audio.output.speed"),
        (start(audio={"format": {"type": "audio/pcm", "rate": 24000, "bits": 16}}),
         "session.audio.format.bits"),
        (start(delegation={"type": "responses", "responses": {"model": "m", "top_p": 1}}),
         "session.delegation.responses.top_p"),
        (start(delegation={"type": "responses", "responses": {"model": "m", "tools": [
            {**TOOL, "extra": True}]}}), "session.delegation.responses.tools[0].extra"),
        (start(input=[{"role": "user", "content": [{"text": "hi", "lang": "en"}]}]),
         "session.input[0].content[0].lang"),
        ({"type": "session.close", "reason": "done"}, "reason"),
        ({"type": "session.update", "session": {"instructions": "x"}}, "session.instructions"),
        ({"type": "response.item.create", "item": {"type": "function_call_output",
          "call_id": "c", "output": "o", "extra": 1}}, "item.extra"),
    ],
)  # fmt: skip
def test_an_unknown_field_is_refused_by_its_path(event: dict[str, Any], param: str) -> None:
    assert refused(event) == ("unknown_parameter", param)


@pytest.mark.parametrize(
    ("event", "param"),
    [
        (start(audio={"format": {"type": "audio/pcmu", "rate": 8000}}), FORMAT + "type"),
        (start(audio={"format": {"type": "audio/pcm", "rate": 16000}}), FORMAT + "rate"),
        (start(audio={"output": {"voice": {"id": "v1"}}}), "session.audio.output.voice"),
        (start(delegation={"type": "client"}), "session.delegation.type"),
        *[(start(delegation={"type": "responses", "responses": {"model": "m", key: value}}),
           "session.delegation.responses." + key) for key, value in (
            ("parallel_tool_calls", True), ("reasoning", {"effort": "low"}),
            ("service_tier", "flex"), ("text", {"verbosity": "low"}))],
        (start(delegation={"type": "responses", "responses": {"model": "m",
               "tools": [{"type": "web_search"}]}}), "session.delegation.responses.tools[0].type"),
        (start(delegation={"type": "responses", "responses": {"model": "m", "tool_choice": {
               "type": "allowed_tools", "tools": []}}}),
         "session.delegation.responses.tool_choice.type"),
        (start(store=True), "session.store"),
        (start(triggers=[{"type": "x"}]), "session.triggers"),
    ],
)  # fmt: skip
def test_a_known_feature_not_built_is_refused_as_unsupported(
    event: dict[str, Any], param: str
) -> None:
    assert refused(event) == ("unsupported_parameter", param)


def test_later_event_types_and_unknown_ones_are_told_apart() -> None:
    assert refused({"type": "decision.create", "event_id": "e"}) == ("unsupported_event", "type")
    assert refused({"type": "session.explode"}) == ("invalid_value", "type")
    assert refused(start(model=None)) == ("missing_required_parameter", "session.model")
    assert refused("[1]")[0] == "invalid_event"
    assert refused("{")[0] == "invalid_json"


def test_delegation_maps_onto_the_language_model_stage() -> None:
    delegation = {
        "type": "responses",
        "responses": {"model": "gpt-5-mini", "instructions": "Use tools.", "tools": [TOOL]},
    }
    event = parse_live_event(json.dumps(start(instructions="Be brief.", delegation=delegation)))
    assert isinstance(event, SessionStart)
    realtime = session_update_from(event.config.realtime()).changes
    assert realtime["instructions"] == "Be brief.\n\nUse tools."
    assert [tool.name for tool in realtime["tools"]] == ["lookup"]
    resource = event.config.resource("sess_1", 0)
    assert resource["delegation"]["responses"]["model"] == "gpt-5-mini"
    update = parse_live_event(json.dumps({"type": "session.update", "session": {"delegation": {
        "type": "responses", "responses": {"tools": [], "tool_choice": "none"}}}}))  # fmt: skip
    assert isinstance(update, SessionUpdate)
    changed = update.apply(event.config)
    assert changed.delegation is not None and changed.delegation.tools == ()
    assert changed.delegation.model == "gpt-5-mini" and changed.delegation.tool_choice == "none"
    plain = parse_live_event(json.dumps(start()))
    assert isinstance(plain, SessionStart)
    with pytest.raises(EventError):
        update.apply(plain.config)  # no delegation to update: the type cannot change


def test_a_tool_output_item_parses() -> None:
    item = {"type": "function_call_output", "call_id": "c1", "output": "sunny"}
    event = parse_live_event(json.dumps({"type": "response.item.create", "item": item}))
    assert event == ResponseItemCreate(None, ToolOutput("c1", "sunny"))


def sdk_shaped(events: list[dict[str, Any]]) -> list[str]:
    for event in events:
        assert SERVER_EVENT.validate_python(event).type == event["type"], event
    return [e["event"]["type"] if e["type"] == "response.event" else e["type"] for e in events]


def test_a_delegated_tool_turn_and_its_continuation_are_sdk_shaped() -> None:
    now = [0]
    translator = LiveTranslator(lambda: now[0], delegated=True, model="m", epoch_s=1_700_000_000)
    recorder = TurnRecorder(1, llm_input_tokens=5, llm_output_tokens=3)
    record = recorder.finish(interrupted=False)
    first = [
        *translator.translate(ev.SpeechStartedEvent(0.0, 0, turn=1)),
        *translator.translate(ev.InputTranscript(1, "use lookup", final=False)),
        *translator.translate(ev.InputTranscript(1, "use lookup", final=True)),
        *translator.translate(ev.ResponseStarted("r1", 1)),
        *translator.translate(ev.ClientToolCallRequested("r1", ToolCall("c1", "lookup", "{}"))),
        *translator.translate(ev.ResponseDone("r1", "completed", "")),
        *translator.translate(ev.TurnCompleted(record)),
    ]
    assert sdk_shaped(first) == [
        "session.input_transcript.delta", "session.delegation.created", "response.created",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed", "session.usage.updated",
    ]  # fmt: skip
    now[0] = 2500
    second = [
        *translator.translate(ev.ResponseStarted("r2", 1)),
        *translator.translate(ev.ResponseTextDelta("r2", "Done.")),
        *translator.audio_delta("r2", b"\x01\x00" * 240),
        *translator.translate(ev.ResponseDone("r2", "completed", "Done.")),
        *translator.translate(ev.TurnCompleted(record)),
    ]
    assert sdk_shaped(second) == [
        "response.created", "session.output_transcript.delta", "response.output_item.added",
        "response.output_text.delta", "session.output_audio.delta", "response.output_text.done",
        "response.output_item.done", "response.completed", "session.usage.updated",
    ]  # fmt: skip
    delegations = {e["delegation_id"] for e in first + second if e["type"] == "response.event"}
    assert len(delegations) == 1  # the answer to the tool output continues the delegation
    assert base64.b64decode(second[4]["delta"]) == b"\x01\x00" * 240
    assert second[-1]["usage"] == {"seconds": 2.0}


def test_the_stored_live_session_reads_back_as_it_was_without_its_input() -> None:
    responses = {"model": "gpt-5-mini", "instructions": "Use tools.", "tools": [TOOL]}
    delegation = {"type": "responses", "responses": {**responses, "max_output_tokens": 40}}
    audio = {"output": {"voice": "cedar"}}
    message = {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}
    event = parse_live_event(json.dumps(start(
        instructions="Be brief.", audio=audio, delegation=delegation, input=[message],
        safety_identifier="user-1",
    )))  # fmt: skip
    assert isinstance(event, SessionStart) and event.config.input == (("user", "hi"),)
    part = {"type": "live", "session": event.config.stored(), "instructions_appended": ["x"]}
    stored = json.loads(json.dumps(with_contract({"type": "realtime", "id": "s"}, part)))
    realtime, contract = split_contract(stored)
    assert realtime == {"type": "realtime", "id": "s"} and contract_type(contract) == "live"
    assert contract is not None
    config, appended = parse_stored(contract)
    assert config == replace(event.config, input=()) and appended == ("x",)
    assert config.delegation is not None and config.delegation.max_output_tokens == 40
    assert contract_type(split_contract({"id": "s"})[1]) == "realtime"
    with pytest.raises(EventError) as unknown:
        parse_stored({**contract, "extra": 1})
    assert unknown.value.param == "voicerelay_contract.extra"
    with pytest.raises(ValueError, match=CONTRACT_KEY):
        split_contract({CONTRACT_KEY: "live"})
    with pytest.raises(ValueError, match="type"):
        with_contract({}, {"session": {}})


def test_the_delegations_max_output_tokens_limits_each_answer() -> None:
    responses = {"model": "m", "max_output_tokens": 25}
    event = parse_live_event(
        json.dumps(start(delegation={"type": "responses", "responses": responses}))
    )
    assert isinstance(event, SessionStart)
    assert session_update_from(event.config.realtime()).changes["max_output_tokens"] == 25
    assert event.config.resource("s", 0)["delegation"]["responses"]["max_output_tokens"] == 25
    lifted = parse_live_event(json.dumps({"type": "session.update", "session": {"delegation": {
        "type": "responses", "responses": {"max_output_tokens": None}}}}))  # fmt: skip
    assert isinstance(lifted, SessionUpdate)
    unlimited = lifted.apply(event.config).realtime()
    assert session_update_from(unlimited).changes["max_output_tokens"] is None
    too_many = {"model": "m", "max_output_tokens": 4097}
    delegated = start(delegation={"type": "responses", "responses": too_many})
    assert refused(delegated) == ("invalid_value", "session.delegation.responses.max_output_tokens")


def test_an_answer_stopped_at_max_output_tokens_is_an_sdk_shaped_incomplete_response() -> None:
    translator = LiveTranslator(lambda: 0, delegated=True, model="m", epoch_s=1_700_000_000)
    record = TurnRecorder(1, llm_input_tokens=5, llm_output_tokens=2).finish(interrupted=False)
    events = [
        *translator.translate(ev.ResponseStarted("r1", 1)),
        *translator.translate(ev.ResponseTextDelta("r1", "Water covers")),
        *translator.translate(ev.ResponseDone("r1", "incomplete", "Water covers")),
        *translator.translate(ev.TurnCompleted(record)),
    ]
    assert sdk_shaped(events)[-2] == "response.incomplete"
    response = events[-2]["event"]["response"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}


def test_the_delegations_tool_choice_is_the_language_model_stages() -> None:
    def delegated(choice: Any, tools: list[Any] = [TOOL]) -> dict[str, Any]:  # noqa: B006
        responses = {"model": "m", "tools": tools, "tool_choice": choice}
        return start(delegation={"type": "responses", "responses": responses})

    forced = {"type": "function", "name": "lookup"}
    for choice, engine in (("required", "required"), (forced, ForcedFunction("lookup"))):
        event = parse_live_event(json.dumps(delegated(choice)))
        assert isinstance(event, SessionStart)
        assert session_update_from(event.config.realtime()).changes["tool_choice"] == engine
        resource = event.config.resource("s", 0)
        assert resource["delegation"]["responses"]["tool_choice"] == choice
        assert SERVER_EVENT.validate_python(
            {"type": "session.started", "event_id": "e", "session": resource}
        )
    path = "session.delegation.responses.tool_choice"
    assert refused(delegated("always")) == ("invalid_value", path)
    assert refused(delegated({**forced, "name": "other"})) == ("invalid_value", path + ".name")
    assert refused(delegated({**forced, "strict": True})) == ("unknown_parameter", path + ".strict")
    assert refused(delegated(forced, tools=[])) == ("invalid_value", path + ".name")
