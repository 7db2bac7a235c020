"""A load-test report (the JSON ``python -m loadtest`` writes) drawn as PNG figures, and its
verdict as plain text.

``draw(report, out_dir)`` writes one PNG per figure the report has data for (``FIGURES``, in
order) and skips the others; ``summary(report)`` is the verdict block. Every section of the
report is optional except ``scenario``. ``python -m loadtest.figures REPORT.json [--out DIR]``
redraws a saved report and prints its summary.

Conventions read from the report:
- a ``series`` row describes the interval that ends at its ``t_s``; its generator
  ``rcvbuf_errors``/``sndbuf_errors`` are the increases during that interval;
- the generator's cores available are ``config["generator_cores"]``, else ``config["workers"]``
  (one core per worker process); without either, its CPU is drawn but not judged. A row is
  shaded as saturated when ``loadtest.hosts.generator_verdict`` fails it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from loadtest.hosts import CPU_SHARE_LIMIT, TICK_LAG_P99_LIMIT_MS, generator_verdict

Report = dict[str, Any]
Row = dict[str, Any]
Values = npt.NDArray[np.float64]
DPI = 100
FIGURE_SIZE_PX = (1200, 520)
PERCENTILES = ("p50", "p95", "p99")
SATURATED = {"color": "tab:red", "alpha": 0.15, "linewidth": 0}


# --- Reading the report ---------------------------------------------------------------------


def title(report: Report) -> str:
    """``scenario: N sessions, M canaries`` (the parts the config has)."""
    config = report.get("config") or {}
    parts = [f"{config[k]:,} {k}" for k in ("sessions", "canaries") if k in config]
    return str(report["scenario"]) + (": " + ", ".join(parts) if parts else "")


def _rows(report: Report) -> list[Row]:
    return list(report.get("series") or [])


def _get(row: Any, path: tuple[str, ...]) -> float:
    for key in path:
        if not isinstance(row, dict) or row.get(key) is None:
            return math.nan
        row = row[key]
    return float(row)


def _values(rows: list[Row], *path: str) -> Values:
    return np.array([_get(row, path) for row in rows], dtype=np.float64)


def _has(values: Values) -> bool:
    return bool(np.isfinite(values).any())


def _worst(values: Values) -> float:
    return float(np.nanmax(values)) if _has(values) else math.nan


def _mean(values: Values) -> float:
    return float(np.nanmean(values)) if _has(values) else math.nan


def _median(values: Values) -> float:
    return float(np.nanmedian(values)) if _has(values) else math.nan


def _server(row: Row) -> Row:
    return dict(row.get("server") or {})


def _components(rows: list[Row], kind: str) -> list[str]:
    """The server components named in any row's ``server[kind]``, in first-seen order."""
    names = (name for row in rows for name in (_server(row).get(kind) or {}))
    return list(dict.fromkeys(names))


def generator_cores(report: Report) -> float | None:
    """The cores the generator's workers may use, when the config says."""
    config = report.get("config") or {}
    cores = config.get("generator_cores") or config.get("workers")
    return None if cores is None else float(cores)


def saturated(report: Report) -> list[bool]:
    """Per series row: did ``generator_verdict`` fail the generator then (False without data)."""
    cores = generator_cores(report) or math.inf  # unknown: CPU alone never fails it
    return [_row_verdict(row, cores)[0] is False for row in _rows(report)]


def _row_verdict(row: Row, cores: float) -> tuple[bool | None, list[str]]:
    generator = row.get("generator")
    if not generator:
        return None, []
    return generator_verdict(
        float(generator.get("tick_lag_p99_ms") or 0.0),
        int(generator.get("rcvbuf_errors") or 0),
        int(generator.get("sndbuf_errors") or 0),
        float(generator.get("cpu_cores") or 0.0),
        cores,
        float(generator.get("pinned_busy") or 0.0),
        int(generator.get("pinned_cores") or 0),
    )


# --- Drawing --------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported: no display needed
    import matplotlib.pyplot as plt

    return plt


def _figure(report: Report, what: str, panels: int = 1) -> tuple[Any, list[Any]]:
    size_in = (FIGURE_SIZE_PX[0] / DPI, FIGURE_SIZE_PX[1] / DPI)
    figure, axes = _pyplot().subplots(
        1, panels, figsize=size_in, squeeze=False, layout="constrained"
    )
    figure.suptitle(f"{title(report)} — {what}")
    return figure, list(axes[0])


