"""The GA session object field by field, client secrets, and the endpoints refused by name,
driven by the official ``openai`` SDK (unchanged but for its base URL) against a real
transceiver process (``websocket_harness``): its language model, speech and speech-to-text are
the fake OpenAI server's, so what each request asked of them can be read back.

Every ``session`` reported (``session.created``/``updated``, a client secret's) has every field
of the SDK's session type and no other, and validates as it.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.types.realtime import (
    RealtimeServerEvent,
    RealtimeSessionCreateResponse,
    RealtimeTranscriptionSessionCreateResponse,
)
from prometheus_client.parser import text_string_to_metric_families
from test_image_parts import PNG_SIGNATURE, data_url, png_bytes
from websocket_harness import (
    EventLog,
    error_for,
    openai_client,
    spoken_question,
    transceiver_process_with,
)

from deploy.fake_openai import FakeOpenAIServer
from deploy.processes import ROOT
from deploy.waiting import poll
from pipeline.config import ConfigError, EngineConfig, PipelineConfig
from pipeline.context_window import ContextWindow
from pipeline.openai_providers import OpenAILanguageModel, OpenAISpeechToText, takes_reasoning
from pipeline.openai_responses import OpenAIResponsesLanguageModel
from pipeline.providers import (
    AudioChunk,
    ImagePart,
    Message,
    ModelOptions,
    TextDelta,
    ToolCall,
    ToolSpec,
    TranscriptionHints,
    with_options,
)
from transceiver.realtime.client_events import SessionConfig
from transceiver.realtime.image_urls import MAX_IMAGE_BYTES
from transceiver.realtime.policy import SessionPolicy, stored_session_update
from transceiver.realtime.session_fields import AUTO_BUDGET_TOKENS, Truncation

pytestmark = pytest.mark.slow
API_KEY = "vr-fields-" + os.urandom(12).hex()
SERVER_EVENT = pydantic.TypeAdapter(RealtimeServerEvent)
LOGPROBS = "item.input_audio_transcription.logprobs"
CALLS = "/v1/realtime/calls"


class Events(EventLog[AsyncRealtimeConnection]):
    def check(self, event: dict[str, Any]) -> None:
        if not event["type"].startswith("voicerelay."):
            SERVER_EVENT.validate_python(event)


@pytest.fixture(scope="module")
def transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("session-fields")
    env = {"PIPELINE_STT": "openai", "PIPELINE_FALLBACK": "false"}
    # a model whose name says it takes a reasoning effort (PIPELINE_OPENAI_LLM_REASONING
    # unset: the name decides), so a session's effort is sent
    env["PIPELINE_OPENAI_LLM_MODEL"] = "gpt-5-mini"
    with transceiver_process_with(server.base_url, API_KEY, 2, log_dir, env) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def question() -> bytes:
    return spoken_question()


@pytest.fixture
def client(transceiver: str) -> openai.AsyncOpenAI:
    return openai_client(transceiver, API_KEY)


@pytest.fixture
async def events(client: openai.AsyncOpenAI) -> AsyncIterator[Events]:
    async with client.realtime.connect(model="gpt-realtime") as connection:
        log = Events(connection)
        await log.next("session.created")
        yield log


def assert_every_field(session: dict[str, Any], model: type[pydantic.BaseModel]) -> None:
    """``session`` validates as the SDK's ``model`` and has each of its fields, no other."""
    model.model_validate(session)
    assert set(session) == set(model.model_fields), set(session) ^ set(model.model_fields)


def _update(session: dict[str, Any]) -> str:
    return json.dumps({"type": "session.update", "session": {"type": "realtime", **session}})


async def _session(events: Events, session: dict[str, Any]) -> dict[str, Any]:
    await events.connection.send_raw(_update(session))
    updated: dict[str, Any] = (await events.next("session.updated"))["session"]
    return updated


async def _say(events: Events, text: str) -> None:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await events.connection.conversation.item.create(item=item)  # type: ignore[arg-type]
    await events.connection.response.create()
    done = await events.next("response.done")
    assert done["response"]["status"] == "completed", done


