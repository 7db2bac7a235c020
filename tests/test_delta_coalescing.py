"""Transcript deltas joined on the data channel (``transceiver.realtime.delta_coalescing``).

The rules on their own (pure), then over the real thing: an aiortc client calls a pipeline
transceiver (``LoopbackRelay``; pocketsphinx hears, the local OpenAI-compatible server writes
the answer a word a chunk and speaks it) with the window on (the default, 50 ms) and off (0),
and a sideband on the same call sees every event as it is sent. What the client's channel got
is compared with what the sideband saw: the same events in the same order but for the deltas,
whose joined text is the same and the ``.done`` transcript.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from aiortc import RTCSessionDescription
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from websocket_harness import EventLog

from deploy.fake_openai import FakeOpenAIServer
from loadtest.realtime_client import (
    PipelineTransceiver,
    RealtimeClient,
    pipeline_transceiver,
    silence,
    speak,
    user_text,
)
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech
from transceiver.realtime.delta_coalescing import HeldDelta, joinable
from transceiver.realtime.server_events import server_event

TRANSCRIPT = "response.output_audio_transcript.delta"
HEARD = "conversation.item.input_audio_transcription.delta"
HEARD_DONE = "conversation.item.input_audio_transcription.completed"
TURN_TIMEOUT_S = 60.0
Event = dict[str, Any]


def transcript_delta(text: str, item_id: str = "item_1", content_index: int = 0) -> Event:
    where = {"response_id": "resp_1", "item_id": item_id, "output_index": 0}
    return server_event(TRANSCRIPT, **where, content_index=content_index, delta=text)


def sent(held: HeldDelta, events: list[Event]) -> list[Event]:
    out = [ready for event in events for ready in held.add(event)]
    return out + held.take()


def test_consecutive_deltas_of_one_text_go_as_one_with_the_first_event_id() -> None:
    deltas = [transcript_delta(text) for text in ("Coffee ", "is ", "made.")]
    (joined,) = sent(HeldDelta(), deltas)
    assert joined == {**deltas[0], "delta": "Coffee is made."}


def test_any_other_event_lets_the_held_delta_out_first() -> None:
    first, second = transcript_delta("Hello "), transcript_delta("there.")
    done = server_event("response.output_audio_transcript.done", transcript="Hello there.")
    started = server_event("output_audio_buffer.started", response_id="resp_1")
    held = HeldDelta()
    assert held.add(first) == [] and held.holding
    assert held.add(started) == [first, started] and not held.holding
    assert held.add(second) == []
    assert held.add(done) == [second, done]
    assert held.take() == []


def test_deltas_of_other_texts_are_not_joined() -> None:
    deltas = [
        transcript_delta("a", item_id="item_1"),
        transcript_delta("b", item_id="item_2"),
        transcript_delta("c", item_id="item_2", content_index=1),
        server_event("response.output_text.delta", item_id="item_2", content_index=1, delta="d"),
    ]
    assert sent(HeldDelta(), deltas) == deltas


def test_an_input_transcription_delta_with_logprobs_is_never_joined() -> None:
    plain = server_event(HEARD, item_id="item_1", content_index=0, delta="Tell ")
    more = server_event(HEARD, item_id="item_1", content_index=0, delta="me ")
    logprobs = [{"token": "about", "bytes": [97], "logprob": -0.1}]
    scored = server_event(
        HEARD, item_id="item_1", content_index=0, delta="about", logprobs=logprobs
    )
    assert not joinable(scored)
    assert sent(HeldDelta(), [plain, more, scored]) == [{**plain, "delta": "Tell me "}, scored]
    audio = server_event("response.output_audio.delta", item_id="item_1", delta="AAAA")
    assert not joinable(audio)  # the audio's base64 is never joined


# --- over WebRTC, with a sideband watching ------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["50", "0"])
async def transceiver(
    request: pytest.FixtureRequest,
    server: FakeOpenAIServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[str, PipelineTransceiver]]:
    """A transceiver with the window at ``request.param`` ms, whose model and voice are the
    local OpenAI-compatible server (which can hold its answer after the first chunk)."""
    window_ms: str = request.param
    env = {"TRANSCEIVER_REALTIME_DELTA_COALESCE_MS": window_ms}
    env |= {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.base_url + "/v1"}
    env |= {"PIPELINE_STT": "pocketsphinx", "PIPELINE_LLM": "openai", "PIPELINE_TTS": "openai"}
    async with pipeline_transceiver(tmp_path_factory.mktemp("deltas"), env) as running:
        yield window_ms, running


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def question() -> bytes:
    """A spoken question (piper, noise off) between silences, at the peer's 48 kHz."""
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    try:
        return silence(300) + await speak(tts, "Tell me about coffee.") + silence(1000)
    finally:
        await tts.aclose()


async def call_id_of(base_url: str, peer: RealtimeClient) -> str:
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    async with httpx.AsyncClient(timeout=30) as http:
        created = await http.post(
            base_url + "/v1/realtime/calls",
            content=peer.pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        )
    assert created.status_code == 201, created.text
    await peer.pc.setRemoteDescription(RTCSessionDescription(created.text, "answer"))
    await peer.wait_for("session.created", timeout_s=TURN_TIMEOUT_S)
    return created.headers["Location"].rsplit("/", 1)[1]


