"""OpenAI's Realtime WebSocket transport, driven by the official ``openai`` Python SDK.

One transceiver process (``--agent pipeline``, auth required) whose language model and speech
are the fake OpenAI server (``deploy/server.py``: it answers "You said: …" and calls a
tool whose name the user says) and whose speech-to-text is pocketsphinx, so a spoken question
is really heard. The SDK is unchanged but for its base URL: ``client.realtime.connect()``
sends ``Authorization: Bearer`` on a plain WebSocket to ``/v1/realtime?model=…``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
import websockets
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from websocket_harness import (
    RATE_HZ,
    EventLog,
    ask_in_text,
    error_for,
    openai_client,
    spoken_question,
    transceiver_process_with,
)

from deploy.fake_openai import FakeOpenAIServer
from transceiver.realtime.client_events import MAX_WEBSOCKET_EVENT_BYTES

pytestmark = pytest.mark.slow
API_KEY = "vr-ws-" + os.urandom(12).hex()
CAPACITY = 3
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The transceiver's HTTP base URL."""
    log_dir = tmp_path_factory.mktemp("websocket")
    with transceiver_process_with(server.base_url, API_KEY, CAPACITY, log_dir) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def question() -> bytes:
    """A spoken question (piper, noise off) between silences, PCM16 at 24 kHz."""
    return spoken_question()