async def _chat_texts(server: FakeOpenAIServer) -> list[str]:
    """The contents of the messages the model's last chat request was sent."""
    messages = (await server.stats())["last_request"]["chat"]["messages"]
    return [str(message.get("content") or "") for message in messages]


async def test_session_created_has_every_field_of_the_sdks_session(
    events: Events, server: FakeOpenAIServer
) -> None:
    session = events.of("session.created")[0]["session"]
    assert_every_field(session, RealtimeSessionCreateResponse)
    await _say(events, "Which model answers?")
    assert session["model"] == (await server.stats())["last_request"]["chat"]["model"]
    assert session["truncation"] == "auto"
    assert (session["reasoning"], session["tracing"], session["prompt"]) == (None, None, None)
    assert (session["include"], session["expires_at"]) == (None, None)  # a session never expires
    updated = await _session(events, {"instructions": "Be brief."})
    assert_every_field(updated, RealtimeSessionCreateResponse)


async def test_client_secret_reports_the_session_its_connection_starts(
    client: openai.AsyncOpenAI, transceiver: str
) -> None:
    asked = {"type": "realtime", "instructions": "From the secret.", "truncation": "disabled"}
    raw = await client.realtime.client_secrets.with_raw_response.create(
        session=asked,  # type: ignore[arg-type]
        expires_after={"anchor": "created_at", "seconds": 60},
    )
    secret = raw.parse()
    body = raw.http_response.json()
    assert_every_field(body["session"], RealtimeSessionCreateResponse)
    assert secret.value.startswith("ek_") and secret.session.type == "realtime"
    async with openai_client(transceiver, secret.value).realtime.connect(model="m") as connection:
        created = (await Events(connection).next("session.created"))["session"]
    reported = body["session"]
    assert reported["id"] != created["id"]  # a secret opens any number of sessions
    assert {**reported, "id": None} == {**created, "id": None}
    assert reported["audio"]["output"]["voice"] == "alloy"  # the deployment's TTS, not a default
    assert [tool["name"] for tool in reported["tools"]] == ["current_time", "lookup_knowledge"]
    assert (reported["instructions"], reported["truncation"]) == ("From the secret.", "disabled")


async def test_a_transcription_secret_reports_its_transcription_session(
    client: openai.AsyncOpenAI, transceiver: str
) -> None:
    asked = {"type": "transcription", "audio": {"input": {"transcription": {"language": "en"}}}}
    raw = await client.realtime.client_secrets.with_raw_response.create(session=asked)  # type: ignore[arg-type]
    body = raw.http_response.json()
    assert_every_field(body["session"], RealtimeTranscriptionSessionCreateResponse)
    async with openai_client(transceiver, body["value"]).realtime.connect(model="m") as connection:
        created = (await Events(connection).next("session.created"))["session"]
    assert {**body["session"], "id": None} == {**created, "id": None}