def _label(axes: Any, x: str, y: str, log: bool = False) -> None:
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    if log and any(np.nanmax(line.get_ydata(), initial=0.0) > 0 for line in axes.get_lines()):
        axes.set_yscale("log")


def _plot(axes: Any, x: Values, curves: dict[str, Values], style: str = "-") -> bool:
    """One line per curve with any data; False when none had any."""
    drawn = False
    for label, y in curves.items():
        if _has(y):
            axes.plot(x, y, style, label=label, markersize=4)
            drawn = True
    return drawn


def _shade(axes: Any, report: Report) -> None:
    """Shade the intervals in which the generator was saturated."""
    t = _values(_rows(report), "t_s")
    starts = np.concatenate(([t[0] - (t[1] - t[0] if len(t) > 1 else 1.0)], t[:-1]))
    label = "generator saturated"
    for start, end, bad in zip(starts, t, saturated(report), strict=True):
        if bad:
            axes.axvspan(start, end, label=label, **SATURATED)
            label = "_"  # one legend entry


def _latency(axes: Any, x: Values, rows: list[Row], styles: tuple[str, str]) -> bool:
    """RTT and turn p50/p95/p99 of each row against ``x``, RTT and turn in their own style."""
    drawn = False
    for (name, key), style in zip((("RTT", "rtt_ms"), ("turn", "turn_ms")), styles, strict=True):
        curves = {f"{name} {p}": _values(rows, key, p) for p in PERCENTILES}
        drawn = _plot(axes, x, curves, style) or drawn
    return drawn


def sessions_figure(report: Report) -> Any | None:
    rows = _rows(report)
    t = _values(rows, "t_s")
    curves = {"sessions": _values(rows, "sessions"), "media": _values(rows, "media_sessions")}
    if not _has(curves["sessions"]):
        return None
    figure, (axes,) = _figure(report, "sessions over time")
    _plot(axes, t, curves)
    _label(axes, "time (s)", "sessions")
    return figure


def latency_figure(report: Report) -> Any | None:
    rows = _rows(report)
    figure, (axes,) = _figure(report, "latency per interval")
    if not _latency(axes, _values(rows, "t_s"), rows, ("-", "--")):
        _discard(figure)
        return None
    _shade(axes, report)
    _label(axes, "time (s)", "latency (ms)", log=True)
    return figure


def latency_by_sessions_figure(report: Report) -> Any | None:
    rows = _rows(report)
    figure, (axes,) = _figure(report, "latency against sessions (one point per interval)")
    if not _latency(axes, _values(rows, "sessions"), rows, (".", "^")):
        _discard(figure)
        return None
    _label(axes, "sessions", "latency (ms)", log=True)
    return figure


def server_figure(report: Report) -> Any | None:
    rows = [row for row in _rows(report) if row.get("sessions")]
    cpu_names, rss_names = _components(rows, "cpu_cores"), _components(rows, "rss_mb")
    if not cpu_names:
        return None
    sessions = _values(rows, "sessions")
    cpu = {name: _values(rows, "server", "cpu_cores", name) for name in cpu_names}
    total = np.nansum(np.array(list(cpu.values())), axis=0)
    figure, axes = _figure(report, "server against sessions", 3 if rss_names else 2)
    _plot(axes[0], sessions, {"total": total, **cpu}, style=".")
    _label(axes[0], "sessions", "server CPU (cores)")
    _plot(axes[1], sessions, {"total": 1e3 * total / sessions}, style=".")
    _label(axes[1], "sessions", "server CPU per session (millicores)")
    if rss_names:
        rss = {name: _values(rows, "server", "rss_mb", name) for name in rss_names}
        _plot(axes[2], sessions, rss, style=".")
        _label(axes[2], "sessions", "server RSS (MiB)")
    return figure


def loss_jitter_figure(report: Report) -> Any | None:
    rows = _rows(report)
    t, loss, jitter = (_values(rows, key) for key in ("t_s", "loss_ratio", "jitter_ms_p99"))
    if not (_has(loss) or _has(jitter)):
        return None
    figure, axes = _figure(report, "loss and jitter per interval", 2)
    for panel, curve, unit in (
        (0, {"loss": 100 * loss}, "loss (%)"),
        (1, {"jitter p99": jitter}, "per-session jitter p99 (ms)"),
    ):
        _plot(axes[panel], t, curve)
        _shade(axes[panel], report)
        _label(axes[panel], "time (s)", unit)
    return figure


