"""Session settings that are accepted do something, and push-to-talk, over the Realtime
WebSocket, driven by the official ``openai`` Python SDK (unchanged but for its base URL).

One transceiver process for the module (``websocket_harness``): pocketsphinx hears the spoken
question, the fake OpenAI server writes the answers ("You said: ...", one word per delta) and
speaks them (0.1 s of tone per word) in the voice it is asked for. Every event received is
checked against the SDK's own ``RealtimeServerEvent`` type (``voicerelay.*`` extensions aside).
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pydantic
import pytest
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.types.realtime import RealtimeServerEvent
from websocket_harness import (
    RATE_HZ,
    EventLog,
    error_for,
    openai_client,
    spoken_question,
    transceiver_process_with,
)

from deploy.fake_openai import FakeOpenAIServer
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech

pytestmark = pytest.mark.slow
API_KEY = "vr-settings-" + os.urandom(12).hex()
SERVER_EVENT = pydantic.TypeAdapter(RealtimeServerEvent)


class Events(EventLog[AsyncRealtimeConnection]):
    def check(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if not kind.startswith("voicerelay."):
            SERVER_EVENT.validate_python(event)


@pytest.fixture(scope="module")
def transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("settings")
    with transceiver_process_with(server.base_url, API_KEY, 2, log_dir) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def heard_by_openai(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A transceiver whose speech-to-text is OpenAI's too (the fake's), with no fallback."""
    log_dir = tmp_path_factory.mktemp("openai-stt")
    env = {"PIPELINE_STT": "openai", "PIPELINE_FALLBACK": "false"}
    with transceiver_process_with(server.base_url, API_KEY, 1, log_dir, env) as base_url:
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
        yield log


async def say(events: Events, text: str) -> dict[str, Any]:
    """A typed user turn and the response.done that answers it."""
    await events.connection.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )
    await events.connection.response.create()
    return await events.next("response.done")


async def test_the_voice_is_one_the_tts_has_and_is_fixed_once_spoken(
    events: Events, server: FakeOpenAIServer
) -> None:
    created = events.of("session.created")[0]
    assert created["session"]["audio"]["output"]["voice"] == "alloy"  # the deployment's default
    unknown = await error_for(events, _update({"audio": {"output": {"voice": "nobody"}}}))
    assert (unknown["code"], unknown["param"]) == ("invalid_value", "session.audio.output.voice")
    assert "'coral'" in unknown["message"], unknown  # the voices it has are listed
    await events.connection.session.update(
        session={"type": "realtime", "audio": {"output": {"voice": "coral"}}}
    )
    updated = await events.next("session.updated")
    assert updated["session"]["audio"]["output"]["voice"] == "coral"
    done = await say(events, "hi there")
    assert done["response"]["status"] == "completed", done
    assert (await server.stats())["last_request"]["speech"]["voice"] == "coral"
    change = _update({"instructions": "Changed.", "audio": {"output": {"voice": "ash"}}})
    refused = await error_for(events, change)
    assert (refused["code"], refused["param"]) == ("cannot_update_voice", None)
    assert refused["message"] == (
        "Cannot update a conversation's voice if assistant audio is present."
    )
    same = {"type": "realtime", "instructions": "Kept.", "audio": {"output": {"voice": "coral"}}}
    await events.connection.session.update(session=same)  # type: ignore[arg-type]
    kept = await events.next("session.updated")
    assert kept["session"]["instructions"] == "Kept."  # the refused update changed nothing
    assert kept["session"]["audio"]["output"]["voice"] == "coral"


