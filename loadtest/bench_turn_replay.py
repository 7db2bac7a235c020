"""The turn decision and the server's window, in real time, without the browser.

``python -m loadtest.bench_turn_replay [--rounds N]`` opens the offline providers as a
transceiver does (``pipeline.assembly``: Moonshine, the rule brain with its tools, piper in the
shared pool; piper's speech cache off, so every answer is synthesized), sets the web client's
``semantic_vad``, and plays ``bench_e2e``'s questions (spoken by piper) into one engine a
20 ms frame at a time on the loop's clock, each after 0.5 s of silence and followed by 3 s.
Per turn, from the turn's record: ``decided_ms`` (its last voiced frame -> the turn ended: the
decision's pause, 200 ms, and whatever the model's verdict or the words came after it; 700
when the window ended it) and ``window_ms`` (the turn ended -> first frame out: what of the
answer and its first chunk's speech was not made by then), whether it was answered early,
early answers dropped and their providers' time (``early_wasted_ms``: what answers started
at a pause the user went on after cost for nothing). ``--paused``: ``bench_end_of_turn``'s
sentences with a 600 ms pause mid-sentence instead, where every early answer is thrown away.
No network, no browser: the machine's load still moves both, so compare variants interleaved
(A/B/A/B) in one sitting (``PIPELINE_ANSWER_BEFORE_VERDICT=0|1``, ``PIPELINE_VAD_*``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest.bench_e2e import QUESTIONS
from loadtest.bench_end_of_turn import PAUSED
from loadtest.offline_turn_cpu import silence, spoken
from pipeline import events as ev
from pipeline.assembly import build_engine, open_providers
from pipeline.config import PipelineConfig
from pipeline.engine import ConversationEngine
from pipeline.providers import TextToSpeech
from pipeline.turns import TurnRecord

FRAME_S = 0.02
LEAD_S, TAIL_S = 0.5, 3.0
MID_PAUSE_S = 0.6  # between an utterance's parts
Utterance = str | tuple[str, ...]  # a tuple: its parts, with MID_PAUSE_S between them


async def play(engine: ConversationEngine, pcm: bytes, rate_hz: int) -> None:
    """``pcm`` into the engine a frame at a time, each at its moment on the loop's clock."""
    loop = asyncio.get_running_loop()
    frame_bytes = int(rate_hz * FRAME_S) * 2
    due_s = loop.time()
    for start in range(0, len(pcm) - frame_bytes + 1, frame_bytes):
        engine.push_audio(pcm[start : start + frame_bytes])
        due_s += FRAME_S
        await asyncio.sleep(max(0.0, due_s - loop.time()))


def row(record: TurnRecord) -> dict[str, Any]:
    voiced_s = record.last_voiced_s
    return {
        "decided_ms": _ms(voiced_s, record.speech_stopped_s),
        "window_ms": _ms(record.speech_stopped_s, record.first_frame_out_s),
        # from the last voiced frame: the words before the pause in, the answer's first
        # token, its first chunk's first audio (before decided_ms: made while deciding)
        "words_ms": _ms(voiced_s, record.stt_final_s),
        "first_token_ms": _ms(voiced_s, record.llm_first_token_s),
        "first_audio_ms": _ms(voiced_s, record.first_tts_audio_s),
        "verdict_ms": _verdict_ms(record),
        "answered_early": record.answered_early,
        "early_dropped": record.early_answers_discarded,
        "early_wasted_ms": round(record.early_answers_wasted_ms),
        "transcript": record.transcript,
    }


def _verdict_ms(record: TurnRecord) -> int | None:
    """The last voiced frame -> the model's verdict in: asked, then its queue, features and
    run (None unless the pause asked once and the model answered)."""
    decision, asked_s = record.decision, record.turn_asked_s
    if decision is None or decision.complete is None or asked_s is None or decision.asked != 1:
        return None
    took_ms = decision.queued_ms + decision.features_ms + decision.model_ms
    return _ms(record.last_voiced_s, asked_s + took_ms / 1000)


def _ms(start_s: float | None, end_s: float | None) -> int | None:
    return None if start_s is None or end_s is None else round((end_s - start_s) * 1000)


async def speak(tts: TextToSpeech, said: Utterance) -> bytes:
    parts = (said,) if isinstance(said, str) else said
    return silence(MID_PAUSE_S).join([await spoken(tts, part) for part in parts])


async def replay(rounds: int, asked: Sequence[Utterance] = QUESTIONS) -> list[dict[str, Any]]:
    env = dict(os.environ, PIPELINE_PIPER_CACHE_MB="0")
    config = PipelineConfig.from_env(env).resolved(env)
    rows: list[dict[str, Any]] = []
    async with open_providers(config) as providers:
        questions = [await speak(providers.tts, said) for said in dict.fromkeys(asked)]
        engine = build_engine(config, providers)
        vad = replace(engine.config.vad, semantic=True, silence_duration_ms=700)  # the web client's
        engine.reconfigure(replace(engine.config, vad=vad))

        async def collect() -> None:
            async for event in engine.events():
                if isinstance(event, ev.TurnCompleted):
                    rows.append(row(event.record))

        async with engine, asyncio.TaskGroup() as group:
            group.create_task(collect())
            rate_hz = config.engine_config().input_sample_rate_hz
            for question in [q for _ in range(rounds) for q in questions]:
                await play(engine, silence(LEAD_S) + question + silence(TAIL_S), rate_hz)
            await engine.wait_idle(timeout_s=60)
            await engine.aclose()
    return rows


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    decided = [r["decided_ms"] for r in rows if r["decided_ms"] is not None]
    windows = [r["window_ms"] for r in rows if r["window_ms"] is not None]
    return {
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "turns": len(rows),
        "decided_median_ms": statistics.median(decided) if decided else None,
        "window_median_ms": statistics.median(windows) if windows else None,
        **{f"{key}_median": _median(rows, key) for key in STAGES},
        "answered_early": sum(r["answered_early"] for r in rows),
        "early_dropped": sum(r["early_dropped"] for r in rows),
        "early_wasted_ms": sum(r["early_wasted_ms"] for r in rows),
        "per_turn": list(rows),
    }


STAGES = ("words_ms", "verdict_ms", "first_token_ms", "first_audio_ms")


def _median(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_turn_replay", description=__doc__
    )
    parser.add_argument("--rounds", type=int, default=2, help="times through the questions")
    parser.add_argument(
        "--paused", action="store_true", help="sentences with a 600 ms pause mid-sentence"
    )
    args = parser.parse_args(argv)
    asked = PAUSED if args.paused else QUESTIONS
    print(json.dumps(summary(asyncio.run(replay(args.rounds, asked))), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