def generator_figure(report: Report) -> Any | None:
    rows = _rows(report)
    t = _values(rows, "t_s")
    lag, cpu = (
        _values(rows, "generator", "tick_lag_p99_ms"),
        _values(rows, "generator", "cpu_cores"),
    )
    errors = {
        f"Udp {k}": _values(rows, "generator", f"{k.lower()}_errors") for k in ("Rcvbuf", "Sndbuf")
    }
    if not (_has(lag) or _has(cpu) or any(_has(e) for e in errors.values())):
        return None
    figure, axes = _figure(report, "generator health (shaded: saturated)", 3)
    cores = generator_cores(report)
    limits = (TICK_LAG_P99_LIMIT_MS, None if cores is None else CPU_SHARE_LIMIT * cores, None)
    panels = (
        ({"tick lag p99": lag}, "wheel tick lag p99 (ms)"),
        ({"worker CPU": cpu}, "generator CPU (cores)"),
        (errors, "Udp buffer errors per interval"),
    )
    for axes_i, (curves, unit), limit in zip(axes, panels, limits, strict=True):
        _plot(axes_i, t, curves, style=".-")
        if limit is not None:
            axes_i.axhline(limit, color="tab:red", linestyle="--", label=f"limit {limit:g}")
        _shade(axes_i, report)
        _label(axes_i, "time (s)", unit)
    return figure


def knee_figure(report: Report) -> Any | None:
    steps = list(report.get("steps") or [])
    if not steps:
        return None
    sessions = _values(steps, "sessions")
    figure, axes = _figure(report, "capacity steps", 2)
    turn = {f"turn {p}": _values(steps, "turn_ms", p) for p in ("p50", "p95")}
    _plot(axes[0], sessions, turn, style="o-")
    bad = np.array([not step.get("ok", True) for step in steps])
    axes[0].plot(sessions[bad], _values(steps, "turn_ms", "p95")[bad], "rx", label="step failed")
    threshold = (report.get("config") or {}).get("knee_threshold_ms")
    if threshold is not None:
        axes[0].axhline(
            threshold, color="tab:red", linestyle="--", label=f"threshold {threshold} ms"
        )
    per_core = {"sessions per server core": _values(steps, "sessions_per_core")}
    _plot(axes[1], sessions, per_core, style="o-")
    _mark_knee(axes, report.get("knee"))
    _label(axes[0], "sessions", "turn latency (ms)")
    _label(axes[1], "sessions", "sessions per server core")
    return figure


def _mark_knee(axes: list[Any], knee: Row | None) -> None:
    if knee:
        label = f"knee: {knee['sessions']:,} sessions"
        for axes_i in axes:
            axes_i.axvline(knee["sessions"], color="tab:green", linestyle=":", label=label)


def by_turn(report: Report) -> tuple[Values, Values, Values]:
    """Turn numbers (ascending) and, per number, the median latency (ms) and server RSS (MiB)
    over the rows of ``turns_by_number`` (one row per call and turn)."""
    turns = list(report.get("turns_by_number") or [])
    number = _values(turns, "turn")
    latency, rss = _values(turns, "latency_ms"), _values(turns, "server_rss_mb")
    numbers = np.unique(number[np.isfinite(number)])
    medians = [(_median(latency[number == n]), _median(rss[number == n])) for n in numbers]
    by_number = np.array(medians, dtype=np.float64).reshape(-1, 2)
    return numbers, by_number[:, 0], by_number[:, 1]


def long_call_figure(report: Report) -> Any | None:
    turns = list(report.get("turns_by_number") or [])
    if not turns:
        return None
    numbers, latency, rss = by_turn(report)
    figure, axes = _figure(report, "turn latency and server memory by turn number", 2)
    every = {"each turn": _values(turns, "latency_ms")}
    _plot(axes[0], _values(turns, "turn"), every, style=".")
    _plot(axes[0], numbers, {"median": latency}, style="-")
    _plot(axes[1], numbers, {"server RSS (median)": rss}, style=".-")
    _label(axes[0], "turn number", "turn latency (ms)")
    _label(axes[1], "turn number", "server RSS (MiB)")
    return figure


