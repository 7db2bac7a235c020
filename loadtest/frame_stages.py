"""``python -m loadtest.frame_stages``: the engine's CPU per 20 ms frame of a call's input.

A µ-benchmark beside ``loadtest.media_stages`` (the lean path's per packet, to the decoded
frame): what each frame then costs the pipeline, on recorded human speech
(``loadtest.recorded_speech``: its ten recordings at 16 kHz, the rate the lean path decodes at,
each followed by two seconds of digital silence). Stages, each over every frame:

- ``webrtcvad (its Python wrapper)``: ``webrtcvad.Vad.is_speech``, the reference the ratio is
  taken against (the classifier's C core, which nothing here can make cheaper);
- the classifier as the engine gets it (``pipeline.vad.webrtc_classifier``), the level
  (``pipeline.vad.level_of``, computed on voiced frames with the voice's end on), the turn
  detector (``TurnDetector.push``) with the voice's end off and on (``VadConfig.voice_end_db``:
  on in ``make run``'s stack and the image);
- ``engine.push_audio``: the whole per-frame path of a call's input into a started
  ``ConversationEngine`` (framing, turn detection, the open stretch's audio queue), one
  decoded frame a call, as the lean path pushes it, with the voice's end off and on.

CPU time of this process (``time.process_time``) per frame, in µs, the median of ``--rounds``
rounds, the stages taking turns in each round (a shared machine's other load touches them
alike; the load average is printed beside). ``ratio`` is each stage's cost over webrtcvad's in
the same round: what ``make bench`` reads (``bench_metrics``), its target the whole path's
with the voice's end on (``TARGET_RATIO``).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import webrtcvad

from loadtest import recorded_speech
from loadtest.rounds import flat_metrics, load_average, stage_medians
from pipeline.config import EngineConfig, VadConfig
from pipeline.engine import ConversationEngine
from pipeline.providers import AudioChunk, LanguageModelEvent, Message, ToolSpec, Transcript
from pipeline.vad import TurnDetector, level_of, webrtc_classifier

RATE_HZ = recorded_speech.SAMPLE_RATE_HZ
FRAME_BYTES = 2 * RATE_HZ // 50
GAP_S = 2.0
REFERENCE = "webrtcvad (its Python wrapper)"
# make bench's target: the whole path with the voice's end on, over webrtcvad's own (3.1-3.4
# measured at load ~9, against 4.0-4.5 before the per-frame cuts of 422a751)
TARGET_STAGE = "engine.push_audio, voice's end on"
TARGET_RATIO = 3.6
VOICE_END_ON = VadConfig(voice_end_db=40.0)  # make run's value (deploy.local.OFFLINE_DEFAULTS)


def speech_frames(recordings: Sequence[bytes]) -> list[bytes]:
    """The recordings back to back, each with ``GAP_S`` of silence after it, in 20 ms frames."""
    pcm = b"".join(speech + bytes(int(2 * RATE_HZ * GAP_S)) for speech in recordings)
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]


class CollectingSpeechToText:
    """Takes a stretch's audio as the API transcription does (all of it, then one request)
    and answers nothing: what is measured is the frames, not the request."""

    name = "collecting"

    async def transcribe(self, audio: AsyncIterator[AudioChunk]) -> AsyncIterator[Transcript]:
        async for _ in audio:
            pass
        yield Transcript("", final=True)


class SilentLanguageModel:
    """Never asked: the engine is told not to answer (``create_response=False``)."""

    name = "silent"

    async def generate(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LanguageModelEvent]:
        for _ in ():
            yield _


class SilentTextToSpeech:
    name = "silent"
    voices = ("none",)

    async def synthesize(self, text: str, voice: str | None = None) -> AsyncIterator[AudioChunk]:
        for _ in ():
            yield _


def per_frame_us(work: Callable[[bytes], Any], frames: Sequence[bytes]) -> float:
    started = time.process_time()
    for frame in frames:
        work(frame)
    return (time.process_time() - started) / len(frames) * 1e6


def detector_push(config: VadConfig) -> Callable[[bytes], Any]:
    return TurnDetector(config, RATE_HZ, webrtc_classifier(config, RATE_HZ), time.monotonic).push


async def engine_us(config: VadConfig, frames: Sequence[bytes]) -> float:
    """``push_audio`` of every frame into a started engine; the loop runs between seconds of
    them (the stretches' audio drained as in a call), outside the time counted."""
    engine_config = EngineConfig(input_sample_rate_hz=RATE_HZ, create_response=False, vad=config)
    engine = ConversationEngine(
        engine_config, CollectingSpeechToText(), SilentLanguageModel(), SilentTextToSpeech()
    )
    await engine.start()
    drained = asyncio.create_task(_drain(engine))
    cpu_s = 0.0
    try:
        for start in range(0, len(frames), 50):
            started = time.process_time()
            for frame in frames[start : start + 50]:
                engine.push_audio(frame)
            cpu_s += time.process_time() - started
            await asyncio.sleep(0)
    finally:
        await engine.aclose()
        await drained
    return cpu_s / len(frames) * 1e6


async def _drain(engine: ConversationEngine) -> None:
    async for _ in engine.events():
        pass


def one_round(frames: Sequence[bytes]) -> dict[str, float]:
    vad = webrtcvad.Vad(VadConfig().aggressiveness)
    return {
        REFERENCE: per_frame_us(lambda frame: vad.is_speech(frame, RATE_HZ), frames),
        "classifier (webrtc_classifier)": per_frame_us(
            webrtc_classifier(VadConfig(), RATE_HZ), frames
        ),
        "level (level_of)": per_frame_us(level_of, frames),
        "TurnDetector.push, voice's end off": per_frame_us(detector_push(VadConfig()), frames),
        "TurnDetector.push, voice's end on": per_frame_us(detector_push(VOICE_END_ON), frames),
        "engine.push_audio, voice's end off": asyncio.run(engine_us(VadConfig(), frames)),
        "engine.push_audio, voice's end on": asyncio.run(engine_us(VOICE_END_ON, frames)),
    }


def run_frame_stages_bench(rounds: int = 7) -> dict[str, Any]:
    """Each stage's median µs per frame and its median ratio to webrtcvad's, and the load."""
    folder = recorded_speech.fetch()  # nothing is downloaded when checked copies are there
    recordings = [recorded_speech.read_pcm(r, folder) for r in recorded_speech.RECORDINGS]
    frames = speech_frames(recordings)
    timings = [one_round(frames) for _ in range(rounds)]
    stages = stage_medians(timings, REFERENCE, "frame")
    return {"frames": len(frames), "rounds": rounds, "load": load_average(), "stages": stages}


def bench_metrics(quick: bool = False) -> dict[str, Any]:
    """``make bench``'s figures, flat: each stage's µs a frame and its ratio to webrtcvad's, and
    whether the target ratio was met (one round when ``quick``: it runs, it measures nothing)."""
    result = run_frame_stages_bench(rounds=1 if quick else 7)
    flat = flat_metrics(result, "frame", "webrtcvad", TARGET_STAGE, TARGET_RATIO)
    return {"frames": result["frames"]} | flat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.frame_stages", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of every stage (>= 1)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    result = run_frame_stages_bench(args.rounds)
    print(f"{result['frames']} frames, {result['rounds']} rounds, load average {result['load']}")
    for name, stage in result["stages"].items():
        print(f"{stage['us_per_frame']:8.2f} us  {stage['ratio']:5.2f}x  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
