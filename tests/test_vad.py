"""Turn detection state machine: onset, prefix padding, end of turn, bad frames."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pipeline.config import VadConfig
from pipeline.vad import (
    DECISION_WINDOW_MS,
    SpeechStarted,
    SpeechStopped,
    TurnCommitted,
    TurnDetector,
    webrtc_classifier,
)

RATE_HZ = 16000
FRAME_BYTES = 640  # 20 ms at 16 kHz
VOICED = b"\x01\x00" * 320  # the fake classifier calls a frame voiced if it starts non-zero
SILENT = b"\x00\x00" * 320


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def detector(**knobs: int | float) -> tuple[TurnDetector, Clock]:
    clock = Clock()
    config = VadConfig(**knobs)  # type: ignore[arg-type]
    return TurnDetector(config, RATE_HZ, lambda frame: frame[0] != 0, clock), clock


def feed(vad: TurnDetector, clock: Clock, frames: list[bytes]) -> list[object]:
    events: list[object] = []
    for frame in frames:
        clock.now_s += 0.02
        events += vad.push(frame)
    return events


def test_speech_starts_after_the_onset_window_with_prefix_padding() -> None:
    vad, clock = detector(prefix_padding_ms=100, min_speech_ms=60)
    events = feed(vad, clock, [SILENT] * 10 + [VOICED] * 2)
    assert events == [] and not vad.in_speech
    (started,) = feed(vad, clock, [VOICED])
    assert isinstance(started, SpeechStarted)
    assert started.at_s == pytest.approx(100.26)
    # 100 ms of padding before the 60 ms onset window: 8 frames
    assert len(started.prefix_pcm) == 8 * FRAME_BYTES
    assert started.audio_start_ms == 260 - 160
    assert started.prefix_pcm.endswith(VOICED * 3)
    assert vad.in_speech


def test_a_short_blip_does_not_start_speech() -> None:
    vad, clock = detector(min_speech_ms=60)
    assert feed(vad, clock, [VOICED, VOICED, SILENT, VOICED, SILENT] * 5) == []


def test_turn_ends_after_the_silence_duration_and_commits_the_utterance() -> None:
    vad, clock = detector(prefix_padding_ms=0, silence_duration_ms=100, min_speech_ms=40)
    events = feed(vad, clock, [VOICED] * 5 + [SILENT] * 4)
    assert [type(e) for e in events] == [SpeechStarted]
    events = feed(vad, clock, [SILENT])
    stopped, committed = events
    assert isinstance(stopped, SpeechStopped) and isinstance(committed, TurnCommitted)
    assert stopped.audio_end_ms == 100  # the end of the last voiced frame
    assert committed.duration_ms == 200 and len(committed.pcm) == 10 * FRAME_BYTES
    assert not vad.in_speech


def test_a_pause_shorter_than_the_silence_duration_keeps_the_turn_open() -> None:
    vad, clock = detector(silence_duration_ms=200, min_speech_ms=20)
    events = feed(vad, clock, [VOICED] * 3 + [SILENT] * 9 + [VOICED] * 3 + [SILENT] * 9)
    assert [type(e) for e in events] == [SpeechStarted]
    assert [type(e) for e in feed(vad, clock, [SILENT])] == [SpeechStopped, TurnCommitted]


def test_flush_commits_an_open_utterance_and_is_a_no_op_otherwise() -> None:
    vad, clock = detector(min_speech_ms=20)
    assert vad.flush() == []
    feed(vad, clock, [VOICED] * 4)
    assert [type(e) for e in vad.flush()] == [SpeechStopped, TurnCommitted]
    assert vad.flush() == []


@pytest.mark.parametrize("frame_ms", [10, 30])
def test_10_and_30_ms_frames_are_accepted(frame_ms: int) -> None:
    vad, clock = detector(min_speech_ms=60, prefix_padding_ms=0)
    frame = b"\x01\x00" * (RATE_HZ * frame_ms // 1000)
    events = feed(vad, clock, [frame] * (60 // frame_ms))
    assert [type(e) for e in events] == [SpeechStarted]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\x00" * 639, "got 639 bytes"),
        (b"\x00" * 700, "must be 10, 20 or 30 ms"),
        (b"", "got 0 bytes"),
    ],
)
def test_bad_frames_are_refused_with_a_clear_error(frame: bytes, message: str) -> None:
    vad, _ = detector()
    with pytest.raises(ValueError, match=message):
        vad.push(frame)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="threshold must be within 0..1"):
        VadConfig(threshold=1.5)
    with pytest.raises(ValueError, match="silence_duration_ms must be >= 0"):
        VadConfig(silence_duration_ms=-1)
    with pytest.raises(ValueError, match="sample rate must be one of"):
        TurnDetector(VadConfig(), 44100, bool, Clock())


def test_threshold_maps_onto_webrtcvad_aggressiveness() -> None:
    assert [VadConfig(threshold=t).aggressiveness for t in (0.0, 0.3, 0.5, 0.8, 1.0)] == [
        0,
        1,
        2,
        3,
        3,
    ]


def test_webrtc_classifier_hears_no_speech_in_silence() -> None:
    classify = webrtc_classifier(VadConfig(), RATE_HZ)
    assert classify(SILENT) is False


# --- semantic end of turn: the detector asks at a short pause and reads a poll -----------------


class Judge:
    """An ``ask_end_of_turn`` whose verdicts the test hands out: None (deciding) until told."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []
        self.verdict: bool | None = None

    def __call__(self, pcm: bytes) -> Callable[[], bool | None]:
        self.asked.append(pcm)
        return lambda: self.verdict