def faults_figure(report: Report) -> Any | None:
    faults = list(report.get("faults") or [])
    if not faults:
        return None
    figure, (axes,) = _figure(report, "media gap after each fault")
    x = np.arange(len(faults))
    for i, key in enumerate(("p50", "p99", "max")):
        axes.bar(x + (i - 1) * 0.25, _values(faults, "gap_ms", key), 0.25, label=f"gap {key}")
    axes.set_xticks(x, [_fault_label(fault) for fault in faults], fontsize="small")
    _label(axes, "fault", "media gap (ms)")
    return figure


def _fault_label(fault: Row) -> str:
    lost = (
        f"{fault.get('turns_cut', 0):,} turns cut"  # the voice scenario's calls
        if "calls" in fault
        else f"{fault.get('lost_after', 0):,} lost"
    )
    return (
        f"{fault.get('kind', '?')} killed at {fault.get('at_s', 0):.0f} s\n"
        f"{fault.get('recovered', 0):,}/{fault.get('affected', 0):,} recovered, {lost}"
    )


def _discard(figure: Any) -> None:
    """Close a figure that turned out to have nothing to show."""
    _pyplot().close(figure)


def close(figure: Any) -> None:
    """Close a figure once written."""
    _pyplot().close(figure)


FIGURES: dict[str, Callable[[Report], Any | None]] = {
    "sessions": sessions_figure,
    "latency": latency_figure,
    "latency_by_sessions": latency_by_sessions_figure,
    "server": server_figure,
    "loss_jitter": loss_jitter_figure,
    "generator": generator_figure,
    "knee": knee_figure,
    "long_call": long_call_figure,
    "faults": faults_figure,
}


def draw(report: Report, out_dir: Path) -> list[Path]:
    """Write ``out_dir/NAME.png`` for each figure of ``FIGURES`` the report has data for
    (``FIGURE_SIZE_PX`` each); return their paths in ``FIGURES`` order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in FIGURES.items():
        figure = make(report)
        if figure is not None:
            figure.savefig(out_dir / f"{name}.png", dpi=DPI)
            _pyplot().close(figure)
            written.append(out_dir / f"{name}.png")
    return written


# --- The verdict as text --------------------------------------------------------------------


def summary(report: Report) -> str:
    """The verdict block: config, validity, setup, latency, loss and jitter, server CPU per
    session, generator health, then the knee, the long call and the faults when present."""
    sections = (
        _config_lines,
        _verdict_lines,
        _setup_lines,
        _hold_lines,
        _latency_lines,
        _turn_lines,
        _loss_lines,
        _server_lines,
        _generator_lines,
        _knee_lines,
        _long_call_lines,
        _fault_lines,
    )
    return "\n".join(line for section in sections for line in section(report))


def _ms(value: Any) -> str:
    if value is None or not math.isfinite(float(value)):
        return "-"
    v = float(value)
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _pcts(values: Row | None, keys: tuple[str, ...] = PERCENTILES) -> str:
    shown, values = {"p999": "p99.9"}, values or {}
    return "  ".join(f"{shown.get(k, k)} {_ms(values[k])}" for k in keys if k in values)


def _config_lines(report: Report) -> list[str]:
    config = report.get("config") or {}
    items = (
        f"{k}={v if isinstance(v, str | int | float) else json.dumps(v)}" for k, v in config.items()
    )
    return [f"Load test {title(report)}", "config: " + (" ".join(items) or "(none)")]


def _verdict_lines(report: Report) -> list[str]:
    verdict = report.get("verdict") or {}
    if "valid" not in verdict:
        return ["verdict: not given"]
    notes = [f"  note: {note}" for note in verdict.get("notes") or []]
    judged = f" during the {verdict['judged']}" if verdict.get("judged") else ""
    if verdict["valid"]:
        return [f"verdict: valid (the generator kept up{judged})", *notes]
    rule = "!" * 72
    reasons = [f"  - {reason}" for reason in verdict.get("reasons") or ["(no reason given)"]]
    banner = f"INVALID: generator saturated{judged} (these figures may describe the generator)"
    return [rule, banner, *reasons, *notes, rule]


def _hold_lines(report: Report) -> list[str]:
    hold = report.get("hold")
    if not hold:
        return []
    loss = hold.get("loss_ratio")
    lines = [
        f"hold: {hold['seconds']:g} s at {hold['sessions']:,} sessions "
        f"({hold['intervals']} intervals); canary loss "
        + ("-" if loss is None else f"{loss:.3%} of {hold['media_sent']:,} packets")
        + f"; consent checks answered {hold['consents_answered']:,}/{hold['consents_sent']:,}"
    ]
    if hold.get("rtt_ms"):
        lines.append(f"  hold RTT (ms): {_pcts(hold['rtt_ms'], (*PERCENTILES, 'max'))}")
    if hold.get("tick_lag_ms"):
        lines.append(f"  hold generator tick lag (ms): {_pcts(hold['tick_lag_ms'])}")
    return lines


def _setup_lines(report: Report) -> list[str]:
    setup = report.get("setup")
    if not setup:
        return []
    attempted, succeeded = int(setup.get("attempted", 0)), int(setup.get("succeeded", 0))
    share = f"{succeeded / attempted:.3%}" if attempted else "-"
    failed = sorted((setup.get("failed") or {}).items(), key=lambda kv: -kv[1])
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in failed) or "none"
    lines = [f"setup: {succeeded:,}/{attempted:,} succeeded ({share}); failed: {reasons}"]
    if setup.get("ms"):
        lines.append(f"  time to connected (ms): {_pcts(setup['ms'], (*PERCENTILES, 'max'))}")
    return lines


def _turn_lines(report: Report) -> list[str]:
    """The run's turns, when the scenario counted them (answered, failed, latency)."""
    turns = report.get("turns") or {}
    if not turns.get("ms"):
        return []
    failed = ", ".join(f"{why} {n:,}" for why, n in (turns.get("failed") or {}).items())
    return [
        f"turns: {turns.get('answered', 0):,} answered; failed: {failed or 'none'}",
        f"  turn latency (ms): {_pcts(turns['ms'], (*PERCENTILES, 'max'))}",
    ]


