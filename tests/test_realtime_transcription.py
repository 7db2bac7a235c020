"""Transcription sessions (``type: "transcription"``), with real speech, over both transports.

A real relay process (one worker) in front of a real pipeline transceiver (offline providers:
pocketsphinx hears, auth required). The official ``openai`` SDK, unchanged but for its base URL,
opens a transcription session over the WebSocket (``client.realtime.connect`` with
``intent=transcription``) and mints a client secret for one, with which an aiortc peer makes a
WebRTC call through the relay. Piper's spoken sentence must come back as transcription deltas
and a completed transcript with the right words and a duration ``usage``, and nothing may
answer: no ``response.*`` event, and ``response.create`` is refused; over WebRTC the retrieved
item carries the committed utterance's audio. A second transceiver whose
speech-to-text is the fake OpenAI server's, told to fail, shows ``.failed`` on the item, and the
session going on; a Realtime session on it does the same (and answers the next turn). Every
event received must validate as the SDK's ``RealtimeServerEvent``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
import pytest_asyncio
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from websocket_harness import EventLog, openai_client, spoken_question

from deploy.fake_openai import FakeOpenAIServer
from deploy.processes import Stack, free_port, random_keys, text, transceiver_process
from loadtest.realtime_client import RealtimeClient, call, silence, speak
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
API_KEY = "vr-transcribe-" + os.urandom(12).hex()
SERVER_EVENT = pydantic.TypeAdapter(RealtimeServerEvent)
TRANSCRIBED = "conversation.item.input_audio_transcription"
TRANSCRIPTION_SESSION = {
    "type": "transcription",
    "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe", "language": "en"}}},
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """One relay worker in front of one pipeline transceiver that requires the API key."""
    log_dir: Path = tmp_path_factory.mktemp("transcription")
    running = Stack(log_dir, transceivers=1, workers=1, agent="pipeline")
    env = {"TRANSCEIVER_SECRET_KEYS": running.secret_keys, "TRANSCEIVER_API_KEY": API_KEY}
    env |= {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}  # offline providers whatever the host
    env |= {"PIPELINE_PIPER_NOISE_SCALE": "0", "PIPELINE_PIPER_NOISE_W_SCALE": "0"}
    # Moonshine guesses every 300 ms of speech too, not only at pauses: its partials revise
    # one another, and the deltas must still add up (``assert_deltas_add_up``)
    env |= {"PIPELINE_MOONSHINE_PARTIAL_INTERVAL_MS": "300"}
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    running.transceivers = [
        transceiver_process(
            "transceiver0", running.links[0], http, running.public_text, running.keys, log_dir,
            env, agent="pipeline", auth="required",
        )
    ]  # fmt: skip
    try:
        for process in [*running.transceivers, running.relay]:
            process.start()
        await running.transceivers[0].ready(timeout_s=90)  # the pipeline loads its models
        await running.relay.ready()
        await running.keyed()
        yield running
    finally:
        await running.stop()
    assert "Traceback" not in (log_dir / "transceiver0.log").read_text()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def failing_stt(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """A transceiver whose speech-to-text and language model are the fake OpenAI server's: its
    HTTP base URL. Its log may hold the injected failures' tracebacks (a provider failure is
    logged with it), and no other."""
    log_dir = tmp_path_factory.mktemp("transcription-openai-stt")
    link, http = ("127.0.0.1", free_port()), ("127.0.0.1", free_port(socket.SOCK_STREAM))
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.base_url + "/v1"}
    env |= {"PIPELINE_STT": "openai", "PIPELINE_FALLBACK": "false", "PIPELINE_LLM": "openai"}
    env |= {"TRANSCEIVER_API_KEY": API_KEY, "TRANSCEIVER_SECRET_KEYS": random_keys()}
    process = transceiver_process(
        "transceiver", link, http, "127.0.0.1:3478", random_keys(), log_dir, env,
        agent="pipeline", auth="required",
    )  # fmt: skip
    try:
        await process.start().ready(timeout_s=90)
        yield f"http://{text(http)}"
    finally:
        assert await process.stop() == 0, process.log_tail()
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", (log_dir / "transceiver.log").read_text())
    for record in records:
        injected = ("injected 400 on transcriptions", "injected 400 on chat", "malformed answer")
        assert "Traceback" not in record or any(i in record for i in injected), record


@pytest.fixture(scope="module")
def question() -> bytes:
    """ "Tell me about the moon." (piper, noise off) between silences, PCM16 at 24 kHz."""
    return spoken_question()


class Events(EventLog[AsyncRealtimeConnection]):
    def check(self, event: dict[str, Any]) -> None:
        assert SERVER_EVENT.validate_python(event).type == event["type"], event


@pytest_asyncio.fixture(loop_scope="module")
async def transcribing(stack: Stack) -> AsyncIterator[Events]:
    """A transcription session over the SDK's WebSocket, its session.created read."""
    client = openai_client(stack.base_url(0), API_KEY)
    intent = {"intent": "transcription"}
    async with client.realtime.connect(extra_query=intent) as connection:
        events = Events(connection)
        created = await events.next("session.created")
        assert created["session"]["type"] == "transcription", created
        assert created["session"]["object"] == "realtime.transcription_session"
        yield events


