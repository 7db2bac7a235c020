"""The turn decision's parts that the machine's load hardly moves, on ``bench_e2e``'s questions.

``python -m loadtest.bench_decision [--repeats N]`` speaks the browser bench's questions with
piper (16 kHz, as the server's VAD hears them) and measures, without the stack:

- ``vad_tail_ms``: the last loud 20 ms block -> the end of the last frame webrtcvad calls
  speech (its own hangover, and the voice's quiet tail it still hears): part of every pause
  the turn detector counts, before the pause's own length starts;
- the end-of-turn model per decision (``EndOfTurn.score``): wall clock and the decision
  thread's CPU time (features and run; one onnxruntime thread);
- Moonshine per question (the words before the pause, as transcribed when the model is asked):
  wall clock and the process's CPU time (its onnxruntime threads);
- the answer's first chunk (``first_chunk``): the rule brain's answer to each question (the
  time one from a fixed clock), the chunker's first chunk of it, and piper's CPU time for it
  (one onnxruntime thread): the speech the early answer makes between the model's "complete"
  and the turn's end, and so most of the server's window (turn ended -> first frame out) when
  it is not made in time.

CPU times are what an idle machine's wall clock would be, near enough (one thread for the
model; Moonshine's pool may spread a decode over both cores, so its wall clock idle can be less
than its CPU time). The browser bench's decision is then about ``vad_tail_ms`` + uplink + the
decision's pause (``VadConfig.decision_pause_ms``, 200 ms), when the model and the words,
started at the pause it is asked ahead at (``ask_pause_ms``, 70 ms), are in within the
``decision_budget`` that follows (``fits``: the model's CPU time is inside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench_e2e import QUESTIONS, vad_tail_ms
from loadtest.voice_audio import silence_pcm, spoken_pcm
from pipeline.chunker import SpeechChunker
from pipeline.config import ChunkerConfig, PiperConfig, VadConfig
from pipeline.end_of_turn import EndOfTurn
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.log_mel import SAMPLE_RATE_HZ
from pipeline.moonshine_stt import MoonshineModel, default_model_folder, read_verified
from pipeline.piper_tts import PiperTextToSpeech, _phonemize, _sentence_pcm
from pipeline.providers import Message, ToolCall
from pipeline.smart_turn_file import default_model_path

VAD = VadConfig()
PAUSE_S = VAD.ask_pause_ms / 1000  # the silence the model hears when asked ahead
ANSWER_CLOCK = datetime(2026, 12, 6, 14, 20, tzinfo=UTC)  # the time question's answer


async def _questions() -> list[bytes]:
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    try:
        return [await spoken_pcm(tts, text, SAMPLE_RATE_HZ) for text in dict.fromkeys(QUESTIONS)]
    finally:
        await tts.aclose()


def _model_ms(questions: Sequence[bytes], repeats: int) -> dict[str, float]:
    model = EndOfTurn(default_model_path())
    try:
        scored = [
            model.score(pcm + silence_pcm(PAUSE_S, SAMPLE_RATE_HZ))
            for _ in range(repeats)
            for pcm in questions
        ]
    finally:
        model.close()
    return {
        "wall_median_ms": round(statistics.median(s.features_ms + s.model_ms for s in scored), 1),
        "features_median_ms": round(statistics.median(s.features_ms for s in scored), 1),
        "cpu_median_ms": round(statistics.median(s.cpu_ms for s in scored), 1),
    }


def _moonshine_ms(questions: Sequence[bytes], repeats: int) -> dict[str, Any]:
    model = MoonshineModel(read_verified(default_model_folder()))
    walls, cpus, heard = [], [], []
    try:
        for _ in range(repeats):
            for pcm in questions:
                samples = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
                wall_s, cpu_s = time.perf_counter(), time.process_time()
                heard.append(model.transcribe(samples))
                cpus.append(time.process_time() - cpu_s)
                walls.append(time.perf_counter() - wall_s)
    finally:
        model.close()
    return {
        "wall_median_ms": round(statistics.median(walls) * 1000, 1),
        "cpu_median_ms": round(statistics.median(cpus) * 1000, 1),
        "heard": heard[: len(questions)],
    }


def rule_answer(question: str) -> str:
    """The rule brain's answer to ``question`` as a call gets it (the time from a fixed
    clock)."""
    agent = LocalRuleBasedAgent(load_knowledge())
    asked = [Message("user", question)]
    reply = agent.decide(asked, {"current_time"})
    if isinstance(reply, ToolCall):
        output = json.dumps({"time": ANSWER_CLOCK.strftime("%H:%M")})  # as current_time's
        called = Message("assistant", "", tool_calls=(reply,))
        result = Message("tool", output, tool_call_id=reply.call_id)
        reply = agent.decide([*asked, called, result], set())
    assert isinstance(reply, str)
    return reply


def first_chunk(answer: str, config: ChunkerConfig | None = None) -> str:
    """The answer's first chunk, as its words stream into the chunker."""
    chunker = SpeechChunker(config)
    for index, word in enumerate(answer.split()):
        if chunks := chunker.push(f" {word}" if index else word):
            return chunks[0]
    return chunker.flush()[0]


async def _first_chunk_ms(repeats: int) -> list[dict[str, Any]]:
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    voice, synthesis = tts._voice, tts._synthesis
    rows = []
    try:
        for question in dict.fromkeys(QUESTIONS):
            chunk = first_chunk(rule_answer(question))
            cpus, audio_ms = [], 0.0
            for _ in range(repeats):
                cpu_s = time.thread_time()
                pcm = b"".join(_sentence_pcm(voice, p, synthesis) for p in _phonemize(voice, chunk))
                cpus.append(time.thread_time() - cpu_s)
                audio_ms = len(pcm) * 500 / voice.config.sample_rate
            cpu_ms = round(statistics.median(cpus) * 1000, 1)
            rows.append({"chunk": chunk, "cpu_median_ms": cpu_ms, "audio_ms": round(audio_ms)})
    finally:
        await tts.aclose()
    return rows


def _budget(model: dict[str, float]) -> dict[str, Any]:
    budget_ms = VAD.decision_pause_ms - VAD.ask_pause_ms
    needed_ms = model["cpu_median_ms"] + model["features_median_ms"]
    return {
        "asked_at_ms": VAD.ask_pause_ms,
        "decided_at_ms": VAD.decision_pause_ms,
        "budget_ms": budget_ms,
        "fits": needed_ms <= budget_ms,
    }


def run(repeats: int = 5) -> dict[str, Any]:
    questions = asyncio.run(_questions())
    tails = [vad_tail_ms(pcm) for pcm in questions]
    model = _model_ms(questions, repeats)
    chunks = asyncio.run(_first_chunk_ms(repeats))
    return {
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "vad_tail_ms": {"per_question": tails, "median": statistics.median(tails)},
        "end_of_turn_model": model,
        "decision_budget": _budget(model),
        "moonshine_per_question": _moonshine_ms(questions, repeats),
        "first_chunk": {
            "per_question": chunks,
            "cpu_median_ms": statistics.median(row["cpu_median_ms"] for row in chunks),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_decision", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    print(json.dumps(run(parser.parse_args(argv).repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