def _latency_lines(report: Report) -> list[str]:
    rows, lines = _rows(report), []
    rtt = (report.get("media") or {}).get("rtt_ms")
    if rtt:
        lines.append(f"media RTT (ms): {_pcts(rtt, (*PERCENTILES, 'p999', 'max'))}")
    for name, key in (("RTT", "rtt_ms"), ("turn latency", "turn_ms")):
        p50, p99 = _values(rows, key, "p50"), _values(rows, key, "p99")
        if _has(p50) and (key == "turn_ms" or not rtt):
            lines.append(
                f"{name} per interval (ms): p50 median {_ms(_median(p50))}  "
                f"p99 worst {_ms(_worst(p99))}"
            )
    return lines


def _loss_lines(report: Report) -> list[str]:
    media = report.get("media") or {}
    if "loss_ratio" in media:
        over = media.get("sessions_over_1pct_loss")
        lines = [
            f"loss: {media['loss_ratio']:.3%} of packets; sessions over 1 % loss: "
            + ("-" if over is None else f"{over:,}")
        ]
        if media.get("jitter_ms"):
            lines.append(f"per-session jitter (ms): {_pcts(media['jitter_ms'])}")
        return lines
    loss = _values(_rows(report), "loss_ratio")
    return [f"loss per interval: worst {_worst(loss):.3%}"] if _has(loss) else []


def _at_peak(report: Report) -> list[Row]:
    """The series rows with server CPU within 5 % of the most sessions: the hold."""
    rows = [r for r in _rows(report) if r.get("sessions") and _server(r).get("cpu_cores")]
    peak = max((row["sessions"] for row in rows), default=0)
    return [row for row in rows if row["sessions"] >= 0.95 * peak]


def _mean_by_component(rows: list[Row], kind: str) -> dict[str, float]:
    return {n: _mean(_values(rows, "server", kind, n)) for n in _components(rows, kind)}


