"""The ``voice`` load-test scenario, really run: ``python -m loadtest.voice_scenario`` starts a
local stack, Locust (a master and one worker process) and its driver child, and real WebRTC
calls speak piper's questions to the pipeline; in the same run a transceiver is killed under
them and its calls resume on the other one. Behaviour only (calls set up, turns answered with
transcripts, the resumes and the report and Locust's CSV written), never timings."""

from __future__ import annotations

import asyncio
import csv
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiortc.rtp import RtpPacket
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from loadtest import voice_scenario
from loadtest.figures import summary
from loadtest.hosts import metric_samples
from loadtest.voice_calls import (
    DTX_HANGOVER_PACKETS,
    QUIET_GAP_S,
    QUIET_PACKETS,
    AnswerMeter,
    Metronome,
    OpusSpeechTrack,
    Question,
    Questions,
    answer_playback_rate_hz,
    answer_uses_dtx,
    opus_packets,
    turn_stages,
)
from loadtest.voice_paths import compare_paths
from loadtest.voice_report import (
    FAILED_CALL_PAUSE_S,
    RUN_LONG_S,
    Hist,
    Knee,
    KneePlan,
    fault_section,
    pause_after,
    where_time_goes,
)
from relay.loop_lag import BUCKETS_S
from transceiver.metrics import GC_PAUSE_BUCKETS_S, GcPauses

ROOT = Path(__file__).resolve().parent.parent
REPORT_KEYS = {"scenario", "config", "setup", "turns", "series", "steps", "knee"}
REPORT_KEYS |= {"turns_by_number", "client"}
RUN_TIMEOUT_S = 240
# 0.5 s of piper's speech (QUESTIONS' 1.1-1.7 s), and the offline agent's shortest answer (the
# clock's, ~2.5 s of speech against 5-7 s from its knowledge): a turn waits for both to end
SHORT_QUESTION = "Time?"


def _scenario(report_dir: Path, *args: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "loadtest.voice_scenario", *args]
    argv += ["--processes", "1", "--report-dir", str(report_dir)]
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads((report_dir / "voice.json").read_text())
    return report


@pytest.mark.slow
def test_calls_to_the_offline_pipeline_are_set_up_and_answered(tmp_path: Path) -> None:
    """Lean client calls (the default) to the lean transceiver (the default), both at once,
    asking a short question of a short answer (the clock's), the stack without the fixed
    replies spoken ahead (the clock's is not one of them); the summary without figures (the
    other run draws them)."""
    args = ["--calls", "2", "--turns", "2", "--spawn-rate", "2", "--no-figures"]
    args += ["--question", SHORT_QUESTION, "--no-speech-prewarm"]  # its answer is not prewarmed
    report = _scenario(tmp_path, "--local", "offline", *args)
    assert report["config"]["client"] == "lean" and report["config"]["speech_prewarm"] is False
    assert set(report) >= REPORT_KEYS
    assert report["scenario"] == "voice"
    assert report["setup"]["attempted"] == report["setup"]["succeeded"] == 2
    assert report["turns"]["answered"] == 4 and report["turns"]["failed"] == {}
    assert set(report["turns"]["ms"]) == {"p50", "p95", "p99", "max"}
    for said in report["transcripts"]:
        assert "time" in said["heard"].lower(), said  # the speech-to-text heard the question
        assert said["answer"], said  # and the agent answered it
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "summary.txt").exists()
    assert report["client"]["cpu_ms_per_call_s"] is not None
    assert any(row["server"]["cpu_cores"] for row in report["series"])
    with (tmp_path / "locust_stats.csv").open() as stats:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}
    assert rows[("CALL", "setup")]["Request Count"] == "2"
    assert rows[("TURN", "turn")]["Request Count"] == "4"
    assert rows[("TURN", "turn")]["Failure Count"] == "0"
    # each turn timed from its own question's end to its own answer: a turn taken for over at
    # a pause inside the last answer (piper's between sentences) had the next question timed to
    # the rest of that answer, before the question's end
    assert float(rows[("TURN", "turn")]["Min Response Time"]) > 0, rows[("TURN", "turn")]
    assert report["faults"] == [] and report["resumes"] == []


