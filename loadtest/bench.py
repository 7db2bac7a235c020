"""``make bench``: the relay benchmark, then the pipeline, provider HTTP, speech-to-text, failover
and browser end-to-end benchmarks.

Prints progress as it goes, then the tables; writes ``bench-results/bench.json``,
``bench-results/bench.png``, ``bench-results/stt.png`` (word error rate and CPU per audio second
of each speech-to-text) and (the browser's turns by stage, per media path)
``bench-results/turn-stages.png``. ``--quick`` is a short smoke run of the same code (the
smallest sizes that still measure: one question, one utterance per speech set, each spoken into
the pipeline and the speech-to-text 8 times as fast as real time, one failover run per figure;
no browser).

    .venv/bin/python -m loadtest.bench [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest import report
from loadtest.bench_relay import RelayBenchSettings, run_relay_bench
from transceiver.config import DEFAULT_MEDIA_PATH

# --quick (the smoke test's): every forwarder and path once, each as short as still measures
QUICK = RelayBenchSettings(flood_s=0.3, repeats=1, clients=8, worker_counts=(1,), ping_rounds=50)


class Progress:
    """Progress lines stamped with the seconds since the benchmark started."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, line: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {line}", flush=True)


def run_optional(progress: Progress, name: str, function: str, /, **kwargs: Any) -> dict[str, Any]:
    """Run ``loadtest.<name>.<function>(**kwargs)``; a missing module is reported, not fatal."""
    try:
        module = importlib.import_module(f"loadtest.{name}")
    except ImportError as error:
        progress(f"{name}: skipped, not importable ({error})")
        return {"skipped": f"loadtest.{name} not importable: {error}"}
    progress(f"{name}: running")
    result: dict[str, Any] = getattr(module, function)(**kwargs)
    return result


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def settings_from(args: argparse.Namespace) -> RelayBenchSettings:
    settings = QUICK if args.quick else RelayBenchSettings()
    return replace(settings, work_dir=args.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="results dir")
    args = parser.parse_args(argv)
    progress = Progress()
    settings = settings_from(args)
    results = {"machine": machine(), "relay": run_relay_bench(settings, progress)}
    results["pipeline"] = run_optional(
        progress, "bench_pipeline", "run_pipeline_bench", quick=args.quick
    )
    # CPU a provider request costs, our asyncio network under httpx against its own (a ratio)
    results["provider_http"] = run_optional(
        progress, "bench_provider_http", "run_provider_http_bench", quick=args.quick
    )
    # offline speech-to-text: Moonshine against pocketsphinx on recorded and piper speech
    results["stt"] = run_optional(
        progress, "bench_stt", "run_stt_bench", quick=args.quick, out=args.out
    )
    results["failover"] = run_optional(
        progress, "bench_failover", "run_failover_bench", quick=args.quick, progress=progress
    )
    # the engine's CPU per 20 ms frame of a call's input, as a multiple of webrtcvad's (a ratio)
    results["frame_stages"] = run_optional(
        progress, "frame_stages", "bench_metrics", quick=args.quick
    )
    # a caller's packet through the lean path into the engine, as a multiple of its Opus decode
    results["lean_inbound"] = run_optional(
        progress, "lean_inbound", "bench_metrics", quick=args.quick
    )
    # the CPU an answer's audio costs, per answer-second, as a multiple of its Opus encoding
    results["answer_audio"] = run_optional(
        progress, "answer_audio", "bench_metrics", quick=args.quick
    )
    e2e_paths: dict[str, Any] = {}
    if not args.quick:
        e2e_paths = run_optional(progress, "bench_e2e", "run_e2e_bench")
        default = e2e_paths.get(DEFAULT_MEDIA_PATH, e2e_paths)  # the default path's, flat
        results["e2e"] = {k: v for k, v in default.items() if not isinstance(v, dict)}
        results["e2e_by_media_path"] = e2e_paths
        # turn latency through a network namespace: 5 % loss, 40 +- 8 ms delay, a 300 ms outage
        results["impaired"] = run_optional(progress, "bench_impaired", "run_impaired_bench")
        # the transceiver's CPU per call-second, lean against aiortc in the same run (a ratio)
        results["media_cost"] = run_optional(progress, "media_cost", "run_media_cost_bench")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    png = report.plot(results, args.out / "bench.png")
    print("\n" + report.render(results))
    title = "Provider requests: this process's CPU a request, by path (lean, or the SDK's)"
    print("\n" + report.metrics_text(title, results["provider_http"]))
    if "media_cost" in results:
        title = "Transceiver CPU per call-second, API-offloaded calls (1000 / it = calls per core)"
        print("\n" + report.metrics_text(title, results["media_cost"]))
    title = "The engine's CPU per 20 ms frame of a call's input (loadtest.frame_stages)"
    print("\n" + report.metrics_text(title, results["frame_stages"]))
    title = "A caller's packet in, CPU a packet (loadtest.lean_inbound)"
    print("\n" + report.metrics_text(title, results["lean_inbound"]))
    title = "An answer's audio out, CPU per answer-second (loadtest.answer_audio)"
    print("\n" + report.metrics_text(title, results["answer_audio"]))
    if "skipped" not in e2e_paths and e2e_paths:
        from loadtest.bench_e2e import e2e_report

        print("\n" + e2e_report(e2e_paths, args.out))
    elapsed_s = time.monotonic() - progress.started
    print(f"\nwrote {args.out / 'bench.json'} and {png} in {elapsed_s:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
