"""The turn decision's parts that the machine's load hardly moves, on ``bench_e2e``'s questions.

``python -m loadtest.bench_decision [--repeats N]`` speaks the browser bench's questions with
piper (16 kHz, as the server's VAD hears them) and measures, without the stack:

- ``vad_tail_ms``: the last loud 20 ms block -> the end of the last frame webrtcvad calls
  speech (its own hangover, and the voice's quiet tail it still hears): part of every pause
  the turn detector counts, before the pause's own length starts;
- the end-of-turn model per decision (``EndOfTurn.score``): wall clock and the decision
  thread's CPU time (features and run; one onnxruntime thread);
- Moonshine per question (the words before the pause, as transcribed when the model is asked):
  wall clock and the process's CPU time (its onnxruntime threads).

CPU times are what an idle machine's wall clock would be, near enough (one thread for the
model; Moonshine's pool may spread a decode over both cores, so its wall clock idle can be less
than its CPU time). The browser bench's decision is then about ``vad_tail_ms`` + uplink + the
decision's pause (200 ms), when the model and the words, started at the 100 ms pause, are in
within the 100 ms that follow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench_e2e import QUESTIONS, vad_tail_ms
from loadtest.voice_audio import silence_pcm, spoken_pcm
from pipeline.config import PiperConfig
from pipeline.end_of_turn import EndOfTurn
from pipeline.log_mel import SAMPLE_RATE_HZ
from pipeline.moonshine_stt import MoonshineModel, default_model_folder, read_verified
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.smart_turn_file import default_model_path

PAUSE_S = 0.1  # the silence the model hears when asked ahead


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


def run(repeats: int = 5) -> dict[str, Any]:
    questions = asyncio.run(_questions())
    tails = [vad_tail_ms(pcm) for pcm in questions]
    return {
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "vad_tail_ms": {"per_question": tails, "median": statistics.median(tails)},
        "end_of_turn_model": _model_ms(questions, repeats),
        "moonshine_per_question": _moonshine_ms(questions, repeats),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_decision", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    print(json.dumps(run(parser.parse_args(argv).repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
