"""The per-frame path of a call's input, cut for CPU (``loadtest.frame_stages`` measures it),
decides as it did, on every 20 ms frame of recorded human speech (``loadtest.recorded_speech``):
the classifier answers as webrtcvad's own ``Vad.is_speech``; the level is the float32 level
of old to the last bit; a turn detector that checks every frame and takes its answers and
levels from those references (the detector as it was) makes the same decision at every frame;
and the engine takes a whole frame as it is the same as the same audio in any other pieces."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import webrtcvad
from engine_feed import events_while_fed, speech_marks

from loadtest import recorded_speech
from loadtest.frame_stages import speech_frames
from pipeline.config import EngineConfig, VadConfig
from pipeline.engine import ConversationEngine
from pipeline.espeak_tts import EspeakTextToSpeech
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.vad import (
    SILENT_DBFS,
    SpeechStarted,
    SpeechStopped,
    TurnDetector,
    VadEvent,
    frame_duration_ms,
    level_of,
    webrtc_classifier,
)

RATE_HZ = recorded_speech.SAMPLE_RATE_HZ
THRESHOLDS = (0.0, 0.25, 0.5, 0.75)  # webrtcvad's four modes (VadConfig.aggressiveness)


@pytest.fixture(scope="module")
def recordings() -> list[bytes]:
    folder = recorded_speech.fetch()
    return [recorded_speech.read_pcm(r, folder) for r in recorded_speech.RECORDINGS]


@pytest.fixture(scope="module")
def frames(recordings: list[bytes]) -> list[bytes]:
    """The recordings with silence after each, as they are and 26 dB quieter (other levels)."""
    quiet = [(np.frombuffer(pcm, "<i2") // 20).astype("<i2").tobytes() for pcm in recordings]
    return speech_frames(recordings + quiet)


def reference_level(frame: bytes) -> float:
    """``level_of`` as it was before the cut."""
    samples = np.frombuffer(frame, "<i2").astype(np.float32)
    power = float(np.dot(samples, samples)) / max(1, samples.size) / 32768.0**2
    return max(SILENT_DBFS, 10.0 * math.log10(power)) if power > 0 else SILENT_DBFS


class ReferenceDetector(TurnDetector):
    """The detector as it was: every frame checked, its levels from ``reference_level``."""

    def push(self, frame: bytes) -> list[VadEvent]:
        duration_ms = frame_duration_ms(frame, self.sample_rate_hz)
        voiced = self._classify(frame)
        self._position_ms += duration_ms
        if self.in_speech:
            return self._push_in_speech(frame, voiced, duration_ms)
        return self._push_in_silence(frame, voiced, duration_ms)

    def _sounding(self, frame: bytes) -> bool:
        if math.isinf(self.config.voice_end_db):
            return True
        level_dbfs = reference_level(frame)
        self._loudest_dbfs = max(self._loudest_dbfs, level_dbfs)
        return level_dbfs >= self._loudest_dbfs - self.config.voice_end_db

    def _note_loudest(self, frame: bytes, voiced: bool) -> None:
        if not voiced:
            self._loudest_dbfs = SILENT_DBFS
        elif not math.isinf(self.config.voice_end_db):
            self._loudest_dbfs = max(self._loudest_dbfs, reference_level(frame))


@dataclass(frozen=True)
class Decision:
    """One frame's outcome: the classifier's answer, the detector's state and its events."""

    voiced: bool
    in_speech: bool
    pause_ms: int
    events: tuple[tuple[str, int, bytes], ...]  # (kind, audio ms, the utterance's audio)


def decisions(detector: TurnDetector, answers: list[bool], frames: list[bytes]) -> list[Decision]:
    out = []
    for frame in frames:
        events = detector.push(frame)
        out.append(Decision(answers[-1], detector.in_speech, detector.pause_ms, described(events)))
    return out


def described(events: list[VadEvent]) -> tuple[tuple[str, int, bytes], ...]:
    out = []
    for event in events:
        if isinstance(event, SpeechStarted):
            out.append(("started", event.audio_start_ms, event.prefix_pcm))
        elif isinstance(event, SpeechStopped):
            out.append(("stopped", event.audio_end_ms, event.pcm))
        else:
            out.append(("committed", event.duration_ms, event.pcm))
    return tuple(out)


def noting(classify: Callable[[bytes], bool], answers: list[bool]) -> Callable[[bytes], bool]:
    def noted(frame: bytes) -> bool:
        answers.append(classify(frame))
        return answers[-1]

    return noted


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_the_classifier_answers_as_webrtcvad_is_speech_on_every_frame(
    recordings: list[bytes], threshold: float, frame_ms: int
) -> None:
    config = VadConfig(threshold=threshold)
    ours, theirs = webrtc_classifier(config, RATE_HZ), webrtcvad.Vad(config.aggressiveness)
    step = 2 * RATE_HZ * frame_ms // 1000
    pcm = b"".join(recordings)
    cut = [pcm[i : i + step] for i in range(0, len(pcm) - step + 1, step)]
    answers = [ours(frame) for frame in cut]
    assert answers == [theirs.is_speech(frame, RATE_HZ) for frame in cut]
    assert 0 < sum(answers) < len(cut)  # both kinds of frame were heard


