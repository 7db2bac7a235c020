"""The offline voice pipeline end to end: real webrtcvad, pocketsphinx, local agent and piper.

Questions are spoken by piper with noise off (deterministic) at test time; answers are heard
again by pocketsphinx. Nothing is faked; the local agent is paced (``tokens_per_s``) where a
test needs the model to be still writing, as a hosted model would be.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import wave
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from loadtest.voice_audio import recognised, silence_pcm, spoken_pcm
from pipeline import events as ev
from pipeline.config import EngineConfig, LocalAgentConfig
from pipeline.engine import ConversationEngine
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.playout import PcmResampler
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.providers import LanguageModelEvent, Message, ToolSpec
from pipeline.tools import ToolRegistry, builtin_tools
from pipeline.turns import MOMENTS, TurnRecord
from pipeline.wav import write_wav

on_module_loop = pytest.mark.asyncio(loop_scope="module")

RATE_HZ = 16000
OUT_RATE_HZ = 24000
REPO = Path(__file__).resolve().parents[1]
KNOWLEDGE = load_knowledge()
MOON = KNOWLEDGE.entries[0]
assert MOON.title == "The moon"
NINE_AM = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def sphinx() -> AsyncIterator[PocketsphinxSpeechToText]:
    stt = PocketsphinxSpeechToText()
    await stt.start()
    yield stt
    await stt.aclose()


async def speak(tts: PiperTextToSpeech, text: str, rate_hz: int = RATE_HZ) -> bytes:
    return await spoken_pcm(tts, text, rate_hz)


def silence(ms: int, rate_hz: int = RATE_HZ) -> bytes:
    return silence_pcm(ms / 1000, rate_hz)


async def hear(stt: PocketsphinxSpeechToText, pcm: bytes, rate_hz: int) -> str:
    finals = await recognised(stt, pcm, rate_hz)
    assert len(finals) == 1
    return finals[0]


class ObservedModel:
    """Passes the local agent through, noting whether each generation ran to its end."""

    def __init__(self, inner: LocalRuleBasedAgent) -> None:
        self.inner, self.name = inner, inner.name
        self.outcomes: list[str] = []

    async def generate(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LanguageModelEvent]:
        outcome = "abandoned"
        try:
            async for event in self.inner.generate(messages, tools):
                yield event
            outcome = "finished"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.outcomes.append(outcome)


def make_engine(
    stt: PocketsphinxSpeechToText,
    tts: PiperTextToSpeech,
    *,
    tokens_per_s: float = 0.0,
    realtime: bool = False,
) -> tuple[ConversationEngine, ObservedModel]:
    model = ObservedModel(LocalRuleBasedAgent(KNOWLEDGE, LocalAgentConfig(tokens_per_s)))
    config = EngineConfig(RATE_HZ, OUT_RATE_HZ, realtime_playout=realtime)
    tools = ToolRegistry(builtin_tools(KNOWLEDGE, lambda: NINE_AM))
    return ConversationEngine(config, stt, model, tts, tools), model


async def collect_until(
    engine: ConversationEngine, done: Callable[[Any], bool], timeout_s: float = 60
) -> list[Any]:
    seen: list[Any] = []
    async with asyncio.timeout(timeout_s), aclosing(engine.events()) as stream:
        async for event in stream:
            seen.append(event)
            if done(event):
                return seen
    raise AssertionError(f"engine closed before the awaited event; saw {seen[-5:]}")


def turn_done(turn: int) -> Callable[[Any], bool]:
    return lambda e: isinstance(e, ev.TurnCompleted) and e.record.turn == turn


def records(seen: list[Any]) -> list[TurnRecord]:
    return [e.record for e in seen if isinstance(e, ev.TurnCompleted)]


def answer_audio(seen: list[Any], response_id: str) -> bytes:
    return b"".join(
        e.pcm for e in seen if isinstance(e, ev.OutputAudio) and e.response_id == response_id
    )


def index_of(seen: list[Any], match: Callable[[Any], bool]) -> int:
    return next(i for i, e in enumerate(seen) if match(e))


@on_module_loop
async def test_round_trip_answer_is_heard_and_every_timestamp_is_in_order(
    piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText
) -> None:
    question = await speak(piper, "Tell me about the moon.")
    engine, _ = make_engine(sphinx, piper)
    async with engine:
        engine.push_audio(silence(300) + question + silence(1000))
        seen = await collect_until(engine, turn_done(1))
    (record,) = records(seen)
    assert "moon" in re.findall(r"[a-z']+", record.transcript.lower())
    assert record.heard_text == MOON.answer and not record.interrupted
    unordered = ("llm_last_token", "turn_asked")  # (turn_asked: semantic_vad's alone)
    stamps = [getattr(record, f"{moment}_s") for moment in MOMENTS if moment not in unordered]
    assert None not in stamps and stamps == sorted(stamps)
    assert record.speech_started_s <= record.llm_last_token_s <= record.response_done_s  # type: ignore[operator]
    assert record.tool_calls == 1  # lookup_knowledge
    assert record.tts_chars == len(MOON.answer) - MOON.answer.count(". ")  # spaces between chunks
    assert record.overhead_ms is not None and record.overhead_ms >= 0
    heard = (await hear(sphinx, answer_audio(seen, "resp_1"), OUT_RATE_HZ)).split()
    assert len({"moon", "earth", "days", "air", "weather"} & set(heard)) >= 2, heard


@on_module_loop
async def test_speech_starts_while_the_model_is_still_writing(
    piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText
) -> None:
    question = await speak(piper, "Tell me about the moon.")
    engine, model = make_engine(sphinx, piper, tokens_per_s=15)
    async with engine:
        engine.push_audio(silence(300) + question + silence(1000))
        seen = await collect_until(engine, turn_done(1))
    (record,) = records(seen)
    assert record.first_tts_audio_s < record.llm_last_token_s  # type: ignore[operator]
    assert record.first_frame_out_s < record.llm_last_token_s  # type: ignore[operator]
    first_audio = index_of(seen, lambda e: isinstance(e, ev.OutputAudio))
    last_text = max(i for i, e in enumerate(seen) if isinstance(e, ev.ResponseTextDelta))
    assert first_audio < last_text
    assert model.outcomes == ["finished", "finished"]  # the tool round, then the answer


@on_module_loop
async def test_barge_in_stops_playout_cancels_the_response_and_truncates_history(
    piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText
) -> None:
    before = asyncio.all_tasks()
    question = await speak(piper, "Tell me about the moon.")
    interruption = await speak(piper, "What time is it?")
    engine, model = make_engine(sphinx, piper, tokens_per_s=5, realtime=True)
    await engine.start()
    engine.push_audio(silence(300) + question + silence(1000))
    played = await _until_frames(engine, 50)
    engine.push_audio(interruption + silence(1000))
    seen = played + await collect_until(engine, turn_done(2))
    await engine.wait_idle(30)
    await engine.aclose()

    barge = max(i for i, e in enumerate(seen) if isinstance(e, ev.SpeechStartedEvent))
    cleared = index_of(seen, lambda e: isinstance(e, ev.OutputCleared))
    done_1 = index_of(seen, lambda e: isinstance(e, ev.ResponseDone) and e.response_id == "resp_1")
    record_1 = index_of(seen, turn_done(1))
    assert barge < cleared < done_1 < record_1
    assert not any(
        isinstance(e, ev.OutputAudio) and e.response_id == "resp_1" for e in seen[barge:]
    )
    assert seen[done_1].status == "cancelled"
    assert model.outcomes[:2] == ["finished", "cancelled"]  # the answer was cut mid-writing

    first, second = records(seen)
    heard = first.heard_text
    assert first.interrupted and heard and MOON.answer.startswith(heard) and heard != MOON.answer
    assert seen[cleared].audio_end_ms == 50 * 20 == first.output_audio_s * 1000
    assert [
        (m.role, m.content) for m in engine.history if m.role in ("user", "assistant") and m.content
    ] == [
        ("user", first.transcript),
        ("assistant", heard),
        ("user", second.transcript),
        ("assistant", "It is nine o'clock in the morning."),
    ]
    assert asyncio.all_tasks() - before == set()


async def _until_frames(engine: ConversationEngine, frames: int) -> list[Any]:
    seen: list[Any] = []
    count = 0

    def enough(event: Any) -> bool:
        nonlocal count
        count += isinstance(event, ev.OutputAudio)
        return count >= frames

    seen += await collect_until(engine, enough)
    return seen


@on_module_loop
async def test_a_question_needing_a_tool_calls_it_and_speaks_its_result(
    piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText
) -> None:
    question = await speak(piper, "What time is it?")
    engine, _ = make_engine(sphinx, piper)
    async with engine:
        engine.push_audio(silence(300) + question + silence(1000))
        seen = await collect_until(engine, turn_done(1))
    (started,) = [e for e in seen if isinstance(e, ev.ToolCallStarted)]
    (completed,) = [e for e in seen if isinstance(e, ev.ToolCallCompleted)]
    assert started.call.name == "current_time"
    assert completed.result.ok and json.loads(completed.result.output)["time"] == "09:00"
    (record,) = records(seen)
    assert record.heard_text == "It is nine o'clock in the morning."
    assert "nine" in (await hear(sphinx, answer_audio(seen, "resp_1"), OUT_RATE_HZ)).split()


@on_module_loop
async def test_a_failing_provider_ends_the_response_with_an_error_not_a_crash(
    piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText
) -> None:
    question = await speak(piper, "What time is it?")
    unstarted = PiperTextToSpeech()  # a real provider in a real failure state
    engine, _ = make_engine(sphinx, unstarted)
    async with engine:
        engine.push_audio(silence(300) + question + silence(1000))
        seen = await collect_until(engine, turn_done(1))
    (error,) = [e for e in seen if isinstance(e, ev.EngineError)]
    assert error.message == "ProviderError: piper: not started" and not error.retryable
    (done,) = [e for e in seen if isinstance(e, ev.ResponseDone)]
    assert done.status == "failed" and done.heard_text == ""
    assert not any(isinstance(e, ev.OutputAudio) for e in seen)


@on_module_loop
async def test_espeak_streams_speech_the_vad_hears_and_survives_abandonment() -> None:
    from pipeline.config import VadConfig
    from pipeline.espeak_tts import EspeakTextToSpeech
    from pipeline.vad import webrtc_classifier

    espeak = EspeakTextToSpeech()
    await espeak.start()
    try:
        async with aclosing(espeak.synthesize("This sentence is abandoned early.")) as first:
            await anext(first)
        chunks = [chunk async for chunk in espeak.synthesize("Tell me about the moon.")]
    finally:
        await espeak.aclose()
    assert len(chunks) > 1 and {c.sample_rate_hz for c in chunks} == {espeak.sample_rate_hz}
    pcm = PcmResampler(espeak.sample_rate_hz, RATE_HZ).push(
        b"".join(c.pcm for c in chunks), last=True
    )
    assert 0.8 < len(pcm) / 2 / RATE_HZ < 3.0
    voiced = webrtc_classifier(VadConfig(), RATE_HZ)
    frames = [pcm[i : i + 640] for i in range(0, len(pcm) - 639, 640)]
    assert sum(map(voiced, frames)) > len(frames) / 2


# --- the CLI, as a real process -----------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@on_module_loop
async def test_cli_runs_a_two_turn_conversation_from_a_wav_file(
    piper: PiperTextToSpeech, tmp_path: Path
) -> None:
    rate_hz = 22050  # piper's own rate: the CLI resamples
    turns = [
        await speak(piper, text, rate_hz)
        for text in ("Tell me about coffee.", "What did I just ask?")
    ]
    pcm = (
        silence(300, rate_hz)
        + turns[0]
        + silence(1200, rate_hz)
        + turns[1]
        + silence(1200, rate_hz)
    )
    write_wav(tmp_path / "question.wav", pcm, rate_hz)
    done = await asyncio.to_thread(
        run_cli, "--in", str(tmp_path / "question.wav"), "--out", str(tmp_path / "answer.wav")
    )
    assert done.returncode == 0, done.stderr
    first, second = [json.loads(line) for line in done.stdout.splitlines()]
    assert (first["turn"], second["turn"]) == (1, 2)
    assert "coffee" in first["transcript"] and first["heard_text"].startswith("Coffee is made")
    assert second["heard_text"] == f"You asked: {first['transcript'].rstrip('?.! ')}."
    with wave.open(str(tmp_path / "answer.wav")) as answer:
        assert answer.getframerate() == OUT_RATE_HZ and answer.getnframes() > OUT_RATE_HZ * 3


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    missing = run_cli("--in", str(tmp_path / "nope.wav"), "--out", str(tmp_path / "a.wav"))
    assert missing.returncode == 2 and "nope.wav: no such file" in missing.stderr
    (tmp_path / "text.wav").write_text("not audio")
    invalid = run_cli("--in", str(tmp_path / "text.wav"), "--out", str(tmp_path / "a.wav"))
    assert invalid.returncode == 2 and "not a readable WAV file" in invalid.stderr
    bad = run_cli("--in", str(tmp_path / "text.wav"), "--out", "x", env={"PIPELINE_STT": "vosk"})
    choices = "PIPELINE_STT must be one of pocketsphinx, moonshine, openai"
    assert bad.returncode == 2 and choices in bad.stderr
    flag = run_cli("--in", "x", "--out", "y", "--vad-threshold", "loud")
    assert (
        flag.returncode == 2 and "PIPELINE_VAD_THRESHOLD" in flag.stderr and "'loud'" in flag.stderr
    )
