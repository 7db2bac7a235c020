"""Offline speech-to-text compared on the same audio: pocketsphinx (the reference) and Moonshine.

``python -m loadtest.bench_stt`` (and ``make bench``) runs each engine behind the pipeline's
Protocol, one decoder each, on the same utterances: people reading (``loadtest.recorded_speech``)
and piper's sentences (the end-of-turn benchmark's, noise off). Audio goes in 20 ms chunks at
the pace it is spoken, as a call's does, so a streaming decoder works while the words come, and
ends with the 500 ms of silence ``server_vad`` waits for (the engine streams it to the
speech-to-text before the turn ends). ``--quick`` feeds it ``QUICK_PACE`` times as fast: its
figures then say nothing of a call's latency, and what it checks (every engine and set
decoded, the figure drawn) waits an eighth as long.
Per engine and set:

- word error rate against the transcripts (words lower-cased, punctuation and hyphens dropped,
  "mr" read as "mister" and numbers under 20 as words, so spelling is not counted as an error);
- CPU per second of audio: this process's CPU time (Moonshine's threads) plus that of its child
  processes (pocketsphinx's decoders), from /proc, over the whole set;
- the final's latency: from the last chunk (the turn's end) to the final transcript (wall
  clock, median).

Moonshine runs twice: as calls get it (a pass at each pause of the speech, which is the final
when only quiet follows) and with a partial each second too (a pass over the audio so far each
time: ``PIPELINE_MOONSHINE_PARTIAL_INTERVAL_MS=1000``).

Ratios are Moonshine's against pocketsphinx measured in the same run, on the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest import recorded_speech
from loadtest.bench_end_of_turn import COMPLETE
from loadtest.voice_audio import silence_pcm, spoken_pcm
from pipeline.config import MoonshineConfig, PiperConfig, PocketsphinxConfig
from pipeline.moonshine_stt import MoonshineSpeechToText
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.providers import AudioChunk, SpeechToText

RATE_HZ = 16000
CHUNK_BYTES = RATE_HZ * 2 // 50  # 20 ms
VAD_WINDOW_SILENCE = silence_pcm(0.5, RATE_HZ)
QUICK_PACE = 8.0  # --quick: the audio goes in this many times as fast as it is spoken
NUMBERS_TEXT = "zero one two three four five six seven eight nine ten eleven twelve thirteen \
fourteen fifteen sixteen seventeen eighteen nineteen"
SPELLINGS = {"mr": "mister", "mrs": "missus"}
SPELLINGS.update((str(number), word) for number, word in enumerate(NUMBERS_TEXT.split()))


@dataclass(frozen=True)
class Utterance:
    name: str
    pcm: bytes
    transcript: str


@dataclass
class EngineResult:
    engine: str
    audio_set: str
    utterances: int
    audio_s: float
    word_errors: int
    reference_words: int
    cpu_s: float
    final_latency_ms: list[float]
    heard: list[str]

    @property
    def wer(self) -> float:
        return self.word_errors / max(self.reference_words, 1)

    @property
    def cpu_per_audio_s(self) -> float:
        return self.cpu_s / max(self.audio_s, 1e-9)

    def summary(self) -> dict[str, Any]:
        fields = asdict(self)
        fields.update(wer=self.wer, cpu_per_audio_s=self.cpu_per_audio_s)
        fields["final_latency_median_ms"] = statistics.median(self.final_latency_ms)
        return fields


def normal_words(text: str) -> list[str]:
    spaced = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " "))
    return [SPELLINGS.get(word, word) for word in spaced.split()]


def word_errors(heard: str, reference: str) -> int:
    """Substitutions, insertions and deletions: the edit distance between the word lists."""
    said, meant = normal_words(heard), normal_words(reference)
    previous = list(range(len(meant) + 1))
    for row, word in enumerate(said, 1):
        current = [row]
        for column, wanted in enumerate(meant, 1):
            substitution = previous[column - 1] + (word != wanted)
            current.append(min(previous[column] + 1, current[column - 1] + 1, substitution))
        previous = current
    return previous[-1]


def cpu_s() -> float:
    """CPU seconds of this process (all its threads) and its living children."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK")
    for child in _children():
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended in between
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _children() -> list[int]:
    found: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        found += [int(pid) for pid in (task / "children").read_text().split()]
    return found


async def paced(pcm: bytes, finished: list[float], pace: float = 1.0) -> AsyncIterator[AudioChunk]:
    """The audio in 20 ms chunks, ``pace`` times as fast as it is spoken; ``finished`` gets
    the end's time."""
    loop = asyncio.get_running_loop()
    started_s, chunk_s = loop.time(), 0.02 / pace
    for index, start in enumerate(range(0, len(pcm), CHUNK_BYTES)):
        await asyncio.sleep(max(0.0, started_s + index * chunk_s - loop.time()))  # pacing only
        yield AudioChunk(pcm[start : start + CHUNK_BYTES], RATE_HZ)
    finished.append(loop.time())


