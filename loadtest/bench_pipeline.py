"""The offline voice pipeline's budget: CPU per 20 ms frame per stage, latency, own overhead.

``run_pipeline_bench() -> dict`` (called by ``loadtest.bench``; ``python -m
loadtest.bench_pipeline`` prints it alone). All stages are the real ones, measured side by side
in one run on questions spoken by piper (noise off):

- CPU per 20 ms frame: VAD (webrtcvad + turn detector), STT (a pocketsphinx Decoder, as in its
  worker process), TTS (piper, per 20 ms of speech produced), chunker (per token), and the
  event-loop thread of a whole conversation (engine + VAD + local agent), per frame in or out.
- Latency: speech stopped -> first frame out, with the input fed in real time (a live caller),
  and its split: STT final, first token, first TTS audio. ``quick`` feeds it ``QUICK_PACE``
  times as fast (the turn is still found: the VAD counts silence in audio, not wall time), so
  its latency then says nothing of a caller's.
- Overhead: the part of that window not spent waiting on a provider or tool, per turn and as
  a fraction of the window. Target: under 20 ms per turn.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

from pipeline.chunker import SpeechChunker
from pipeline.config import EngineConfig, PiperConfig, VadConfig
from pipeline.engine import ConversationEngine
from pipeline.events import OutputAudio, TurnCompleted
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.playout import PcmResampler
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.tools import ToolRegistry, builtin_tools
from pipeline.turns import TurnRecord
from pipeline.vad import TurnDetector, webrtc_classifier

RATE_HZ = 16000
FRAME_BYTES = 640  # 20 ms at 16 kHz
QUESTIONS = ("Tell me about the moon.", "What time is it?", "Tell me about coffee.")
QUICK_PACE = 8.0  # quick: the question goes in this many times as fast as it is spoken


def cpu_per_unit_us(
    work: Callable[[], int], timer: Callable[[], float] = time.process_time
) -> float:
    """CPU microseconds per unit; ``work`` returns how many units it did."""
    started = timer()
    units = work()
    return (timer() - started) * 1e6 / max(units, 1)


def frames_of(pcm: bytes) -> list[bytes]:
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]


def bench_vad(speech: list[bytes], repeats: int = 20) -> float:
    def work() -> int:
        detector = TurnDetector(
            VadConfig(), RATE_HZ, webrtc_classifier(VadConfig(), RATE_HZ), time.monotonic
        )
        for _ in range(repeats):
            for pcm in speech:
                for frame in frames_of(pcm):
                    detector.push(frame)
        return repeats * sum(len(frames_of(pcm)) for pcm in speech)

    return cpu_per_unit_us(work)


def bench_stt(speech: list[bytes]) -> float:
    from pocketsphinx import Decoder

    decoder = Decoder(loglevel="FATAL")

    def work() -> int:
        for pcm in speech:
            decoder.start_utt()
            for frame in frames_of(pcm):
                decoder.process_raw(frame, False, False)
            decoder.end_utt()
        return sum(len(frames_of(pcm)) for pcm in speech)

    return cpu_per_unit_us(work)


def bench_chunker(text: str, repeats: int = 200) -> float:
    tokens = [f" {word}" for word in text.split()]

    def work() -> int:
        for _ in range(repeats):
            chunker = SpeechChunker()
            for token in tokens:
                chunker.push(token)
            chunker.flush()
        return repeats * len(tokens)

    return cpu_per_unit_us(work)


async def bench_tts(tts: PiperTextToSpeech, text: str) -> float:
    frames = 0
    started = time.process_time()  # piper's thread is in this process: counted
    async for chunk in tts.synthesize(text):
        frames += round(chunk.duration_s / 0.02)
    return (time.process_time() - started) * 1e6 / max(frames, 1)


async def speak(tts: PiperTextToSpeech, text: str) -> bytes:
    resampler, pcm = None, b""
    async for chunk in tts.synthesize(text):
        resampler = resampler or PcmResampler(chunk.sample_rate_hz, RATE_HZ)
        pcm += resampler.push(chunk.pcm)
    return pcm + (resampler.flush() if resampler else b"")


async def live_conversation(
    engine: ConversationEngine, speech: list[bytes], pace: float = 1.0
) -> tuple[list[TurnRecord], int]:
    """Feed each question in real time (one frame per 20 ms; ``pace`` times as fast) and wait
    for the answer."""
    records: list[TurnRecord] = []
    frames = 0
    loop = asyncio.get_running_loop()
    for pcm in speech:
        due_s = loop.time()
        for frame in frames_of(b"\0" * 9600 + pcm + b"\0" * 32000):  # 0.3 s before, 1 s after
            due_s += 0.02 / pace
            await asyncio.sleep(max(0.0, due_s - loop.time()))
            engine.push_audio(frame)
            frames += 1
            if engine.busy and not engine.user_speaking:
                break
        async with asyncio.timeout(60), aclosing(engine.events()) as events:
            async for event in events:
                frames += isinstance(event, OutputAudio)
                if isinstance(event, TurnCompleted):
                    records.append(event.record)
                    break
        await engine.wait_idle(30)
    return records, frames


def median(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else float("nan")


async def bench_conversation(
    stt: PocketsphinxSpeechToText, tts: PiperTextToSpeech, speech: list[bytes], pace: float = 1.0
) -> dict[str, Any]:
    knowledge = load_knowledge()
    config = EngineConfig(RATE_HZ, 24000, realtime_playout=False)
    tools = ToolRegistry(builtin_tools(knowledge))
    engine = ConversationEngine(config, stt, LocalRuleBasedAgent(knowledge), tts, tools)
    async with engine:
        started = time.thread_time()  # the event-loop thread only: not piper's, not sphinx's
        records, frames = await live_conversation(engine, speech, pace)
        loop_cpu_us = (time.thread_time() - started) * 1e6 / max(frames, 1)
    windows = [r.speech_stopped_to_first_frame_ms for r in records]
    overheads = [r.overhead_ms for r in records]
    fractions = [o / w for o, w in zip(overheads, windows, strict=True) if o is not None and w]
    return {
        "turns": len(records),
        "event-loop thread CPU per frame in/out (us)": round(loop_cpu_us, 1),
        "speech stopped -> first frame out, median (ms)": median(windows),
        "  of which STT final after speech stopped (ms)": median([r.stt_ms for r in records]),
        "  of which LLM first token (ms)": median([r.llm_first_token_ms for r in records]),
        "  of which TTS first audio (ms)": median([r.tts_first_audio_ms for r in records]),
        "pipeline overhead per turn, median (ms)": median(overheads),
        "pipeline overhead per turn, max (ms)": round(
            max(o for o in overheads if o is not None), 2
        ),
        "pipeline overhead, fraction of the window": round(statistics.median(fractions), 4),
    }


def first_sentence(text: str) -> str:
    return text.split(". ", 1)[0].rstrip(".") + "."


async def _run(
    questions: tuple[str, ...], fewer: int, pace: float, tts_text: Callable[[str], str] = str
) -> dict[str, Any]:
    """``tts_text``: what of the first knowledge answer piper's CPU is measured on."""
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    stt = PocketsphinxSpeechToText()
    await tts.start()
    await stt.start()
    try:
        speech = [await speak(tts, text) for text in questions]
        answer = load_knowledge().entries[0].answer
        results: dict[str, Any] = {
            "VAD CPU per 20 ms frame (us)": round(bench_vad(speech, 20 // fewer), 1),
            "STT (pocketsphinx) CPU per 20 ms frame (us)": round(bench_stt(speech), 1),
            "TTS (piper, 1 thread) CPU per 20 ms of speech (us)": round(
                await bench_tts(tts, tts_text(answer)), 1
            ),
            "chunker CPU per token (us)": round(bench_chunker(answer, 200 // fewer), 2),
        }
        results.update(await bench_conversation(stt, tts, speech, pace))
        return results
    finally:
        await stt.aclose()
        await tts.aclose()


def run_pipeline_bench(quick: bool = False) -> dict[str, Any]:
    """``quick``: one question, a tenth of the repeats, fed ``QUICK_PACE`` times as fast, piper
    timed on the answer's first sentence (a smoke run of the same code)."""
    if quick:
        return asyncio.run(_run(QUESTIONS[:1], 10, QUICK_PACE, first_sentence))
    return asyncio.run(_run(QUESTIONS, 1, 1.0))


if __name__ == "__main__":
    for name, value in run_pipeline_bench().items():
        print(f"{name:55s} {value}")
