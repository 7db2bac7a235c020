"""Micro-benchmarks measured in rounds, on a shared machine: each stage's median over the rounds
and its median ratio to a reference stage timed in the same round (the ratio holds steadier under
load than either figure alone), and the load they were taken at."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def stage_medians(
    timings: list[dict[str, float]], reference: str, per: str, ratio_digits: int = 2
) -> dict[str, dict[str, float]]:
    """Rounds of per-stage timings (µs a unit, by stage name; every round has every stage) as
    each stage's ``us_per_<per>`` median and its median ``ratio`` to ``reference``'s."""
    stages: dict[str, dict[str, float]] = {}
    for name in timings[0]:
        us = [timing[name] for timing in timings]
        ratios = [timing[name] / timing[reference] for timing in timings]
        stages[name] = {
            f"us_per_{per}": round(statistics.median(us), 2),
            "ratio": round(statistics.median(ratios), ratio_digits),
        }
    return stages


def load_average() -> str:
    """``/proc/loadavg`` as it reads now."""
    return Path("/proc/loadavg").read_text().strip()


def flat_metrics(
    result: dict[str, Any], per: str, reference: str, target_stage: str, target_ratio: float
) -> dict[str, Any]:
    """``make bench``'s flat figures from a rounds result (``stages`` as ``stage_medians`` gives
    them, ``rounds``, ``load``): each stage's µs a ``per`` and its ratio to ``reference``, and
    whether ``target_stage`` stayed within ``target_ratio`` of it."""
    metrics: dict[str, Any] = {"rounds": result["rounds"], "load average": result["load"]}
    for name, stage in result["stages"].items():
        metrics[f"{name}: us a {per}"] = stage[f"us_per_{per}"]
        metrics[f"{name}: / {reference}"] = stage["ratio"]
    met = result["stages"][target_stage]["ratio"] <= target_ratio
    metrics[f"target: {target_stage} <= {target_ratio}x {reference}"] = "met" if met else "missed"
    return metrics
