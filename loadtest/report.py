"""Benchmark results as text tables and a PNG plot (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loadtest.bench_relay import PACKET_BYTES

Result = dict[str, Any]
ARROWS = {
    "client_to_transceiver": "client->transceiver",
    "transceiver_to_client": "transceiver->client",
}


FAILOVER_SCENARIOS = {
    "transceiver_kill": "transceiver SIGKILLed, session resumed on another (Redis)",
    "relay_kill_hello": "relay SIGKILLed and restarted, routes recovered by HELLO",
    "relay_kill_cache": "relay SIGKILLed and restarted with HELLO off, routes from Redis",
    "relay_kill": "relay SIGKILLed and restarted",
}
READY_LINE_NOTE = (
    "  (relay_ready_to_media < 0: the new workers carried media before the supervisor printed"
    " its ready line; it looks at the workers every 0.1 s)"
)
BUSY_NOTE = (
    "(cores busy: forwarder CPU / wall time. Below 1 per worker the forwarder was waiting for the"
    " load generator or for a core on this shared machine; pkt/CPU-s counts only the"
    " forwarder's own CPU time.)"
)


def _k(value: float) -> str:
    return f"{value / 1e3:.1f}k"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def throughput_table(relay: Result) -> str:
    header = ["forwarder", "workers", "direction", "pkt/CPU-s", "vs C ref", "pkt/s", "cores busy"]
    rows = [
        [
            r["forwarder"],
            str(r["workers"]),
            ARROWS[r["direction"]],
            _k(r["packets_per_cpu_s"]),
            _ratio(r["ratio_to_reference"]),
            _k(r["packets_per_s"]),
            f"{r['busy_cores']:.2f}",
        ]
        for r in sorted(relay["throughput"], key=lambda r: (r["workers"], r["direction"]))
    ]
    return _table(header, rows)


def sessions_table(relay: Result) -> str:
    by_key = {
        (r["forwarder"], r["workers"]): r["sessions_per_core"] for r in relay["sessions_per_core"]
    }
    rows = []
    for (kind, workers), sessions in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        reference = by_key.get(("c-reference", workers))
        ratio = sessions / reference if reference else None
        rows.append([kind, str(workers), f"{sessions:,.0f}", _ratio(ratio)])
    return _table(["forwarder", "workers", "sessions/core", "vs C ref"], rows)


def latency_table(relay: Result) -> str:
    rows = []
    for name, p in relay["latency"]["paths"].items():
        added = [f"{p[k]:+.1f}" if k in p else "-" for k in ("added_median_us", "added_p99_us")]
        rows.append([name, f"{p['median_us']:.1f}", f"{p['p99_us']:.1f}", *added, str(p["lost"])])
    header = ["path", "RTT median us", "RTT p99 us", "added median us", "added p99 us", "lost"]
    return _table(header, rows)


def render(results: Result) -> str:
    relay = results["relay"]
    settings = relay["settings"]
    parts = [
        f"Relay forwarding, {PACKET_BYTES}-byte packets, median of {settings['repeats']} runs of "
        f"{settings['flood_s']} s; CPU = the forwarder's supervisor + workers (/proc)",
        throughput_table(relay),
        BUSY_NOTE,
        *(counters_text(check) for check in relay.get("relay_counters", [])),
        "",
        "Voice sessions per core (50 packets/s each way per session)",
        sessions_table(relay),
    ]
    if relay.get("latency"):
        parts += ["", latency_title(relay["latency"]), latency_table(relay)]
    parts += ["", metrics_text("Pipeline benchmark", results.get("pipeline"))]
    e2e = results.get("e2e")
    if e2e is not None:
        summary = {k: v for k, v in e2e.items() if k != "per_turn"}
        parts += ["", metrics_text("End to end in Chromium (speech end -> first audio)", summary)]
    if "failover" in results:
        parts += ["", failover_text(results["failover"])]
    return "\n".join(parts)


def failover_text(failover: Result) -> str:
    """The failover figures: per scenario, each metric's median, min, max and samples (ms)."""
    if "skipped" in failover:
        return f"Failover: skipped ({failover['skipped']})"
    title = f"Failover, ms over {failover['runs']} run(s) each (samples in run order)"
    rows, notes = [], []
    for name, scenario in failover["scenarios"].items():
        notes.append(f"  {name}: {FAILOVER_SCENARIOS.get(name, name)}")
        if "error" in scenario:
            rows.append([name, "FAILED: " + scenario["error"], "", "", "", ""])
        rows += _failover_rows(name, scenario.get("metrics", {}))
        if "recalled" in scenario:
            recalled = sum(scenario["recalled"])
            notes.append(f"    the resumed session recalled the question: {recalled}/"
                         f"{len(scenario['recalled'])} runs")  # fmt: skip
    if any(name.startswith("relay_kill") for name in failover["scenarios"]):
        notes.append(READY_LINE_NOTE)
    header = ["scenario", "metric", "median", "min", "max", "samples"]
    return "\n".join([title, _table(header, rows), *notes])


