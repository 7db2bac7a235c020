"""The language model over the Responses API (``pipeline.openai_responses``) against the fake
OpenAI server's streamed ``/v1/responses``; a session's model per request (``answering_as``)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent

from deploy.fake_openai import FakeOpenAIServer
from pipeline.config import ConfigError, PipelineConfig
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.openai_providers import OpenAILanguageModel
from pipeline.openai_responses import OpenAIResponsesLanguageModel, request_body
from pipeline.providers import (
    ForcedTool,
    LanguageModel,
    LanguageModelEvent,
    Message,
    ProviderError,
    TextDelta,
    ToolCall,
    ToolSpec,
    Usage,
    answering_as,
    generate_with,
)
from pipeline.resilience import HardenedLanguageModel, harden_llm

LOOKUP = ToolSpec(
    "lookup",
    "Look a word up in the knowledge file.",
    {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
)
STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


async def answer(llm: LanguageModel, messages: list[Message], **kw: Any) -> list[Any]:
    events: list[LanguageModelEvent] = []
    async for event in generate_with(llm, messages, kw.get("tools", []), kw.get("choice", "auto")):
        events.append(event)
    return events


def text_of(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def sent(server: FakeOpenAIServer) -> dict[str, Any]:
    request: dict[str, Any] = (await server.stats())["last_request"]["responses"]
    return request


async def test_a_text_answer_streams_with_instructions_and_input_items(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    llm = OpenAIResponsesLanguageModel(client, "gpt-5-mini")
    assert isinstance(llm, LanguageModel)
    messages = [Message("system", "Be brief."), Message("user", "hello there")]
    events = await answer(llm, messages)
    assert text_of(events) == "You said: hello there"
    assert isinstance(events[-1], Usage) and events[-1].output_tokens == 4
    request = await sent(server)
    assert (request["model"], request["instructions"], request["store"]) == (
        "gpt-5-mini", "Be brief.", False,
    )  # fmt: skip
    assert request["input"] == [{"type": "message", "role": "user", "content": "hello there"}]
    assert "tools" not in request and "tool_choice" not in request


async def test_a_tool_round_trip_sends_function_call_items(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    llm = OpenAIResponsesLanguageModel(client)
    history = [Message("user", "please lookup the moon")]
    events = await answer(llm, history, tools=[LOOKUP])
    (call,) = [e for e in events if isinstance(e, ToolCall)]
    assert (call.name, json.loads(call.arguments)) == ("lookup", {"query": history[0].content})
    tool = (await sent(server))["tools"][0]
    assert tool == {"type": "function", "name": "lookup", "description": LOOKUP.description,
                    "parameters": dict(LOOKUP.parameters), "strict": False}  # fmt: skip
    history += [Message("assistant", tool_calls=(call,)), Message("tool", "full", (), call.call_id)]
    events = await answer(llm, history, tools=[LOOKUP])
    assert text_of(events) == "The lookup tool says full."
    assert [item["type"] for item in (await sent(server))["input"]] == [
        "message", "function_call", "function_call_output",
    ]  # fmt: skip
    items = (await sent(server))["input"]
    assert items[1] == {"type": "function_call", "call_id": call.call_id, "name": "lookup",
                        "arguments": call.arguments}  # fmt: skip
    assert items[2] == {"type": "function_call_output", "call_id": call.call_id, "output": "full"}


async def test_the_body_is_what_the_sdks_own_create_would_send(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    """The request skips the SDK's transformer (its cost grows with the history): what
    reaches the server is what ``responses.create`` sends for the same body."""
    call = ToolCall("call_7", "lookup", '{"query": "hours"}')
    history = [Message("system", "Be brief.")]
    for turn in range(40):
        history += [Message("user", f"question {turn}"), Message("assistant", f"answer {turn}")]
    history += [
        Message("user", "please lookup the hours"),
        Message("assistant", "", tool_calls=(call,)),
        Message("tool", "nine to five", tool_call_id="call_7"),
    ]
    llm = OpenAIResponsesLanguageModel(client, "gpt-test")
    await answer(llm, history, tools=[LOOKUP], choice=ForcedTool("lookup"))
    ours = await sent(server)
    body = request_body("gpt-test", history, [LOOKUP], ForcedTool("lookup"))
    stream = await client.responses.create(**body)
    async with stream:
        _ = [event async for event in stream]
    assert ours == await sent(server)
    assert len(ours["input"]) == len(history) - 1  # the system message is the instructions


async def test_a_forced_tool_choice_is_sent_in_the_responses_shape(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    llm = OpenAIResponsesLanguageModel(client)
    events = await answer(llm, [Message("user", "hi")], tools=[LOOKUP], choice=ForcedTool("lookup"))
    assert [e.name for e in events if isinstance(e, ToolCall)] == ["lookup"]
    assert (await sent(server))["tool_choice"] == {"type": "function", "name": "lookup"}


async def test_the_fakes_events_are_the_sdks_types(server: FakeOpenAIServer) -> None:
    """Every event the fake streams validates as the SDK's ``ResponseStreamEvent``."""
    lookup = {"type": "function", "name": "lookup", "parameters": {}, "strict": False}
    body = {"model": "m", "stream": True, "input": [{"role": "user", "content": "call lookup"}]}
    for tools in ([lookup], []):
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            response = await http.post("/v1/responses", json={**body, "tools": tools})
        data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        kinds = [STREAM_EVENT.validate_json(item).type for item in data]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
        assert ("response.function_call_arguments.done" in kinds) is bool(tools), kinds