def test_a_frame_webrtcvad_refuses_is_refused_alike() -> None:
    ours, theirs = (
        webrtc_classifier(VadConfig(), RATE_HZ),
        webrtcvad.Vad(VadConfig().aggressiveness),
    )
    with pytest.raises(Exception) as refused:
        theirs.is_speech(bytes(100), RATE_HZ)
    with pytest.raises(type(refused.value), match=str(refused.value)):
        ours(bytes(100))


def test_the_level_is_the_float32_level_to_the_last_bit(frames: list[bytes]) -> None:
    extremes = [b"\x00\x80" * 320, b"\xff\x7f" * 320, b"\x01\x00" * 320, bytes(640)]
    levels = [level_of(frame) for frame in frames + extremes]
    assert levels == [reference_level(frame) for frame in frames + extremes]
    assert levels[-4] == 0.0 and levels[-1] == SILENT_DBFS
    assert len(set(levels)) > len(frames) // 2  # levels of every kind, not a few


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("voice_end_db", [math.inf, 40.0, 12.0])
def test_the_detector_decides_every_frame_as_the_reference_does(
    frames: list[bytes], threshold: float, voice_end_db: float
) -> None:
    config = VadConfig(threshold=threshold, voice_end_db=voice_end_db)
    ours: list[bool] = []
    theirs: list[bool] = []
    vad = webrtcvad.Vad(config.aggressiveness)
    reference = ReferenceDetector(
        config, RATE_HZ, noting(lambda f: bool(vad.is_speech(f, RATE_HZ)), theirs), lambda: 0.0
    )
    detector = TurnDetector(
        config, RATE_HZ, noting(webrtc_classifier(config, RATE_HZ), ours), lambda: 0.0
    )
    expected = decisions(reference, theirs, frames)
    got = decisions(detector, ours, frames)
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"frame {index} ({index * 20} ms)"
    turns = sum(1 for d in got for e in d.events if e[0] == "committed")
    assert turns >= len(recorded_speech.RECORDINGS)  # the speech was segmented
    if not math.isinf(voice_end_db):
        assert any(d.pause_ms for d in got)  # the voice's end was told apart


def pieces(pcm: bytes, how: str) -> Iterator[bytes | bytearray]:
    """``pcm`` as the engine may be given it: whole 20 ms frames (the lean path), the same in
    bytearrays (copied, then spoilt after the push), or 333-byte pieces."""
    step = 333 if how == "odd pieces" else 2 * RATE_HZ // 50
    for start in range(0, len(pcm), step):
        piece = pcm[start : start + step]
        yield bytearray(piece) if how == "bytearrays" else piece


async def speech_events(pcm: bytes, how: str) -> list[tuple[Any, ...]]:
    config = EngineConfig(input_sample_rate_hz=RATE_HZ, create_response=False)
    agent = LocalRuleBasedAgent(load_knowledge())
    stt = PocketsphinxSpeechToText()
    await stt.start()
    engine = ConversationEngine(config, stt, agent, EspeakTextToSpeech())
    await engine.start()

    def push(piece: bytes | bytearray) -> None:
        engine.push_audio(piece)  # type: ignore[arg-type]  # bytearrays: a caller's
        if isinstance(piece, bytearray):
            piece[:] = bytes(len(piece))

    try:
        fed = await events_while_fed(engine, pieces(pcm, how), push, 60, finish=True)
    finally:
        await stt.aclose()
    return speech_marks(fed, transcripts=False)


_WHOLE: dict[bytes, list[tuple[Any, ...]]] = {}  # the reference run, once for both cases


@pytest.mark.parametrize("how", ["bytearrays", "odd pieces"])
async def test_the_engine_takes_whole_frames_as_it_takes_any_other_pieces(
    recordings: list[bytes], how: str
) -> None:
    pcm = b"".join(speech + bytes(2 * RATE_HZ) for speech in recordings[:2])
    if pcm not in _WHOLE:
        _WHOLE[pcm] = await speech_events(pcm, "whole frames")
    whole = _WHOLE[pcm]
    assert [e[0] for e in whole] == ["started", "stopped"] * 2
    assert await speech_events(pcm, how) == whole


def test_a_frame_of_another_size_is_checked_however_many_came_before() -> None:
    """The detector checks a frame size once: a frame of another size is checked again (a bad
    one refused with the same error), and a good one counts for its own duration."""
    detector = TurnDetector(VadConfig(), RATE_HZ, lambda frame: False, lambda: 0.0)
    for _ in range(5):
        detector.push(bytes(640))
    with pytest.raises(ValueError, match="got 642 bytes"):
        detector.push(bytes(642))
    detector.push(bytes(320))
    detector.push(bytes(960))
    assert detector.position_ms == 5 * 20 + 10 + 30
