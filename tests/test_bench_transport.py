"""The browser benchmark's arithmetic (loadtest/bench_transport.py, loadtest/bench_bargein.py):
first frame out -> heard by stage, and barge-in onset -> stopped, from what a page recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loadtest import bench_bargein, bench_transport, figures
from loadtest.bench_e2e import decision_table, e2e_report
from loadtest.voice_audio import WAV_RATE_HZ, Speaker
from pipeline.knowledge import load_knowledge

SERVER = {"response": "resp_1", "queued_wait_ms": 12.0, "quiet_lead_ms": 40.0}


def stats_row(at_ms: float, delay_s: float, emitted: int, concealed: int = 0) -> dict[str, Any]:
    return {
        "at_ms": at_ms,
        "jitterBufferDelay": delay_s,
        "jitterBufferEmittedCount": emitted,
        "jitterBufferTargetDelay": 0.04 * emitted,
        "concealedSamples": concealed,
        "silentConcealedSamples": 0,
        "totalSamplesReceived": emitted,
    }


def test_first_frame_out_to_heard_is_split_into_stages_that_add_up() -> None:
    taken_ms = 5_000.0
    server = {**SERVER, "loud_unix_ms": taken_ms + 40}
    packets = [{"at_ms": taken_ms - 900}, {"at_ms": taken_ms + 3}]  # an earlier answer's, ours
    stats = [stats_row(taken_ms, 1000.0, 48_000), stats_row(taken_ms + 600, 3400.0, 96_000, 480)]
    split = bench_transport.split_turn(server, packets, stats, heard_unix_ms=taken_ms + 200)
    assert split["send_ms"] == 3.0 and split["neteq_ms"] == 50.0 and split["target_ms"] == 40.0
    assert split["concealed_samples"] == 480
    stages = ("send_ms", "neteq_ms", "quiet_lead_ms", "playout_ms")
    assert sum(split[s] for s in stages) == split["frame_out_to_heard_ms"] == 200.0


def test_a_turn_without_its_packet_or_server_line_has_no_split() -> None:
    assert bench_transport.split_turn(None, [], [], 1.0)["send_ms"] is None
    server = {**SERVER, "loud_unix_ms": 5_040.0}
    split = bench_transport.split_turn(server, [{"at_ms": 100.0}], [], 5_200.0)
    assert split["send_ms"] is None and split["frame_out_to_heard_ms"] == 200.0


def test_a_barge_in_is_split_from_onset_to_the_answer_s_last_audible_sample() -> None:
    def segment(start_s: float, end_s: float) -> list[float]:  # context s, then Unix ms
        return [start_s, end_s, 1_000_000 + 1000 * start_s, 1_000_000 + 1000 * end_s]

    page = {
        "mic": [segment(1, 2), segment(6, 7), segment(20, 21), segment(40, 41)]
        + [segment(50, 51), segment(52.1, 53)],  # the third: the answer had just gone quiet
        # a pause between sentences just before the onset; the second interruption: too late
        "remote": [segment(3, 5.8), segment(6.1, 6.25), segment(8.5, 9), segment(22, 30)]
        + [segment(51.5, 52)],
        "stamps": [
            ["input_audio_buffer.speech_started", 1_006_090.0],
            ["output_audio_buffer.cleared", 1_006_110.0],
        ],
    }
    (found,) = bench_bargein.barge_ins(page)
    assert found == {
        "onset_to_stopped_ms": 250.0,
        "detect_ms": 90.0,
        "clear_ms": 20.0,
        "drain_ms": 140.0,
    }
    summary = bench_bargein.summarise([found], asked=3)
    assert summary["median"]["onset_to_stopped_ms"] == 250.0
    assert "1 of 3 fell inside an answer" in bench_bargein.text("lean", summary)


def test_the_interruptions_own_answer_is_not_counted_as_the_old_ones() -> None:
    def segment(start_s: float, end_s: float) -> list[float]:  # context s, then Unix ms
        return [start_s, end_s, 1_000_000 + 1000 * start_s, 1_000_000 + 1000 * end_s]

    # the old answer stops 80 ms after the onset at 6 s; the interruption's own answer starts
    # (its output_audio_buffer.started at 6.9 s) and is heard from 6.95 s, within 1.2 s
    remote = [segment(3, 6.08), segment(6.95, 9.5)]
    stamps = [
        ["input_audio_buffer.speech_started", 1_006_040.0],
        ["output_audio_buffer.cleared", 1_006_045.0],
        ["output_audio_buffer.started", 1_006_900.0],
    ]
    page = {"mic": [segment(1, 2), segment(6, 6.8)], "remote": remote, "stamps": stamps}
    (found,) = bench_bargein.barge_ins(page)
    assert found["onset_to_stopped_ms"] == 80.0 and found["drain_ms"] == 35.0
    # without the page's stamp, the old bound (1.2 s after the onset) would take both
    assert bench_bargein.answer_stopped_ms(remote, 1_006_000.0) == 1_009_500.0


def spoken_spans_ms(pcm: bytes, rate_hz: int, gap_ms: int = 100) -> list[tuple[int, int]]:
    """Where 16-bit speech is audible, ms: 20 ms blocks above a quiet level, gaps under
    ``gap_ms`` (stops inside a word) closed."""
    block = rate_hz // 50
    samples = np.frombuffer(pcm, np.int16).astype(np.float64)
    blocks = samples[: len(samples) // block * block].reshape(-1, block)
    loud = np.sqrt(np.mean(blocks**2, axis=1)) > 300
    spans: list[tuple[int, int]] = []
    for index in np.flatnonzero(loud):
        start_ms = int(index) * 20
        if spans and start_ms - spans[-1][1] < gap_ms:
            spans[-1] = (spans[-1][0], start_ms + 20)
        else:
            spans.append((start_ms, start_ms + 20))
    return spans


async def test_the_interruption_falls_inside_a_sentence_of_the_long_answer() -> None:
    """The barge-in call speaks over the knowledge file's long answer ``BARGE_AFTER_S`` after
    its question: that moment must be inside a spoken sentence, not a pause between two, for an
    answer that starts 0.1-1.5 s after the question (an onset in a pause has nothing audible
    to stop and is not counted; at 6.0 s the aiortc path counted 0 of 3)."""
    entry = load_knowledge().search(bench_bargein.LONG_QUESTION)
    assert entry is not None
    async with Speaker() as speaker:
        spans = spoken_spans_ms(await speaker.speak(entry.answer), WAV_RATE_HZ)
    assert len(spans) >= 3  # its three sentences, with pauses between them
    for started_ms in range(100, 1501, 50):
        onset_ms = bench_bargein.BARGE_AFTER_S * 1000 - started_ms
        assert any(start + 150 <= onset_ms <= end - 150 for start, end in spans), started_ms


def test_the_report_draws_a_stage_stack_per_turn(tmp_path: Path) -> None:
    turn = {
        "e2e_ms": 1200.0,
        "stt_final_ms": 100.0,
        "llm_first_token_ms": 110.0,
        "first_tts_request_ms": 290.0,
        "first_audio_ms": 400.0,
        "server_window_ms": 420.0,
        "frame_out_to_heard_ms": 200.0,
        "send_ms": 3.0,
        "neteq_ms": 50.0,
        "quiet_lead_ms": 40.0,
        "playout_ms": 107.0,
    }
    stack = figures.turn_stage_ms(turn)
    assert stack is not None and sum(stack) == 1200.0 and stack[0] == 580.0
    assert stack[3:5] == [180.0, 110.0]  # the first chunk's words, then its speech
    assert figures.turn_stage_ms({**turn, "send_ms": None}) is None
    paths = {"aiortc": {"per_turn": [turn], "receiver": {}}}
    text = e2e_report(paths, tmp_path)
    assert "aiortc" in text and (tmp_path / "turn-stages.png").stat().st_size > 0
    stages = {"to_last_voiced_ms": 140.0, "pause_ms": 120.0, "after_asked_ms": 110.0}
    decided = {**turn, "turn_decision_ms": 370.0, "decision_stages": stages}
    (*_, row) = decision_table({"lean": {"per_turn": [decided]}}).splitlines()
    assert row.split() == ["lean", "1", "370", "140", "120", "110", "-", "-", "-"]
