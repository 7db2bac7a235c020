"""Realtime translation sessions (``client.realtime.translations``), driven by the official
``openai`` SDK unchanged but for its base URL, against real transceiver processes
(``websocket_harness``): pocketsphinx hears, the fake OpenAI server's chat model "translates"
(told to interpret, it answers "In <language>: <the words>"), piper speaks the translation (and
the question: the transceiver's own answer to a typed message).
A transceiver whose language model is the offline rule-based agent refuses a translation
session by name: ``test_call_records.py`` (its stack runs that agent) tries one.

Every server event validates as the SDK's ``RealtimeTranslationServerEvent``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pydantic
import pytest
import websockets
from openai.resources.realtime.translations.translations import AsyncTranslationsConnection
from openai.types.realtime import (
    RealtimeTranslationClientSecretCreateResponse,
    RealtimeTranslationServerEvent,
    RealtimeTranslationSession,
)
from openai.types.realtime import realtime_translation_session_update_request_param as update
from websocket_harness import (
    EVENT_TIMEOUT_S,
    RATE_HZ,
    EventLog,
    ask_in_text,
    error_for,
    heard_words,
    openai_client,
    transceiver_process_with,
)

from deploy.fake_openai import FakeOpenAIServer
from loadtest.voice_audio import silence_pcm

pytestmark = pytest.mark.slow
API_KEY = "vr-translate-" + os.urandom(12).hex()
MODEL = "gpt-realtime-translate"
SERVER_EVENT = pydantic.TypeAdapter(RealtimeTranslationServerEvent)
STEP_BYTES = 2 * RATE_HZ // 5  # 200 ms of PCM16 per append, as OpenAI advises


class Events(EventLog[AsyncTranslationsConnection]):
    def check(self, event: dict[str, Any]) -> None:
        SERVER_EVENT.validate_python(event)
        if "session" in event:
            assert_every_field(event["session"])


def assert_every_field(session: dict[str, Any]) -> None:
    RealtimeTranslationSession.model_validate(session)
    fields = set(RealtimeTranslationSession.model_fields)
    assert set(session) == fields, set(session) ^ fields


@pytest.fixture(scope="module")
def transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("translation")
    speech = {"PIPELINE_TTS": "piper"}  # its noise off: the same words, the same audio
    speech |= {"PIPELINE_PIPER_NOISE_SCALE": "0", "PIPELINE_PIPER_NOISE_W_SCALE": "0"}
    with transceiver_process_with(server.base_url, API_KEY, 2, log_dir, speech) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def question(transceiver: str) -> bytes:
    """ "You said: Tell me about the moon." between silences, PCM16 at 24 kHz, spoken by the
    transceiver's own piper (its answer to a typed message over the Realtime WebSocket), so
    this process loads no piper of its own."""

    async def spoken() -> bytes:
        client = openai_client(transceiver, API_KEY)
        async with client.realtime.connect(model="gpt-realtime") as connection:
            await ask_in_text(connection, "Tell me about the moon.")
            pcm = b""
            async with asyncio.timeout(EVENT_TIMEOUT_S):
                async for event in connection:
                    if event.type == "response.output_audio.delta":
                        pcm += base64.b64decode(event.delta)
                    elif event.type == "response.done":
                        break
        return silence_pcm(0.5, RATE_HZ) + pcm + silence_pcm(1.5, RATE_HZ)

    return asyncio.run(spoken())


@pytest.fixture
def client(transceiver: str) -> openai.AsyncOpenAI:
    return openai_client(transceiver, API_KEY)


@pytest.fixture
async def events(client: openai.AsyncOpenAI) -> AsyncIterator[Events]:
    async with client.realtime.translations.connect(model=MODEL) as connection:
        yield Events(connection)


async def test_spoken_words_come_back_translated_in_text_and_speech(
    events: Events, question: bytes
) -> None:
    created = (await events.next("session.created"))["session"]
    assert (created["model"], created["audio"]["output"]["language"]) == (MODEL, "en")
    connection = events.connection
    whisper: update.AudioInputTranscription = {"model": "gpt-realtime-whisper"}
    await connection.session.update(
        session={"audio": {"input": {"transcription": whisper}, "output": {"language": "fr"}}}
    )
    updated = (await events.next("session.updated"))["session"]
    assert updated["audio"]["input"]["transcription"] == whisper, updated
    assert (updated["id"], updated["audio"]["output"]["language"]) == (created["id"], "fr")
    speech = question + question  # the second utterance ends while the first is translated
    for start in range(0, len(speech), STEP_BYTES):
        chunk = base64.b64encode(speech[start : start + STEP_BYTES]).decode()
        await connection.session.input_audio_buffer.append(audio=chunk)
    await connection.session.close()  # both are translated before the session closes
    await events.next("session.closed")
    utterances = [e["delta"].split() for e in events.of("session.input_transcript.delta")]
    assert len(utterances) == 2 and "moon" in utterances[0], utterances
    heard = "".join(e["delta"] for e in events.of("session.input_transcript.delta"))
    assert heard.split() == utterances[0] + utterances[1], heard  # a space between them
    said = "".join(e["delta"] for e in events.of("session.output_transcript.delta"))
    assert said.split() == [w for u in utterances for w in ["In", "French:", *u]], said
    # aligned: each translation's deltas carry where its utterance stopped, in 200 ms steps
    heard_at = [e["elapsed_ms"] for e in events.of("session.input_transcript.delta")]
    assert heard_at[0] < heard_at[1] and all(ms % 200 == 0 for ms in heard_at), heard_at
    outputs = ("session.output_transcript.delta", "session.output_audio.delta")
    said_at = sorted({e["elapsed_ms"] for e in events.seen if e["type"] in outputs})
    assert said_at == heard_at, (said_at, heard_at)
    deltas = events.of("session.output_audio.delta")
    assert {(e["format"], e["sample_rate"], e["channels"]) for e in deltas} == {
        ("pcm16", RATE_HZ, 1)
    }
    first, second = spoken_translations(events.seen)
    pause = silence_pcm(1.0, RATE_HZ)  # between them, as a listener hears them
    words = await heard_words(first + pause + second)
    # each translation heard, and two thirds of the utterance's words in what was heard:
    # pocketsphinx mishears some of piper's words ("you said" as "he said", "the moon" as "them
    # i'm", "the mum" or "the moment"), which ones by machine (piper's audio differs slightly
    # between CPUs, AVX-512 or AVX2)
    assert words.count("french") == words.count("tell") == 2, " ".join(words)
    uttered = [re.sub(r"[^a-z']", "", word.lower()) for word in utterances[0]]
    unheard = [word for word in uttered if word not in words]
    assert len(unheard) <= len(uttered) // 3, (unheard, uttered, " ".join(words))
    assert "error" not in events.types(), events.seen
    with pytest.raises(websockets.ConnectionClosedOK):
        await events.connection.recv_bytes()  # closed 1000 by the server


def spoken_translations(seen: list[dict[str, Any]]) -> list[bytes]:
    """Each translation's audio: one starts with its text ("In <language>: …", the fake model's
    first word "In"), and the next starts once it is done."""
    parts: list[bytes] = []
    for event in seen:
        if event["type"] == "session.output_transcript.delta" and event["delta"].strip() == "In":
            parts.append(b"")
        elif event["type"] == "session.output_audio.delta":
            parts[-1] += base64.b64decode(event["delta"])
    return parts


async def test_bad_fields_and_events_are_refused_by_name_and_change_nothing(
    events: Events,
) -> None:
    await events.next("session.created")
    output, audio_in = "session.audio.output", "session.audio.input"
    for session, code, param in [
        ({"audio": {"output": {"voice": "marin"}}}, "unknown_parameter", f"{output}.voice"),
        ({"instructions": "Be brief."}, "unknown_parameter", "session.instructions"),
        ({"audio": {"output": {"language": 5}}}, "invalid_type", f"{output}.language"),
        ({"audio": {"output": {"language": "French!"}}}, "invalid_value", f"{output}.language"),
        (
            {"audio": {"output": {"language": "fr"}, "input": {"noise_reduction": {"type": "x"}}}},
            "invalid_value", f"{audio_in}.noise_reduction.type",
        ),
        (
            {"audio": {"input": {"transcription": {}}}},
            "invalid_value", f"{audio_in}.transcription.model",
        ),
    ]:  # fmt: skip
        event = json.dumps({"type": "session.update", "session": session})
        error = await error_for(events, event)
        assert (error["code"], error["param"]) == (code, param), (session, error)
    error = await error_for(events, json.dumps({"type": "response.create"}))
    assert (error["code"], error["param"]) == ("invalid_value", "type"), error
    append = {"type": "session.input_audio_buffer.append", "audio": "not base64!"}
    assert (await error_for(events, json.dumps(append)))["param"] == "audio"
    for extra, key in [
        ({"type": "session.update", "session": {}, "voice": "marin"}, "voice"),
        ({**append, "audio": "", "at": 1}, "at"),
        ({"type": "session.close", "at": 1}, "at"),  # refused: the session stays open
    ]:
        error = await error_for(events, json.dumps(extra))
        refused = ("unknown_parameter", key, f"Unknown parameter: '{key}'.")
        assert (error["code"], error["param"], error["message"]) == refused, error
    noise: update.AudioInputNoiseReduction = {"type": "far_field", "strength": 0.5}
    await events.connection.session.update(session={"audio": {"input": {"noise_reduction": noise}}})
    updated = (await events.next("session.updated"))["session"]
    assert updated["audio"]["output"]["language"] == "en", updated  # the bad updates discarded
    assert updated["audio"]["input"]["noise_reduction"] == noise, updated
    await events.connection.session.close()  # nothing heard: closed at once
    await events.next("session.closed")
    assert not events.of("session.output_transcript.delta"), events.seen


async def test_a_client_secret_starts_its_translation_session(
    client: openai.AsyncOpenAI, transceiver: str
) -> None:
    asked = {"model": MODEL, "audio": {"output": {"language": "es"}}}
    secret = await client.realtime.translations.client_secrets.create(session=asked)  # type: ignore[arg-type]
    body = secret.model_dump()
    RealtimeTranslationClientSecretCreateResponse.model_validate(body)
    assert_every_field(body["session"])
    assert secret.value.startswith("ek_") and secret.session.audio.output.language == "es"  # type: ignore[union-attr]
    browser = openai_client(transceiver, secret.value).realtime.translations
    async with browser.connect(model=MODEL) as connection:
        created = (await Events(connection).next("session.created"))["session"]
    assert created["audio"]["output"]["language"] == "es", created
    with pytest.raises(websockets.InvalidStatus) as denied:  # not a Realtime session's secret
        async with openai_client(transceiver, secret.value).realtime.connect(model="m"):
            pass
    assert denied.value.response.status_code == 400
    error = json.loads(denied.value.response.body)["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "session.type"), error
    bad = {"model": MODEL, "audio": {"output": {"language": "French!"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.realtime.translations.client_secrets.create(session=bad)  # type: ignore[arg-type]
    assert refused.value.body["param"] == "session.audio.output.language"  # type: ignore[index]
    realtime = await client.realtime.client_secrets.create(session={"type": "realtime"})
    with pytest.raises(websockets.InvalidStatus) as denied:
        async with openai_client(transceiver, realtime.value).realtime.translations.connect(
            model=MODEL
        ):
            pass
    assert denied.value.response.status_code == 400
    error = json.loads(denied.value.response.body)["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "client_secret"), error
