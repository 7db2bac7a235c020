"""Smoke tests of the benchmarks: a tiny relay run with real processes on loopback, and the
whole ``python -m loadtest.bench --quick`` (relay, pipeline and one run of each failover).

Asserts the shape of the results and that packets really went through every forwarder; no
timing assertions (timings belong to ``make bench``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from loadtest.bench_relay import DIRECT, DIRECTIONS, RelayBenchSettings, run_relay_bench
from loadtest.forwarders import BARE_PYTHON, C_REFERENCE, RELAY

ROOT = Path(__file__).resolve().parents[1]
TINY = RelayBenchSettings(
    flood_s=0.3,
    repeats=1,
    clients=8,
    worker_counts=(1,),
    ping_rounds=50,
    kinds=(C_REFERENCE, BARE_PYTHON, RELAY),
)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work_dir: Path = tmp_path_factory.mktemp("bench")
    lines: list[str] = []
    outcome = run_relay_bench(replace(TINY, work_dir=work_dir), lines.append)
    assert len(lines) >= len(TINY.kinds) * len(DIRECTIONS), "progress is reported per run"
    json.dumps(outcome)  # the results serialise as JSON as they are
    return outcome


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_every_forwarder_forwards_both_directions(result: dict[str, Any]) -> None:
    rows = {(r["forwarder"], r["workers"], r["direction"]): r for r in result["throughput"]}
    assert set(rows) == {(k, 1, d) for k in TINY.kinds for d in DIRECTIONS}
    for row in rows.values():
        assert row["forwarded"] > 0
        assert row["packets_per_cpu_s"] > 0
        assert row["ratio_to_reference"] > 0


@pytest.mark.slow
def test_relay_ratio_and_sessions_per_core_are_positive(result: dict[str, Any]) -> None:
    relay_rows = [r for r in result["throughput"] if r["forwarder"] == RELAY]
    assert [r["ratio_to_reference"] > 0 for r in relay_rows] == [True, True]
    sessions = {r["forwarder"]: r["sessions_per_core"] for r in result["sessions_per_core"]}
    assert set(sessions) == set(TINY.kinds)
    assert all(value > 0 for value in sessions.values())


@pytest.mark.slow
def test_latency_has_direct_and_relayed_samples(result: dict[str, Any]) -> None:
    paths = result["latency"]["paths"]
    assert set(paths) == {DIRECT, *TINY.kinds}
    for name, stats in paths.items():
        assert stats["samples"] > 0, name
        assert stats["median_us"] > 0, name
        if name != DIRECT:
            assert "added_median_us" in stats and "added_p99_us" in stats


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
def test_quick_bench_measures_each_failover_once(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "loadtest.bench", "--quick", "--out", str(tmp_path)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    failover = json.loads((tmp_path / "bench.json").read_text())["failover"]
    scenarios = failover["scenarios"]
    assert set(scenarios) == {"transceiver_kill", "relay_kill_hello", "relay_kill_cache"}, failover
    for name, scenario in scenarios.items():
        assert scenario["metrics"], name
        assert all(len(m["samples"]) == 1 for m in scenario["metrics"].values()), name
    assert scenarios["transceiver_kill"]["recalled"] == [True]
    assert "Failover, ms over 1 run(s)" in run.stdout
    assert (tmp_path / "bench.png").stat().st_size > 0
