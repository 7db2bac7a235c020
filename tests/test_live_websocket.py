"""GPT-Live's primary WebSocket, driven by the official ``openai`` SDK's ``client.live.connect()``.

One transceiver process (``--agent pipeline``, auth required) whose language model and speech
are the fake OpenAI server (``deploy/server.py``: it answers "You said: …" and calls a tool
whose name the user says) and whose speech-to-text is pocketsphinx, so the spoken question is
really heard. The SDK is unchanged but for its base URL: it sends ``Authorization: Bearer`` on a
plain WebSocket to ``/v1/live/sessions``. Every event received must validate as the SDK's own
``ServerEvent`` type.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
import websockets
from openai.resources.live.live import AsyncLiveConnection
from openai.types.live.server_event import ServerEvent
from websocket_harness import (
    RATE_HZ,
    EventLog,
    error_for,
    openai_client,
    spoken_question,
    transceiver_process_with,
)

from deploy.fake_openai import FakeOpenAIServer
from transceiver.live.client_events import MAX_LIVE_EVENT_BYTES

pytestmark = pytest.mark.slow
API_KEY = "vr-live-" + os.urandom(12).hex()
CAPACITY = 2
SERVER_EVENT = pydantic.TypeAdapter(ServerEvent)
# The fake model calls a tool whose name the user says: "moon" is in the spoken question.
MOON_TOOL = {
    "type": "function",
    "name": "moon",
    "description": "Facts about the moon.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The transceiver's HTTP base URL."""
    log_dir = tmp_path_factory.mktemp("live")
    with transceiver_process_with(server.base_url, API_KEY, CAPACITY, log_dir) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def question() -> bytes:
    """A spoken question (piper, noise off) between silences, PCM16 at 24 kHz."""
    return spoken_question()