async def test_a_client_secrets_expiry_is_bounded_as_openais(client: openai.AsyncOpenAI) -> None:
    for seconds in (10, 7200):
        before = int(time.time())
        secret = await client.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": seconds}
        )
        assert before + seconds <= secret.expires_at <= int(time.time()) + seconds
    before = int(time.time())
    default = await client.realtime.client_secrets.create()
    assert before + 600 <= default.expires_at <= int(time.time()) + 600
    for expires_after, param in [
        ({"anchor": "created_at", "seconds": 9}, "expires_after.seconds"),
        ({"anchor": "created_at", "seconds": 7201}, "expires_after.seconds"),
        ({"anchor": "now", "seconds": 60}, "expires_after.anchor"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.realtime.client_secrets.create(expires_after=expires_after)  # type: ignore[arg-type]
        assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        await client.realtime.client_secrets.create(
            session={"type": "realtime", "audio": {"output": {"voice": "nobody"}}}
        )
    assert refused.value.body["param"] == "session.audio.output.voice"  # type: ignore[index]


async def test_truncation_cuts_what_the_model_is_sent(
    events: Events, server: FakeOpenAIServer
) -> None:
    budget = {"post_instructions": 45}
    truncation: dict[str, Any] = {"type": "retention_ratio", "retention_ratio": 0.5}
    truncation["token_limits"] = budget
    session = await _session(events, {"instructions": "", "truncation": truncation})
    assert session["truncation"] == truncation
    first = "The first question is about the moon and its many craters."
    second = "The second question is about the stars and their colours."
    await _say(events, first)
    await _say(events, second)
    # The first question (17 tokens in o200k_base), its answer (20) and the second question
    # (15) are over 45, so the oldest are left out until at most 22 remain: the second alone.
    assert await _chat_texts(server) == [second]
    assert (await _session(events, {"truncation": "disabled"}))["truncation"] == "disabled"
    await _say(events, "And the third?")
    sent = await _chat_texts(server)
    assert sent[0] == first and sent[2] == second and sent[-1] == "And the third?", sent
    assert len(sent) == 5, sent  # three questions, two answers: nothing left out
    assert (await _session(events, {"truncation": "auto"}))["truncation"] == "auto"
    for bad, param in [
        ("sometimes", "session.truncation"),
        ({**truncation, "retention_ratio": 1.5}, "session.truncation.retention_ratio"),
        ({**truncation, "token_limits": {"post_instructions": 0}},
         "session.truncation.token_limits.post_instructions"),
        ({"type": "tokens"}, "session.truncation.type"),
    ]:  # fmt: skip
        error = await error_for(events, _update({"truncation": bad}))
        assert (error["code"], error["param"]) == ("invalid_value", param), error


def test_auto_truncation_cuts_at_its_budget_and_never_inside_a_tool_round() -> None:
    window = SessionPolicy(EngineConfig()).engine_config(SessionConfig("sess_1")).context
    assert (window.budget_tokens, window.retention_ratio) == (AUTO_BUDGET_TOKENS, 1.0)
    history = [Message("user", "word " * 2000) for _ in range(20)]  # 2,005 tokens each
    kept = window.view(history)
    assert 1 < len(kept) < len(history) and kept == history[-len(kept) :]
    call = ToolCall("call_1", "current_time", "{}")
    rounds = [
        Message("user", "x" * 400), Message("assistant", tool_calls=(call,)),
        Message("tool", "noon", tool_call_id="call_1"), Message("user", "y" * 40),
    ]  # fmt: skip
    assert ContextWindow(20, 1.0).view(rounds) == rounds[-1:]  # not the orphaned result
    assert ContextWindow(30, 1.0).view(rounds) == rounds[1:]  # the call with its result
    assert ContextWindow(None).view(history) == history  # "disabled"


async def test_reasoning_and_tracing_are_reported_prompt_and_include_refused(
    events: Events,
) -> None:
    fields = {"reasoning": {"effort": "low"}, "tracing": {"workflow_name": "support"}}
    session = await _session(events, {**fields, "parallel_tool_calls": False})
    assert (session["reasoning"], session["tracing"]) == (fields["reasoning"], fields["tracing"])
    assert (await _session(events, {"tracing": "auto"}))["tracing"] == "auto"
    refused: list[tuple[dict[str, Any], str, str]] = [
        ({"prompt": {"id": "pmpt_123"}}, "invalid_value", "session.prompt"),
        ({"reasoning": {"effort": "max"}}, "invalid_value", "session.reasoning.effort"),
        ({"parallel_tool_calls": "yes"}, "invalid_type", "session.parallel_tool_calls"),
        ({"tracing": {"workflow": "x"}}, "unknown_parameter", "session.tracing.workflow"),
    ]
    for bad, code, param in refused:
        error = await error_for(events, _update({"instructions": "Lost.", **bad}))
        assert (error["code"], error["param"]) == (code, param), error
    kept = await _session(events, {"prompt": None, "include": []})
    assert kept["instructions"] != "Lost." and kept["reasoning"] == {"effort": "low"}
    for response, param in [
        ({"prompt": {"id": "pmpt_123"}}, "response.prompt"),
        ({"reasoning": {"effort": "max"}}, "response.reasoning.effort"),
    ]:  # a response's own are read as a session's
        create = {"type": "response.create", "response": response}
        error = await error_for(events, json.dumps(create))
        assert (error["code"], error["param"]) == ("invalid_value", param), error


LOOKUP = {"type": "function", "name": "lookup", "description": "Looks things up.",
          "parameters": {"type": "object", "properties": {}}}  # fmt: skip


async def _calls(events: Events, text: str, response: dict[str, Any]) -> list[str]:
    """The call ids of the function calls the answer to ``text`` made (each then answered)."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await events.connection.conversation.item.create(item=item)  # type: ignore[arg-type]
    await events.connection.send_raw(json.dumps({"type": "response.create", "response": response}))
    done = await events.next("response.done")
    calls = [item for item in done["response"]["output"] if item["type"] == "function_call"]
    for call in calls:
        output = {"type": "function_call_output", "call_id": call["call_id"], "output": "ok"}
        await events.connection.conversation.item.create(item=output)  # type: ignore[arg-type]
        await events.next("conversation.item.done")
    return [call["call_id"] for call in calls]


OPTION_KEYS = ("parallel_tool_calls", "reasoning_effort", "reasoning")


async def _options_sent(server: FakeOpenAIServer, route: str = "chat") -> dict[str, Any]:
    """The model options the last request on ``route`` carried."""
    sent = (await server.stats())["last_request"][route]
    return {key: sent[key] for key in OPTION_KEYS if key in sent}


DROPPED = "transceiver_tool_calls_dropped_total"


async def _metric(transceiver: str, name: str) -> float:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{transceiver}/metrics")
    response.raise_for_status()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


async def _metric_reaches(transceiver: str, name: str, value: float) -> float:
    """The metric once it is at least ``value`` (it is counted just after the response's done
    event is sent); AssertionError if it is not within the deadline."""
    return await poll(
        lambda: _metric(transceiver, name),
        lambda seen: seen >= value,
        20.0,
        lambda seen: f"{name} is {seen}, not {value}",
    )


async def test_parallel_tool_calls_and_reasoning_effort_reach_the_model(
    events: Events, server: FakeOpenAIServer, transceiver: str
) -> None:
    await server.control(calls_per_turn=2)  # a model that calls twice, whatever it is told
    try:
        await _session(events, {"tools": [LOOKUP], "reasoning": {"effort": "low"}})
        assert len(await _calls(events, "Please lookup the tides.", {})) == 2
        assert await _options_sent(server) == {"reasoning_effort": "low"}
        dropped = await _metric(transceiver, DROPPED)
        await _session(events, {"parallel_tool_calls": False})
        assert await _calls(events, "Please lookup the moon.", {}) == ["call_fake_3"]
        assert await _metric_reaches(transceiver, DROPPED, dropped + 1) == dropped + 1
        sent = {"parallel_tool_calls": False, "reasoning_effort": "low"}
        assert await _options_sent(server) == sent
        own = {"parallel_tool_calls": True, "reasoning": {"effort": "high"}}
        assert len(await _calls(events, "Please lookup the sun.", own)) == 2  # this one only
        assert await _options_sent(server) == {"reasoning_effort": "high"}
        assert len(await _calls(events, "Please lookup Mars.", {})) == 1
    finally:
        await server.control(calls_per_turn=1)


async def test_the_options_reach_either_api_the_effort_only_when_the_model_takes_it(
    server: FakeOpenAIServer,
) -> None:
    options = ModelOptions(parallel_tool_calls=False, reasoning_effort="minimal")
    apis: list[tuple[type[OpenAILanguageModel | OpenAIResponsesLanguageModel], str, Any]] = [
        (OpenAILanguageModel, "chat", {"reasoning_effort": "minimal"}),
        (OpenAIResponsesLanguageModel, "responses", {"reasoning": {"effort": "minimal"}}),
    ]
    said: list[tuple[bool | None, str]] = [
        (False, "gpt-5"), (True, "gpt-4o-mini"),  # the deployment's word wins
        (None, "o4-mini"), (None, "gpt-5.1"), (None, "gpt-4o-mini"),  # else the model's name
    ]  # fmt: skip
    async with server.openai_client() as client:
        for api, route, effort in apis:
            for reasoning, name in said:
                model = with_options(api(client, name, reasoning=reasoning), options)
                answer = model.generate([Message("user", "Hello there.")], [LOOKUP_SPEC])
                assert [event async for event in answer], (api, reasoning)
                wanted = {"parallel_tool_calls": False}
                if reasoning or (reasoning is None and name != "gpt-4o-mini"):
                    wanted.update(effort)
                assert await _options_sent(server, route) == wanted, (api, reasoning, name)
                assert (await server.stats())["last_request"][route]["model"] == name


LOOKUP_SPEC = ToolSpec("lookup", "Looks.")


def test_the_model_name_decides_the_reasoning_effort_unless_the_deployment_says() -> None:
    takes = ["o1", "o3", "o3-2025-04-16", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5.1",
             "openai/gpt-5-nano"]  # fmt: skip
    takes_none = ["gpt-4o-mini", "gpt-4.1", "o1-mini", "o1-preview", "gpt-5-chat-latest",
                  "gpt-50", "llama-3-o3", "gpt-realtime"]  # fmt: skip
    assert [takes_reasoning(name) for name in takes] == [True] * len(takes)
    assert [takes_reasoning(name) for name in takes_none] == [False] * len(takes_none)
    variable = "PIPELINE_OPENAI_LLM_REASONING"
    for text, wanted in [("", None), ("auto", None), ("true", True), ("off", False)]:
        assert PipelineConfig.from_env({variable: text}).openai_llm_reasoning is wanted
    assert PipelineConfig.from_env({}).openai_llm_reasoning is None
    with pytest.raises(ConfigError, match=variable):
        PipelineConfig.from_env({variable: "sometimes"})


async def test_transcription_keywords_and_languages_reach_the_speech_to_text(
    events: Events, server: FakeOpenAIServer, question: bytes
) -> None:
    transcription = {
        "model": "gpt-transcribe", "prompt": "Astronomy.", "keywords": ["moon", "crater"],
        "languages": ["en"], "delay": "low",
    }  # fmt: skip
    audio_in = {"transcription": transcription, "turn_detection": QUIET_VAD}  # unanswered
    session = await _session(events, {"audio": {"input": audio_in}})
    assert session["audio"]["input"]["transcription"] == transcription
    for start in range(0, len(question), 9600):
        chunk = question[start : start + 9600]
        await events.connection.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
    await events.next("conversation.item.input_audio_transcription.completed")
    sent = (await server.stats())["last_request"]["transcriptions"]
    assert (sent["language"], sent["prompt"]) == ("en", "Astronomy. moon, crater"), sent
    bad = {**transcription, "delay": "never"}
    error = await error_for(events, _update({"audio": {"input": {"transcription": bad}}}))
    assert error["param"] == "session.audio.input.transcription.delay", error


async def test_sip_endpoints_are_refused_by_name(
    client: openai.AsyncOpenAI, transceiver: str
) -> None:
    """SIP call control is refused by name (translation sessions are served:
    ``test_realtime_translation.py``)."""
    for action, call in [
        ("accept", client.realtime.calls.accept("rtc_x", type="realtime")),
        ("reject", client.realtime.calls.reject("rtc_x", status_code=486)),
        ("refer", client.realtime.calls.refer("rtc_x", target_uri="tel:+14155550123")),
    ]:
        with pytest.raises(openai.NotFoundError) as refused:
            await call
        assert refused.value.body["code"] == "sip_unavailable", (action, refused.value.body)  # type: ignore[index]
    async with httpx.AsyncClient(base_url=transceiver, timeout=10) as http:
        for path, status, code in [
            ("/v1/nowhere", 404, "not_found"), (CALLS, 405, "method_not_allowed"),
        ]:  # fmt: skip
            response = await http.get(path, headers={"Authorization": f"Bearer {API_KEY}"})
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert (error["type"], error["code"], error["param"]) == (
                "invalid_request_error", code, None
            ), error  # fmt: skip


async def test_a_secret_carries_a_session_of_realistic_size(
    client: openai.AsyncOpenAI, transceiver: str
) -> None:
    prose = (ROOT / "ARCHITECTURE.md").read_text()[:8000]  # once over the secret's bound
    tool = {"type": "function", "name": "order_status", "description": prose[:300]}
    asked = {"type": "realtime", "instructions": prose, "tools": [tool]}
    secret = await client.realtime.client_secrets.create(session=asked)  # type: ignore[arg-type]
    async with openai_client(transceiver, secret.value).realtime.connect(model="m") as connection:
        created = (await Events(connection).next("session.created"))["session"]
    assert created["instructions"] == prose
    assert [tool["name"] for tool in created["tools"]] == ["order_status"]


async def test_an_mcp_approval_is_refused_by_name(events: Events) -> None:
    item = {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True}
    event = {"type": "conversation.item.create", "item": item}
    error = await error_for(events, json.dumps(event))
    assert (error["code"], error["param"]) == ("invalid_value", "item.type"), error


async def _show(events: Events, url: str, detail: str) -> dict[str, Any]:
    """The item created for a question with an image, as ``conversation.item.added`` says."""
    image = {"type": "input_image", "image_url": url, "detail": detail}
    text = {"type": "input_text", "text": "What is in this picture?"}
    item = {"type": "message", "role": "user", "content": [text, image]}
    await events.connection.conversation.item.create(item=item)  # type: ignore[arg-type]
    added: dict[str, Any] = (await events.next("conversation.item.added"))["item"]
    return added


async def test_an_image_reaches_the_model_is_retrieved_and_is_cut_as_any_message(
    events: Events, server: FakeOpenAIServer
) -> None:
    url = data_url(png_bytes(4, 4))
    image = {"type": "input_image", "image_url": url, "detail": "low"}
    budget = {"type": "retention_ratio", "retention_ratio": 0.5,
              "token_limits": {"post_instructions": 110}}  # fmt: skip
    await _session(events, {"truncation": budget, "instructions": "Look."})
    added = await _show(events, url, "low")
    assert added["content"][1] == image, added
    await events.connection.response.create()
    done = await events.next("response.done")
    said = done["response"]["output"][0]["content"][0]["transcript"].strip()
    assert said == "You said: What is in this picture? (and 1 image)", done
    sent = (await server.stats())["last_request"]["chat"]["messages"][-1]["content"]
    assert sent[1] == {"type": "image_url", "image_url": {"url": url, "detail": "low"}}, sent
    await events.connection.conversation.item.retrieve(item_id=added["id"])
    retrieved = (await events.next("conversation.item.retrieved"))["item"]
    assert retrieved["content"] == added["content"], retrieved
    await _say(events, "And now?")  # the image's 85 tokens are over the budget: it is cut
    assert [text.strip() for text in await _chat_texts(server)] == ["Look.", said, "And now?"]


async def test_an_out_of_band_response_is_shown_an_image_given_or_referenced(
    events: Events, server: FakeOpenAIServer
) -> None:
    url = data_url(png_bytes(2, 2))
    parts = [
        {"type": "input_image", "image_url": url, "detail": "auto"},
        {"type": "input_text", "text": "Two"},
        {"type": "input_text", "text": "words."},
    ]
    item = {"type": "message", "role": "user", "content": parts}
    await events.connection.conversation.item.create(item=item)  # type: ignore[arg-type]
    assert (await events.next("conversation.item.added"))["item"]["content"] == parts
    added = await _show(events, url, "high")
    given = {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "And this?"},
        {"type": "input_image", "image_url": url, "detail": "low"},
    ]}  # fmt: skip
    for entry, detail in [({"type": "item_reference", "id": added["id"]}, "high"), (given, "low")]:
        response = {"conversation": "none", "output_modalities": ["text"], "input": [entry]}
        await events.connection.send_raw(
            json.dumps({"type": "response.create", "response": response})
        )
        done = await events.next("response.done")
        assert done["response"]["status"] == "completed", done
        sent = (await server.stats())["last_request"]["chat"]["messages"][-1]["content"]
        assert sent[1] == {"type": "image_url", "image_url": {"url": url, "detail": detail}}


async def test_a_bad_image_is_refused_by_name_and_the_responses_api_sends_a_good_one(
    events: Events, server: FakeOpenAIServer
) -> None:
    for url, code, wanted in [
        ("https://example.com/cat.png", "invalid_value", "must be a data URL"),
        (data_url(png_bytes(), "image/bmp"), "invalid_value", "'image/bmp' is not taken"),
        (data_url(b"GIF89a"), "invalid_value", "not those of image/png"),
        (data_url(PNG_SIGNATURE + bytes(MAX_IMAGE_BYTES)), "image_too_large", "over"),
    ]:  # fmt: skip
        image = {"type": "input_image", "image_url": url}
        item = {"type": "message", "role": "user", "content": [image]}
        event = json.dumps({"type": "conversation.item.create", "item": item})
        error = await error_for(events, event)
        assert (error["code"], error["param"]) == (code, "item.content[0].image_url"), error
        assert wanted in error["message"], error
    url = data_url(png_bytes())
    question = Message("user", "What is this?", images=(ImagePart(url, "high"),))
    async with server.openai_client() as client:
        answer = OpenAIResponsesLanguageModel(client).generate([question], [])
        deltas = [e.text async for e in answer if isinstance(e, TextDelta)]
    assert "".join(deltas).strip() == "You said: What is this? (and 1 image)"
    sent = (await server.stats())["last_request"]["responses"]["input"][0]["content"]
    assert sent[1] == {"type": "input_image", "image_url": url, "detail": "high"}, sent


def test_a_stored_session_reads_back_with_its_fields() -> None:
    truncation = Truncation("retention_ratio", 0.5, 100)
    config = SessionConfig("sess_1", truncation=truncation, reasoning_effort="low", tracing="auto")
    assert stored_session_update(config.to_json()).apply(SessionConfig("sess_1")) == config


# --- what OpenAI's speech-to-text gives beyond words: logprobs, speakers, languages ----------

DIARIZE = "gpt-4o-transcribe-diarize"
TRANSCRIBED = "conversation.item.input_audio_transcription"
PCM_RATE_HZ = 24_000  # the events' PCM16
QUIET_VAD = {"type": "server_vad", "create_response": False}  # transcribed, never answered


@pytest.fixture
async def transcribing(client: openai.AsyncOpenAI) -> AsyncIterator[Events]:
    """A transcription session over the SDK's WebSocket, its session.created read."""
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        events = Events(connection)
        created = await events.next("session.created")
        assert created["session"]["type"] == "transcription", created
        yield events


async def _updated(events: Events, session: dict[str, Any]) -> dict[str, Any]:
    await events.connection.send_raw(json.dumps({"type": "session.update", "session": session}))
    updated: dict[str, Any] = (await events.next("session.updated"))["session"]
    return updated


async def _transcribed(events: Events, pcm: bytes) -> dict[str, Any]:
    """``pcm`` appended as a microphone would send it; its transcription's ``.completed``."""
    step = PCM_RATE_HZ * 2 // 5  # 200 ms an append
    for start in range(0, len(pcm), step):
        chunk = base64.b64encode(pcm[start : start + step]).decode()
        await events.connection.input_audio_buffer.append(audio=chunk)
    return await events.next(f"{TRANSCRIBED}.completed")


def _of_item(events: Events, kind: str, item_id: str) -> list[dict[str, Any]]:
    return [event for event in events.of(f"{TRANSCRIBED}.{kind}") if event["item_id"] == item_id]


def _tokens(logprobs: list[dict[str, Any]]) -> str:
    for entry in logprobs:
        assert bytes(entry["bytes"]).decode() == entry["token"] and entry["logprob"] <= 0, entry
    return "".join(entry["token"] for entry in logprobs)


async def _last_transcription_request(server: FakeOpenAIServer) -> dict[str, str]:
    sent: dict[str, str] = (await server.stats())["last_request"]["transcriptions"]
    return sent


async def test_logprobs_come_with_each_delta_and_the_completed_transcript(
    events: Events, transcribing: Events, server: FakeOpenAIServer, question: bytes
) -> None:
    quiet = {"input": {"turn_detection": QUIET_VAD}}
    sessions: list[tuple[Events, dict[str, Any]]] = [
        (events, {"type": "realtime", "include": [LOGPROBS], "audio": quiet}),
        (transcribing, {"type": "transcription", "include": [LOGPROBS]}),
    ]
    for log, session in sessions:
        assert (await _updated(log, session))["include"] == [LOGPROBS]
        completed = await _transcribed(log, question)
        sent = await _last_transcription_request(server)
        assert (sent["include[]"], sent["response_format"]) == ("logprobs", "json"), sent
        deltas = _of_item(log, "delta", completed["item_id"])
        assert deltas and all(_tokens(d["logprobs"]) == d["delta"] for d in deltas), deltas
        assert "".join(d["delta"] for d in deltas) == completed["transcript"], deltas
        assert _tokens(completed["logprobs"]) == completed["transcript"], completed
    # without include: none asked for, none given
    assert (await _updated(events, {"type": "realtime", "include": []}))["include"] is None
    completed = await _transcribed(events, question)
    assert "include[]" not in await _last_transcription_request(server)
    assert completed.get("logprobs") is None, completed
    assert all(d.get("logprobs") is None for d in _of_item(events, "delta", completed["item_id"]))


async def test_a_diarized_transcription_sends_its_speaker_segments_before_completing(
    transcribing: Events, server: FakeOpenAIServer, question: bytes
) -> None:
    diarize = {"model": DIARIZE, "language": "en"}
    session = {"type": "transcription", "audio": {"input": {"transcription": diarize}}}
    updated = await _updated(transcribing, session)
    assert updated["audio"]["input"]["transcription"] == diarize, updated
    completed = await _transcribed(transcribing, question)
    sent = await _last_transcription_request(server)
    assert (sent["model"], sent["response_format"]) == (DIARIZE, "diarized_json"), sent
    assert "prompt" not in sent and "include[]" not in sent, sent
    segments = _of_item(transcribing, "segment", completed["item_id"])
    assert [s["speaker"] for s in segments] == ["A", "B"], segments
    assert " ".join(s["text"] for s in segments) == completed["transcript"], segments
    audio_s = len(question) / 2 / PCM_RATE_HZ
    assert 0 == segments[0]["start"] < segments[0]["end"] == segments[1]["start"], segments
    assert segments[1]["end"] <= audio_s, (segments, audio_s)
    kinds = [e["type"] for e in transcribing.seen if e.get("item_id") == completed["item_id"]]
    assert kinds.index(f"{TRANSCRIBED}.segment") < kinds.index(f"{TRANSCRIBED}.completed")


async def test_what_openai_refuses_with_the_diarizing_model_is_refused(
    events: Events, transcribing: Events
) -> None:
    path = "session.audio.input.transcription"
    for diarize, include, param in [
        ({"model": DIARIZE, "prompt": "Astronomy."}, [], f"{path}.prompt"),
        ({"model": DIARIZE, "keywords": ["moon"]}, [], f"{path}.keywords"),
        ({"model": DIARIZE}, [LOGPROBS], "session.include"),
    ]:
        audio = {"input": {"transcription": diarize}}
        for log, kind in [(events, "realtime"), (transcribing, "transcription")]:
            update = {"type": kind, "audio": audio, "include": include}
            event = {"type": "session.update", "session": update}
            error = await error_for(log, json.dumps(event))
            assert (error["code"], error["param"]) == ("invalid_value", param), error
    bad = {"type": "realtime", "include": ["item.input_audio_transcription.words"]}
    error = await error_for(events, json.dumps({"type": "session.update", "session": bad}))
    assert (error["code"], error["param"]) == ("invalid_value", "session.include[0]"), error


async def _hints_sent(server: FakeOpenAIServer, model: str, hints: TranscriptionHints) -> Any:
    async def second() -> AsyncIterator[AudioChunk]:
        yield AudioChunk(bytes(2 * 16_000), 16_000)

    stt = OpenAISpeechToText(server.openai_client(), model)
    async for transcript in stt.transcribe(second(), hints):
        if transcript.final:
            break
    return await _last_transcription_request(server)


async def test_several_languages_go_to_a_model_that_takes_them_and_none_to_another(
    server: FakeOpenAIServer,
) -> None:
    several = TranscriptionHints(languages=("en", "fr"))
    sent = await _hints_sent(server, "gpt-transcribe", several)
    assert sent["languages[]"] in ("en", "fr") and "language" not in sent, sent
    sent = await _hints_sent(server, "gpt-4o-mini-transcribe", several)
    assert "languages[]" not in sent and "language" not in sent, sent  # it detects the language
