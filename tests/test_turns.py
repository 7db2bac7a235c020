"""Turn records and playout bookkeeping: durations, overhead, what was heard."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pipeline.playout import FrameSlicer, PlayoutLedger
from pipeline.turns import TurnRecorder
from transceiver.metrics import RealtimeMetrics


def test_durations_and_overhead_come_from_the_marks_and_provider_time() -> None:
    recorder = TurnRecorder(1, "stt", "llm", "tts")
    for moment, at_s in [
        ("speech_stopped", 10.0),
        ("stt_final", 10.1),
        ("llm_first_token", 10.15),
        ("first_tts_request", 10.16),
        ("first_tts_audio", 10.30),
        ("first_frame_out", 10.31),
    ]:
        recorder.mark(moment, at_s)
    recorder.mark("stt_final", 99.0)  # first mark wins
    # overlapping and out-of-window provider intervals: the union within the window counts
    for busy in [(9.0, 10.1), (10.1, 10.15), (10.12, 10.14), (10.16, 10.30), (10.5, 11.0)]:
        recorder.provider_busy(*busy)
    record = recorder.finish(interrupted=False, estimate_cost=lambda r: 0.25)
    assert record.stt_ms == pytest.approx(100)
    assert record.llm_first_token_ms == pytest.approx(50)
    assert record.tts_first_audio_ms == pytest.approx(140)
    assert record.speech_stopped_to_first_frame_ms == pytest.approx(310)
    assert record.provider_ms == pytest.approx(290)
    assert record.overhead_ms == pytest.approx(20)
    assert record.cost_usd == 0.25 and record.to_json()["turn"] == 1
    with pytest.raises(ValueError, match="unknown turn moment 'lunch'"):
        recorder.mark("lunch", 1.0)


def test_a_turn_without_audio_out_has_no_overhead_figure() -> None:
    recorder = TurnRecorder(2)
    recorder.mark("speech_stopped", 1.0)
    record = recorder.finish(interrupted=True)
    assert record.first_frame_out_s is None and record.overhead_ms is None and record.interrupted


def test_heard_text_keeps_whole_segments_and_cuts_the_current_one_at_a_word() -> None:
    ledger = PlayoutLedger()
    ledger.begin("The moon is far away.")
    ledger.add_audio(1000)
    ledger.begin("It has no air and no weather.")
    ledger.add_audio(2000)
    assert ledger.heard_text(0) == ""
    assert ledger.heard_text(500) == "The moon"  # "is" only half played: not heard
    assert ledger.heard_text(1000) == "The moon is far away."
    assert ledger.heard_text(2000) == "The moon is far away. It has no air"
    assert ledger.heard_text(5000) == ledger.full_text
    ledger.begin("Never synthesized.")
    assert ledger.heard_text(5000) == "The moon is far away. It has no air and no weather."
    with pytest.raises(ValueError, match="audio added before any text segment"):
        PlayoutLedger().add_audio(20)


def test_frames_are_cut_exactly_and_the_tail_is_padded() -> None:
    slicer = FrameSlicer(4)
    assert slicer.push(b"abcdef") == [b"abcd"]
    assert slicer.push(b"gh") == [b"efgh"]
    assert slicer.push(b"ij") == []
    assert slicer.flush() == [b"ij\0\0"] and slicer.flush() == []
    with pytest.raises(ValueError, match="positive even number"):
        FrameSlicer(3)


def test_an_early_answers_record_takes_in_the_turns_and_is_counted() -> None:
    """The answer started before the turn ended keeps its own moments (written before the
    turn's end: negative stages) and takes the turn's; the turn's discarded answers count."""
    turn = TurnRecorder(3, "stt", "llm", "tts", transcript="hello there", input_audio_s=1.2)
    turn.mark("speech_started", 10.0)
    turn.mark("stt_final", 11.1)
    turn.mark("speech_stopped", 11.3)
    turn.provider_busy(10.5, 11.1)
    turn.early_answers_discarded = 2
    thrown = TurnRecorder(3)  # an answer started at an earlier pause, thrown away
    thrown.provider_busy(10.6, 10.7)
    thrown.provider_busy(10.65, 10.75)  # (the model still writing while the first chunk speaks)
    turn.early_answers_wasted_ms += thrown.busy_ms()
    answer = TurnRecorder(3, "stt", "llm", "tts")
    answer.mark("llm_first_token", 11.15)
    answer.mark("first_tts_request", 11.15)
    answer.absorb(turn)
    answer.mark("first_tts_audio", 11.35)
    answer.mark("first_frame_out", 11.36)
    record = answer.finish(interrupted=False)
    assert record.answered_early and record.early_answers_discarded == 2
    assert record.early_answers_wasted_ms == pytest.approx(150)
    assert (record.transcript, record.input_audio_s) == ("hello there", 1.2)
    assert record.stt_ms == pytest.approx(-200) and record.llm_first_token_ms == pytest.approx(50)
    assert record.speech_stopped_to_first_frame_ms == pytest.approx(60)
    registry = CollectorRegistry()
    metrics = RealtimeMetrics(registry)
    metrics.turn(record, None)
    metrics.turn(TurnRecorder(4).finish(interrupted=False), None)

    def early(outcome: str) -> float | None:
        return registry.get_sample_value("transceiver_early_answers_total", {"outcome": outcome})

    assert (early("used"), early("discarded")) == (1, 2)
    wasted_s = registry.get_sample_value("transceiver_early_answers_wasted_seconds_total")
    assert wasted_s == pytest.approx(0.15)
    stt = {"stage": "stt"}
    assert registry.get_sample_value("transceiver_turn_stage_seconds_sum", stt) == 0  # not < 0