@pytest.mark.parametrize(
    ("status", "retryable"), [(429, True), (500, True), (400, False), (401, False)]
)
async def test_http_errors_map_to_provider_errors(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI, status: int, retryable: bool
) -> None:
    await server.control(fail={"responses": [status]})
    llm = OpenAIResponsesLanguageModel(client)
    with pytest.raises(ProviderError) as caught:
        await answer(llm, [Message("user", "hi")])
    assert (caught.value.retryable, caught.value.provider) == (retryable, llm.name)
    assert f"HTTP {status}" in str(caught.value)
    assert (await server.stats())["hits"]["responses"] == 1  # the SDK did not retry


@pytest.mark.parametrize(
    ("ending", "says"),
    [
        ("failed", "response.failed: server_error: injected failed"),
        ("error", "error event: server_error: injected error"),
        ("cut", "stream ended without response.completed"),
    ],
)
async def test_a_stream_the_server_fails_is_a_retryable_error(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI, ending: str, says: str
) -> None:
    await server.control(responses_ending=ending)
    llm = OpenAIResponsesLanguageModel(client)
    events: list[Any] = []
    with pytest.raises(ProviderError) as caught:
        async for event in llm.generate([Message("user", "hi there")], []):
            events.append(event)
    assert text_of(events) == "You said: hi there"  # what came before the failure
    assert caught.value.retryable and says in str(caught.value), caught.value


async def test_a_tool_output_without_its_call_is_refused_by_the_server(
    client: openai.AsyncOpenAI,
) -> None:
    llm = OpenAIResponsesLanguageModel(client)
    with pytest.raises(ProviderError) as caught:
        await answer(llm, [Message("user", "hi"), Message("tool", "x", (), "call_nowhere")])
    assert "HTTP 400" in str(caught.value) and "no function_call before it" in str(caught.value)
    assert not caught.value.retryable


@pytest.mark.parametrize("route", ["chat", "responses"])
async def test_a_session_model_is_sent_per_request_and_the_deployments_stays(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI, route: str
) -> None:
    api = OpenAIResponsesLanguageModel if route == "responses" else OpenAILanguageModel
    base = harden_llm(api(client, "gpt-4o-mini"), LocalRuleBasedAgent(load_knowledge()))
    session = answering_as(base, "gpt-5-mini")
    assert session.name.endswith("/gpt-5-mini") and base.name.endswith("/gpt-4o-mini")
    for llm, model in ((session, "gpt-5-mini"), (base, "gpt-4o-mini")):
        await answer(llm, [Message("user", "hi")])
        assert (await server.stats())["last_request"][route]["model"] == model
    local = LocalRuleBasedAgent(load_knowledge())
    assert answering_as(local, "gpt-5-mini") is local  # an alias for every name