def _server_lines(report: Report) -> list[str]:
    held = _at_peak(report)
    if not held:
        return []
    cores, rss = _mean_by_component(held, "cpu_cores"), _mean_by_component(held, "rss_mb")
    total, sessions = sum(cores.values()), _mean(_values(held, "sessions"))
    parts = ", ".join(f"{name} {value:.2f}" for name, value in cores.items())
    lines = [
        f"server CPU at ~{sessions:,.0f} sessions (mean of {len(held)} intervals): "
        f"{total:.2f} cores ({parts})",
        f"  {1e3 * total / sessions:.3f} millicores per session, "
        f"{sessions / total if total else math.inf:,.0f} sessions per core",
    ]
    if rss:
        lines.append("server RSS (MiB): " + ", ".join(f"{n} {v:,.0f}" for n, v in rss.items()))
    return lines


def _generator_lines(report: Report) -> list[str]:
    rows = [row for row in _rows(report) if row.get("generator")]
    if not rows:
        return []
    lag, cpu = (
        _values(rows, "generator", "tick_lag_p99_ms"),
        _values(rows, "generator", "cpu_cores"),
    )
    rcvbuf, sndbuf = (
        int(np.nansum(_values(rows, "generator", k))) for k in ("rcvbuf_errors", "sndbuf_errors")
    )
    cores, bad = generator_cores(report), sum(saturated(report))
    available = "" if cores is None else f" of {cores:g}"
    pinned = [int((row.get("generator") or {}).get("pinned_cores") or 0) for row in rows]
    busy = (
        ""
        if not any(pinned)
        else (
            f", its pinned cores busy max {_worst(_values(rows, 'generator', 'pinned_busy')):.2f}"
            f" of {max(pinned)}"
        )
    )
    return [
        f"generator: tick lag p99 worst {_ms(_worst(lag))} ms, CPU max {_worst(cpu):.2f}"
        f"{available} cores{busy}, Udp RcvbufErrors +{rcvbuf:,} SndbufErrors +{sndbuf:,}",
        f"  saturated in {bad} of {len(_rows(report))} intervals",
    ]