def deltas_by_text(events: list[Event]) -> dict[tuple[str, str], str]:
    joined: dict[tuple[str, str], str] = {}
    for event in events:
        if joinable(event):
            key = (event["type"], event["item_id"])
            joined[key] = joined.get(key, "") + event["delta"]
    return joined


def deltas_between(events: list[Event]) -> list[tuple[int, str, str, str]]:
    """Each run of deltas of one text, joined, with the number of other events before it."""
    runs: list[tuple[int, str, str, str]] = []
    others = 0
    for event in events:
        if not joinable(event):
            others += 1
            continue
        key = (others, event["type"], event["item_id"])
        if runs and runs[-1][:3] == key:
            runs[-1] = (*key, runs[-1][3] + event["delta"])
        else:
            runs.append((*key, event["delta"]))
    return runs


async def watched_turn(
    running: PipelineTransceiver, peer: RealtimeClient, ask: Callable[[], None]
) -> tuple[list[Event], list[Event]]:
    """A turn ``ask`` starts on a call watched by a sideband: what the call's channel got and
    what the sideband saw, from the sideband's first event to the answer's audio stopped."""
    call_id = await call_id_of(running.base_url, peer)
    sdk = openai.AsyncOpenAI(api_key="none", base_url=running.base_url + "/v1", max_retries=0)
    async with sdk.realtime.connect(call_id=call_id) as connection:
        side = EventLog[AsyncRealtimeConnection](connection)
        detection = {"type": "server_vad", "silence_duration_ms": 400}
        session = {"type": "realtime", "audio": {"input": {"turn_detection": detection}}}
        await connection.session.update(session=session)  # type: ignore[arg-type]
        await side.next("session.updated")
        ask()
        stopped = await side.next("output_audio_buffer.stopped", TURN_TIMEOUT_S)
    await peer.wait_for("output_audio_buffer.stopped", lambda e: e == stopped)
    begin = next(i for i, e in enumerate(peer.events) if e == side.seen[0])
    channel = peer.events[begin : peer.events.index(stopped) + 1]
    return channel, side.seen[: side.seen.index(stopped) + 1]


def check_joined(window_ms: str, channel: list[Event], seen: list[Event]) -> None:
    """The channel's events are the sideband's, but for its transcript deltas, joined (window
    on) or each as it came (off)."""
    assert [e for e in channel if not joinable(e)] == [e for e in seen if not joinable(e)]
    (done,) = [e for e in seen if e["type"] == "response.output_audio_transcript.done"]
    assert deltas_between(channel) == deltas_between(seen)  # each text where it was said
    assert deltas_by_text(channel)[(TRANSCRIPT, done["item_id"])] == done["transcript"]
    chunks = sum(e["type"] == TRANSCRIPT for e in seen)  # the sideband's: one a model chunk
    messages = sum(e["type"] == TRANSCRIPT for e in channel)
    assert chunks > 1, seen
    if window_ms == "0":
        assert channel == seen  # each delta as it came, as before
    else:
        assert messages < chunks, channel
        ids = {e["event_id"] for e in seen}
        assert all(e["event_id"] in ids for e in channel)  # a joined delta keeps its first id


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_voice_turn_s_deltas_heard_and_said_keep_their_text_and_order(
    transceiver: tuple[str, PipelineTransceiver], peer: RealtimeClient, question: bytes
) -> None:
    """A spoken question: the answer's transcript deltas joined (window on) or each as it came
    (off), every other event kept in its place, and the question's own deltas whole."""
    window_ms, running = transceiver
    channel, seen = await watched_turn(running, peer, lambda: peer.mic.say(question))
    check_joined(window_ms, channel, seen)
    (heard,) = [e for e in seen if e["type"] == HEARD_DONE]
    partials = deltas_by_text(channel).get((HEARD, heard["item_id"]))
    assert partials in (None, heard["transcript"]), (partials, heard)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("transceiver", ["50"], indirect=True)  # the window on: the default
async def test_a_held_delta_leaves_when_its_window_ends_while_the_model_pauses(
    transceiver: tuple[str, PipelineTransceiver], server: FakeOpenAIServer, peer: RealtimeClient
) -> None:
    _, running = transceiver
    await call_id_of(running.base_url, peer)
    finished = (await server.stats())["finished"].get("chat", 0)  # the module's calls before
    await server.control(hold=["chat"])  # the model says its first word, then waits
    try:
        start = len(peer.events)
        peer.send(user_text("Tell me about coffee."))
        peer.send({"type": "response.create"})
        first = await peer.wait_for(TRANSCRIPT, after=start, timeout_s=TURN_TIMEOUT_S)
        assert first["delta"] == "You ", first
        assert peer.types(peer.index(first)) == [TRANSCRIPT]  # no other event let it out
        assert (await server.stats())["finished"].get("chat", 0) == finished  # still held
    finally:
        await server.release("chat")  # the module's other turns answer at once
    done = await peer.wait_for("response.output_audio_transcript.done", after=start)
    said = deltas_by_text(peer.events[start:])[(TRANSCRIPT, done["item_id"])]
    assert said == done["transcript"] and said.startswith("You said:"), said
    assert "error" not in peer.types(start)