@pytest.mark.slow
def test_a_long_call_reports_every_turn_and_survives_its_transceiver(tmp_path: Path) -> None:
    """One call of three turns on the first of two transceivers; 5 s into the run (its first
    or second turn) that transceiver is killed: the call resumes on the other one, asks the
    cut question again and finishes its turns."""
    args = ["--long-call", "3", "--fault", "transceiver@5", "--question", SHORT_QUESTION]
    report = _scenario(tmp_path, "--local", "api", *args)
    turns = report["turns_by_number"]
    assert [row["turn"] for row in turns] == [1, 2, 3]
    assert all(row["server_rss_mb"] and row["latency_ms"] > 0 for row in turns)
    assert all(said["answer"].startswith("You said: heard") for said in report["transcripts"])
    assert report["turns"]["failed"] == {} and report["setup"]["failed"] == {}
    (fault,) = report["faults"]
    assert fault["kind"] == "transceiver" and fault["name"].startswith("transceiver-")
    assert fault["affected"] == fault["resumed"] == fault["recovered"] == 1
    (call,) = fault["calls"]
    assert call["resumed"] and call["reasked"] == "answered", call  # turns went on after it
    assert call["history_kept"], call  # every answered turn replayed by the new transceiver
    with (tmp_path / "locust_stats.csv").open() as stats:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}
    assert rows[("CALL", "resume")]["Request Count"] == "1"
    assert rows[("CALL", "resume")]["Failure Count"] == "0"
    assert "1 calls affected, 1 resumed" in (tmp_path / "summary.txt").read_text()
    assert (tmp_path / "faults.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--local", "offline", "--question", "hi", "--question", " "],
         "--question: an empty question (piper would say nothing)"),
        (["--url", "http://127.0.0.1:9/", "--no-speech-prewarm"],
         "--no-speech-prewarm is for the stack --local starts"),
    ],
)  # fmt: skip
def test_a_bad_option_is_refused_before_anything_starts(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        voice_scenario.main(argv)
    assert refused.value.code == 2
    assert error in capsys.readouterr().err


def _step(knee: Knee, at_s: float, latencies_ms: list[float], failures: int = 0) -> None:
    hist = Hist()
    for ms in latencies_ms:
        hist.record(ms)
    knee.add({"turn": hist.take()}, at_s)
    knee.sample({"cpu_cores": {"transceiver-0": 0.5, "relay": 0.2}}, at_s)
    knee.tick(at_s, failures)


def test_a_caller_told_maxplaybackrate_16000_codes_no_wider_than_wideband() -> None:
    tone = (8000 * np.sin(np.arange(48_000) * 2 * np.pi * 300 / 48_000)).astype(np.int16)
    bandwidths = {packet[0] >> 3 for packet in opus_packets(tone.tobytes(), cutoff_hz=8_000)}
    # RFC 6716 section 3.1: SILK configurations 0-11 (8-11 wideband), hybrid 12-15, CELT 16-31
    # in fours by band (20-23 wideband)
    assert bandwidths and all(c <= 11 or 16 <= c <= 23 for c in bandwidths), bandwidths
    assert any(c > 11 for c in {p[0] >> 3 for p in opus_packets(tone.tobytes())})  # full band


def test_the_load_tester_codes_its_questions_as_the_answer_asks() -> None:
    asked = "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;maxplaybackrate=16000\r\n"
    assert answer_playback_rate_hz(asked) == 16_000
    assert answer_playback_rate_hz("a=fmtp:111 minptime=10;useinbandfec=1\r\n") is None
    question = Question("hello", [b"full"], [b"wide"])
    assert question.coded_for(16_000) == [b"wide"] and question.coded_for(48_000) == [b"full"]
    assert question.coded_for(None) == [b"full"] and Question("hi", [b"full"]).coded_for(16_000)
    questions = Questions([question], b"quiet", b"narrow")
    assert questions.silence_for(16_000) == b"narrow" and questions.silence_for(None) == b"quiet"
    assert Questions.from_json(questions.to_json()) == questions


def test_the_knee_is_the_last_step_under_the_threshold() -> None:
    plan = KneePlan([1, 2, 4, 8], step_s=10, settle_s=2, spawn_rate=1, threshold=1.5,
                    baseline_ms=None)  # fmt: skip
    knee = Knee(plan)
    assert knee.tick(0.0, 0) == (1, 1)
    _step(knee, 5.0, [600, 700])  # one call: the baseline, p95 700
    assert knee.tick(10.0, 0) == (2, 1)
    _step(knee, 15.0, [800, 1000])  # within 1.5 x 700
    assert knee.tick(20.0, 0) == (4, 1)
    _step(knee, 25.0, [900, 1200])  # past 1050
    assert knee.tick(30.0, 0) is None
    assert [step["ok"] for step in knee.steps] == [True, True, False]
    assert knee.knee is not None and knee.knee["sessions"] == 2
    assert knee.knee["sessions_per_core"] == 4.0  # transceiver cores only


def test_a_failure_ends_the_steps() -> None:
    plan = KneePlan([1, 2], step_s=10, settle_s=0, spawn_rate=1, threshold=1.5, baseline_ms=500)
    knee = Knee(plan)
    knee.tick(0.0, 0)
    _step(knee, 5.0, [400], failures=1)
    assert knee.tick(10.0, 1) is None
    assert knee.knee is None and knee.steps[0]["failures"] == 1


async def test_a_track_that_stops_waiting_leaves_the_others_their_tick() -> None:
    """A call's sender cancelled while it waits (its connection closing) must not cancel the
    tick every other call's track waits on."""
    metronome = Metronome()
    try:
        leaving, staying = metronome.next_tick(), metronome.next_tick()
        leaving.cancel()
        async with asyncio.timeout(1.0):
            assert isinstance(await staying, float)
    finally:
        metronome.close()


async def test_a_caller_asked_for_dtx_sends_silence_as_opus_dtx_does() -> None:
    """After the hangover, one packet of silence every 400 ms and nothing between; speech at
    once; over aiortc's sender the packet's time (its RTP timestamp) covers the ticks skipped."""
    assert answer_uses_dtx("a=fmtp:111 minptime=10;useinbandfec=1;usedtx=1\r\n")
    assert not answer_uses_dtx("a=fmtp:111 minptime=10;useinbandfec=1\r\n")
    metronome = Metronome()
    track = OpusSpeechTrack(metronome, b"quiet")
    try:
        track.dtx = True
        sent = [track.next_payload(0.0) for _ in range(DTX_HANGOVER_PACKETS + 3 * 20)]
        assert sent[:DTX_HANGOVER_PACKETS] == [b"quiet"] * DTX_HANGOVER_PACKETS
        every = [i for i, payload in enumerate(sent) if payload is not None]
        assert every[DTX_HANGOVER_PACKETS:] == [29, 49, 69]  # 400 ms apart
        track.say([b"one", b"two"])
        assert [track.next_payload(0.0) for _ in range(3)] == [b"one", b"two", b"quiet"]
        for _ in range(DTX_HANGOVER_PACKETS - 1):
            track.next_payload(0.0)  # the hangover once more
        async with asyncio.timeout(5.0):
            packet = await track.recv()  # waits out the ticks without a packet
        assert bytes(packet) == b"quiet" and packet.pts == 19 * 960
        track.dtx = False
        assert [track.next_payload(0.0) for _ in range(25)] == [b"quiet"] * 25
    finally:
        track.stop()
        metronome.close()


def _rtp(level: int | None) -> RtpPacket:
    packet = RtpPacket(payload_type=111, sequence_number=1, timestamp=960, payload=b"\xf8")
    if level is not None:
        packet.extensions.audio_level = (True, level)
    return packet


async def test_an_answer_ends_when_packets_stop_as_well_as_when_they_go_quiet() -> None:
    """A sender that sends nothing while silent (Opus DTX, the lean media path) ends an
    answer by its silence: no quiet packets ever come."""
    meter = AnswerMeter()
    onset = meter.expect_answer()
    await meter.handle_rtp_packet(_rtp(10))
    assert onset.done() and not meter.quiet.is_set()
    assert meter.last_packet_s is not None
    meter.idle(meter.last_packet_s + QUIET_GAP_S / 2)
    assert not meter.quiet.is_set()  # a gap shorter than the rule: still playing
    # (a whole gap past the last packet, kept clear of float rounding: (t + g) - t < g for some t)
    meter.idle(meter.last_packet_s + QUIET_GAP_S * 1.001)
    assert meter.quiet.is_set()
    for _ in range(QUIET_PACKETS):  # and the packet rule still holds on its own
        await meter.handle_rtp_packet(_rtp(10))
        await meter.handle_rtp_packet(_rtp(127))
    assert not meter.quiet.is_set()
    for _ in range(QUIET_PACKETS):
        await meter.handle_rtp_packet(_rtp(127))
    assert meter.quiet.is_set()


def test_the_faults_section_counts_the_calls_the_kill_cut() -> None:
    killed = 1000.0
    resumed = {"ok": True, "reason": "", "cut_turn": 2, "turns_before": 1, "history_expected": 2}
    resumes = [
        resumed | {"id": 1, "last_packet_unix_s": 999.99, "detected_unix_s": 1001.0,
                   "created_unix_s": 1001.1, "media_unix_s": 1001.2, "answer_unix_s": 1003.0,
                   "reasked": "answered", "history_items": 3},
        {"id": 2, "ok": False, "reason": "resume_http_503:no_capacity", "cut_turn": 1,
         "last_packet_unix_s": 999.98, "detected_unix_s": 1001.0},
        resumed | {"id": 3, "last_packet_unix_s": 990.0, "detected_unix_s": 991.0,
                   "reasked": "answered", "history_items": 2},  # silent before the kill
    ]  # fmt: skip
    fault = {"kind": "transceiver", "name": "transceiver-0", "at_s": 5.0, "sessions": 2}
    section = fault_section(fault | {"killed_unix_s": killed}, resumes)
    assert [call["id"] for call in section["calls"]] == [1, 2]
    assert (section["affected"], section["resumed"], section["recovered"]) == (2, 1, 1)
    assert section["not_resumed"] == {"resume_http_503:no_capacity": 1}
    assert section["other_resumes"] == 1 and section["history_kept"] == 1
    assert section["gap_ms"] == {"p50": 1200.0, "p99": 1200.0, "max": 1200.0}


def _held(knee: Knee, at_s: float, hold_s: float, latencies_ms: list[float]) -> Any:
    """Hold the step ``knee`` asks for at ``at_s`` for ``hold_s`` with these turn latencies
    (recorded at its end, past any settling); the step asked for next."""
    hist = Hist()
    for ms in latencies_ms:
        hist.record(ms)
    knee.add({"turn": hist.take()}, at_s + hold_s - 1)
    stat = {"periods": 1000.0 * at_s, "throttled": 10.0 * at_s, "throttled_ms": 0.0}
    for t_s in (at_s + hold_s - 5, at_s + hold_s - 1):  # throttled in 10% of the periods
        server = {"cpu_cores": {"transceiver-0": 0.25}, "throttling": stat}
        knee.sample(server, t_s)
        stat = {k: v + 4000 * (k == "periods") + 400 * (k == "throttled") for k, v in stat.items()}
    return knee.tick(at_s + hold_s, 0)


def test_the_knee_bisects_past_the_first_failed_step_in_calls_per_confined_core() -> None:
    """Steps 1, 8, 32: 32 fails, so 20 (holds), 26 (fails), 23 (holds), 24 (fails): 23 and 24
    are ``refine`` = 1 apart, the knee is 23 calls = 92 per confined quarter core."""
    plan = KneePlan([1, 8, 32], step_s=10, settle_s=2, spawn_rate=4, threshold=1.5,
                    baseline_ms=None, refine=1, confined_cores=0.25)  # fmt: skip
    knee = Knee(plan)
    asked, at_s = [knee.tick(0.0, 0)], 0.0
    for p95_ms in [700, 800, 2000, 900, 1500, 1000, 1100]:
        hold_s = 15.0 if knee.steps and not knee.steps[-1]["ok"] else 10.0  # after a failure
        asked.append(_held(knee, at_s, hold_s, [p95_ms]))
        at_s += hold_s
    assert [a[0] if a else None for a in asked] == [1, 8, 32, 20, 26, 23, 24, None]
    assert [s["ok"] for s in knee.steps] == [True, True, False, True, False, True, False]
    assert knee.knee is not None and knee.knee["sessions"] == 23
    assert knee.knee["sessions_per_confined_core"] == 92.0
    assert knee.knee["throttled_share"] == 0.1


def test_the_paths_compared_side_by_side(tmp_path: Path) -> None:
    """Two runs' reports make ``paths.json``, one text line each and a PNG of both curves."""
    runs = []
    for index, (path, knee_calls) in enumerate([("lean", 24), ("aiortc", 4)], start=1):
        steps: list[dict[str, Any]] = [
            {"sessions": n, "turn_ms": {"p50": 500.0, "p95": 600.0 + 20 * n}, "ok": n <= knee_calls,
             "server_cpu_cores": 0.01 * n, "sessions_per_confined_core": 4.0 * n}
            for n in (1, 4, 16, 24, 32) if n <= 2 * knee_calls
        ]  # fmt: skip
        report = {
            "scenario": "voice",
            "config": {"knee_threshold_ms": 930.0, "load_average": "1.0 1.0 1.0 1/1 1",
                       "confinement": {"confined_cores": 0.25}},
            "steps": steps,
            "knee": max((s for s in steps if s["ok"]), key=lambda s: s["sessions"]),
            "client": {"cpu_ms_per_call_s": 9.5},
        }  # fmt: skip
        (run_dir := tmp_path / f"{index}-{path}").mkdir()
        (run_dir / "voice.json").write_text(json.dumps(report))
        runs.append((path, run_dir / "voice.json"))
    runs.append(("lean", tmp_path / "3-lean" / "voice.json"))  # a run that wrote no report
    text = compare_paths(runs, tmp_path)
    lean, aiortc, missing = text.splitlines()
    assert lean.startswith("lean: knee 24 calls = 96 calls per confined core (0.25 core)")
    assert aiortc.startswith("aiortc: knee 4 calls = 16 calls per confined core")
    assert missing == f"no report at {tmp_path / '3-lean' / 'voice.json'}"
    rows = json.loads((tmp_path / "paths.json").read_text())
    assert [row["media_path"] for row in rows] == ["lean", "aiortc"]
    assert rows[0]["baseline_p95_ms"] == 620.0
    assert (tmp_path / "knee_paths.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_one_call_step_may_hold_longer() -> None:
    """``first_step_s``: the baseline's step holds longer (more turns for its p95)."""
    plan = KneePlan([1, 8], step_s=10, settle_s=2, spawn_rate=4, threshold=1.5,
                    baseline_ms=None, first_step_s=25)  # fmt: skip
    knee = Knee(plan)
    assert knee.tick(0.0, 0) == (1, 4)
    assert knee.tick(20.0, 0) == (1, 4)  # past step_s, not past first_step_s
    _step(knee, 24.0, [700])
    assert knee.tick(25.0, 0) == (8, 4)
    assert knee.tick(34.0, 0) == (8, 4) and knee.tick(35.0, 0) is None


def test_a_step_after_a_failed_one_settles_longer() -> None:
    """After a failed step the next one's first ``settle_s + step_s / 2`` is not measured, and
    it holds half a step longer."""
    plan = KneePlan([1, 8], step_s=10, settle_s=2, spawn_rate=4, threshold=1.5,
                    baseline_ms=500, refine=1)  # fmt: skip
    knee = Knee(plan)
    knee.tick(0.0, 0)
    _step(knee, 5.0, [400])  # holds
    assert knee.tick(10.0, 0) == (8, 4)
    _step(knee, 15.0, [2000])  # fails: bisect to 4
    assert knee.tick(20.0, 0) == (4, 4)
    _step(knee, 25.0, [5000])  # 5 s in: still settling after the failed step, not counted
    _step(knee, 29.0, [600])
    assert knee.tick(34.0, 0) == (4, 4)  # held 15 s, not 10
    assert knee.tick(35.0, 0) == (6, 4)
    assert knee.steps[-1]["sessions"] == 4 and knee.steps[-1]["ok"]


def test_a_turns_latency_is_split_into_the_servers_stages() -> None:
    metrics = {"type": "voicerelay.turn.metrics", "speech_stopped_ms": 0.0,
               "last_voiced_ms": -230.0, "stt_final_ms": 40.0, "llm_first_token_ms": 90.0,
               "first_audio_ms": 150.0, "first_frame_out_ms": 170.0}  # fmt: skip
    stages = turn_stages(metrics, latency_ms=520.0)
    assert stages == {"decision": 230.0, "server": 170.0, "stt": 40.0, "llm": 90.0,
                      "tts": 150.0, "outside": 120.0}  # fmt: skip
    assert turn_stages({"first_frame_out_ms": None}, 500.0) == {}  # nothing the event lacks


def _loop_metrics(lags_s: list[float], pauses_s: list[float]) -> dict[str, float]:
    """A transceiver's loop-lag and gc-pause histograms, as its /metrics would show them."""
    registry = CollectorRegistry()
    lag = Histogram("transceiver_event_loop_lag_seconds", "", buckets=BUCKETS_S,
                    registry=registry)  # fmt: skip
    for lag_s in lags_s:
        lag.observe(lag_s)
    pause = Histogram("transceiver_gc_pause_seconds", "", ["generation"],
                      buckets=GC_PAUSE_BUCKETS_S, registry=registry)  # fmt: skip
    for pause_s in pauses_s:
        pause.labels("2").observe(pause_s)
    return metric_samples(generate_latest(registry).decode())


def test_a_knee_step_says_where_its_turn_time_went() -> None:
    plan = KneePlan([1], step_s=10, settle_s=0, spawn_rate=1, threshold=1.5, baseline_ms=None)
    knee = Knee(plan)
    knee.tick(0.0, 0)
    knee.add({"turn": "", "stages": {"decision": [200.0, 240.0], "outside": [-5.0, 15.0]}}, 1.0)
    knee.sample({"cpu_cores": {}}, 1.0, _loop_metrics([0.001] * 10, [0.02]))
    lags_s = [0.001] * 10 + [0.002] * 15 + [0.03] * 4 + [0.2]  # 20 ticks since the first scrape
    knee.sample({"cpu_cores": {}}, 5.0, _loop_metrics(lags_s, [0.02, 0.08, 0.004]))
    _step(knee, 6.0, [600])
    knee.tick(10.0, 0)
    (step,) = knee.steps
    assert step["stages_ms"]["decision"] == {"p50": 220.0, "p95": 238.0}
    assert step["stages_ms"]["outside"]["p50"] == 5.0  # a negative stage is kept as it is
    loop = step["loop"]
    assert loop["ticks"] == 20 and loop["late_share"][">10ms"] == 0.25  # 5 of 20
    assert loop["late_share"][">100ms"] == 0.05
    assert loop["gc2"]["per_s"] == 0.5 and loop["gc2"]["over_50ms"] == 1  # 2 in 4 s
    assert "decision p50/p95" in where_time_goes(knee.steps)


def test_the_collectors_pauses_are_observed_by_generation() -> None:
    registry = CollectorRegistry()
    with GcPauses(registry):
        gc.collect()
    gc.collect()  # outside: not observed
    samples = metric_samples(generate_latest(registry).decode(), "transceiver_gc_pause")
    assert samples["transceiver_gc_pause_seconds_count{generation=2}"] == 1
    assert samples["transceiver_gc_pause_seconds_sum{generation=2}"] > 0


def test_the_collectors_pauses_fall_in_the_buckets_a_prometheus_histogram_puts_them_in() -> None:
    """The counts the callback keeps, shown at scrape time, are the histogram prometheus_client
    would have made of the same pauses, on every bound and between them, per generation."""
    pauses = [(0, 0.0001), (0, 0.0005), (0, 0.0006), (1, 0.005), (1, 0.3), (2, 1.0), (2, 7.5)]
    registry, reference = CollectorRegistry(), CollectorRegistry()
    counted = GcPauses(registry)
    histogram = Histogram("transceiver_gc_pause_seconds", "", ["generation"],
                          buckets=GC_PAUSE_BUCKETS_S, registry=reference)  # fmt: skip
    for generation, pause_s in pauses:
        counted._on_gc("start", {"generation": generation}, clock=lambda: 0.0)
        counted._on_gc("stop", {"generation": generation}, clock=lambda p=pause_s: p)
        histogram.labels(str(generation)).observe(pause_s)
    name = "transceiver_gc_pause_seconds"
    made = metric_samples(generate_latest(reference).decode(), name)
    made = {key: value for key, value in made.items() if "_created" not in key}
    assert metric_samples(generate_latest(registry).decode(), name) == made
    assert made[f"{name}_bucket{{generation=0,le=0.0005}}"] == 2
    assert made[f"{name}_bucket{{generation=2,le=+Inf}}"] == 2


def test_a_step_failed_with_the_generators_core_full_is_called_generator_bound() -> None:
    """With --generator-cpus the fake providers, Locust, the clients and the relay share the
    generator's core: a step that failed while that core was full measured it, and the summary
    says so beside the knee."""
    plan = KneePlan([1, 2, 4], step_s=10, settle_s=0, spawn_rate=1, threshold=1.5,
                    baseline_ms=500)  # fmt: skip
    knee = Knee(plan)
    knee.tick(0.0, 0)
    for at_s, p95_ms, busy in ((5.0, 400, 0.5), (15.0, 600, 0.6), (25.0, 900, 0.95)):
        hist = Hist()
        hist.record(p95_ms)
        knee.add({"turn": hist.take()}, at_s)
        for offset_s, share in ((0.0, busy), (1.0, 0.5)):  # one sample of two full, or none
            knee.sample({"cpu_cores": {"transceiver-0": 0.5}}, at_s + offset_s, None,
                        {"pinned_busy": share, "pinned_cores": 1})  # fmt: skip
        knee.tick(at_s + 5.0, 0)
    assert [s["ok"] for s in knee.steps] == [True, True, False]
    assert [s["generator_full_share"] for s in knee.steps] == [0.0, 0.0, 0.5]
    text = summary({"scenario": "voice", "steps": knee.steps, "knee": knee.knee})
    assert "(generator-bound: its pinned cores were full in half or more of the samples of" in text
    assert "failed step(s) 4)" in text and "generator full" in text
    unpinned = Knee(plan)
    unpinned.tick(0.0, 0)
    _step(unpinned, 5.0, [400])  # sampled without a generator row: not pinned
    unpinned.tick(10.0, 0)
    assert unpinned.steps and "generator_full_share" not in unpinned.steps[0]
    assert "generator full" not in summary({"scenario": "voice", "steps": unpinned.steps})


def test_a_knee_user_pauses_after_a_failed_call_and_a_fixed_run_user_for_the_run() -> None:
    assert pause_after({"ok": True, "reason": ""}, knee=True) == 0.0
    assert pause_after({"ok": False, "reason": "http_503"}, knee=True) == FAILED_CALL_PAUSE_S > 0
    assert pause_after({"ok": True, "reason": ""}, knee=False) == RUN_LONG_S
    assert pause_after({"ok": False, "reason": "http_503"}, knee=False) == RUN_LONG_S