def _failover_rows(name: str, metrics: Result) -> list[list[str]]:
    rows = []
    for i, (metric, s) in enumerate(metrics.items()):
        samples = " ".join(f"{v:.0f}" for v in s["samples"])
        numbers = [f"{s[k]:.0f}" for k in ("median", "min", "max")]
        rows.append([name if i == 0 else "", metric.removesuffix("_ms"), *numbers, samples])
    return rows


def latency_title(latency: Result) -> str:
    return (
        f"Round trip on loopback, {latency['rounds']} interleaved rounds "
        f"(direct and through each forwarder in turn), {latency['workers']} worker(s)"
    )


def counters_text(check: Result) -> str:
    sink, counted = check["sink_received"], check["relay_forwarded"]
    directions = ", ".join(
        f"{ARROWS[d]} {counted[d]:,.0f} (sinks got {sink[d]:,})" for d in sorted(sink)
    )
    drops = ", ".join(f"{k} {v:,.0f}" for k, v in check["relay_dropped"].items()) or "none"
    return f"relay /metrics, {check['workers']} worker(s): forwarded {directions}; drops: {drops}"


def metrics_text(title: str, metrics: Result | None) -> str:
    """A flat result dict as a two-column table (the pipeline and end-to-end benches)."""
    if not metrics:
        return f"{title}: not run"
    if "skipped" in metrics:
        return f"{title}: skipped ({metrics['skipped']})"
    return f"{title}\n" + _table(
        ["metric", "value"], [[str(k), _value(v)] for k, v in metrics.items()]
    )


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot(results: Result, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relay = results["relay"]
    failover = _failover_bars(results.get("failover"))
    ratios = (3, 2, 3) if failover else (3, 2)
    figure, axes = plt.subplots(1, len(ratios), figsize=(6.5 * len(ratios), 5), width_ratios=ratios)
    _plot_throughput(axes[0], relay["throughput"])
    if relay.get("latency"):
        _plot_latency(axes[1], relay["latency"])
    if failover:
        _plot_failover(axes[2], failover)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_throughput(axes: Any, rows: list[Result]) -> None:
    groups = sorted({(r["workers"], r["direction"]) for r in rows})
    kinds = sorted({r["forwarder"] for r in rows}, key=lambda k: (k != "c-reference", k))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        values = [_rate(rows, kind, g) for g in groups]
        bars = axes.bar(
            [g + i * width for g in range(len(groups))],
            [v / 1e3 for v in values],
            width,
            label=kind,
        )
        ratios = [_ratio_of(rows, kind, g) for g in groups]
        axes.bar_label(bars, labels=[_ratio(r) for r in ratios], fontsize=7)
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    axes.set_xticklabels([f"{w} worker(s)\n{ARROWS[d]}" for w, d in groups], fontsize=8)
    axes.set_ylabel("thousand packets per CPU-second")
    axes.set_title("Forwarding efficiency, 200-byte packets (labels: x C reference)")
    axes.legend()


def _rate(rows: list[Result], kind: str, group: tuple[int, str]) -> float:
    return next(
        (
            r["packets_per_cpu_s"]
            for r in rows
            if (r["forwarder"], r["workers"], r["direction"]) == (kind, *group)
        ),
        0.0,
    )


def _ratio_of(rows: list[Result], kind: str, group: tuple[int, str]) -> float | None:
    return next(
        (
            r["ratio_to_reference"]
            for r in rows
            if (r["forwarder"], r["workers"], r["direction"]) == (kind, *group)
        ),
        None,
    )


def _plot_latency(axes: Any, latency: Result) -> None:
    names = list(latency["paths"])
    medians = [latency["paths"][n]["median_us"] for n in names]
    p99s = [latency["paths"][n]["p99_us"] for n in names]
    positions = range(len(names))
    axes.bar([p - 0.2 for p in positions], medians, 0.4, label="median")
    axes.bar([p + 0.2 for p in positions], p99s, 0.4, label="p99")
    axes.set_xticks(list(positions))
    axes.set_xticklabels(names, fontsize=8)
    axes.set_ylabel("round trip, microseconds")
    axes.set_title(f"Loopback RTT, {latency['rounds']} interleaved rounds")
    axes.legend()


def _failover_bars(failover: Result | None) -> list[tuple[str, Result]]:
    """``(label, summary)`` of each measured scenario's headline (first) metric."""
    bars = []
    for name, scenario in (failover or {}).get("scenarios", {}).items():
        for metric, summary in list(scenario.get("metrics", {}).items())[:1]:
            bars.append((f"{name}\n{metric.removesuffix('_ms')}", summary))
    return bars


def _plot_failover(axes: Any, bars: list[tuple[str, Result]]) -> None:
    labels = [label for label, _ in bars]
    medians = [s["median"] for _, s in bars]
    spread = [[s["median"] - s["min"] for _, s in bars], [s["max"] - s["median"] for _, s in bars]]
    positions = list(range(len(bars)))[::-1]  # first metric on top
    axes.barh(positions, medians, xerr=spread, capsize=3)
    axes.set_yticks(positions)
    axes.set_yticklabels(labels, fontsize=8)
    axes.set_xlabel("milliseconds (bar: median, whiskers: min-max)")
    axes.set_title("Failover: kill -> audio / media again")