async def hello_answered(connection: AsyncRealtimeConnection) -> Events:
    """Once the session is created, a user's "Hello?" and a response asked for; the events."""
    events = Events(connection)
    await events.next("session.created")
    text = {"type": "input_text", "text": "Hello?"}
    item = {"type": "message", "role": "user", "content": [text]}
    await connection.conversation.item.create(item=item)  # type: ignore[arg-type]
    await connection.response.create()
    return events


async def next_response_completes(connection: AsyncRealtimeConnection, events: Events) -> None:
    await connection.response.create()
    done = (await events.next("response.done"))["response"]
    assert (done["status"], done["status_details"]) == ("completed", None), done


async def append(connection: AsyncRealtimeConnection, pcm: bytes) -> None:
    step = 24_000 * 2 // 5  # 200 ms per append, as a microphone would send
    for start in range(0, len(pcm), step):
        chunk = base64.b64encode(pcm[start : start + step]).decode()
        await connection.input_audio_buffer.append(audio=chunk)


def answered(events: list[dict[str, Any]]) -> list[str]:
    """The types of any events of a response or its audio (a transcription session has none)."""
    kinds = (e["type"] for e in events)
    return [k for k in kinds if k.startswith(("response.", "output_audio_buffer."))]


async def test_a_spoken_sentence_is_transcribed_in_deltas_and_never_answered(
    transcribing: Events, question: bytes
) -> None:
    events, connection = transcribing, transcribing.connection
    await connection.session.update(session=TRANSCRIPTION_SESSION)  # type: ignore[arg-type]
    updated = (await events.next("session.updated"))["session"]
    assert updated["audio"]["input"]["transcription"]["language"] == "en", updated
    assert "create_response" not in updated["audio"]["input"]["turn_detection"], updated
    await append(connection, question)
    started = await events.next("input_audio_buffer.speech_started")
    committed = await events.next("input_audio_buffer.committed")
    item_id = committed["item_id"]
    assert started["item_id"] == item_id
    added = await events.next("conversation.item.added")
    assert added["item"]["id"] == item_id and added["item"]["role"] == "user", added
    completed = await events.next(f"{TRANSCRIBED}.completed")
    assert completed["item_id"] == item_id
    assert "moon" in re.findall(r"[a-z']+", completed["transcript"].lower()), completed
    assert_deltas_add_up(events.seen, completed)
    usage = completed["usage"]
    assert usage["type"] == "duration" and 0.8 < usage["seconds"] < len(question) / 48_000, usage
    error = await refused(events, {"type": "response.create"})
    assert error["code"] == "invalid_value" and error["param"] == "type", error
    assert answered(events.seen) == [], events.types()


def assert_deltas_add_up(seen: list[dict[str, Any]], completed: dict[str, Any]) -> None:
    """The item's transcription deltas came before its ``.completed``, and add up to the start
    of its transcript, or all of it (Moonshine revises its partial guesses: only words two
    guesses agree on are sent, ``transceiver.realtime.stable_words``)."""
    item_id, done_at = completed["item_id"], seen.index(completed)
    kind = f"{TRANSCRIBED}.delta"
    deltas = [(i, e["delta"]) for i, e in enumerate(seen) if e["type"] == kind and
              e["item_id"] == item_id]  # fmt: skip
    assert deltas and all(text for _, text in deltas), [e["type"] for e in seen]
    assert all(i < done_at for i, _ in deltas), [e["type"] for e in seen]
    heard = "".join(text for _, text in deltas)
    assert completed["transcript"].startswith(heard), (heard, completed["transcript"])


async def test_a_realtime_sessions_transcription_deltas_add_up_to_its_transcript(
    stack: Stack, question: bytes
) -> None:
    """The same in a Realtime session (told not to answer: its transcription only)."""
    heard = {"transcription": {"model": "gpt-4o-transcribe"},
             "turn_detection": {"type": "server_vad", "create_response": False}}  # fmt: skip
    client = openai_client(stack.base_url(0), API_KEY)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        events = Events(connection)
        await events.next("session.created")
        session = {"type": "realtime", "audio": {"input": heard}}
        await connection.session.update(session=session)  # type: ignore[arg-type]
        await events.next("session.updated")
        await append(connection, question)
        completed = await events.next(f"{TRANSCRIBED}.completed")
    assert "moon" in re.findall(r"[a-z']+", completed["transcript"].lower()), completed
    assert_deltas_add_up(events.seen, completed)