async def test_text_output_answers_in_text_without_speaking(
    events: Events, server: FakeOpenAIServer
) -> None:
    await events.connection.session.update(
        session={"type": "realtime", "output_modalities": ["text"]}
    )
    assert (await events.next("session.updated"))["session"]["output_modalities"] == ["text"]
    spoken_before = (await server.stats())["hits"].get("speech", 0)
    done = await say(events, "hi there")
    response = done["response"]
    assert (response["status"], response["output_modalities"]) == ("completed", ["text"])
    (item,) = response["output"]
    ((part,),) = [item["content"]]
    assert (part["type"], part["text"].strip()) == ("output_text", "You said: hi there"), item
    kinds = events.types()
    text = "".join(e["delta"] for e in events.of("response.output_text.delta"))
    assert text.split() == ["You", "said:", "hi", "there"]
    assert events.of("response.output_text.done")[0]["text"].strip() == "You said: hi there"
    assert not [k for k in kinds if "audio" in k], kinds
    assert (await server.stats())["hits"].get("speech", 0) == spoken_before


async def test_max_output_tokens_stops_the_answer(events: Events) -> None:
    await events.connection.session.update(session={"type": "realtime", "max_output_tokens": 3})
    assert (await events.next("session.updated"))["session"]["max_output_tokens"] == 3
    done = await say(events, "one two three four five")
    response = done["response"]
    assert response["status"] == "incomplete", response
    assert response["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
    transcript = response["output"][0]["content"][0]["transcript"]
    assert transcript.split() == ["You", "said:", "one"], transcript  # one token per delta
    bad = await error_for(events, _update({"max_output_tokens": 0}))
    assert (bad["code"], bad["param"]) == ("invalid_value", "session.max_output_tokens")


async def test_transcription_off_sends_no_transcription_events(
    events: Events, question: bytes
) -> None:
    session = {"type": "realtime", "audio": {"input": {"transcription": None}}}
    await events.connection.session.update(session=session)  # type: ignore[arg-type]
    updated = await events.next("session.updated")
    assert updated["session"]["audio"]["input"]["transcription"] is None
    await _append(events, question)
    committed = await events.next("input_audio_buffer.committed")
    done = await events.next("response.done")
    transcript = done["response"]["output"][0]["content"][0]["transcript"]
    assert "moon" in transcript.lower(), transcript  # the words still reach the model
    assert not [k for k in events.types() if "input_audio_transcription" in k], events.types()
    user_item = next(e for e in events.of("conversation.item.done") if e["item"]["role"] == "user")
    assert user_item["item"]["id"] == committed["item_id"]
    assert user_item["item"]["content"][0]["transcript"] is None


async def test_unknown_and_beta_shaped_fields_are_refused_and_the_update_discarded(
    events: Events,
) -> None:
    for session, param in [
        ({"instructions": "Lost.", "voice": "alloy"}, "session.voice"),
        ({"instructions": "Lost.", "modalities": ["text"]}, "session.modalities"),
        ({"input_audio_transcription": {"model": "w"}}, "session.input_audio_transcription"),
        ({"audio": {"input": {"turn_detection": {"type": "server_vad", "x": 1}}}},
         "session.audio.input.turn_detection.x"),
    ]:  # fmt: skip
        error = await error_for(events, _update(session))
        assert (error["code"], error["param"]) == ("unknown_parameter", param), error
        assert error["message"] == f"Unknown parameter: '{param}'."
    await events.connection.session.update(session={"type": "realtime"})
    updated = await events.next("session.updated")
    assert updated["session"]["instructions"] != "Lost."
    assert updated["session"]["output_modalities"] == ["audio"]


async def test_push_to_talk_commits_what_was_heard_and_answers_it(
    events: Events, question: bytes
) -> None:
    session = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
    await events.connection.session.update(session=session)  # type: ignore[arg-type]
    assert (await events.next("session.updated"))["session"]["audio"]["input"][
        "turn_detection"
    ] is None
    await events.connection.input_audio_buffer.commit()
    empty = await events.next("error")
    assert empty["error"]["code"] == "input_audio_buffer_commit_empty", empty
    await _append(events, question)
    await events.connection.input_audio_buffer.commit()
    committed = await events.next("input_audio_buffer.committed")
    await events.connection.response.create()  # at once: not after the transcript
    done = await events.next("response.done")
    transcript = done["response"]["output"][0]["content"][0]["transcript"]
    assert "moon" in transcript.lower(), transcript
    heard = events.of("conversation.item.input_audio_transcription.completed")
    assert [e["item_id"] for e in heard] == [committed["item_id"]]
    kinds = events.types()
    assert not [k for k in kinds if k.startswith("input_audio_buffer.speech_")], kinds
    assert kinds.count("input_audio_buffer.committed") == 1
    assert kinds.count("response.created") == 1  # no response of its own accord


async def test_usage_counts_the_audio_at_openais_rates_and_transcription_has_its_seconds(
    events: Events, question: bytes
) -> None:
    session = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
    await events.connection.session.update(session=session)  # type: ignore[arg-type]
    await events.next("session.updated")
    await _append(events, question)
    await events.connection.input_audio_buffer.commit()
    await events.connection.response.create()
    heard = await events.next("conversation.item.input_audio_transcription.completed")
    assert heard["usage"]["type"] == "duration", heard
    assert heard["usage"]["seconds"] == pytest.approx(len(question) / (2 * RATE_HZ), abs=0.05)
    first = (await events.next("response.done"))["response"]
    spoken_in = math.ceil(round(heard["usage"]["seconds"] * 1000) / 100)  # 1 a 100 ms
    answer_ms = _audio_ms(events, first["id"])
    assert answer_ms > 0
    _check_usage(first["usage"], audio_in=spoken_in, audio_out=math.ceil(round(answer_ms) / 50))
    await events.connection.conversation.item.create(item=_user("and the sun?"))  # type: ignore[arg-type]
    await events.connection.response.create(response={"output_modalities": ["text"]})
    second = (await events.next("response.done"))["response"]
    # its input: the question heard and the answer spoken (1 token a 50 ms), no audio made
    _check_usage(
        second["usage"], audio_in=spoken_in + math.ceil(round(answer_ms) / 50), audio_out=0
    )


def _audio_ms(events: Events, response_id: str) -> float:
    """The audio the response's deltas carried, in ms."""
    deltas = [
        e for e in events.of("response.output_audio.delta") if e["response_id"] == response_id
    ]
    return sum(len(base64.b64decode(e["delta"])) for e in deltas) * 1000 / (2 * RATE_HZ)


def _check_usage(usage: dict[str, Any], *, audio_in: int, audio_out: int) -> None:
    """The usage's audio tokens, its text tokens the model's, and its totals their sums."""
    details_in, details_out = usage["input_token_details"], usage["output_token_details"]
    assert (details_in["audio_tokens"], details_out["audio_tokens"]) == (audio_in, audio_out), usage
    assert details_in["text_tokens"] > 0 and details_out["text_tokens"] > 0, usage
    assert usage["input_tokens"] == details_in["text_tokens"] + audio_in, usage
    assert usage["output_tokens"] == details_out["text_tokens"] + audio_out, usage
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"], usage
    assert details_in["cached_tokens"] == 0, usage


def _update(session: dict[str, Any]) -> str:
    return json.dumps({"type": "session.update", "session": {"type": "realtime", **session}})


async def _append(events: Events, pcm: bytes) -> None:
    step = RATE_HZ * 2 // 5  # 200 ms per append, as a microphone would send
    for start in range(0, len(pcm), step):
        chunk = base64.b64encode(pcm[start : start + step]).decode()
        await events.connection.input_audio_buffer.append(audio=chunk)


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather."}
CLOCK = {"type": "function", "name": "get_clock", "description": "The clock."}


async def test_tools_are_the_sessions_and_the_builtins_are_listed_and_opt_in(
    events: Events, server: FakeOpenAIServer
) -> None:
    listed = events.of("session.created")[0]["session"]["tools"]
    assert [tool["name"] for tool in listed] == ["current_time", "lookup_knowledge"]
    await _session(events, {"tools": []})
    done = await say(events, "what does current_time say")
    assert done["response"]["output"][0]["type"] == "message", done
    assert "tools" not in (await server.stats())["last_request"]["chat"]  # none offered
    clock = next(tool for tool in listed if tool["name"] == "current_time")
    updated = await _session(events, {"tools": [clock, WEATHER]})
    assert updated["tools"] == [clock, {**WEATHER, "parameters": _NO_PARAMETERS}]
    done = await say(events, "what does current_time say")  # the server runs its built-in
    (item,) = done["response"]["output"]
    assert item["type"] == "message", item
    assert "current_time tool says" in item["content"][0]["transcript"], item
    sent = (await server.stats())["last_request"]["chat"]
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["current_time", "get_weather"]


async def test_tool_choice_required_forced_and_none(
    events: Events, server: FakeOpenAIServer
) -> None:
    await _session(events, {"tools": [WEATHER, CLOCK], "tool_choice": "required"})
    call = await _function_call(events, "hello there")  # names no tool: the choice forces one
    assert call["name"] == "get_weather", call
    assert (await server.stats())["last_request"]["chat"]["tool_choice"] == "required"
    forced = {"type": "function", "name": "get_clock"}
    assert (await _session(events, {"tool_choice": forced}))["tool_choice"] == forced
    call = await _function_call(events, "what is the get_weather")
    assert call["name"] == "get_clock", call
    sent = (await server.stats())["last_request"]["chat"]["tool_choice"]
    assert sent == {"type": "function", "function": {"name": "get_clock"}}
    await _session(events, {"tool_choice": "none"})
    done = await say(events, "what is the get_weather")
    assert [item["type"] for item in done["response"]["output"]] == ["message"], done
    assert "tools" not in (await server.stats())["last_request"]["chat"]


async def test_mcp_tools_and_bad_tool_choices_are_refused_and_the_update_discarded(
    events: Events,
) -> None:
    mcp = {"type": "mcp", "server_label": "docs", "server_url": "https://example.com/mcp"}
    for session, code, param in [
        ({"tools": [WEATHER, mcp]}, "invalid_value", "session.tools[1].type"),
        ({"tool_choice": {"type": "mcp", "server_label": "docs"}}, "invalid_value",
         "session.tool_choice.type"),
        ({"tool_choice": "sometimes"}, "invalid_value", "session.tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
         "invalid_value", "session.tool_choice.name"),
    ]:  # fmt: skip
        error = await error_for(events, _update({"instructions": "Lost.", **session}))
        assert (error["code"], error["param"]) == (code, param), error
        if session.get("tools") == [WEATHER, mcp]:  # OpenAI's words for a value outside a set
            assert error["message"] == "Invalid value: 'mcp'. Supported values are: 'function'."
    updated = await _session(events, {})
    assert updated["instructions"] != "Lost."
    assert [tool["name"] for tool in updated["tools"]] == ["current_time", "lookup_knowledge"]


_NO_PARAMETERS = {"type": "object", "properties": {}}


async def _session(events: Events, session: dict[str, Any]) -> dict[str, Any]:
    """The session after a session.update of ``session``, as session.updated reports it."""
    await events.connection.send_raw(_update(session))
    updated: dict[str, Any] = (await events.next("session.updated"))["session"]
    return updated


async def _function_call(events: Events, text: str) -> dict[str, Any]:
    """The function call that answers ``text`` (its response completed; left unanswered)."""
    done = await say(events, text)
    assert done["response"]["status"] == "completed", done
    (call,) = done["response"]["output"]
    assert call["type"] == "function_call", call
    return dict(call)


async def test_idle_timeout_commits_the_silence_and_answers(events: Events) -> None:
    detection = {"type": "server_vad", "idle_timeout_ms": 5000}
    session = await _session(events, {"audio": {"input": {"turn_detection": detection}}})
    assert session["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 5000
    first = await say(events, "hi there")
    # No speech follows the answer: after its audio and 5 s, the server takes the turn.
    triggered = await events.next("input_audio_buffer.timeout_triggered")
    assert triggered["audio_end_ms"] >= triggered["audio_start_ms"] >= 0, triggered
    committed = await events.next("input_audio_buffer.committed")
    assert committed["item_id"] == triggered["item_id"]
    added = await events.next("conversation.item.added")
    assert (added["item"]["id"], added["item"]["role"]) == (triggered["item_id"], "user")
    assert added["item"]["content"][0]["type"] == "input_audio"
    done = await events.next("response.done")
    assert done["response"]["id"] != first["response"]["id"]
    assert done["response"]["status"] == "completed", done
    for value, code in [(4999, "invalid_value"), (30001, "invalid_value")]:
        bad = {**detection, "idle_timeout_ms": value}
        error = await error_for(events, _update({"audio": {"input": {"turn_detection": bad}}}))
        assert (error["code"], error["param"]) == (
            code, "session.audio.input.turn_detection.idle_timeout_ms"
        ), error  # fmt: skip
    semantic = {"type": "semantic_vad", "idle_timeout_ms": 5000}  # server_vad's alone
    error = await error_for(events, _update({"audio": {"input": {"turn_detection": semantic}}}))
    assert error["code"] == "unknown_parameter", error


async def test_transcription_hints_and_speed_reach_the_providers(
    heard_by_openai: str, server: FakeOpenAIServer, question: bytes
) -> None:
    client = openai_client(heard_by_openai, API_KEY)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        events = Events(connection)
        await events.next("session.created")
        transcription = {"model": "gpt-4o-mini-transcribe", "language": "en", "prompt": "Moon."}
        audio_in = {"transcription": transcription, "noise_reduction": {"type": "far_field"}}
        audio = {"input": audio_in, "output": {"speed": 1.25}}
        session = (await _session(events, {"audio": audio}))["audio"]
        assert session["input"]["transcription"] == transcription
        assert session["input"]["noise_reduction"] == {"type": "far_field", "strength": 1.0}
        assert session["output"]["speed"] == 1.25
        await _append(events, question)
        heard = await events.next("conversation.item.input_audio_transcription.completed")
        assert heard["transcript"].startswith("heard "), heard  # the fake's words for a WAV
        await events.next("response.done")
        sent = (await server.stats())["last_request"]
        assert (sent["transcriptions"]["language"], sent["transcriptions"]["prompt"]) == (
            "en", "Moon."
        )  # fmt: skip
        assert sent["speech"]["speed"] == 1.25
        for value in (0.2, 1.6):
            bad = _update({"audio": {"output": {"speed": value}}})
            error = await error_for(events, bad)
            assert (error["code"], error["param"]) == (
                "invalid_value", "session.audio.output.speed"
            ), error  # fmt: skip
        noise = _update({"audio": {"input": {"noise_reduction": {"type": "loud"}}}})
        error = await error_for(events, noise)
        assert error["param"] == "session.audio.input.noise_reduction.type", error


NOISY_QUESTION = "Please book a table for dinner."
NOISE_ALONE_S = 2.0
NOISE_SNR_DB = 10.0  # below the words' power where they are spoken


@pytest.fixture(scope="module")
def noisy_question() -> tuple[bytes, int]:
    """NOISY_QUESTION (as ``spoken_question`` pads it) in steady white noise (seeded), after
    ``NOISE_ALONE_S`` of the noise alone; and where the words end, in ms."""
    words = np.frombuffer(spoken_question(NOISY_QUESTION), np.int16).astype(np.float64)
    spoken = np.flatnonzero(words)
    lead = int(NOISE_ALONE_S * RATE_HZ)
    signal = np.concatenate([np.zeros(lead), words])
    noise = np.random.default_rng(5).standard_normal(len(signal))
    power = np.mean(words[spoken[0] : spoken[-1]] ** 2)
    signal += noise * np.sqrt(power / 10 ** (NOISE_SNR_DB / 10))
    end_ms = (lead + int(spoken[-1])) * 1000 // RATE_HZ
    return np.clip(signal, -32768, 32767).astype(np.int16).tobytes(), end_ms


@pytest.fixture
def fresh_transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A transceiver whose pocketsphinx has heard nothing yet: a decoder adapts to what it
    hears, so the words it makes of noisy speech depend on the calls before."""
    log_dir = tmp_path_factory.mktemp("fresh")
    with transceiver_process_with(server.base_url, API_KEY, 1, log_dir) as base_url:
        yield base_url


async def test_noise_reduction_hears_a_noisy_question_as_one_turn(
    fresh_transceiver: str, noisy_question: tuple[bytes, int]
) -> None:
    """near_field: the noise alone starts no turn; the question in it is one turn, heard. (The
    same input without noise_reduction, here: a turn that starts in the noise or one whose
    transcript misses the words; see docs/realtime-compat.md.)"""
    client = openai_client(fresh_transceiver, API_KEY)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        events = Events(connection)
        await events.next("session.created")
        await _hear_noisy_question(events, noisy_question)


async def _hear_noisy_question(events: Events, noisy_question: tuple[bytes, int]) -> None:
    audio_in = {"noise_reduction": {"type": "near_field"}}
    session = await _session(events, {"audio": {"input": audio_in}})
    expected = {"type": "near_field", "strength": 1.0}  # OpenAI's default strength
    assert session["audio"]["input"]["noise_reduction"] == expected
    pcm, words_end_ms = noisy_question
    await _append(events, pcm)
    heard = await events.next("conversation.item.input_audio_transcription.completed")
    assert "table" in heard["transcript"].split(), heard
    [started] = events.of("input_audio_buffer.speech_started")
    [stopped] = events.of("input_audio_buffer.speech_stopped")
    assert started["audio_start_ms"] >= NOISE_ALONE_S * 1000, started  # not in the noise
    assert stopped["audio_end_ms"] >= words_end_ms - 300, (stopped, words_end_ms)  # not cut
    assert heard["item_id"] == started["item_id"] == stopped["item_id"]
    await events.next("response.done")


async def test_noise_reduction_filters_push_to_talk_input(
    events: Events, noisy_question: tuple[bytes, int]
) -> None:
    """With turn_detection null the input is filtered too: the committed item's audio (as
    conversation.item.retrieved gives it) has the noise alone at least 6 dB down (near_field's
    floor is -12 dB) and the words' power within 3 dB of what was sent."""
    audio_in = {"turn_detection": None, "noise_reduction": {"type": "near_field"}}
    session = await _session(events, {"audio": {"input": audio_in}})
    assert session["audio"]["input"]["turn_detection"] is None, session
    pcm, words_end_ms = noisy_question
    await _append(events, pcm)
    await events.connection.input_audio_buffer.commit()
    item_id = (await events.next("input_audio_buffer.committed"))["item_id"]
    await events.connection.conversation.item.retrieve(item_id=item_id)
    retrieved = (await events.next("conversation.item.retrieved"))["item"]
    kept = np.frombuffer(base64.b64decode(retrieved["content"][0]["audio"]), np.int16)
    sent = np.frombuffer(pcm, np.int16)
    assert abs(len(kept) - len(sent)) <= RATE_HZ // 10, (len(kept), len(sent))
    noise = slice(RATE_HZ // 2, int(NOISE_ALONE_S * RATE_HZ) - RATE_HZ // 10)  # settled
    words = slice(int(NOISE_ALONE_S * RATE_HZ), words_end_ms * RATE_HZ // 1000)
    assert _db(kept[noise]) <= _db(sent[noise]) - 6, (_db(kept[noise]), _db(sent[noise]))
    assert _db(kept[words]) >= _db(sent[words]) - 3, (_db(kept[words]), _db(sent[words]))
    assert not events.of("input_audio_buffer.speech_started")  # no VAD ran


def _db(samples: np.ndarray[Any, Any]) -> float:
    """The mean power of PCM16 samples, in dB."""
    return float(10 * np.log10(np.mean(samples.astype(np.float64) ** 2) + 1e-9))


async def test_piper_speaks_faster_at_a_higher_speed() -> None:
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    try:
        lengths = []
        for speed in (0.5, 1.0, 1.5):
            speech = tts.synthesize("Tell me about the moon.", None, speed)
            lengths.append(sum([len(chunk.pcm) async for chunk in speech]))
    finally:
        await tts.aclose()
    assert lengths[0] > lengths[1] > lengths[2], lengths


def _user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


async def test_a_response_has_its_own_settings_and_metadata(
    events: Events, server: FakeOpenAIServer
) -> None:
    spoken_before = (await server.stats())["hits"].get("speech", 0)
    await events.connection.conversation.item.create(item=_user("one two three four"))  # type: ignore[arg-type]
    await events.connection.response.create(
        response={
            "instructions": "Count.",
            "output_modalities": ["text"],
            "max_output_tokens": 2,
            "metadata": {"topic": "counting"},
        }  # fmt: skip
    )
    created = (await events.next("response.created"))["response"]
    assert (created["metadata"], created["max_output_tokens"]) == ({"topic": "counting"}, 2)
    assert created["conversation_id"].startswith("conv_"), created
    done = (await events.next("response.done"))["response"]
    assert (done["status"], done["output_modalities"]) == ("incomplete", ["text"]), done
    assert done["output"][0]["content"][0]["text"].split() == ["You", "said:"]
    assert (await server.stats())["last_request"]["chat"]["messages"][0] == {
        "role": "system", "content": "Count."
    }  # fmt: skip
    assert (await server.stats())["hits"].get("speech", 0) == spoken_before
    after = (await say(events, "hi there"))["response"]  # the session's settings again
    assert (after["output_modalities"], after["metadata"]) == (["audio"], None), after
    await events.connection.conversation.item.create(item=_user("hello"))  # type: ignore[arg-type]
    await events.connection.response.create(
        response={"tools": [WEATHER], "tool_choice": "required"}  # type: ignore[list-item]
    )
    (call,) = (await events.next("response.done"))["response"]["output"]
    assert (call["type"], call["name"]) == ("function_call", "get_weather"), call
    sent = (await server.stats())["last_request"]["chat"]
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["get_weather"]
    for response, code, param in [
        ({"tools": [{"type": "mcp", "server_label": "x"}]}, "invalid_value",
         "response.tools[0].type"),
        ({"modalities": ["text"]}, "unknown_parameter", "response.modalities"),
        ({"input": []}, "invalid_value", "response.input"),  # its own context: out of band
        ({"conversation": "other"}, "invalid_value", "response.conversation"),
    ]:  # fmt: skip
        event = json.dumps({"type": "response.create", "response": response})
        error = await error_for(events, event)
        assert (error["code"], error["param"]) == (code, param), error


async def test_out_of_band_responses_run_beside_the_conversation(
    events: Events, server: FakeOpenAIServer
) -> None:
    await say(events, "remember apples")
    await server.control(hold=["speech"])  # the next spoken answer stays in progress
    try:
        await events.connection.conversation.item.create(item=_user("tell me more"))  # type: ignore[arg-type]
        await events.connection.response.create()
        in_band = (await events.next("response.created"))["response"]
        await events.next("response.output_audio.delta")  # its model call is over
        question = [_user("classify: tell me more")]
        await events.connection.response.create(
            response={"conversation": "none", "output_modalities": ["text"],
                      "metadata": {"purpose": "classify"}, "input": question}  # type: ignore[typeddict-item]
        )  # fmt: skip
        aside = (await events.next("response.created"))["response"]
        assert (aside["conversation_id"], aside["metadata"]) == (None, {"purpose": "classify"})
        done = (await events.next("response.done"))["response"]  # while the other speaks
        assert done["id"] == aside["id"], done
        assert done["output"][0]["content"][0]["text"].strip() == "You said: classify: tell me more"
        sent = (await server.stats())["last_request"]["chat"]["messages"]
        assert sent[-1] == {"role": "user", "content": "classify: tell me more"}
        assert not [m for m in sent if "apples" in str(m["content"])], sent  # its own context
    finally:
        await server.release("speech")
    assert (await events.next("response.done"))["response"]["id"] == in_band["id"]
    aside_items = {item["id"] for item in done["output"]}
    joined = [e for e in events.seen if e["type"].startswith("conversation.item.")]
    assert not [e for e in joined if e["item"]["id"] in aside_items], joined
    await say(events, "and now")  # the conversation never had the out-of-band exchange
    sent = (await server.stats())["last_request"]["chat"]["messages"]
    assert not [m for m in sent if "classify" in str(m["content"])], sent
    assert [m["content"] for m in sent if m["role"] == "user"][:2] == [
        "remember apples", "tell me more"
    ]  # fmt: skip


async def test_an_out_of_band_response_answers_spoken_words_in_its_own_voice(
    events: Events, server: FakeOpenAIServer, question: bytes
) -> None:
    detection = {"type": "server_vad", "create_response": False}  # the client decides
    await _session(events, {"audio": {"input": {"turn_detection": detection}}})
    await _append(events, question)
    heard = await events.next("conversation.item.input_audio_transcription.completed")
    assert "moon" in heard["transcript"].lower(), heard
    reference = {"type": "item_reference", "id": heard["item_id"]}
    await events.connection.response.create(
        response={
            "conversation": "none",
            "input": [reference],  # type: ignore[list-item]
            "audio": {"output": {"voice": "ash"}},
            "metadata": {"step": "1"},
        }  # fmt: skip
    )
    created = (await events.next("response.created"))["response"]
    assert created["conversation_id"] is None and created["audio"]["output"]["voice"] == "ash"
    done = (await events.next("response.done"))["response"]
    assert (done["status"], done["output_modalities"]) == ("completed", ["audio"]), done
    transcript = done["output"][0]["content"][0]["transcript"]
    assert "moon" in transcript.lower(), transcript  # the spoken words it was given
    spoken_in = math.ceil(round(heard["usage"]["seconds"] * 1000) / 100)  # its input: the item
    assert done["usage"]["input_token_details"]["audio_tokens"] == spoken_in, done["usage"]
    deltas = events.of("response.output_audio.delta")
    assert deltas and {delta["response_id"] for delta in deltas} == {done["id"]}
    assert (await server.stats())["last_request"]["speech"]["voice"] == "ash"
    joined = [e["item"]["id"] for e in events.seen if e["type"] == "conversation.item.added"]
    assert joined == [heard["item_id"]]  # the user's words only: the answer stayed aside


async def test_an_out_of_band_response_is_cancelled_by_its_id(
    events: Events, server: FakeOpenAIServer
) -> None:
    await server.control(hold=["chat"])  # the model writes one word, then waits
    try:
        await events.connection.response.create(
            response={"conversation": "none", "output_modalities": ["text"],
                      "input": [_user("count to ten")]}  # type: ignore[typeddict-item]
        )  # fmt: skip
        aside = (await events.next("response.created"))["response"]
        await events.next("response.output_text.delta")
        await events.connection.response.cancel(response_id=aside["id"])
        done = (await events.next("response.done"))["response"]
    finally:
        await server.release("chat")
    assert (done["id"], done["status"]) == (aside["id"], "cancelled"), done
    assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    await events.connection.response.cancel(response_id=aside["id"])  # it is over
    assert (await events.next("error"))["error"]["code"] == "response_cancel_not_active"