async def run_engine(
    stt: SpeechToText,
    engine: str,
    audio_set: str,
    utterances: Sequence[Utterance],
    pace: float = 1.0,
) -> EngineResult:
    loop = asyncio.get_running_loop()
    result = EngineResult(engine, audio_set, len(utterances), 0.0, 0, 0, 0.0, [], [])
    for utterance in utterances:
        finished: list[float] = []
        cpu_before_s = cpu_s()
        final = ""
        audio = paced(utterance.pcm + VAD_WINDOW_SILENCE, finished, pace)
        async for transcript in stt.transcribe(audio):
            final = transcript.text if transcript.final else final
        result.final_latency_ms.append((loop.time() - finished[0]) * 1000)
        result.cpu_s += cpu_s() - cpu_before_s
        result.audio_s += len(utterance.pcm) / 2 / RATE_HZ
        result.word_errors += word_errors(final, utterance.transcript)
        result.reference_words += len(normal_words(utterance.transcript))
        result.heard.append(final)
    return result


async def audio_sets(quick: bool) -> dict[str, list[Utterance]]:
    """Every recording and sentence; ``quick``: the shortest of each (the audio goes in paced,
    three engines over: what the quick run's speech-to-text takes)."""
    folder = recorded_speech.fetch()
    recorded = [
        Utterance(r.name, recorded_speech.read_pcm(r, folder), r.transcript)
        for r in recorded_speech.RECORDINGS
    ]
    if quick:
        recorded = [min(recorded, key=lambda utterance: len(utterance.pcm))]
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    try:
        sentences = [min(COMPLETE, key=len)] if quick else COMPLETE
        piper = [Utterance(s, await spoken_pcm(tts, s, RATE_HZ), s) for s in sentences]
    finally:
        await tts.aclose()
    return {"recorded": recorded, "piper": piper}


def engines() -> dict[str, SpeechToText]:
    return {
        "pocketsphinx": PocketsphinxSpeechToText(PocketsphinxConfig(workers=1)),
        "moonshine": MoonshineSpeechToText(MoonshineConfig(workers=1)),
        "moonshine-partials-1s": MoonshineSpeechToText(MoonshineConfig(partial_interval_ms=1000)),
    }


async def measure(quick: bool = False) -> list[EngineResult]:
    sets = await audio_sets(quick)
    pace = QUICK_PACE if quick else 1.0
    results = []
    for name, stt in engines().items():
        await stt.start()  # type: ignore[attr-defined]
        try:
            for audio_set, utterances in sets.items():
                results.append(await run_engine(stt, name, audio_set, utterances, pace))
        finally:
            await stt.aclose()  # type: ignore[attr-defined]
    return results


def ratios(results: Sequence[EngineResult]) -> dict[str, dict[str, float]]:
    """Moonshine against pocketsphinx, per set: CPU per audio second, final latency, WER."""
    by_key = {(r.engine, r.audio_set): r for r in results}
    found: dict[str, dict[str, float]] = {}
    for (engine, audio_set), result in by_key.items():
        reference = by_key.get(("pocketsphinx", audio_set))
        if engine == "pocketsphinx" or reference is None:
            continue
        ratio = {"cpu": result.cpu_per_audio_s / reference.cpu_per_audio_s}
        latency_ms = statistics.median(result.final_latency_ms)
        ratio["final_latency"] = latency_ms / statistics.median(reference.final_latency_ms)
        ratio["wer_points"] = (result.wer - reference.wer) * 100
        found[f"{engine}/{audio_set}"] = ratio
    return found


def render(results: Sequence[EngineResult]) -> str:
    lines = ["engine                set        utts  audio s   WER    CPU/audio s  final p50 ms"]
    for r in results:
        latency_ms = statistics.median(r.final_latency_ms)
        lines.append(f"{r.engine:21} {r.audio_set:9} {r.utterances:5} {r.audio_s:7.1f} "
                     f"{r.wer:6.1%} {r.cpu_per_audio_s:12.3f} {latency_ms:13.0f}")  # fmt: skip
    for name, ratio in ratios(results).items():
        cpu, latency, wer = ratio["cpu"], ratio["final_latency"], ratio["wer_points"]
        lines.append(f"{name} vs pocketsphinx: CPU x{cpu:.2f}, final latency x{latency:.2f}, "
                     f"WER {wer:+.1f} points")  # fmt: skip
    return "\n".join(lines)


def plot(results: Sequence[EngineResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (wer_axes, cpu_axes) = plt.subplots(1, 2, figsize=(8, 3))
    labels = [f"{r.engine}\n{r.audio_set}" for r in results]
    wer_axes.bar(labels, [r.wer * 100 for r in results])
    wer_axes.set_ylabel("word error rate, %")
    cpu_axes.bar(labels, [r.cpu_per_audio_s * 1000 for r in results])
    cpu_axes.set_ylabel("CPU ms per audio second")
    for axes in (wer_axes, cpu_axes):
        axes.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def run_stt_bench(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    """``make bench``'s entry: the results, the ratios, and the figure when ``out`` is given."""
    results = asyncio.run(measure(quick))
    print(render(results), flush=True)
    summary: dict[str, Any] = {"results": [r.summary() for r in results]}
    summary["ratios_vs_pocketsphinx"] = ratios(results)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        summary["figure"] = str(plot(results, out / "stt.png"))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_stt", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="the shortest utterance of each set, paced faster"
    )
    parser.add_argument("--out", type=Path, default=None, help="write stt.png here")
    args = parser.parse_args(argv)
    run_stt_bench(args.quick, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