def sdk(base_url: str, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai_client(base_url, api_key)


Events = EventLog[AsyncRealtimeConnection]


@pytest.fixture
async def events(transceiver: str) -> AsyncIterator[Events]:
    async with sdk(transceiver).realtime.connect(model="gpt-realtime") as connection:
        yield Events(connection)


async def test_a_text_turn_answers_in_text_and_audio(events: Events) -> None:
    created = await events.next("session.created")
    assert created["session"]["object"] == "realtime.session"
    connection = events.connection
    await connection.session.update(session={"type": "realtime", "instructions": "Be brief."})
    updated = await events.next("session.updated")
    assert updated["session"]["instructions"] == "Be brief."
    await ask_in_text(connection, "hi there")
    done = await events.next("response.done")
    assert done["response"]["status"] == "completed", done
    (item,) = done["response"]["output"]
    assert item["content"][0]["transcript"].split() == ["You", "said:", "hi", "there"]
    deltas = [e for e in events.seen if e["type"] == "response.output_audio.delta"]
    audio = b"".join(base64.b64decode(e["delta"]) for e in deltas)
    assert deltas and all(e["item_id"] == item["id"] for e in deltas)
    assert len(audio) >= 2 * RATE_HZ * 0.1 * 4  # the fake speaks 0.1 s per word, at 24 kHz
    kinds = events.types()
    assert kinds.index("response.output_audio.done") < kinds.index("response.done")
    assert not [k for k in kinds if k.startswith("output_audio_buffer.")], kinds
    assert "error" not in kinds, events.seen


async def test_our_extension_events_come_only_when_asked(transceiver: str) -> None:
    """``voicerelay.turn.metrics`` follows ``response.done`` only on a socket opened with
    ``voicerelay_events=true``: server-side SDKs check every event against their own types."""
    for asked in (False, True):
        query = {"voicerelay_events": "true"} if asked else {}
        client = sdk(transceiver).realtime
        async with client.connect(model="gpt-realtime", extra_query=query) as connection:
            events = Events(connection)
            await events.next("session.created")
            await ask_in_text(connection, "hi there")
            done = await events.next("response.done")
            # sent with response.done when asked for: before anything answered after it
            await connection.session.update(session={"type": "realtime", "instructions": "Hi."})
            await events.next("session.updated")
            metrics = [e for e in events.seen if e["type"] == "voicerelay.turn.metrics"]
            if asked:
                assert [m["response_id"] for m in metrics] == [done["response"]["id"]], metrics
            else:
                assert not metrics, metrics


async def test_an_appended_spoken_question_is_heard_and_answered(
    events: Events, question: bytes
) -> None:
    await events.next("session.created")
    connection = events.connection
    step = RATE_HZ * 2 // 5  # 200 ms per append, as a microphone would send
    for start in range(0, len(question), step):
        chunk = base64.b64encode(question[start : start + step]).decode()
        await connection.input_audio_buffer.append(audio=chunk)
    await events.next("input_audio_buffer.speech_started")
    committed = await events.next("input_audio_buffer.committed")
    heard = await events.next("conversation.item.input_audio_transcription.completed")
    assert heard["item_id"] == committed["item_id"]
    assert "moon" in heard["transcript"].lower().split(), heard
    done = await events.next("response.done")
    assert done["response"]["status"] == "completed", done
    transcript = done["response"]["output"][0]["content"][0]["transcript"]
    assert transcript.startswith("You said:") and "moon" in transcript.lower(), transcript
    assert "response.output_audio.delta" in events.types()


async def test_a_function_tool_round_trip(events: Events) -> None:
    await events.next("session.created")
    connection = events.connection
    await connection.session.update(session={"type": "realtime", "tools": [TOOL]})
    assert (await events.next("session.updated"))["session"]["tools"][0]["name"] == "get_weather"
    question = "Use get_weather for Oslo"
    await ask_in_text(connection, question)
    called = await events.next("response.function_call_arguments.done")
    assert called["name"] == "get_weather" and json.loads(called["arguments"]) == {
        "query": question
    }
    first = await events.next("response.done")
    assert [o["type"] for o in first["response"]["output"]] == ["function_call"]
    await connection.conversation.item.create(
        item={"type": "function_call_output", "call_id": called["call_id"], "output": "sunny"}
    )
    await connection.response.create()
    second = await events.next("response.done")
    answer = second["response"]["output"][0]["content"][0]["transcript"]
    assert answer.split() == ["The", "get_weather", "tool", "says", "sunny."], answer


async def test_truncate_cuts_what_the_model_heard(events: Events) -> None:
    await events.next("session.created")
    connection = events.connection
    words = "one two three four five six seven eight"
    await connection.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": words}]}
    )
    await connection.response.create()
    done = await events.next("response.done")
    item = done["response"]["output"][0]
    audio_ms = sum(
        len(base64.b64decode(e["delta"])) * 500 // RATE_HZ
        for e in events.seen
        if e["type"] == "response.output_audio.delta"
    )
    await connection.conversation.item.truncate(
        item_id=item["id"], content_index=0, audio_end_ms=audio_ms // 2
    )
    truncated = await events.next("conversation.item.truncated")
    assert truncated["audio_end_ms"] == audio_ms // 2
    await connection.conversation.item.retrieve(item_id=item["id"])
    retrieved = await events.next("conversation.item.retrieved")
    heard = retrieved["item"]["content"][0]["transcript"]
    assert 0 < len(heard.split()) < len(item["content"][0]["transcript"].split()), heard
    await connection.send({"type": "conversation.item.truncate", "item_id": item["id"],
                           "content_index": 0, "audio_end_ms": audio_ms * 2})  # fmt: skip
    past = await events.next("error")
    assert (past["error"]["code"], past["error"]["param"]) == ("invalid_value", "audio_end_ms")
    await connection.response.create(response={"output_modalities": ["text"]})
    after = (await events.next("response.done"))["response"]["usage"]["input_token_details"]
    assert after["audio_tokens"] == math.ceil(audio_ms // 2 / 50), after  # what is left of it


async def test_bad_input_gets_openai_errors_and_the_session_goes_on(events: Events) -> None:
    await events.next("session.created")
    invalid = await error_for(events, "{not json")
    assert (invalid["type"], invalid["code"]) == ("invalid_request_error", "invalid_json")
    unknown = await error_for(events, json.dumps({"type": "session.explode", "event_id": "e1"}))
    assert (unknown["code"], unknown["param"], unknown["event_id"]) == (
        "invalid_value",
        "type",
        "e1",
    )
    assert unknown["message"].startswith("Invalid value: 'session.explode'. Supported values are:")
    not_base64 = json.dumps({"type": "input_audio_buffer.append", "audio": "not base64!"})
    assert (await error_for(events, not_base64))["param"] == "audio"
    missing = await error_for(events, json.dumps({"type": "input_audio_buffer.append"}))
    assert (missing["code"], missing["param"]) == ("missing_required_parameter", "audio")
    part = {"type": "input_text", "text": "hi"}
    item = {"type": "message", "role": "user", "content": [part]}
    for stray, param in (
        ({"type": "response.cancel", "reason": "x"}, "reason"),
        ({"type": "conversation.item.create", "item": {**item, "name": "me"}}, "item.name"),
        (
            {"type": "conversation.item.create", "item": {**item, "content": [{**part, "x": 1}]}},
            "item.content[0].x",
        ),
    ):
        error = await error_for(events, json.dumps(stray))
        assert (error["code"], error["param"]) == ("unknown_parameter", param), error
        assert error["message"] == f"Unknown parameter: '{param}'.", error
    binary = await error_for(events, b"\x00\x01binary")
    assert binary["code"] == "invalid_event"
    prefix, suffix = '{"type": "input_audio_buffer.append", "audio": "', '"}'
    room = MAX_WEBSOCKET_EVENT_BYTES - len(prefix) - len(suffix)
    at_limit = prefix + "A" * (room // 4 * 4) + suffix  # silence, just under the limit
    too_large = prefix + "A" * (room + 4) + suffix
    assert (await error_for(events, too_large))["code"] == "event_too_large"
    await events.connection.send_raw(at_limit)
    await events.connection.conversation.item.create(
        item={
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "still here"}],
        }
    )
    added = await events.next("conversation.item.added")
    assert added["item"]["content"][0]["text"] == "still here"
    assert sum(e["type"] == "error" for e in events.seen) == 9, events.seen  # none for at_limit


