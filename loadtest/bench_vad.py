"""What Silero VAD costs a call, and how much sooner it ends speech than webrtcvad alone.

``python -m loadtest.bench_vad [--repeats N]`` builds a call's input out of the recordings of
``loadtest.recorded_speech`` (each followed by ``GAP_S`` of quiet: digital silence, or white
noise at ``NOISE_DBFS``, a quiet room's microphone), feeds it 20 ms frame by frame to the
turn detector (``pipeline.vad``) with each classifier (``pipeline.silero_vad.vad_classifier``)
and reads this thread's CPU time, the variants taking turns (A/B/C/A/B/C), so the machine's
load touches them alike. It prints, per classifier and input: CPU microseconds per 20 ms frame
and milliseconds per call-second, the share of frames that ran a model window, and the tail:
from the last loud 20 ms block to the end of speech the detector reports, per recording (a
function of the audio alone): webrtcvad's own end as it was, the voice's end
(``VadConfig.voice_end_db``), and the model's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import recorded_speech
from pipeline.config import VadConfig
from pipeline.silero_vad import GatedSileroClassifier, vad_classifier
from pipeline.vad import SpeechStopped, TurnDetector

RATE_HZ = 16000
FRAME_BYTES = RATE_HZ // 50 * 2
GAP_S = 4.0
NOISE_DBFS = -60.0
LOUD_RMS = 0.01  # loadtest.bench_e2e's "last loud block" (-40 dBFS)
# before (webrtcvad's own end, as it was), the default (the voice's end), the model
CONFIGS = {
    "webrtcvad": VadConfig(model="webrtc", voice_end_db=math.inf),
    "webrtcvad_voice_end": VadConfig(model="webrtc", voice_end_db=40.0),
    "silero": VadConfig(model="silero"),
    "silero_voice_end": VadConfig(model="silero", voice_end_db=40.0),
}


def frames_of(pcm: bytes) -> list[bytes]:
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]


def quiet(seconds: float, noise_dbfs: float | None, seed: int) -> bytes:
    samples = int(seconds * RATE_HZ)
    if noise_dbfs is None:
        return bytes(samples * 2)
    noise = np.random.default_rng(seed).standard_normal(samples) * 32768 * 10 ** (noise_dbfs / 20)
    return noise.astype("<i2").tobytes()


def call_input(speech: Sequence[bytes], noise_dbfs: float | None) -> bytes:
    return b"".join(pcm + quiet(GAP_S, noise_dbfs, i) for i, pcm in enumerate(speech))


def cpu_cost(detector: TurnDetector, frames: Sequence[bytes]) -> float:
    """Thread CPU seconds for the turn detector (and its classifier) to take ``frames``."""
    started_s = time.thread_time()
    for frame in frames:
        detector.push(frame)
    return time.thread_time() - started_s


def tail_frames(pcm: bytes, config: VadConfig) -> int:
    """Frames from the last loud block to the end of speech the turn detector reports."""
    frames = frames_of(pcm + bytes(FRAME_BYTES * 40))
    classify = vad_classifier(config, RATE_HZ)
    detector = TurnDetector(config, RATE_HZ, classify, float)
    stops = [e for f in frames for e in detector.push(f) if isinstance(e, SpeechStopped)]
    levels = [np.sqrt(np.mean((np.frombuffer(f, "<i2") / 32768.0) ** 2)) for f in frames]
    loud = [i for i, level in enumerate(levels) if level >= LOUD_RMS]
    return stops[-1].audio_end_ms // 20 - (loud[-1] + 1) if stops and loud else 0


def windows_run(classify: Callable[[bytes], bool]) -> int:
    return classify.stream.windows_run if isinstance(classify, GatedSileroClassifier) else 0


def costs(speech: Sequence[bytes], noise_dbfs: float | None, repeats: int) -> dict[str, Any]:
    frames = frames_of(call_input(speech, noise_dbfs))
    spent_s: dict[str, list[float]] = {name: [] for name in CONFIGS}
    windows = 0
    for _ in range(repeats):
        for name, config in CONFIGS.items():  # A/B/C/A/B/C
            classify = vad_classifier(config, RATE_HZ)
            spent_s[name].append(cpu_cost(TurnDetector(config, RATE_HZ, classify, float), frames))
            windows = max(windows, windows_run(classify))
    call_s = len(frames) / 50
    result: dict[str, Any] = {
        "call_s": call_s,
        "windows_per_frame": round(windows / len(frames), 3),
    }
    for name, spent in spent_s.items():
        median_s = statistics.median(spent)
        result[name] = {
            "us_per_frame": round(median_s / len(frames) * 1e6, 1),
            "ms_per_call_s": round(median_s / call_s * 1000, 2),
        }
    return result


def run(repeats: int) -> dict[str, Any]:
    speech = [
        recorded_speech.read_pcm(r, recorded_speech.fetch()) for r in recorded_speech.RECORDINGS
    ]
    tails = {
        r.name: {name: tail_frames(pcm, config) * 20 for name, config in CONFIGS.items()}
        for r, pcm in zip(recorded_speech.RECORDINGS, speech, strict=True)
    }
    speech_s = sum(len(pcm) for pcm in speech) / 2 / RATE_HZ
    return {
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "speech_share": round(speech_s / (speech_s + GAP_S * len(speech)), 3),
        "digital_silence": costs(speech, None, repeats),
        f"noise_{NOISE_DBFS:.0f}_dbfs": costs(speech, NOISE_DBFS, repeats),
        "tail_ms": tails,
        "tail_median_ms": {
            name: statistics.median(t[name] for t in tails.values()) for name in CONFIGS
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_vad", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    print(json.dumps(run(parser.parse_args(argv).repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
