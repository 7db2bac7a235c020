"""Semantic end of turn on people's speech: ``loadtest.bench_end_of_turn``'s comparison, run on
the recordings of ``loadtest.recorded_speech`` instead of piper's voice.

``python -m loadtest.bench_end_of_turn_recorded`` segments each recording twice with webrtcvad,
as the synthetic benchmark does (``segment``): ``server_vad``'s 500 ms window, and
``semantic_vad`` with the model asked at a short pause and deciding from it, or asked ahead
(each of ``ASKED_MS``: asked at, decided from), answering at once, so where a turn ends depends
on the audio alone.

- Complete turns: the ten recordings as read (five LibriVox sentences, five card names), each
  followed by silence: how much sooner than the window each turn ends.
- Mid-sentence pauses: the five LibriVox sentences with 600 ms of silence put in at a pause of
  the reader's own between two words (40-70 ms long as read; the word boundaries are those of
  the archive's alignments), before words that finish the sentence: is any turn cut there?

The pause is lengthened, not natural: these readers do not stop mid-sentence for 600 ms. What
is real is the voice, its pitch and rhythm up to the pause, which is what the model hears.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from loadtest import recorded_speech
from loadtest.bench_end_of_turn import SERVER_VAD, asking, segment
from loadtest.voice_audio import silence_pcm
from pipeline.config import VadConfig
from pipeline.end_of_turn import EndOfTurn
from pipeline.log_mel import SAMPLE_RATE_HZ
from pipeline.smart_turn_file import default_model_path

ASKED_MS = ((100, 100), (200, 200), (100, 200))  # (the model asked at, decided from)
PAUSE_S = 0.6
TRAILING_SILENCE_S = 1.5
# recording: (the reader's pause, in ms from the start, and the words on either side)
PAUSES_MS = {
    "librivox-0870": (2210, "and mister john dashwood had then | leisure to consider how much..."),
    "librivox-0880": (1060, "he was not | an ill disposed young man"),
    "librivox-0890": (3590, "unless to be rather cold hearted and rather selfish | is to be..."),
    "librivox-0920": (2490, "had he married a more a amiable woman | he might have been made..."),
    "librivox-0930": (1330, "he might even have been | made amiable himself"),
}  # fmt: skip


@dataclass(frozen=True)
class Sample:
    name: str
    pcm: bytes
    label: str


def at_ms(pcm: bytes, ms: int) -> int:
    return ms * SAMPLE_RATE_HZ // 1000 * 2


def samples() -> tuple[list[Sample], list[Sample]]:
    """The complete turns, and the sentences with a pause put in."""
    folder = recorded_speech.fetch()
    trailing = silence_pcm(TRAILING_SILENCE_S, SAMPLE_RATE_HZ)
    complete, paused = [], []
    for recording in recorded_speech.RECORDINGS:
        pcm = recorded_speech.read_pcm(recording, folder)
        complete.append(Sample(recording.name, pcm + trailing, recording.transcript))
        if recording.name in PAUSES_MS:
            pause_ms, words = PAUSES_MS[recording.name]
            cut = at_ms(pcm, pause_ms)
            lengthened = pcm[:cut] + silence_pcm(PAUSE_S, SAMPLE_RATE_HZ) + pcm[cut:]
            paused.append(Sample(recording.name, lengthened + trailing, words))
    return complete, paused


def compare(
    complete: Sequence[Sample], paused: Sequence[Sample], pauses_ms: tuple[int, int]
) -> dict[str, float]:
    model = EndOfTurn(default_model_path())
    config = asking(*pauses_ms)
    spent_s: list[float] = []
    splits: list[bool] = []
    try:
        sooner_ms = [_sooner_ms(sample, config, model, spent_s, splits) for sample in complete]
        cut = sum(_cut(sample, config, model, spent_s) for sample in paused)
    finally:
        model.close()
    summary = {
        "sooner_median_ms": statistics.median(sooner_ms),
        "sooner_min_ms": min(sooner_ms),
        "complete_split": sum(splits),
        "cut_at_pause": cut,
        "paused": len(paused),
        "decision_median_ms": statistics.median(spent_s) * 1000,
    }
    print(f"complete turns end sooner: median {summary['sooner_median_ms']} ms, "
          f"min {summary['sooner_min_ms']} ms, over {len(sooner_ms)}; complete turns split at "
          f"the reader's own pauses: {sum(splits)}; mid-sentence pauses cut: "
          f"{cut} of {len(paused)}; model per decision: median "
          f"{summary['decision_median_ms']:.1f} ms (wall clock)")  # fmt: skip
    return summary


def _sooner_ms(
    sample: Sample, config: VadConfig, model: EndOfTurn, spent_s: list[float], splits: list[bool]
) -> int:
    """How much sooner the turn's last end comes; ``splits`` gets whether semantic_vad ended
    a turn inside it (at one of the reader's own pauses) where the window did not."""
    window = segment(sample.pcm, SERVER_VAD, model, spent_s)
    semantic = segment(sample.pcm, config, model, spent_s)
    sooner_ms = window.ends_ms[-1] - semantic.ends_ms[-1]
    said = [round(p, 3) for p in semantic.probabilities]
    split = len(semantic.ends_ms) > len(window.ends_ms)
    print(f"complete  {sooner_ms:+5d} ms sooner  turns={len(semantic.ends_ms)} (window "
          f"{len(window.ends_ms)}){' SPLIT' if split else ''}  P={said}  {sample.name}: "
          f"{sample.label}")  # fmt: skip
    splits.append(split)
    return sooner_ms


def _cut(sample: Sample, config: VadConfig, model: EndOfTurn, spent_s: list[float]) -> bool:
    semantic = segment(sample.pcm, config, model, spent_s)
    window = segment(sample.pcm, SERVER_VAD, model, spent_s)
    cut = len(semantic.ends_ms) > 1  # semantic_vad's 700 ms window outlasts the pause
    verdict = "CUT at the pause" if cut else "kept whole"
    said = [round(p, 3) for p in semantic.probabilities]
    print(f"paused    {verdict:16}  turns={len(semantic.ends_ms)} (window {len(window.ends_ms)})  "
          f"P={said}  {sample.name}: {sample.label}")  # fmt: skip
    return cut


def run(
    pauses_ms: Sequence[tuple[int, int]] = ASKED_MS,
) -> dict[tuple[int, int], dict[str, float]]:
    complete, paused = samples()
    results = {}
    for ask_ms, decide_ms in pauses_ms:
        print(f"--- semantic_vad asking at a {ask_ms} ms pause, deciding from {decide_ms} "
              "(recorded speech)")  # fmt: skip
        started_s = time.perf_counter()
        results[ask_ms, decide_ms] = compare(complete, paused, (ask_ms, decide_ms))
        results[ask_ms, decide_ms]["wall_s"] = time.perf_counter() - started_s
    return results


if __name__ == "__main__":
    run()
