"""Semantic end of turn against the 500 ms window, on synthetic speech, in audio time.

``python -m loadtest.bench_end_of_turn`` speaks each utterance with piper (noise off, so the
same audio every run) and segments it twice with webrtcvad: ``server_vad``'s 500 ms window,
and ``semantic_vad`` (auto: the model asked at a 200 ms pause, 700 ms window), the model
answering at once so that where a turn ends depends on the audio alone. Prints, per complete
sentence, how much sooner its turn ends; per sentence with a 600 ms mid-sentence pause, whether
semantic_vad cut it there (the model called it complete); and the model's time per decision
(wall clock, on this machine's load at the time). All of it for each pair of pauses
(``PAUSES_MS``: the model asked at the first, its verdict able to end the turn from the second):
asked and decided at a shorter pause a turn ends sooner, if the model, hearing less of the
pause, does not cut more sentences; asked ahead (100, then 200 ms) the turn ends where it does
at 200 ms, and the model's time and the words' come before that moment instead of after it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from loadtest.voice_audio import silence_pcm, spoken_pcm
from pipeline.config import PiperConfig, VadConfig
from pipeline.end_of_turn import EndOfTurn, Verdict
from pipeline.log_mel import SAMPLE_RATE_HZ
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.smart_turn_file import default_model_path
from pipeline.vad import TurnCommitted, TurnDetector, webrtc_classifier

COMPLETE = (
    "What's the weather like in Berlin today?",
    "Please book me a table for two at seven tonight.",
    "Could you turn off the lights in the kitchen?",
    "How far is the moon from the earth?",
    "What time is it?",
    "Tell me a joke.",
    "Thank you very much.",
    "Where is the nearest train station?",
    "I would like to order a large pizza.",
    "Can you tell me about the moon?",
)
PAUSED = (
    ("I would like to order a", "large pizza with mushrooms."),
    ("So I was thinking that maybe we could", "go to the beach tomorrow."),
    ("Let me think about it, I need", "a few more minutes."),
    ("Because the", "train was late."),
    ("Can you tell me about the", "history of Rome?"),
    ("My name is", "John Smith."),
    ("I want to fly to Paris on", "Monday morning."),
    ("I would like to order a large pizza and", "a salad."),
    ("Could you please", "call my mother?"),
    ("The meeting is at", "three o'clock."),
)
SERVER_VAD = VadConfig()
SEMANTIC_VAD = VadConfig(semantic=True, decision_pause_ms=200, silence_duration_ms=700)
# (asked at, decided from): the model asked at the first pause, its verdict read from the
# second; "not yet" from a question asked ahead is asked again there (pipeline.vad)
PAUSES_MS = ((100, 100), (150, 150), (200, 200), (100, 200))
FRAME_BYTES = SAMPLE_RATE_HZ * 20 // 500


@dataclass
class Segmented:
    ends_ms: list[int]
    probabilities: list[float]


def segment(pcm: bytes, config: VadConfig, model: EndOfTurn, spent_s: list[float]) -> Segmented:
    result = Segmented([], [])

    def ask(utterance: bytes) -> Verdict:
        started_s = time.perf_counter()
        probability = model.probability_complete(utterance)
        spent_s.append(time.perf_counter() - started_s)
        result.probabilities.append(probability)
        return lambda: probability > model.threshold

    detector = TurnDetector(
        config, SAMPLE_RATE_HZ, webrtc_classifier(config, SAMPLE_RATE_HZ), time.monotonic, ask
    )
    for start in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES):
        events = detector.push(pcm[start : start + FRAME_BYTES])
        if any(isinstance(event, TurnCommitted) for event in events):
            result.ends_ms.append(detector.position_ms)
    return result


async def speak(tts: PiperTextToSpeech, parts: Sequence[str]) -> bytes:
    spoken = [await spoken_pcm(tts, part, SAMPLE_RATE_HZ) for part in parts]
    edge = silence_pcm(0.3, SAMPLE_RATE_HZ)
    return edge + silence_pcm(0.6, SAMPLE_RATE_HZ).join(spoken) + edge * 5


def asking(ask_ms: int, decide_ms: int) -> VadConfig:
    """semantic_vad asking the model at ``ask_ms`` of pause, deciding from ``decide_ms``."""
    return replace(SEMANTIC_VAD, ask_pause_ms=ask_ms, decision_pause_ms=decide_ms)


async def run(pauses_ms: Sequence[tuple[int, int]] = PAUSES_MS) -> None:
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    model = EndOfTurn(default_model_path())
    try:
        complete = [(text, await speak(tts, [text])) for text in COMPLETE]
        paused = [(parts, await speak(tts, parts)) for parts in PAUSED]
        for ask_ms, decide_ms in pauses_ms:
            print(f"--- semantic_vad asking at a {ask_ms} ms pause, deciding from {decide_ms}")
            compare(complete, paused, asking(ask_ms, decide_ms), model)
    finally:
        await tts.aclose()
        model.close()


def compare(
    complete: Sequence[tuple[str, bytes]],
    paused: Sequence[tuple[Sequence[str], bytes]],
    config: VadConfig,
    model: EndOfTurn,
) -> None:
    """How much sooner complete sentences end than with the 500 ms window, and how many
    mid-sentence pauses ``config`` cuts."""
    spent_s: list[float] = []
    sooner_ms: list[int] = []
    for text, pcm in complete:
        window = segment(pcm, SERVER_VAD, model, spent_s)
        semantic = segment(pcm, config, model, spent_s)
        sooner_ms.append(window.ends_ms[-1] - semantic.ends_ms[-1])
        said = [round(p, 3) for p in semantic.probabilities]
        print(f"complete  {sooner_ms[-1]:+5d} ms sooner  P={said}  {text}")
    cut = 0
    for parts, pcm in paused:
        semantic = segment(pcm, config, model, spent_s)
        window = segment(pcm, SERVER_VAD, model, spent_s)
        cut += len(semantic.ends_ms) > 1
        verdict = "CUT at the pause" if len(semantic.ends_ms) > 1 else "kept whole"
        said = [round(p, 3) for p in semantic.probabilities]
        print(f"paused    {verdict:16}  window turns={len(window.ends_ms)}  "
              f"P={said}  {' | '.join(parts)}")  # fmt: skip
    print(f"complete turns end sooner: median {statistics.median(sooner_ms)} ms, "
          f"min {min(sooner_ms)} ms, over {len(sooner_ms)}")  # fmt: skip
    print(f"mid-sentence pauses cut by semantic_vad: {cut} of {len(paused)}")
    print(f"model per decision: median {statistics.median(spent_s) * 1000:.1f} ms, "
          f"max {max(spent_s) * 1000:.1f} ms, over {len(spent_s)} (wall clock)")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(run())