def _knee_lines(report: Report) -> list[str]:
    steps, knee = list(report.get("steps") or []), report.get("knee")
    if not steps and not knee:
        return []
    if knee:
        line = (
            f"knee: {knee['sessions']:,} sessions, {knee.get('sessions_per_core', math.nan):,.0f}"
            f" sessions per server core, turn (ms) {_pcts(knee.get('turn_ms'))}"
        )
    else:
        held = [s["sessions"] for s in steps if s.get("ok")]
        line = (
            f"knee: none reported; highest step that held: {max(held):,}"
            if held
            else ("knee: none reported; no step held")
        )
    header = ["step sessions", "turn p50 ms", "turn p95 ms", "server cores", "sessions/core", "ok"]
    pinned = any("generator_full_share" in s for s in steps)
    table = [
        [
            f"{s['sessions']:,}",
            _ms(_get(s, ("turn_ms", "p50"))),
            _ms(_get(s, ("turn_ms", "p95"))),
            _ms(s.get("server_cpu_cores")),
            _ms(s.get("sessions_per_core")),
            "yes" if s.get("ok") else "NO",
            *(
                [f"{s['generator_full_share']:.0%}" if "generator_full_share" in s else "-"]
                * pinned
            ),
        ]
        for s in steps
    ]
    if pinned:
        header.append("generator full")
        bound = [s for s in steps if not s.get("ok") and s.get("generator_full_share", 0) >= 0.5]
        if bound:
            line += (
                f" (generator-bound: its pinned cores were full in half or more of the samples of"
                f" failed step(s) {', '.join(str(s['sessions']) for s in bound)})"
            )
    return [line, *(_table(header, table) if steps else [])]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return [
        "  " + "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    ]


def _long_call_lines(report: Report) -> list[str]:
    numbers, latency, rss = by_turn(report)
    if not numbers.size:
        return []
    k = max(1, numbers.size // 10)
    rss = rss[np.isfinite(rss)]
    memory = f"; server RSS {rss[0]:,.0f} -> {rss[-1]:,.0f} MiB" if rss.size else ""
    first, last = _ms(_median(latency[:k])), _ms(_median(latency[-k:]))
    return [
        f"long call: turns {numbers[0]:.0f}-{numbers[-1]:.0f}; median turn latency {first} ms over"
        f" the first {k} turn numbers, {last} ms over the last {k}{memory}"
    ]


def _fault_lines(report: Report) -> list[str]:
    lines = []
    for f in report.get("faults") or []:
        if "calls" in f:
            lines += _call_fault_lines(f)
            continue
        lines.append(
            f"fault: {f.get('kind')} killed at {f.get('at_s', 0):.0f} s, {f.get('affected', 0):,} "
            f"sessions affected, media gap (ms) {_pcts(f.get('gap_ms'), ('p50', 'p99', 'max'))}, "
            f"{f.get('recovered', 0):,} recovered, {f.get('lost_after', 0):,} lost"
        )
    asked = (report.get("config") or {}).get("fault")
    if asked and not report.get("faults"):
        lines.append(f"fault: {asked} asked, none injected (no call was running by then)")
    resumes = list(report.get("resumes") or [])
    if resumes and not report.get("faults"):
        failed = sum(not row.get("ok") for row in resumes)
        lines.append(
            f"media lost with no fault injected: {len(resumes):,} resumes "
            f"({failed:,} could not resume; rows in the report's resumes)"
        )
    return lines


SHOWN_FAULT_CALLS = 20


def _call_fault_lines(f: Row) -> list[str]:
    """A transceiver killed under voice calls: the resumes' figures, what was lost, and a row
    per call (ms from the kill)."""
    spread = ("p50", "p99", "max")
    not_resumed = ", ".join(f"{why} {n:,}" for why, n in (f.get("not_resumed") or {}).items())
    lines = [
        f"fault: {f.get('kind')} {f.get('name', '')} (pid {f.get('pid')}) killed at "
        f"{f.get('at_s', 0):.1f} s holding {f.get('sessions', '?')} sessions: "
        f"{f.get('affected', 0):,} calls affected, {f.get('resumed', 0):,} resumed, "
        f"{f.get('recovered', 0):,} answered again",
        f"  kill -> media again (ms): {_pcts(f.get('gap_ms'), spread) or '-'}; -> answer to "
        f"the re-asked question: {_pcts(f.get('answer_gap_ms'), spread) or '-'}",
        f"  kill -> silence noticed (ms): {_pcts(f.get('detected_ms'), spread) or '-'}; -> "
        f"session.created: {_pcts(f.get('session_created_ms'), spread) or '-'}",
        f"  lost: {f.get('turns_cut', 0):,} turns cut (asked again); conversation history kept "
        f"by {f.get('history_kept', 0):,} of {f.get('resumed', 0):,} resumed calls; not "
        f"resumed: {not_resumed or 'none'}; other resumes: {f.get('other_resumes', 0):,}",
    ]
    calls = list(f.get("calls") or [])
    header = ["call", "cut turn", "noticed", "201", "created", "media", "answer", "history"]
    table = [
        [
            str(c.get("id")),
            f"{c.get('cut_turn') or '-'} ({c.get('cut_stage')})",
            *(_ms(c.get(k)) for k in ("detected_ms", "resume_answered_ms")),
            *(_ms(c.get(k)) for k in ("session_created_ms", "media_ms", "answer_ms")),
            f"{c.get('history_items')}/{c.get('history_expected')}"
            if c.get("resumed")
            else f"NOT RESUMED: {c.get('reason')}",
        ]
        for c in calls[:SHOWN_FAULT_CALLS]
    ]
    if table:
        lines += ["  per call, ms from the kill (history: items replayed/expected):"]
        lines += _table(header, table)
    if len(calls) > SHOWN_FAULT_CALLS:
        lines.append(f"  ... {len(calls) - SHOWN_FAULT_CALLS:,} more calls in the report")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.figures", description="Redraw a load-test report's figures."
    )
    parser.add_argument("report", type=Path, help="the report JSON a load-test run wrote")
    parser.add_argument("--out", type=Path, help="directory for the PNGs (default: the report's)")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    if not isinstance(report, dict) or "scenario" not in report:
        parser.error(f"{args.report}: not a load-test report (no 'scenario')")
    print(summary(report))
    for path in draw(report, args.out or args.report.parent):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()


# --- The browser benchmark's turns, by stage (``loadtest.bench_e2e``) -----------------------

TURN_STAGES = (  # (label, colour): a turn's end of speech -> heard, bottom to top
    ("end-of-turn wait + uplink", "tab:gray"),
    ("STT final", "tab:blue"),
    ("LLM first token", "tab:cyan"),
    ("LLM first chunk's words", "tab:brown"),
    ("TTS first audio", "tab:green"),
    ("-> first frame out", "tab:olive"),
    ("send (encode, SRTP, relay)", "tab:orange"),
    ("Chromium jitter buffer", "tab:red"),
    ("voice's quiet lead-in", "tab:pink"),
    ("Chromium decode + render", "tab:purple"),
)


def turn_stage_ms(turn: Row) -> list[float] | None:
    """A turn's ``TURN_STAGES`` in ms, or None when a stage is missing (no server split)."""
    marks = (
        *("stt_final_ms", "llm_first_token_ms", "first_tts_request_ms", "first_audio_ms"),
        "server_window_ms",
    )
    tail = ("send_ms", "neteq_ms", "quiet_lead_ms", "playout_ms")
    names = (*marks, *tail, "frame_out_to_heard_ms", "e2e_ms")
    if any(turn.get(name) is None for name in names):
        return None
    at = [float(turn[name]) for name in marks]
    steps = [at[0]] + [b - a for a, b in zip(at, at[1:], strict=False)]
    before = float(turn["e2e_ms"]) - float(turn["frame_out_to_heard_ms"]) - at[-1]
    return [before, *steps, *(float(turn[name]) for name in tail)]


def turn_stages_figure(paths: dict[str, Row]) -> Any | None:
    """One panel per media path: a stacked bar per turn of ``TURN_STAGES`` (turns numbered as
    run; a turn missing a stage is left out); None without data."""
    drawable: dict[str, list[tuple[int, list[float]]]] = {}
    for name, result in paths.items():
        for number, turn in enumerate(result.get("per_turn", []), 1):
            if (stack := turn_stage_ms(turn)) is not None:
                drawable.setdefault(name, []).append((number, stack))
    if not drawable:
        return None
    report = {"scenario": "browser end to end"}
    figure, panels = _figure(report, "end of speech -> heard, by stage", len(drawable))
    for axes, (name, stacks) in zip(panels, drawable.items(), strict=True):
        turns = [n for n, _ in stacks]
        bottoms = np.zeros(len(stacks))
        for index, (label, colour) in enumerate(TURN_STAGES):
            heights = np.array([stack[index] for _, stack in stacks])
            axes.bar(turns, heights, bottom=bottoms, color=colour, label=label)
            bottoms += heights
        axes.set_xticks(turns)
        axes.set_title(f"media path: {name}")
        axes.set_xlabel("turn")
        axes.set_ylabel("ms")
        axes.grid(True, alpha=0.3)
    panels[0].legend(fontsize="x-small", loc="upper left")
    return figure


# --- The voice knee, one curve per media path (``loadtest.voice_paths``) --------------------


def knee_paths_figure(runs: list[tuple[str, Row]]) -> Any | None:
    """Two panels against calls held: each step's turn p95 (a failed step hollow, each run's
    threshold dotted) and its transceiver CPU in cores (the confined cores dashed); one curve
    per run (``(label, voice report)``); None when no run has steps."""
    drawable = [(label, report) for label, report in runs if report.get("steps")]
    if not drawable:
        return None
    figure, (latency, cpu) = _figure({"scenario": "voice"}, "knee by media path", 2)
    for index, (label, report) in enumerate(drawable):
        colour = f"C{index}"
        steps = sorted(report["steps"], key=lambda step: int(step["sessions"]))
        calls = [int(step["sessions"]) for step in steps]
        p95 = [_get(step, ("turn_ms", "p95")) for step in steps]
        cores = [_get(step, ("server_cpu_cores",)) for step in steps]
        latency.plot(calls, p95, "-", color=colour, label=label)
        for x, y, step in zip(calls, p95, steps, strict=True):
            latency.plot(x, y, "o", color=colour, fillstyle="full" if step["ok"] else "none")
        if limit := (report.get("config") or {}).get("knee_threshold_ms"):
            latency.axhline(limit, color=colour, linestyle=":", linewidth=1)
        cpu.plot(calls, cores, "o-", color=colour, label=label, markersize=4)
        confined = ((report.get("config") or {}).get("confinement") or {}).get("confined_cores")
        if confined:
            cpu.axhline(confined, color=colour, linestyle="--", linewidth=1)
    _label(latency, "calls held", "turn p95 (ms); dotted: 1.5x one call")
    _label(cpu, "calls held", "transceiver CPU (cores); dashed: confined to")
    return figure