def semantic_detector(judge: Judge, **knobs: int) -> tuple[TurnDetector, Clock]:
    """Asked at the decision's pause (200 ms) unless ``ask_pause_ms`` says sooner."""
    clock = Clock()
    knobs = {"decision_pause_ms": 200, "ask_pause_ms": 200, **knobs}
    config = VadConfig(semantic=True, silence_duration_ms=700, **knobs)
    vad = TurnDetector(config, RATE_HZ, lambda frame: frame[0] != 0, clock, judge)
    return vad, clock


def test_a_complete_verdict_ends_the_turn_at_the_short_pause() -> None:
    judge = Judge()
    judge.verdict = True  # answers at once
    vad, clock = semantic_detector(judge)
    speech = [VOICED] * 20
    assert feed(vad, clock, speech + [SILENT] * 9) and judge.asked == []  # started; 180 ms
    stopped, committed = feed(vad, clock, [SILENT])  # the 200 ms frame
    assert isinstance(stopped, SpeechStopped) and isinstance(committed, TurnCommitted)
    assert vad.position_ms == (20 + 10) * 20 and stopped.audio_end_ms == 20 * 20
    (asked,) = judge.asked
    assert asked.endswith(VOICED + SILENT * 10) and asked == committed.pcm


def test_a_pending_verdict_is_read_on_the_following_frames_and_asked_once() -> None:
    judge = Judge()
    vad, clock = semantic_detector(judge)
    feed(vad, clock, [VOICED] * 20 + [SILENT] * 12)
    assert len(judge.asked) == 1 and vad.in_speech  # asked at 200 ms, still deciding
    judge.verdict = True
    stopped, _ = feed(vad, clock, [SILENT])
    assert isinstance(stopped, SpeechStopped) and vad.position_ms == (20 + 13) * 20
    assert len(judge.asked) == 1


def test_not_yet_waits_for_the_silence_window() -> None:
    judge = Judge()
    judge.verdict = False
    vad, clock = semantic_detector(judge)
    assert len(feed(vad, clock, [VOICED] * 20 + [SILENT] * 34)) == 1  # started only
    stopped, _ = feed(vad, clock, [SILENT])  # 700 ms of silence
    assert isinstance(stopped, SpeechStopped) and len(judge.asked) == 1


def test_speech_coming_back_drops_the_question_and_the_next_pause_asks_again() -> None:
    judge = Judge()
    vad, clock = semantic_detector(judge)
    feed(vad, clock, [VOICED] * 20 + [SILENT] * 11 + [VOICED] * 5)
    judge.verdict = True  # the first pause's answer comes too late: speech resumed
    assert feed(vad, clock, [SILENT] * 9) == [] and len(judge.asked) == 1
    assert len(feed(vad, clock, [SILENT])) == 2 and len(judge.asked) == 2