def sdk(base_url: str, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai_client(base_url, api_key)


class Events(EventLog[AsyncLiveConnection]):
    """Every event the connection receives, kept and checked against the SDK's types; waits
    are on a type (never on a time)."""

    def check(self, event: dict[str, Any]) -> None:
        assert SERVER_EVENT.validate_python(event).type == event["type"], event

    def nested(self, kind: str) -> list[dict[str, Any]]:
        return [e["event"] for e in self.of("response.event") if e["event"]["type"] == kind]


@pytest.fixture
async def live(transceiver: str) -> AsyncIterator[Events]:
    async with sdk(transceiver).live.connect() as connection:
        yield Events(connection)


async def speak(connection: AsyncLiveConnection, pcm: bytes) -> None:
    step = RATE_HZ * 2 // 5  # 200 ms per append, as a microphone would send
    for start in range(0, len(pcm), step):
        chunk = base64.b64encode(pcm[start : start + step]).decode()
        await connection.session.input_audio.append(audio=chunk)


async def test_a_spoken_turn_is_heard_answered_and_the_session_closes(
    live: Events, question: bytes
) -> None:
    connection = live.connection
    await connection.session.start(
        session={"model": "gpt-live-1", "instructions": "Be brief."}, event_id="start-1"
    )
    started = await live.next("session.started")
    assert started["client_event_id"] == "start-1"
    session = started["session"]
    assert session["id"] and session["model"] == "gpt-live-1" and session["status"] == "active"
    assert session["audio"]["format"] == {"type": "audio/pcm", "rate": RATE_HZ}
    await speak(connection, question)
    heard = await live.next("session.input_transcript.delta")
    assert "moon" in re.findall(r"[a-z']+", heard["delta"].lower()), heard
    await live.next("session.usage.updated")
    said = "".join(e["delta"] for e in live.of("session.output_transcript.delta"))
    assert said.startswith("You said:") and "moon" in said.lower(), said
    audio = b"".join(base64.b64decode(e["delta"]) for e in live.of("session.output_audio.delta"))
    assert len(audio) >= 2 * RATE_HZ * 0.1 * 4  # the fake speaks 0.1 s per word, at 24 kHz
    assert not live.of("response.event") and not live.of("error"), live.seen  # no delegation
    await connection.session.close(event_id="bye")
    closed = await live.next("session.closed")
    assert (closed["reason"], closed["client_event_id"]) == ("close_requested", "bye")
    assert closed["session"]["id"] == session["id"]
    with pytest.raises(websockets.ConnectionClosedOK):
        await connection.recv_bytes()


async def test_a_spoken_question_calls_a_function_tool_that_the_client_answers(
    live: Events, question: bytes
) -> None:
    connection = live.connection
    delegation = {
        "type": "responses",
        "responses": {"model": "gpt-5-mini", "instructions": "Use tools.", "tools": [MOON_TOOL]},
    }
    await connection.session.start(session={"model": "gpt-live-1", "delegation": delegation})
    started = await live.next("session.started")
    assert started["session"]["delegation"]["responses"]["tools"][0]["name"] == "moon"
    await speak(connection, question)
    created = await live.next("session.delegation.created")
    assert created["delegation"]["target"] == "responses"
    await live.next("session.usage.updated")
    (arguments,) = live.nested("response.function_call_arguments.done")
    (call,) = [e["item"] for e in live.nested("response.output_item.done")]
    assert call["type"] == "function_call" and call["id"] == arguments["item_id"]
    assert call["name"] == "moon" and "moon" in json.loads(call["arguments"])["query"].lower()
    assert [e["type"] for e in live.nested("response.completed")] == ["response.completed"]
    await connection.response.item.create(
        item={"type": "function_call_output", "call_id": call["call_id"], "output": "full"}
    )
    await connection.response.create(event_id="continue")
    await live.next("session.usage.updated")
    said = "".join(e["delta"] for e in live.of("session.output_transcript.delta"))
    assert said.split() == ["The", "moon", "tool", "says", "full."], said
    completed = live.nested("response.completed")
    assert len(completed) == 2 and completed[1]["response"]["usage"]["output_tokens"] > 0
    assert len(live.of("session.delegation.created")) == 1  # the tool's answer continues it
    delegations = {e["delegation_id"] for e in live.of("response.event")}
    assert delegations == {created["delegation"]["id"]}
    assert not live.of("error"), live.seen


async def test_the_delegations_tool_choice_and_output_limit_reach_the_model(
    live: Events, server: FakeOpenAIServer
) -> None:
    connection = live.connection
    forced = {"type": "function", "name": "moon"}
    responses = {"model": "gpt-5-mini", "tools": [MOON_TOOL], "tool_choice": forced}
    delegation = {"type": "responses", "responses": responses}
    await connection.session.start(session={"model": "gpt-live-1", "delegation": delegation})
    started = await live.next("session.started")
    assert started["session"]["delegation"]["responses"]["tool_choice"] == forced
    ask = {"type": "message", "role": "user", "content": "What is new?"}
    await connection.response.item.create(item=ask)
    await connection.response.create()
    await live.next("session.usage.updated")
    (call,) = [e["item"] for e in live.nested("response.output_item.done")]
    assert call["name"] == "moon"  # forced: the question does not name it
    sent = (await server.stats())["last_request"]["chat"]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "moon"}}
    assert sent["model"] == "gpt-5-mini"  # the delegation's, not the deployment's gpt-4o-mini
    limit = {"type": "responses", "responses": {"tool_choice": "auto", "max_output_tokens": 2}}
    await connection.session.update(session={"delegation": limit})
    updated = (await live.next("session.updated"))["session"]["delegation"]["responses"]
    assert (updated["tool_choice"], updated["max_output_tokens"]) == ("auto", 2)
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "full"}
    await connection.response.item.create(item=output)
    await connection.response.create()
    await live.next("session.usage.updated")
    (stopped,) = live.nested("response.incomplete")
    assert stopped["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    said = "".join(e["delta"] for e in live.of("session.output_transcript.delta"))
    assert said.split() == ["The", "moon"], said  # "The moon tool says full.", cut at 2
    assert not live.of("error"), live.seen


async def test_an_unknown_field_in_session_start_gets_an_error_and_no_session(
    transceiver: str,
) -> None:
    async with sdk(transceiver).live.connect() as connection:
        await connection.send_raw(
            json.dumps(
                {
                    "type": "session.start",
                    "event_id": "s1",
                    "session": {"model": "gpt-live-1", "audio": {"output": {"pitch": 2}}},
                }
            )
        )
        events = Events(connection)
        error = (await events.next("error"))["error"]
        assert (error["type"], error["code"], error["param"], error["client_event_id"]) == (
            "invalid_request_error", "unknown_parameter", "session.audio.output.pitch", "s1",
        )  # fmt: skip
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await connection.recv_bytes()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    async with sdk(transceiver).live.connect() as connection:
        await connection.response.create()  # anything but session.start, first
        error = (await Events(connection).next("error"))["error"]
        assert error["code"] == "session_not_started"
    async with sdk(transceiver).live.connect() as connection:
        decisions = {"type": "decisions", "decisions": {"model": "m", "questions": []}}
        await connection.send_raw(json.dumps({"type": "session.start", "session": {
            "model": "gpt-live-1", "delegation": decisions}}))  # fmt: skip
        error = (await Events(connection).next("error"))["error"]
        assert (error["code"], error["param"]) == (
            "unsupported_parameter",
            "session.delegation.type",
        )


async def test_bad_input_gets_errors_and_the_session_goes_on(live: Events) -> None:
    connection = live.connection
    await connection.session.start(session={"model": "gpt-live-1"})
    await live.next("session.started")
    assert (await error_for(live, "{not json"))["code"] == "invalid_json"
    unknown = await error_for(live, json.dumps({"type": "session.explode", "event_id": "e1"}))
    assert (unknown["code"], unknown["param"], unknown["client_event_id"]) == (
        "invalid_value", "type", "e1",
    )  # fmt: skip
    later = await error_for(live, json.dumps({"type": "decision.create", "event_id": "d"}))
    assert later["code"] == "unsupported_event"
    extra = json.dumps({"type": "session.input_audio.append", "audio": "", "gain": 2})
    assert (await error_for(live, extra))["param"] == "gain"
    assert (await error_for(live, b"\x00binary"))["code"] == "invalid_event"
    again = await error_for(live, json.dumps({"type": "session.start", "session": {"model": "m"}}))
    assert again["code"] == "session_already_started"
    await connection.response.create()
    assert (await live.next("error"))["error"]["code"] == "delegation_required"
    prefix, suffix = '{"type": "session.input_audio.append", "audio": "', '"}'
    room = MAX_LIVE_EVENT_BYTES - len(prefix) - len(suffix)
    too_large = prefix + "A" * (room + 4) + suffix
    assert (await error_for(live, too_large))["code"] == "event_too_large"
    await connection.send_raw(prefix + "A" * (room // 4 * 4) + suffix)  # silence, at the limit
    await connection.session.input_audio.mute(event_id="m")
    assert (await live.next("session.input_audio.muted"))["client_event_id"] == "m"
    await connection.session.input_audio.unmute()
    await live.next("session.input_audio.unmuted")
    await connection.session.instructions.append(content="Speak slowly.", delegation_id=None)
    await live.next("session.instructions.appended")
    assert len(live.of("error")) == 8, live.seen  # none for the append at the limit


async def test_auth_and_capacity_are_the_calls(transceiver: str) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with sdk(transceiver, "wrong-key-" + "x" * 16).live.connect():
            pass
    assert refused.value.response.status_code == 401
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(100):  # the other tests' sessions end as their sockets close
            if (await http.get(transceiver + "/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        client = sdk(transceiver)
        connections = [await client.live.connect().enter() for _ in range(CAPACITY)]
        try:
            for connection in connections:
                await connection.session.start(session={"model": "gpt-live-1"})
                await Events(connection).next("session.started")
            assert (await http.get(transceiver + "/readyz")).json()["error"]["code"] == "full"
            with pytest.raises(websockets.InvalidStatus) as full:
                async with client.live.connect():
                    pass
            assert full.value.response.status_code == 503
            assert json.loads(full.value.response.body)["error"]["code"] == "transceiver_full"
        finally:
            for connection in connections:
                await connection.close()