async def test_auth_is_bearer_or_an_ek_secret(transceiver: str) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with sdk(transceiver, "wrong-key-" + "x" * 16).realtime.connect(model="m"):
            pass
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
    async with httpx.AsyncClient(timeout=10) as http:
        minted = await http.post(
            transceiver + "/v1/realtime/client_secrets",
            json={"session": {"type": "realtime", "instructions": "From the secret."}},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    secret = minted.json()["value"]
    async with sdk(transceiver, secret).realtime.connect(model="gpt-realtime") as connection:
        created = await Events(connection).next("session.created")
    assert created["session"]["instructions"] == "From the secret."
    ws_url = transceiver.replace("http", "ws", 1) + "/v1/realtime?model=gpt-realtime"
    protocols = ["realtime", "openai-insecure-api-key." + secret]
    async with websockets.connect(ws_url, subprotocols=protocols) as browser_like:  # type: ignore[arg-type]
        assert browser_like.subprotocol == "realtime"
        assert json.loads(await browser_like.recv())["type"] == "session.created"


async def test_sessions_count_against_capacity(transceiver: str) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(100):  # the other tests' sessions end as their sockets close
            if (await http.get(transceiver + "/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        client = sdk(transceiver)
        open_sessions = [client.realtime.connect(model="m") for _ in range(CAPACITY)]
        connections = [await manager.enter() for manager in open_sessions]
        try:
            for connection in connections:
                await Events(connection).next("session.created")
            assert (await http.get(transceiver + "/readyz")).json()["error"]["code"] == "full"
            with pytest.raises(websockets.InvalidStatus) as full:
                async with client.realtime.connect(model="m"):
                    pass
            assert full.value.response.status_code == 503
            assert full.value.response.headers["Retry-After"]
            body = json.loads(full.value.response.body)
            assert body["error"]["code"] == "transceiver_full"
        finally:
            for connection in connections:
                await connection.close()


async def test_speech_while_a_response_is_generated_cancels_it(
    events: Events, server: FakeOpenAIServer, question: bytes
) -> None:
    await events.next("session.created")
    connection = events.connection
    await server.control(hold=["chat"])  # the answer stops after its first word
    try:
        await ask_in_text(connection, "hi")
        await events.next("response.output_audio_transcript.delta")
        audio = base64.b64encode(question).decode()
        await connection.input_audio_buffer.append(audio=audio)
        await events.next("input_audio_buffer.speech_started")
        cancelled = await events.next("response.done")
        assert cancelled["response"]["status"] == "cancelled", cancelled
        assert cancelled["response"]["status_details"]["reason"] == "turn_detected"
        await server.release("chat")
        answered = await events.next("response.done")
        assert answered["response"]["status"] == "completed", answered
        transcript = answered["response"]["output"][0]["content"][0]["transcript"]
        assert "moon" in transcript.lower(), transcript
    finally:
        await server.reset()
