"""The voice knee of several media paths side by side: ``python -m loadtest voice --knee
--media-paths lean,aiortc`` runs one knee per path (each on a fresh stack, in the order given)
and this module puts their reports together: ``paths.json`` (per run: the path, its knee in
calls per confined core when confined, every step, the confinement and its throttling, the
load generator's cost, the load average at the start), ``knee_paths.png`` (turn p95 and
transceiver CPU against calls, one curve per run) and a few lines of text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import figures

PATHS_NAME, FIGURE_NAME = "paths.json", "knee_paths.png"


def path_row(path: str, report: dict[str, Any]) -> dict[str, Any]:
    """One run's figures for the comparison."""
    config = report.get("config") or {}
    return {
        "media_path": path,
        "knee": report.get("knee"),
        "baseline_p95_ms": _baseline_p95(report),
        "threshold_ms": config.get("knee_threshold_ms"),
        "steps": report.get("steps") or [],
        "confinement": config.get("confinement"),
        "generator_cpus": config.get("generator_cpus"),
        "client": report.get("client"),
        "load_average": config.get("load_average"),
    }


def _baseline_p95(report: dict[str, Any]) -> float | None:
    steps = report.get("steps") or []
    first = steps[0].get("turn_ms") if steps else None
    return None if not first else float(first["p95"])


def line(row: dict[str, Any]) -> str:
    """``lean: knee 24 calls = 96 calls per confined core (0.25 core), p95 ...``."""
    knee, name = row["knee"], row["media_path"]
    if not knee:
        return f"{name}: no step held (baseline p95 {row['baseline_p95_ms']} ms)"
    text = f"{name}: knee {knee['sessions']} calls"
    if (per_core := knee.get("sessions_per_confined_core")) is not None:
        cores = (row["confinement"] or {}).get("confined_cores")
        text += f" = {per_core:g} calls per confined core ({cores:g} core)"
    text += f"; {knee.get('sessions_per_core')} calls per measured transceiver core"
    p95 = (knee.get("turn_ms") or {}).get("p95")
    text += f"; turn p95 {p95} ms against one call's {row['baseline_p95_ms']} ms"
    if knee.get("throttled_share") is not None:
        text += f"; throttled in {100 * knee['throttled_share']:.0f}% of periods"
    client = row["client"] or {}
    text += f"; client {client.get('cpu_ms_per_call_s')} ms CPU per call-s"
    return text + f" (loadavg at start {row['load_average']})"


def compare_paths(runs: Sequence[tuple[str, Path]], out_dir: Path) -> str:
    """Write ``paths.json`` and the figure in ``out_dir`` from each run's report (media path,
    report JSON); the text."""
    reports = []
    for path, report_path in runs:
        if report_path.exists():
            reports.append((path, json.loads(report_path.read_text())))
    rows = [path_row(path, report) for path, report in reports]
    (out_dir / PATHS_NAME).write_text(json.dumps(rows, indent=2))
    labels = [f"{i}: {path}" for i, (path, _) in enumerate(reports, start=1)]
    figure = figures.knee_paths_figure(list(zip(labels, [r for _, r in reports], strict=True)))
    if figure is not None:
        figure.savefig(out_dir / FIGURE_NAME, dpi=figures.DPI)
        figures.close(figure)
    missing = [str(report) for _, report in runs if not report.exists()]
    text = [line(row) for row in rows] + [f"no report at {report}" for report in missing]
    return "\n".join(text)