class Answers(Judge):
    """Each question gets the next of ``answers`` at once."""

    def __init__(self, *answers: bool) -> None:
        super().__init__()
        self.answers = list(answers)

    def __call__(self, pcm: bytes) -> Callable[[], bool | None]:
        self.asked.append(pcm)
        answer = self.answers.pop(0)
        return lambda: answer


def test_asked_ahead_a_complete_verdict_ends_the_turn_at_the_decisions_pause_not_sooner() -> None:
    judge = Answers(True)
    vad, clock = semantic_detector(judge, ask_pause_ms=100)
    assert len(feed(vad, clock, [VOICED] * 20 + [SILENT] * 5)) == 1  # started; asked at 100 ms
    (asked,) = judge.asked
    assert asked.endswith(VOICED + SILENT * 5)
    assert feed(vad, clock, [SILENT] * 4) == []  # 180 ms: the verdict waits for the pause
    stopped, _ = feed(vad, clock, [SILENT])
    assert isinstance(stopped, SpeechStopped) and vad.position_ms == (20 + 10) * 20
    assert len(judge.asked) == 1


def test_asked_ahead_not_yet_is_asked_again_of_the_decisions_pause() -> None:
    judge = Answers(False, True)
    vad, clock = semantic_detector(judge, ask_pause_ms=100)
    feed(vad, clock, [VOICED] * 20 + [SILENT] * 9)
    stopped, _ = feed(vad, clock, [SILENT])  # 200 ms: asked again, "complete"
    assert isinstance(stopped, SpeechStopped) and len(judge.asked) == 2
    assert judge.asked[1].endswith(VOICED + SILENT * 10)


def test_asked_ahead_twice_not_yet_leaves_it_to_the_window() -> None:
    judge = Answers(False, False)
    vad, clock = semantic_detector(judge, ask_pause_ms=100)
    assert len(feed(vad, clock, [VOICED] * 20 + [SILENT] * 34)) == 1
    stopped, _ = feed(vad, clock, [SILENT])  # 700 ms of silence
    assert isinstance(stopped, SpeechStopped) and len(judge.asked) == 2


def test_a_breath_shorter_than_the_decisions_pause_ends_no_turn_whatever_was_said_ahead() -> None:
    judge = Answers(True, True)
    vad, clock = semantic_detector(judge, ask_pause_ms=100)
    events = feed(vad, clock, [VOICED] * 20 + [SILENT] * 8 + [VOICED] * 5 + [SILENT] * 9)
    assert len(events) == 1 and len(judge.asked) == 2 and vad.in_speech  # asked in each pause
    assert len(feed(vad, clock, [SILENT])) == 2  # the second pause reaches 200 ms


def test_the_model_hears_the_pause_with_its_padding_after_it() -> None:
    judge = Answers(True)
    vad, clock = semantic_detector(judge, ask_pause_ms=100, model_pad_ms=120)
    feed(vad, clock, [VOICED] * 20 + [SILENT] * 5)  # asked at 100 ms
    (asked,) = judge.asked
    assert asked.endswith(VOICED + SILENT * (5 + 6))  # the pause, then 120 ms of padding
    assert len(asked) == (20 + 5 + 6) * FRAME_BYTES  # the utterance as fed, and the padding


def test_the_model_hears_at_most_the_last_eight_seconds() -> None:
    judge = Judge()
    judge.verdict = True
    vad, clock = semantic_detector(judge, prefix_padding_ms=0)
    feed(vad, clock, [VOICED] * 500 + [SILENT] * 10)  # 10 s of speech
    (asked,) = judge.asked
    assert len(asked) == DECISION_WINDOW_MS * RATE_HZ // 500


def test_server_vad_never_asks() -> None:
    judge = Judge()
    judge.verdict = True
    clock = Clock()
    vad = TurnDetector(VadConfig(), RATE_HZ, lambda frame: frame[0] != 0, clock, judge)
    events = feed(vad, clock, [VOICED] * 20 + [SILENT] * 25)
    assert len(events) == 3 and judge.asked == []  # ended by the 500 ms window alone
