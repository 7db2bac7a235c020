"""GPT-Live delegation to a Responses backend: the session's ``delegation.responses`` (model,
instructions, function tools) drive the language model stage, here over the Responses API
(``PIPELINE_LLM_API=responses``), and the fake OpenAI server shows what it was sent.

One transceiver process (as ``test_live_websocket``'s, with the Responses API), the official
SDK's ``client.live.connect()``; every event validates as the SDK's ``ServerEvent``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from test_live_websocket import MOON_TOOL, Events, speak
from websocket_harness import openai_client, spoken_question, transceiver_process_with

from deploy.fake_openai import FakeOpenAIServer

pytestmark = pytest.mark.slow
API_KEY = "vr-deleg-" + os.urandom(12).hex()


@pytest.fixture(scope="module")
def transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("live-delegation")
    responses_api = {"PIPELINE_LLM_API": "responses"}
    with transceiver_process_with(server.base_url, API_KEY, 2, log_dir, responses_api) as url:
        yield url


@pytest.fixture(scope="module")
def question() -> bytes:
    return spoken_question()


@pytest.fixture
async def live(transceiver: str, server: FakeOpenAIServer) -> AsyncIterator[Events]:
    await server.reset()
    async with openai_client(transceiver, API_KEY).live.connect() as connection:
        yield Events(connection)


async def sent(server: FakeOpenAIServer) -> dict[str, Any]:
    stats = await server.stats()
    assert "chat" not in stats["hits"], stats["hits"]  # the Responses API only
    request: dict[str, Any] = stats["last_request"]["responses"]
    return request


async def test_a_spoken_question_and_its_function_call_go_to_the_delegations_model(
    live: Events, server: FakeOpenAIServer, question: bytes
) -> None:
    connection = live.connection
    responses = {"model": "gpt-5-mini", "instructions": "Use tools.", "tools": [MOON_TOOL]}
    await connection.session.start(session={
        "model": "gpt-live-1", "instructions": "Be brief.",
        "delegation": {"type": "responses", "responses": responses}})  # fmt: skip
    await live.next("session.started")
    await speak(connection, question)
    await live.next("session.delegation.created")
    await live.next("session.usage.updated")
    (call,) = [e["item"] for e in live.nested("response.output_item.done")]
    asked = await sent(server)
    assert (asked["model"], asked["instructions"]) == ("gpt-5-mini", "Be brief.\n\nUse tools.")
    assert asked["tools"] == [{**MOON_TOOL, "strict": False}]
    (heard,) = asked["input"]
    assert heard["role"] == "user" and "moon" in heard["content"].lower(), heard
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "full"}
    await connection.response.item.create(item=output)
    await connection.response.create()
    await live.next("session.usage.updated")
    said = "".join(e["delta"] for e in live.of("session.output_transcript.delta"))
    assert said.split() == ["The", "moon", "tool", "says", "full."], said
    items = (await sent(server))["input"]
    assert [item["type"] for item in items] == ["message", "function_call", "function_call_output"]
    assert (items[1]["call_id"], items[1]["name"]) == (call["call_id"], "moon")
    assert items[2] == {**output, "call_id": call["call_id"]}
    assert not live.of("error"), live.seen


async def test_a_session_update_changes_the_model_the_backend_is_asked_for(
    live: Events, server: FakeOpenAIServer
) -> None:
    connection = live.connection
    delegation = {"type": "responses", "responses": {"model": "gpt-5-mini"}}
    await connection.session.start(session={"model": "gpt-live-1", "delegation": delegation})
    await live.next("session.started")
    await connection.session.update(
        session={"delegation": {"type": "responses", "responses": {"model": "gpt-5-nano"}}}
    )
    updated = await live.next("session.updated")
    assert updated["session"]["delegation"]["responses"]["model"] == "gpt-5-nano"
    ask = {"type": "message", "role": "user", "content": "What is new?"}
    await connection.response.item.create(item=ask)
    await connection.response.create()
    await live.next("session.usage.updated")
    said = "".join(e["delta"] for e in live.of("session.output_transcript.delta"))
    assert said == "You said: What is new?", said
    (completed,) = live.nested("response.completed")
    assert completed["response"]["model"] == "gpt-5-nano"
    assert (await sent(server))["model"] == "gpt-5-nano"
    assert not live.of("error"), live.seen
