"""The load-test report's figures and verdict text: ``loadtest.figures`` on a synthetic report
shaped like a real run (ramp, hold, ramp-down; a generator stall during the ramp; capacity
steps; a long call; two faults). The PNGs are decoded; absent sections draw nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from loadtest.figures import FIGURE_SIZE_PX, FIGURES, draw, saturated, summary

ROOT = Path(__file__).resolve().parent.parent
INTERVAL_S = 3.0
HOLD_SESSIONS = 10_000
STALLED_ROWS = {8, 9, 10}  # the end of the ramp: the generator's wheel ran late
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _series_row(i: int, sessions: int) -> dict[str, Any]:
    load = sessions / HOLD_SESSIONS
    stalled = i in STALLED_ROWS
    return {
        "t_s": (i + 1) * INTERVAL_S,
        "sessions": sessions,
        "media_sessions": sessions // 20,
        "rtt_ms": {
            "p50": 0.3 + load,
            "p95": 2 + 5 * load,
            "p99": 4 + 20 * load + 60 * stalled,
            "p999": 9 + 40 * load,
            "max": 20 + 60 * load,
        },
        "turn_ms": {"p50": 250 + 100 * load, "p95": 400 + 300 * load, "p99": 500 + 600 * load},
        "loss_ratio": 0.0002 * load + 0.01 * stalled,
        "jitter_ms_p99": 0.8 + 0.5 * load,
        "server": {
            "cpu_cores": {"relay": 0.02 + 1e-4 * sessions, "transceiver": 5e-5 * sessions},
            "rss_mb": {"relay": 60 + 0.01 * sessions, "transceiver": 300 + 0.05 * sessions},
        },
        "generator": {
            "cpu_cores": 0.4 + 0.6 * load,
            "tick_lag_p99_ms": 60.0 if stalled else 3.0,
            "rcvbuf_errors": 120 if i == 9 else 0,
            "sndbuf_errors": 0,
        },
    }


def full_report() -> dict[str, Any]:
    """Ramp over 10 intervals, hold for 20, ramp down over 10."""
    ramp = [HOLD_SESSIONS * (i + 1) // 10 for i in range(10)]
    sessions = ramp + [HOLD_SESSIONS] * 20 + ramp[::-1]
    steps = [
        {
            "sessions": n,
            "turn_ms": {"p50": 250 + n / 100, "p95": 400 + n**2 / 2e5},
            "server_cpu_cores": 1.5e-4 * n * (1 + n / 4e4),
            "sessions_per_core": 1 / (1.5e-4 * (1 + n / 4e4)),
            "ok": n <= 15_000,
        }
        for n in (5_000, 10_000, 15_000, 20_000)
    ]
    return {
        "scenario": "voice",
        "config": {
            "sessions": HOLD_SESSIONS,
            "canaries": 500,
            "workers": 2,
            "knee_threshold_ms": 1600,
            "stages": [[10000, 1000, 60]],
        },
        "verdict": {"valid": False, "reasons": ["tick lag p99 60.0 ms > 20 ms at t=27-33 s"]},
        "setup": {
            "attempted": HOLD_SESSIONS,
            "succeeded": HOLD_SESSIONS - 2,
            "failed": {"stun_timeout": 2},
            "ms": {"p50": 36, "p95": 120, "p99": 280, "max": 640},
        },
        "series": [_series_row(i, n) for i, n in enumerate(sessions)],
        "media": {
            "rtt_ms": {"p50": 0.28, "p95": 6.1, "p99": 44.5, "p999": 79, "max": 131},
            "loss_ratio": 0.00031,
            "jitter_ms": {"p50": 0.77, "p95": 1.1, "p99": 1.26},
            "sessions_over_1pct_loss": 3,
        },
        "steps": steps,
        "knee": {
            "sessions": 15_000,
            "sessions_per_core": 4_848,
            "turn_ms": {"p50": 400, "p95": 1525},
        },
        "turns": {
            "answered": 119,
            "failed": {"no_reply": 1},
            "ms": {"p50": 350, "p95": 390, "p99": 420, "max": 900},
        },
        # Three long calls, one row per call and turn.
        "turns_by_number": [
            {
                "turn": k,
                "latency_ms": 300 + 2 * k + 10 * call,
                "server_rss_mb": 350.2 + 0.5 * k + call,
            }
            for call in range(3)
            for k in range(1, 41)
        ],
        "faults": [
            {
                "kind": "relay",
                "at_s": 60.0,
                "affected": 500,
                "recovered": 500,
                "lost_after": 0,
                "gap_ms": {"p50": 180, "p99": 420, "max": 510},
            },
            {
                "kind": "transceiver",
                "at_s": 90.0,
                "affected": 250,
                "recovered": 248,
                "lost_after": 2,
                "gap_ms": {"p50": 2300, "p99": 3900, "max": 4100},
            },
        ],
    }


def assert_png(path: Path) -> None:
    """A real PNG of the documented size with something drawn on it."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (FIGURE_SIZE_PX[1], FIGURE_SIZE_PX[0])
    assert float(np.std(pixels[..., :3])) > 0.01  # not one flat colour


