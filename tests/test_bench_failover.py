"""The failover benchmark's pure parts: its statistics, its two detectors and its table."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.bench_failover import FirstSound, OutageWatch, summarise_runs, summary
from loadtest.report import failover_text


def test_summary_is_median_min_max_and_every_sample_in_run_order() -> None:
    assert summary([310.04, 250.0, 990.26, 270.0]) == {
        "median": 290.0,
        "min": 250.0,
        "max": 990.3,
        "samples": [310.0, 250.0, 990.3, 270.0],
    }
    assert summary([42.0])["median"] == 42.0


def test_summary_of_no_samples_is_refused() -> None:
    with pytest.raises(ValueError):
        summary([])


def test_runs_are_summarised_per_metric_keeping_the_metric_order() -> None:
    runs = [{"total_ms": 300.0, "part_ms": 100.0}, {"total_ms": 500.0, "part_ms": 50.0}]
    summed = summarise_runs(runs)
    assert list(summed) == ["total_ms", "part_ms"]
    assert summed["total_ms"]["median"] == 400.0
    assert summed["part_ms"]["samples"] == [100.0, 50.0]
    assert summarise_runs([]) == {}


def frame(value: int) -> bytes:
    return np.full(960, value, dtype=np.int16).tobytes()


def test_first_sound_is_the_first_frame_that_is_not_all_zeros() -> None:
    frames = [frame(0), frame(0)]
    watch = FirstSound(frames)
    assert not watch.heard()
    assert watch.checked == 2  # silent frames are looked at once
    frames += [frame(0), frame(-3)]
    assert watch.heard()
    assert watch.checked == 3  # the index of the sound


def test_an_outage_ends_at_the_first_rise_after_a_quiet_gap() -> None:
    watch = OutageWatch(gap_s=0.2, count=100, changed_at=10.0)  # the kill, at t = 10 s
    assert not watch.resumed(10.01, 102)  # packets in flight at the kill: no gap yet
    assert not watch.resumed(10.15, 102)
    assert not watch.resumed(10.50, 102)  # quiet, but nothing new
    assert watch.resumed(10.60, 103)  # 0.59 s after the last rise: media again
    assert not watch.resumed(10.62, 104)  # and then it keeps flowing


def test_failover_table_lists_each_metric_and_reports_a_failure() -> None:
    metrics = summarise_runs([{"kill_to_media_ms": 510.0}, {"kill_to_media_ms": 530.0}])
    failover = {
        "runs": 2,
        "scenarios": {
            "transceiver_kill": {"error": "TimeoutError: no media"},
            "relay_kill_hello": {"metrics": metrics},
        },
    }
    lines = failover_text(failover).splitlines()
    assert lines[0] == "Failover, ms over 2 run(s) each (samples in run order)"
    assert lines[2].split() == ["transceiver_kill", "FAILED:", "TimeoutError:", "no", "media"]
    assert lines[3].split() == [
        "relay_kill_hello",
        "kill_to_media",
        "520",
        "510",
        "530",
        "510",
        "530",
    ]
