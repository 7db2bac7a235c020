"""The conversation is what the client says it is: items created at their place, deleted or
heard from audio change what the model is sent next.

The official ``openai`` SDK (unchanged but for its base URL) over the Realtime WebSocket of one
transceiver process (``websocket_harness``); the model is the fake OpenAI server, whose last
chat request is what the model saw. Every event received is checked against the SDK's
``RealtimeServerEvent`` type (``voicerelay.*`` extensions and the transcription's completed
event, which lacks ``usage``, aside).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pydantic
import pytest
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.types.realtime import RealtimeServerEvent
from websocket_harness import EventLog, error_for, openai_client, spoken_question
from websocket_harness import transceiver_process_with as transceiver_process

from deploy.fake_openai import FakeOpenAIServer

pytestmark = pytest.mark.slow
API_KEY = "vr-conversation-" + os.urandom(12).hex()
SERVER_EVENT = pydantic.TypeAdapter(RealtimeServerEvent)
RULES = "Session rules."


class Events(EventLog[AsyncRealtimeConnection]):
    def check(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if not kind.startswith("voicerelay."):
            SERVER_EVENT.validate_python(event)


@pytest.fixture(scope="module")
def transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("conversation")
    with transceiver_process(server.base_url, API_KEY, 2, log_dir) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def question() -> bytes:
    return spoken_question()


@pytest.fixture
async def events(transceiver: str) -> AsyncIterator[Events]:
    client = openai_client(transceiver, API_KEY)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        log = Events(connection)
        await log.next("session.created")
        await connection.session.update(
            session={"type": "realtime", "instructions": RULES, "output_modalities": ["text"]}
        )
        await log.next("session.updated")
        yield log


def _text(role: str, text: str, kind: str = "input_text") -> dict[str, Any]:
    key = "transcript" if kind == "output_audio" else "text"
    return {"type": "message", "role": role, "content": [{"type": kind, key: text}]}


async def _create(events: Events, item: dict[str, Any], previous: str | None = None) -> Any:
    """The item created (at ``previous``): its conversation.item.added, then .done."""
    event: dict[str, Any] = {"type": "conversation.item.create", "item": item}
    if previous is not None:
        event["previous_item_id"] = previous
    await events.connection.send_raw(json.dumps(event))
    added = await events.next("conversation.item.added")
    done = await events.next("conversation.item.done")
    assert added["item"] == done["item"] and added["previous_item_id"] == done["previous_item_id"]
    return added


async def _answer(events: Events, server: FakeOpenAIServer) -> list[tuple[str, str]]:
    """A response; what the model was sent for it, as (role, words or tool-call ids)."""
    await events.connection.response.create()
    done = await events.next("response.done")
    assert done["response"]["status"] == "completed", done
    sent = (await server.stats())["last_request"]["chat"]["messages"]
    return [(m["role"], m.get("content") or _calls(m)) for m in sent]


def _calls(message: dict[str, Any]) -> str:
    return " ".join(call["id"] for call in message.get("tool_calls") or ())


async def test_created_items_are_what_the_model_sees_in_their_place(
    events: Events, server: FakeOpenAIServer
) -> None:
    question = (await _create(events, _text("user", "first question")))["item"]
    assert await _answer(events, server) == [("system", RULES), ("user", "first question")]
    answer = events.of("response.done")[-1]["response"]["output"][0]
    system = await _create(events, _text("system", "Be terse."), "root")
    assert system["previous_item_id"] is None
    assert system["item"]["content"] == [{"type": "input_text", "text": "Be terse."}]
    remembered = await _create(
        events, _text("assistant", "I remember apples", "output_audio"), question["id"]
    )
    assert remembered["previous_item_id"] == question["id"]
    call = {"type": "function_call", "call_id": "call_x", "name": "get_weather", "arguments": "{}"}
    called = await _create(events, call)
    assert called["previous_item_id"] == answer["id"]
    await _create(events, {"type": "function_call_output", "call_id": "call_x", "output": "sun"})
    await _create(events, _text("user", "what now"))
    assert await _answer(events, server) == [
        ("system", RULES),
        ("system", "Be terse."),
        ("user", "first question"),
        ("assistant", "I remember apples"),
        ("assistant", "You said: first question"),
        ("assistant", "call_x"),
        ("tool", "sun"),
        ("user", "what now"),
    ]
    await events.connection.conversation.item.retrieve(item_id=remembered["item"]["id"])
    retrieved = await events.next("conversation.item.retrieved")
    assert retrieved["item"] == remembered["item"]


async def test_deleted_items_leave_what_the_model_sees(
    events: Events, server: FakeOpenAIServer
) -> None:
    first = (await _create(events, _text("user", "alpha")))["item"]
    await _answer(events, server)
    answer = events.of("response.done")[-1]["response"]["output"][0]
    await _create(events, _text("user", "beta"))
    await _answer(events, server)
    for item_id in (first["id"], answer["id"]):
        await events.connection.conversation.item.delete(item_id=item_id)
        assert (await events.next("conversation.item.deleted"))["item_id"] == item_id
    await _create(events, _text("user", "gamma"))
    assert await _answer(events, server) == [
        ("system", RULES),
        ("user", "beta"),
        ("assistant", "You said: beta"),
        ("user", "gamma"),
    ]
    await events.connection.conversation.item.retrieve(item_id=first["id"])
    assert (await events.next("error"))["error"]["code"] == "item_not_found"


async def test_a_created_audio_item_is_heard_and_its_words_are_what_the_model_sees(
    events: Events, server: FakeOpenAIServer, question: bytes
) -> None:
    greeting = (await _create(events, _text("user", "hello")))["item"]
    audio = base64.b64encode(question).decode("ascii")
    item = {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": audio}]}
    created = await _create(events, item, "root")
    assert created["item"]["content"][0]["transcript"] is None
    await events.connection.response.create()  # waits for the audio's words
    heard = await events.next("conversation.item.input_audio_transcription.completed")
    assert heard["item_id"] == created["item"]["id"] and "moon" in heard["transcript"], heard
    await events.next("response.done")
    sent = (await server.stats())["last_request"]["chat"]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "user"], sent
    assert "moon" in sent[1]["content"] and sent[2]["content"] == "hello", sent
    await events.connection.conversation.item.retrieve(item_id=created["item"]["id"])
    retrieved = (await events.next("conversation.item.retrieved"))["item"]
    assert retrieved["content"][0]["transcript"] == heard["transcript"]
    assert greeting["id"] != created["item"]["id"]


async def test_bad_items_are_refused_by_name(events: Events) -> None:
    for item, previous, code, param in [
        (_text("user", "x"), "item_nope", "invalid_value", "previous_item_id"),
        (_text("developer", "x"), None, "invalid_value", "item.role"),
        (_text("assistant", "x", "input_text"), None, "invalid_value", "item.content[0].type"),
        ({"type": "function_call_output", "call_id": "call_none", "output": "x"}, None,
         "invalid_value", "item.call_id"),
    ]:  # fmt: skip
        event: dict[str, Any] = {"type": "conversation.item.create", "item": item}
        if previous is not None:
            event["previous_item_id"] = previous
        error = await error_for(events, json.dumps(event))
        assert (error["code"], error["param"]) == (code, param), error


async def test_a_response_while_one_is_active_is_refused_as_openai_does(
    events: Events, server: FakeOpenAIServer
) -> None:
    await server.control(hold=["chat"])  # the answer stays in progress after its first word
    try:
        await _create(events, _text("user", "one two three"))
        await events.connection.response.create()
        created = (await events.next("response.created"))["response"]
        await events.next("response.output_text.delta")
        error = await error_for(events, json.dumps({"type": "response.create"}))
    finally:
        await server.release("chat")
    assert error["code"] == "conversation_already_has_active_response", error
    assert error["message"] == (
        f"Conversation already has an active response in progress: {created['id']}."
    )
    done = (await events.next("response.done"))["response"]
    assert (done["id"], done["status"]) == (created["id"], "completed")


def _words(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split()


async def _retrieved_audio(events: Events, item_id: str) -> tuple[dict[str, Any], bytes]:
    await events.connection.conversation.item.retrieve(item_id=item_id)
    item = (await events.next("conversation.item.retrieved"))["item"]
    assert item["id"] == item_id, item
    return item, base64.b64decode(item["content"][0]["audio"])


async def test_retrieved_items_carry_their_audio(events: Events, question: bytes) -> None:
    """The user's committed utterance (as the VAD cut it) and the answer's audio, as OpenAI's
    retrieved items carry them: PCM16 at 24 kHz; a truncated answer keeps what is left."""
    await events.connection.session.update(
        session={"type": "realtime", "output_modalities": ["audio"]}
    )
    await events.next("session.updated")
    step = 24_000 * 2 // 5  # 200 ms per append
    for start in range(0, len(question), step):
        chunk = base64.b64encode(question[start : start + step]).decode("ascii")
        await events.connection.input_audio_buffer.append(audio=chunk)
    started = await events.next("input_audio_buffer.speech_started")
    stopped = await events.next("input_audio_buffer.speech_stopped")
    heard = await events.next("conversation.item.input_audio_transcription.completed")
    done = await events.next("response.done")
    user, user_pcm = await _retrieved_audio(events, stopped["item_id"])
    assert user["content"][0]["type"] == "input_audio"
    assert user["content"][0]["transcript"] == heard["transcript"]
    span_ms = stopped["audio_end_ms"] - started["audio_start_ms"]
    assert abs(len(user_pcm) * 500 / 24_000 - span_ms) <= 40, (len(user_pcm), span_ms)
    answer_id = done["response"]["output"][0]["id"]
    deltas = [e for e in events.of("response.output_audio.delta") if e["item_id"] == answer_id]
    sent = b"".join(base64.b64decode(e["delta"]) for e in deltas)
    answer, answer_pcm = await _retrieved_audio(events, answer_id)
    assert answer["content"][0]["type"] == "output_audio" and sent and answer_pcm == sent
    half_ms = len(sent) * 250 // 24_000
    await events.connection.conversation.item.truncate(
        item_id=answer_id, content_index=0, audio_end_ms=half_ms
    )
    await events.next("conversation.item.truncated")
    _, left = await _retrieved_audio(events, answer_id)
    assert left == sent[: half_ms * 48], (len(left), half_ms)
    audio = base64.b64encode(user_pcm).decode("ascii")
    item = {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": audio}]}
    await _create(events, item)  # the server's speech-to-text hears the retrieved audio again
    again = await events.next("conversation.item.input_audio_transcription.completed")
    assert _words(again["transcript"]) == _words(heard["transcript"]), (again, heard)
    assert "moon" in _words(heard["transcript"]), heard
