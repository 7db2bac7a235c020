"""Smoke test of the benchmarks: the whole ``python -m loadtest.bench --quick`` once (relay,
pipeline, speech-to-text and one run of each failover, with real processes on loopback), its
results read by each test.

Asserts the shape of the results and that packets really went through every forwarder; no
timing assertions (timings belong to ``make bench``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.bench_relay import DIRECT, DIRECTIONS, default_kinds
from loadtest.forwarders import RELAY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server"),
]
Quick = tuple[dict[str, Any], str, Path]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Quick:
    """``make bench``'s code at its quick sizes: its results, its output, its directory."""
    out: Path = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "loadtest.bench", "--quick", "--out", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), run.stdout, out


@pytest.mark.timeout(300)
def test_every_forwarder_forwards_both_directions(quick: Quick) -> None:
    relay = quick[0]["relay"]
    kinds = default_kinds()
    rows = {(r["forwarder"], r["workers"], r["direction"]): r for r in relay["throughput"]}
    assert set(rows) == {(k, 1, d) for k in kinds for d in DIRECTIONS}
    for row in rows.values():
        assert row["forwarded"] > 0
        assert row["packets_per_cpu_s"] > 0
        assert row["ratio_to_reference"] > 0
    runs = [line for line in quick[1].splitlines() if "run 1/1" in line]
    assert len(runs) == len(kinds) * len(DIRECTIONS), "progress is reported per run"


def test_relay_ratio_and_sessions_per_core_are_positive(quick: Quick) -> None:
    relay = quick[0]["relay"]
    relay_rows = [r for r in relay["throughput"] if r["forwarder"] == RELAY]
    assert [r["ratio_to_reference"] > 0 for r in relay_rows] == [True, True]
    sessions = {r["forwarder"]: r["sessions_per_core"] for r in relay["sessions_per_core"]}
    assert set(sessions) == set(default_kinds())
    assert all(value > 0 for value in sessions.values())


def test_latency_has_direct_and_relayed_samples(quick: Quick) -> None:
    paths = quick[0]["relay"]["latency"]["paths"]
    assert set(paths) == {DIRECT, *default_kinds()}
    for name, stats in paths.items():
        assert stats["samples"] > 0, name
        assert stats["median_us"] > 0, name
        if name != DIRECT:
            assert "added_median_us" in stats and "added_p99_us" in stats


def test_the_pipeline_and_speech_to_text_are_measured(quick: Quick) -> None:
    pipeline, stt = quick[0]["pipeline"], quick[0]["stt"]
    assert pipeline["turns"] == 1 and pipeline["VAD CPU per 20 ms frame (us)"] > 0, pipeline
    assert "skipped" not in stt, stt


def test_a_provider_requests_cpu_is_measured_on_every_path(quick: Quick) -> None:
    http = quick[0]["provider_http"]
    for kind in ("chat", "transcription", "speech"):
        assert http[f"{kind} CPU ms a request (anyio)"] > 0, http
        assert http[f"{kind} asyncio / anyio"] > 0, http
        assert http[f"{kind} lean / asyncio"] > 0, http
    assert "Provider requests: this process's CPU a request" in quick[1]


def test_quick_bench_measures_each_failover_once(quick: Quick) -> None:
    results, stdout, out = quick
    failover = results["failover"]
    scenarios = failover["scenarios"]
    assert set(scenarios) == {"transceiver_kill", "relay_kill_hello", "relay_kill_cache"}, failover
    for name, scenario in scenarios.items():
        assert scenario["metrics"], name
        assert all(len(m["samples"]) == 1 for m in scenario["metrics"].values()), name
    assert scenarios["transceiver_kill"]["recalled"] == [True]
    assert "Failover, ms over 1 run(s)" in stdout
    assert (out / "bench.png").stat().st_size > 0


def test_the_engines_cpu_a_frame_is_measured_against_webrtcvads(quick: Quick) -> None:
    results, stdout, _ = quick
    frames = results["frame_stages"]
    assert "skipped" not in frames and frames["rounds"] == 1, frames
    assert frames["engine.push_audio, voice's end on: us a frame"] > 0, frames
    assert frames["engine.push_audio, voice's end on: / webrtcvad"] > 0, frames
    assert "The engine's CPU per 20 ms frame of a call's input" in stdout


def test_a_callers_packet_is_measured_against_its_opus_decode(quick: Quick) -> None:
    results, stdout, _ = quick
    inbound = results["lean_inbound"]
    assert "skipped" not in inbound and inbound["rounds"] == 1, inbound
    assert inbound["whole path: us a packet"] > 0, inbound
    assert inbound["whole path, no codec nor engine: / opus decode"] > 0, inbound
    assert "A caller's packet in, CPU a packet" in stdout


def test_an_answers_audio_is_measured_against_its_opus_encoding(quick: Quick) -> None:
    results, stdout, _ = quick
    audio = results["answer_audio"]
    assert "skipped" not in audio and audio["runs"] == 1, audio
    assert audio["PCM taken as spoken"] is True, audio
    assert audio["engine and loop: / opus encode"] > 0, audio
    assert "An answer's audio out, CPU per answer-second" in stdout