async def refused(events: Events, event: dict[str, Any]) -> dict[str, Any]:
    await events.connection.send_raw(json.dumps(event))
    error: dict[str, Any] = (await events.next("error"))["error"]
    return error


async def test_push_to_talk_commit_is_transcribed(transcribing: Events, question: bytes) -> None:
    events, connection = transcribing, transcribing.connection
    ptt = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
    await connection.session.update(session=ptt)  # type: ignore[arg-type]
    assert (await events.next("session.updated"))["session"]["audio"]["input"][
        "turn_detection"
    ] is None
    await append(connection, question)
    await connection.input_audio_buffer.commit()
    committed = await events.next("input_audio_buffer.committed")
    completed = await events.next(f"{TRANSCRIBED}.completed")
    assert completed["item_id"] == committed["item_id"]
    assert "moon" in re.findall(r"[a-z']+", completed["transcript"].lower()), completed
    assert completed["usage"]["seconds"] == pytest.approx(len(question) / 48_000, abs=0.05)
    assert "input_audio_buffer.speech_started" not in events.types()
    assert answered(events.seen) == [], events.types()


async def test_a_session_keeps_its_type(transcribing: Events, stack: Stack) -> None:
    realtime = {"type": "session.update", "session": {"type": "realtime", "instructions": "Hi"}}
    error = await refused(transcribing, realtime)
    assert error["param"] == "session.type" and "not allowed" in error["message"], error
    answering = {"turn_detection": {"type": "server_vad", "create_response": True}}
    update = {"type": "transcription", "audio": {"input": answering}}
    error = await refused(transcribing, {"type": "session.update", "session": update})
    assert error["param"] == "session.audio.input.turn_detection.create_response", error
    client = openai_client(stack.base_url(0), API_KEY)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        events = Events(connection)
        await events.next("session.created")
        error = await refused(events, {"type": "session.update", "session": TRANSCRIPTION_SESSION})
        assert error["code"] == "invalid_value" and error["param"] == "session.type", error


async def test_a_client_secret_for_a_transcription_session_transcribes_a_webrtc_call(
    stack: Stack,
) -> None:
    client = openai_client(stack.base_url(0), API_KEY)
    secret = await client.realtime.client_secrets.create(session=TRANSCRIPTION_SESSION)  # type: ignore[arg-type]
    assert secret.session.type == "transcription", secret
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    try:
        spoken = silence(500) + await speak(tts, "Tell me about the moon.") + silence(1500)
    finally:
        await tts.aclose()
    peer = RealtimeClient()
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            auth = {"Authorization": f"Bearer {secret.value}"}
            response = await call(peer, http, stack.base_url(0), auth)
        assert response.status_code == 201, response.text
        assert peer.events[0]["session"]["type"] == "transcription", peer.events[0]
        peer.mic.say(spoken)
        completed = await peer.wait_for(f"{TRANSCRIBED}.completed", timeout_s=60)
        assert "moon" in re.findall(r"[a-z']+", completed["transcript"].lower()), completed
        item_id = completed["item_id"]
        assert_deltas_add_up(peer.events, completed)
        assert completed["usage"]["type"] == "duration" and completed["usage"]["seconds"] > 0.8
        peer.send({"type": "response.create", "event_id": "r1"})
        error = await peer.wait_for("error")
        assert error["error"]["event_id"] == "r1" and error["error"]["param"] == "type", error
        peer.send({"type": "conversation.item.retrieve", "item_id": item_id})
        retrieved = await peer.wait_for("conversation.item.retrieved")
        assert retrieved["item"]["content"][0]["transcript"] == completed["transcript"]
        started = await peer.wait_for("input_audio_buffer.speech_started", _of(item_id))
        stopped = await peer.wait_for("input_audio_buffer.speech_stopped", _of(item_id))
        heard_ms = stopped["audio_end_ms"] - started["audio_start_ms"]
        audio = base64.b64decode(retrieved["item"]["content"][0]["audio"])  # PCM16, 24 kHz
        assert abs(len(audio) / 48 - heard_ms) <= 40, (len(audio), heard_ms)
        assert answered(peer.events) == [], peer.types()
        for event in peer.events:
            assert SERVER_EVENT.validate_python(event).type == event["type"], event
    finally:
        await peer.close()


