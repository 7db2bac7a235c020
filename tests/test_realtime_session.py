"""Voice sessions end to end: an aiortc client speaks piper questions to a real transceiver
process running the offline pipeline (through ``LoopbackRelay``) and hears the answers.

What the client hears is transcribed again with pocketsphinx. Covered: a spoken turn with
every GA event in order, a client-executed tool round trip, and barge-in.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import pytest_asyncio

from deploy.processes import metric_values
from loadtest.realtime_client import (
    PipelineTransceiver,
    RealtimeClient,
    connected,
    hear,
    pipeline_transceiver,
    silence,
    speak,
)
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
module_fixture = pytest_asyncio.fixture(loop_scope="module", scope="module")
TURN_TIMEOUT_S = 30.0


@module_fixture
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PipelineTransceiver]:
    async with pipeline_transceiver(tmp_path_factory.mktemp("realtime")) as running:
        yield running


@module_fixture
async def piper() -> AsyncIterator[PiperTextToSpeech]:
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    yield tts
    await tts.aclose()


@module_fixture
async def sphinx() -> AsyncIterator[PocketsphinxSpeechToText]:
    stt = PocketsphinxSpeechToText()
    await stt.start()
    yield stt
    await stt.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def client(server: PipelineTransceiver) -> AsyncIterator[RealtimeClient]:
    async with connected(server.base_url) as peer:
        yield peer


async def configure(client: RealtimeClient, **session: object) -> dict[str, object]:
    detection = {"type": "server_vad", "silence_duration_ms": 400}
    body = {"audio": {"input": {"turn_detection": detection}}, **session}
    client.send({"type": "session.update", "session": body})
    return await client.wait_for("session.updated")


async def test_a_spoken_question_gets_ga_events_in_order_and_an_audible_answer(
    server: PipelineTransceiver,
    client: RealtimeClient,
    piper: PiperTextToSpeech,
    sphinx: PocketsphinxSpeechToText,
) -> None:
    updated = await configure(client, instructions="Answer briefly.")
    session = updated["session"]
    assert isinstance(session, dict) and session["instructions"] == "Answer briefly."
    assert session["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 400
    start = len(client.events)
    heard_from = len(client.heard)
    client.mic.say(await speak(piper, "Tell me about coffee.") + silence(200))
    done = await client.wait_for("response.done", after=start, timeout_s=TURN_TIMEOUT_S)
    stopped = await client.wait_for("output_audio_buffer.stopped", after=start)
    metrics = await client.wait_for("voicerelay.turn.metrics", after=start)

    user = (await client.wait_for("input_audio_buffer.speech_started", after=start))["item_id"]
    completed = await client.wait_for("conversation.item.input_audio_transcription.completed")
    said = re.findall(r"[a-z']+", completed["transcript"].lower())
    assert completed["item_id"] == user and "coffee" in said
    order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.input_audio_transcription.completed",
        "response.created",
        "response.output_item.added",
        "output_audio_buffer.started",  # transcript deltas stream around it, as they write
        "response.output_audio_transcript.done",
        "response.output_item.done",
        "response.done",  # when generation ends (OpenAI's order): the audio plays on
        "voicerelay.turn.metrics",
        "output_audio_buffer.stopped",
    ]
    types = client.types(start)
    firsts = [types.index(kind) for kind in order]  # each one's first occurrence
    assert firsts == sorted(firsts), types
    response = done["response"]
    assert response["status"] == "completed" and response["usage"]["output_tokens"] > 0
    (item,) = response["output"]
    transcript = item["content"][0]["transcript"]
    assert transcript.startswith("Coffee is made") and stopped["response_id"] == response["id"]
    assert metrics["response_id"] == response["id"] and metrics["speech_stopped_ms"] == 0
    stages = ("stt_final_ms", "llm_first_token_ms", "first_tts_request_ms", "first_audio_ms")
    stages += ("first_frame_out_ms",)
    values = [metrics[name] for name in stages]
    assert all(isinstance(v, float) for v in values) and values == sorted(values), metrics

    words = await hear(sphinx, b"".join(client.heard[heard_from:]))
    assert len({"coffee", "beans", "plant", "people", "awake", "roasted"} & set(words)) >= 2, words
    usage = response["usage"]
    spoken_ms = round(completed["usage"]["seconds"] * 1000)  # the question's audio: 1 a 100 ms
    assert usage["input_token_details"]["audio_tokens"] == math.ceil(spoken_ms / 100), usage
    answer_ms = usage["output_token_details"]["audio_tokens"] * 50  # the answer's: 1 a 50 ms
    played_ms = loud_span_ms(client.heard[heard_from:])
    assert 0.6 * played_ms - 200 < answer_ms < 1.4 * played_ms + 400, (usage, played_ms)
    async with httpx.AsyncClient(timeout=10) as http:
        exposition = (await http.get(server.base_url + "/metrics")).text
    assert metric_values(exposition, "transceiver_turn_stage_seconds_count")
    events = metric_values(exposition, "transceiver_realtime_events_total")
    assert events, exposition


def loud_span_ms(frames: list[bytes]) -> float:
    """From the first to the last loud frame heard (48 kHz PCM16), in ms."""
    loud = [i for i, f in enumerate(frames) if np.abs(np.frombuffer(f, np.int16)).max() > 500]
    assert loud, "nothing loud was heard"
    return sum(len(f) for f in frames[loud[0] : loud[-1] + 1]) / 96


async def test_a_client_executed_tool_round_trip(
    client: RealtimeClient, piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText
) -> None:
    tool = {"type": "function", "name": "current_time", "description": "The time now."}
    tool["parameters"] = {"type": "object", "properties": {}}  # type: ignore[assignment]
    updated = await configure(client, tools=[tool])
    assert [t["name"] for t in updated["session"]["tools"]] == ["current_time"]  # type: ignore[index]
    start = len(client.events)
    client.mic.say(await speak(piper, "What time is it?") + silence(200))
    call = await client.wait_for(
        "response.function_call_arguments.done", after=start, timeout_s=TURN_TIMEOUT_S
    )
    assert call["name"] == "current_time"
    done = await client.wait_for("response.done", after=start)
    assert [o["type"] for o in done["response"]["output"]] == ["function_call"]

    heard_from, start = len(client.heard), len(client.events)
    output = '{"hour": 15, "minute": 30}'
    item = {"type": "function_call_output", "call_id": call["call_id"], "output": output}
    client.send({"type": "conversation.item.create", "item": item})
    await client.wait_for("conversation.item.added", after=start)
    client.send({"type": "response.create"})
    said = await client.wait_for("response.output_audio_transcript.done", after=start)
    assert said["transcript"] == "It is three thirty in the afternoon."
    await client.wait_for("output_audio_buffer.stopped", after=start, timeout_s=TURN_TIMEOUT_S)
    words = await hear(sphinx, b"".join(client.heard[heard_from:]))
    assert {"three", "thirty", "afternoon"} & set(words), words


async def test_barge_in_clears_the_answer_and_the_new_question_is_answered(
    client: RealtimeClient, piper: PiperTextToSpeech
) -> None:
    await configure(client)
    interruption = await speak(piper, "What time is it?") + silence(200)
    start = len(client.events)
    client.mic.say(await speak(piper, "Tell me about the moon.") + silence(200))
    playing = await client.wait_for(
        "output_audio_buffer.started", after=start, timeout_s=TURN_TIMEOUT_S
    )
    first = playing["response_id"]
    client.mic.say(interruption)
    cleared = await client.wait_for("output_audio_buffer.cleared", after=start)
    assert cleared["response_id"] == first
    done = await client.wait_for("response.done", lambda e: e["response"]["id"] == first)
    if client.index(done) < client.index(cleared):  # generated before the barge-in: it was done
        item_id = done["response"]["output"][0]["id"]
        truncated = await client.wait_for(
            "conversation.item.truncated", lambda e: e["item_id"] == item_id
        )
        assert client.index(truncated) > client.index(cleared)
    else:
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "turn_detected"
    answer = await client.wait_for(
        "response.output_audio_transcript.done",
        lambda e: e["response_id"] != first,
        after=client.index(done),
        timeout_s=TURN_TIMEOUT_S,
    )
    assert answer["transcript"].startswith("It is ")