async def test_a_sessions_model_is_retried_behind_the_deployments_breaker(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    """A failure of the session's model (``route:model``) is retried by the hardened view,
    whose breaker and counters are the deployment's provider's."""
    await server.control(fail={"responses:gpt-5-mini": [503]})
    base = harden_llm(OpenAIResponsesLanguageModel(client), sleep=lambda _: asyncio.sleep(0))
    session = answering_as(base, "gpt-5-mini")
    assert isinstance(session, HardenedLanguageModel) and session.breaker is base.breaker
    assert text_of(await answer(session, [Message("user", "hi")])) == "You said: hi"
    hits = (await server.stats())["hits"]
    assert (hits["responses:gpt-5-mini"], hits["responses"]) == (2, 2)
    assert base.stats.retries[base.name] == 1


def test_the_llm_api_is_a_setting() -> None:
    assert PipelineConfig.from_env({}).llm_api == "chat"
    assert PipelineConfig.from_env({"PIPELINE_LLM_API": "responses"}).llm_api == "responses"
    with pytest.raises(ConfigError, match="PIPELINE_LLM_API must be one of chat, responses"):
        PipelineConfig.from_env({"PIPELINE_LLM_API": "completions"})


DELTA = {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "delta": "Hi"}
CALL = {"type": "function_call", "id": "fc", "call_id": "c", "name": "lookup", "arguments": "{}"}


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"[]", "Responses event is an array, not an object"),
        (b"null", "Responses event is null, not an object"),
        (b"{bad", "Responses event is not JSON: "),
        (b'{"type": 3}', "Responses event.type is a number, not a string"),
        (json.dumps({**DELTA, "delta": 5}), "output_text.delta.delta is a number, not a string"),
        (
            json.dumps(
                {"type": "response.function_call_arguments.delta", "item_id": [], "delta": ""}
            ),
            "response.function_call_arguments.delta.item_id is an array, not a string",
        ),
        (
            json.dumps({"type": "response.output_item.done", "item": {**CALL, "arguments": 5}}),
            "function_call.arguments is a number, not a string",
        ),
        (
            json.dumps({"type": "response.output_item.done", "item": [CALL]}),
            "response.output_item.done.item is an array, not an object",
        ),
        (
            json.dumps({"type": "response.output_item.done", "item": 5}),
            "response.output_item.done.item is a number, not an object",
        ),
        (
            json.dumps({"type": "response.completed", "response": 7}),
            "response.completed.response is a number, not an object",
        ),
        (
            json.dumps({"type": "response.completed", "response": {"usage": [1, 2]}}),
            "the response's usage is an array, not an object",
        ),
        (
            json.dumps(
                {"type": "response.completed", "response": {"usage": {"input_tokens": "2"}}}
            ),
            "the response's usage.input_tokens is a string, not a non-negative integer",
        ),
    ],
)
async def test_an_event_of_the_wrong_shape_is_the_providers_failure_naming_it(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI, data: str | bytes, said: str
) -> None:
    """The SDK builds each event without checking it: an event that is not an object, or a
    field of another type, is a ProviderError naming it (not an AttributeError or a TypeError
    further on), after what came before it."""
    body = b"data: " + json.dumps(DELTA).encode() + b"\n\ndata: "
    body += (data.encode() if isinstance(data, str) else data) + b"\n\n"
    raw = {"body_base64": base64.b64encode(body).decode(), "content_type": "text/event-stream"}
    await server.control(raw={"responses": [raw]})
    llm = OpenAIResponsesLanguageModel(client)
    events: list[Any] = []
    with pytest.raises(ProviderError) as caught:
        async for event in llm.generate([Message("user", "hi there")], [LOOKUP]):
            events.append(event)
    assert events == [TextDelta("Hi")]
    assert str(caught.value).startswith(f"{llm.name}: malformed answer: "), caught.value
    assert said in str(caught.value) and not caught.value.retryable, caught.value