async def test_a_failed_transcription_is_reported_on_its_item_and_the_session_goes_on(
    failing_stt: str, server: FakeOpenAIServer, question: bytes
) -> None:
    await server.reset()
    await server.control(fail={"transcriptions": [400]})
    client = openai_client(failing_stt, API_KEY)
    try:
        intent = {"intent": "transcription"}
        async with client.realtime.connect(extra_query=intent) as connection:
            events = Events(connection)
            await events.next("session.created")
            await append(connection, question)
            committed = await events.next("input_audio_buffer.committed")
            failed = await events.next(f"{TRANSCRIBED}.failed")
            assert failed["item_id"] == committed["item_id"], failed
            assert failed["error"]["type"] == "server_error", failed
            assert committed["item_id"] in failed["error"]["message"], failed
            await append(connection, question)  # the fake transcribes this one
            completed = await events.next(f"{TRANSCRIBED}.completed")
            assert completed["item_id"] != committed["item_id"]
            assert completed["transcript"].startswith("heard "), completed
            assert "error" not in events.types(), events.seen
            assert answered(events.seen) == [], events.types()
    finally:
        await server.reset()


async def test_a_realtime_sessions_failed_transcription_is_failed_on_its_item_and_not_answered(
    failing_stt: str, server: FakeOpenAIServer, question: bytes
) -> None:
    """In a Realtime session too: the spoken turn and a created audio item whose transcription
    fails get ``.failed`` (no ``error``, no answer); the next spoken turn is heard and answered."""
    await server.reset()
    await server.control(fail={"transcriptions": [400, 400]})
    client = openai_client(failing_stt, API_KEY)
    try:
        async with client.realtime.connect(model="gpt-realtime") as connection:
            events = Events(connection)
            await events.next("session.created")
            await append(connection, question)
            committed = await events.next("input_audio_buffer.committed")
            failed = await events.next(f"{TRANSCRIBED}.failed")
            assert failed["item_id"] == committed["item_id"], failed
            assert failed["error"]["type"] == "server_error", failed
            assert f"item '{committed['item_id']}'" in failed["error"]["message"], failed
            audio = base64.b64encode(question).decode()
            content = [{"type": "input_audio", "audio": audio}]
            item = {"type": "message", "role": "user", "content": content}
            await connection.conversation.item.create(item=item)  # type: ignore[arg-type]
            created = (await events.next("conversation.item.added"))["item"]
            failed = await events.next(f"{TRANSCRIBED}.failed")
            assert failed["item_id"] == created["id"], failed
            await append(connection, question)  # the fake transcribes this one
            completed = await events.next(f"{TRANSCRIBED}.completed")
            assert completed["transcript"].startswith("heard "), completed
            done = (await events.next("response.done"))["response"]
            assert done["status"] == "completed", done
            assert "error" not in events.types(), events.seen
            assert events.types().count("response.created") == 1, events.types()
    finally:
        await server.reset()


async def test_a_failed_response_says_why_in_openais_shape(
    failing_stt: str, server: FakeOpenAIServer
) -> None:
    """The language model fails: ``response.done`` ``failed`` with ``status_details.error``
    (its type and code; the SDK's ``RealtimeResponseStatus`` has no reason for it), after the
    ``error``; the next response completes."""
    await server.reset()
    await server.control(fail={"chat": [400]})
    client = openai_client(failing_stt, API_KEY)
    try:
        async with client.realtime.connect(model="gpt-realtime") as connection:
            events = await hello_answered(connection)
            error = (await events.next("error"))["error"]
            failed = (await events.next("response.done"))["response"]
            assert failed["status"] == "failed", failed
            details = {"type": "failed", "error": {"type": "server_error", "code": error["code"]}}
            assert failed["status_details"] == details, failed
            assert error["code"] == "provider_error", error
            await next_response_completes(connection, events)
    finally:
        await server.reset()


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"[]", "chat chunk is an array, not an object"),
        (b'{"choices": [{"delta": {"content": 5}}]}', "delta.content is a number, not a string"),
    ],
)
async def test_a_chat_stream_of_the_wrong_shape_fails_the_response_and_the_session_goes_on(
    failing_stt: str, server: FakeOpenAIServer, data: bytes, said: str
) -> None:
    """The language model's server streams JSON that is not a chat chunk: the response fails
    as the provider's (an ``error`` naming what was wrong, ``response.done`` failed, no bug in
    the transceiver's log: the fixture checks), and the next response completes."""
    await server.reset()
    stream = b"data: " + data + b"\n\ndata: [DONE]\n\n"
    raw = {"body_base64": base64.b64encode(stream).decode(), "content_type": "text/event-stream"}
    await server.control(raw={"chat": [raw]})
    client = openai_client(failing_stt, API_KEY)
    try:
        async with client.realtime.connect(model="gpt-realtime") as connection:
            events = await hello_answered(connection)
            error = (await events.next("error"))["error"]
            assert error["code"] == "provider_error", error
            assert "ProviderError" in error["message"] and said in error["message"], error
            failed = (await events.next("response.done"))["response"]
            assert failed["status"] == "failed", failed
            await next_response_completes(connection, events)
    finally:
        await server.reset()


def _of(item_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get("item_id") == item_id
