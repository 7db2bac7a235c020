"""``python -m loadtest.offline_turn_cpu``: where an offline turn's CPU goes, by stage.

The embedded pipeline's providers opened as a transceiver opens them (``PIPELINE_*`` from the
environment: ``PIPELINE_PIPER_CACHE_MB=0`` turns the speech cache off), one engine without
real-time playout, and the load test's questions (``loadtest.voice_calls.QUESTIONS``, spoken
by piper, resampled to 16 kHz) pushed as PCM, each followed by a second of silence, ``--rounds``
times over. Around each turn it reads the CPU of every thread of this process from
``/proc/self/task`` and sums it by the thread's kernel name (``pipeline.thread_names``:
``pipeline-pool`` is piper, ``moonshine`` the speech-to-text, ``main`` the event loop: VAD,
turns, the rule-based agent, resampling). Prints one JSON line: CPU ms per turn by stage, the
speech cache's hits and misses, ``/proc/loadavg`` after. No WebRTC: the media path's own cost per
call-second is ``loadtest.media_cost``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path

import numpy as np
import soxr

from loadtest.hosts import CLOCK_TICKS_PER_S
from loadtest.voice_calls import QUESTIONS
from pipeline import events as ev
from pipeline.assembly import build_engine, open_providers
from pipeline.config import PipelineConfig
from pipeline.providers import TextToSpeech

RATE_HZ = 16000
LEAD_S, TAIL_S = 0.3, 1.0  # silence before each question, and after it (the VAD's window)


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds of this process's threads by kernel name; the main thread is ``main``."""
    found: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            line = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = line[line.rindex(")") + 2 :].split()
        name = (
            "main"
            if task.name == str(os.getpid())
            else line[line.index("(") + 1 : line.rindex(")")]
        )
        found[name] = found.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S
    return found


async def spoken(tts: TextToSpeech, text: str) -> bytes:
    chunks = [chunk async for chunk in tts.synthesize(text)]
    pcm = np.frombuffer(b"".join(chunk.pcm for chunk in chunks), np.int16)
    return bytes(soxr.resample(pcm, chunks[0].sample_rate_hz, RATE_HZ).astype(np.int16).tobytes())


def silence(seconds: float) -> bytes:
    return bytes(2 * int(RATE_HZ * seconds))


async def measure(rounds: int) -> dict[str, object]:
    config = replace(PipelineConfig.from_env(os.environ), realtime_playout=False)
    config = config.resolved(os.environ)
    async with open_providers(config) as providers:
        questions = [await spoken(providers.tts, text) for text in QUESTIONS]
        cache = providers.pool.speech_cache if providers.pool is not None else None
        lookups = (cache.hits, cache.misses) if cache is not None else (0, 0)
        used: dict[str, float] = {}
        turns = 0
        engine = build_engine(config, providers)
        async with engine, aclosing(engine.events()) as stream:
            for pcm in [question for _ in range(rounds) for question in questions]:
                before = thread_cpu_s()
                engine.push_audio(silence(LEAD_S) + pcm + silence(TAIL_S))
                async for event in stream:
                    if isinstance(event, ev.TurnCompleted):
                        break
                for name, cpu_s in thread_cpu_s().items():
                    used[name] = used.get(name, 0.0) + cpu_s - before.get(name, 0.0)
                turns += 1
    return {
        "turns": turns,
        "cpu_ms_per_turn": {
            name: round(1000 * cpu_s / turns, 1)
            for name, cpu_s in sorted(used.items(), key=lambda item: -item[1])
            if cpu_s > 0
        },
        "total_ms_per_turn": round(1000 * sum(used.values()) / turns, 1),
        "speech_cache_hits_misses": None
        if cache is None
        else [cache.hits - lookups[0], cache.misses - lookups[1]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.offline_turn_cpu", description=__doc__
    )
    parser.add_argument("--rounds", type=int, default=4, help="times over the questions")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.rounds))
    result["loadavg"] = Path("/proc/loadavg").read_text().strip()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