def test_absent_sections_draw_nothing(tmp_path: Path) -> None:
    rows = [
        {"t_s": 3.0 * i, "sessions": 100 * i, "media_sessions": 5 * i, "rtt_ms": {"p99": 1.0 + i}}
        for i in range(1, 8)
    ]
    written = draw({"scenario": "relay", "series": rows}, tmp_path / "some")
    assert [p.name for p in written] == ["sessions.png", "latency.png", "latency_by_sessions.png"]
    for path in written:
        assert_png(path)
    assert draw({"scenario": "ports"}, tmp_path / "none") == []
    assert list((tmp_path / "none").iterdir()) == []


def test_null_figures_neither_draw_nor_break_the_summary(tmp_path: Path) -> None:
    """Keepalive-only intervals: no media, no turns, a generator row without a tick lag yet."""
    nothing = {"rtt_ms": None, "turn_ms": None, "loss_ratio": None, "jitter_ms_p99": None}
    generator = {"cpu_cores": 0.3, "tick_lag_p99_ms": None, "rcvbuf_errors": 0}
    rows = [
        {
            "t_s": 3.0 * i,
            "sessions": 1000 * i,
            "media_sessions": 0,
            **nothing,
            "generator": generator,
        }
        for i in range(1, 6)
    ]
    report: dict[str, Any] = {"scenario": "relay", "series": rows, "steps": [], "knee": None}
    written = draw(report, tmp_path)
    assert [p.name for p in written] == ["sessions.png", "generator.png"]
    text = summary(report)
    assert "generator: tick lag p99 worst - ms, CPU max 0.30 cores" in text
    assert "knee" not in text and "loss" not in text


def test_generator_saturation_is_read_per_interval() -> None:
    flags = saturated(full_report())
    assert {i for i, bad in enumerate(flags) if bad} == STALLED_ROWS
    one_core = full_report()
    one_core["config"]["workers"] = 1  # the hold's 1.0 core is above 90 % of it
    assert sum(saturated(one_core)) > len(STALLED_ROWS)
    unknown = full_report()
    del unknown["config"]["workers"]  # CPU is then drawn but not judged
    assert {i for i, bad in enumerate(saturated(unknown)) if bad} == STALLED_ROWS


def test_the_summary_reports_the_figures() -> None:
    text = summary(full_report())
    assert "Load test voice: 10,000 sessions, 500 canaries" in text
    assert "setup: 9,998/10,000 succeeded (99.980%); failed: stun_timeout 2" in text
    assert "media RTT (ms): p50 0.28  p95 6.10  p99 44.5  p99.9 79.0  max 131" in text
    # The hold: relay 0.02 + 1.0 cores, transceiver 0.5, at 10,000 sessions.
    assert "1.52 cores (relay 1.02, transceiver 0.50)\n  0.152 millicores per session" in text
    assert "6,579 sessions per core" in text
    assert "CPU max 1.00 of 2 cores, Udp RcvbufErrors +120 SndbufErrors +0\n" in text
    assert "saturated in 3 of 40 intervals" in text
    assert "turns: 119 answered; failed: no_reply 1" in text
    assert "knee: 15,000 sessions" in text
    # Per turn number, the median of the three calls: 310 + 2k ms and 351.2 + k/2 MiB.
    assert (
        "long call: turns 1-40; median turn latency 315 ms over the first 4 turn numbers," in text
    )
    assert "387 ms over the last 4; server RSS 352 -> 371 MiB" in text
    assert "transceiver killed at 90 s, 250 sessions affected" in text


@pytest.mark.parametrize("valid", [True, False])
def test_the_invalid_banner_shows_only_when_invalid(valid: bool) -> None:
    report = full_report()
    report["verdict"] = {"valid": valid, "reasons": [] if valid else ["RcvbufErrors +120"]}
    text = summary(report)
    assert ("INVALID: generator saturated" in text) is not valid
    assert ("  - RcvbufErrors +120" in text) is not valid
    assert ("verdict: valid" in text) is valid


def test_the_command_redraws_a_saved_report_with_every_figure(tmp_path: Path) -> None:
    """The full report, saved and redrawn by ``python -m loadtest.figures`` (``draw`` and the
    verdict): every figure, in order, a real PNG, and nothing else in the folder."""
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(full_report()))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.figures", str(saved), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "INVALID: generator saturated" in done.stdout
    written = [Path(line[6:]) for line in done.stdout.splitlines() if line.startswith("wrote ")]
    assert [path.name for path in written] == [f"{name}.png" for name in FIGURES]
    for path in written:
        assert path.parent == out
        assert_png(path)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)


def test_a_busy_pinned_core_saturates_the_generator_and_is_summarised() -> None:
    """The fake providers and the relay share the generator's pinned core: its processes look
    idle while the core is full, and the interval is judged saturated all the same."""
    report = full_report()
    rows = report["series"]
    for row in rows:
        row["generator"] |= {"pinned_busy": 0.5, "pinned_cores": 1}
    before = sum(saturated(report))
    rows[0]["generator"]["pinned_busy"] = 0.97
    assert sum(saturated(report)) == before + (0 not in STALLED_ROWS)
    assert ", its pinned cores busy max 0.97 of 1, Udp" in summary(report)
    assert "pinned cores" not in summary(full_report())
