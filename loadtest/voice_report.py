"""The ``voice`` scenario's figures: histograms, run totals, the knee's steps, the server's
processes sampled from /proc, and the report JSON built from them.

No Locust here (the locustfile imports this; tests may too): HdrHistograms in milliseconds,
merged through ``encode()``/``decode_and_add()``; run totals that workers ship whole (the
master sums the latest of each worker); ``Knee``, the step logic behind ``VoiceShape``.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from hdrh.histogram import HdrHistogram

from loadtest.hosts import CPU_SHARE_LIMIT, ProcessCpu, metric_samples, read_stat

HIGHEST_MS = 600_000
SIGNIFICANT_DIGITS = 3
PERCENTILES = {"p50": 50.0, "p95": 95.0, "p99": 99.0}
MAX_FAILED_ROWS = 50
MAX_RESUME_ROWS = 10_000
AFTER_KILL_S = 0.5  # a packet heard this long after a kill was in flight, not sent later
RUN_LONG_S = 24 * 3600.0  # longer than any run (a user that waits this long waits for its end)
FAILED_CALL_PAUSE_S = 1.0  # a knee's user, after a call that failed (pause_after)


class Hist:
    """Latencies in whole milliseconds (1 ms .. 10 min)."""

    def __init__(self) -> None:
        self.h = HdrHistogram(1, HIGHEST_MS, SIGNIFICANT_DIGITS)

    def record(self, ms: float) -> None:
        self.h.record_value(min(HIGHEST_MS, max(1, round(ms))))

    def add(self, encoded: str | bytes) -> None:
        if encoded:
            self.h.decode_and_add(encoded)

    def take(self) -> str:
        """Encoded, then reset ("" when empty)."""
        if self.h.get_total_count() == 0:
            return ""
        encoded: bytes = self.h.encode()
        self.h.reset()
        return encoded.decode()

    def percentiles(self, with_max: bool = False) -> dict[str, float] | None:
        if self.h.get_total_count() == 0:
            return None
        values = {k: float(self.h.get_value_at_percentile(p)) for k, p in PERCENTILES.items()}
        return values | ({"max": float(self.h.get_max_value())} if with_max else {})


class Histograms:
    """Turn latency and call set-up time; and each answered turn's stages (``stages``: stage ->
    ms, from ``voice_calls.turn_stages``; kept as values, since one, ``outside``, may be
    negative), shipped with the histograms."""

    def __init__(self) -> None:
        self.turn, self.setup = Hist(), Hist()
        self.stages: dict[str, list[float]] = {}

    def stage(self, stages: dict[str, float] | None) -> None:
        for name, ms in (stages or {}).items():
            self.stages.setdefault(name, []).append(float(ms))

    def take(self) -> dict[str, Any]:
        stages, self.stages = self.stages, {}
        return {"turn": self.turn.take(), "setup": self.setup.take(), "stages": stages}

    def add(self, encoded: dict[str, Any]) -> None:
        self.turn.add(encoded.get("turn", ""))
        self.setup.add(encoded.get("setup", ""))
        self.stage_lists(encoded.get("stages") or {})

    def stage_lists(self, stages: dict[str, list[float]]) -> None:
        for name, values in stages.items():
            self.stages.setdefault(name, []).extend(values)

    def take_turn_percentiles(self) -> dict[str, float] | None:
        turn = self.turn.percentiles()
        self.turn.h.reset()
        self.setup.h.reset()
        self.stages = {}
        return turn


def stage_percentiles(stages: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Each stage's p50 and p95 (ms, numpy's interpolated percentiles)."""
    return {
        name: {
            "p50": round(float(np.percentile(values, 50)), 1),
            "p95": round(float(np.percentile(values, 95)), 1),
        }
        for name, values in sorted(stages.items())
        if values
    }


def histogram_delta(first: dict[str, float], last: dict[str, float], name: str) -> dict[str, Any]:
    """A Prometheus histogram's observations between two scrapes (``metric_samples`` keys,
    summed over processes and any other label): count, sum and the count above each bound."""

    def summed(samples: dict[str, float], suffix: str) -> dict[str, float]:
        found: dict[str, float] = {}
        for key, value in samples.items():
            metric, _, labels = key.partition("{")
            if metric != name + suffix:
                continue
            le = next((p[3:] for p in labels.rstrip("}").split(",") if p.startswith("le=")), "")
            found[le] = found.get(le, 0.0) + value
        return found

    def delta(suffix: str) -> dict[str, float]:
        before = summed(first, suffix)
        return {k: v - before.get(k, 0.0) for k, v in summed(last, suffix).items()}

    count, total, buckets = (
        delta("_count").get("", 0.0),
        delta("_sum").get("", 0.0),
        delta("_bucket"),
    )
    above = {le: count - n for le, n in buckets.items() if le not in ("+Inf", "inf")}
    return {"count": count, "sum_s": total, "above": above}


LOOP_METRICS = ("transceiver_event_loop_lag_seconds", "transceiver_gc_pause_seconds")
SCRAPE_TIMEOUT_S = 2.0


def scrape_loop_metrics(urls: Sequence[str]) -> dict[str, float]:
    """The ``LOOP_METRICS`` samples of each transceiver's /metrics, summed over them; a
    transceiver that does not answer is left out (a step then reads only the others)."""
    summed: dict[str, float] = {}
    for url in urls:
        try:
            text = httpx.get(url.rstrip("/") + "/metrics", timeout=SCRAPE_TIMEOUT_S).text
        except httpx.HTTPError:
            continue
        for prefix in LOOP_METRICS:
            for key, value in metric_samples(text, prefix).items():
                summed[key] = summed.get(key, 0.0) + value
    return summed


def loop_lag(first: dict[str, float], last: dict[str, float], wall_s: float) -> dict[str, Any]:
    """The transceivers' event-loop lag (``transceiver_event_loop_lag_seconds``: how late each
    50 ms tick ran) and garbage-collector pauses (``transceiver_gc_pause_seconds``, by
    generation) between two scrapes ``wall_s`` apart."""
    lag = histogram_delta(first, last, "transceiver_event_loop_lag_seconds")
    ticks = lag["count"]
    out: dict[str, Any] = {
        "ticks": int(ticks),
        "mean_ms": round(1000 * lag["sum_s"] / ticks, 2) if ticks else None,
        "late_share": {
            f">{float(le) * 1000:g}ms": round(n / ticks, 4)
            for le, n in sorted(lag["above"].items(), key=lambda item: float(item[0]))
            if ticks and float(le) >= 0.005
        },
    }
    for generation in ("0", "1", "2"):
        gc_first = {k: v for k, v in first.items() if f"generation={generation}" in k}
        gc_last = {k: v for k, v in last.items() if f"generation={generation}" in k}
        pauses = histogram_delta(gc_first, gc_last, "transceiver_gc_pause_seconds")
        if pauses["count"]:
            out[f"gc{generation}"] = {
                "per_s": round(pauses["count"] / wall_s, 2) if wall_s > 0 else None,
                "mean_ms": round(1000 * pauses["sum_s"] / pauses["count"], 2),
                "ms_per_s": round(1000 * pauses["sum_s"] / wall_s, 2) if wall_s > 0 else None,
                "over_10ms": int(pauses["above"].get("0.01", 0)),
                "over_50ms": int(pauses["above"].get("0.05", 0)),
            }
    return out


@dataclass
class RunTotals:
    """Counts since the start of the run (a worker's, or the sum of every worker's)."""

    setup_attempted: int = 0
    setup_ok: int = 0
    setup_failed: Counter[str] = field(default_factory=Counter)
    turns_answered: int = 0
    turns_failed: Counter[str] = field(default_factory=Counter)
    ended: int = 0
    call_s: float = 0.0
    keep_rows: bool = True  # one row per turn answered (long calls; not the knee's thousands)
    rows: list[dict[str, Any]] = field(default_factory=list)
    transcripts: list[dict[str, Any]] = field(default_factory=list)  # the first few turns
    failed_rows: list[dict[str, Any]] = field(default_factory=list)  # the first few failures
    resumes: list[dict[str, Any]] = field(default_factory=list)  # every resume's row

    def setup(self, ok: bool, reason: str) -> None:
        self.setup_attempted += 1
        self.setup_ok += ok
        if not ok:
            self.setup_failed[reason] += 1

    def turn(self, ok: bool, reason: str, event: dict[str, Any]) -> None:
        if not ok:
            self.turns_failed[reason] += 1
            if len(self.failed_rows) < MAX_FAILED_ROWS:  # what the client saw, to diagnose it
                self.failed_rows.append({k: v for k, v in event.items() if k not in ("ev", "ok")})
            return
        self.turns_answered += 1
        if self.keep_rows:
            row = {"turn": event["turn"], "latency_ms": event["ms"]}
            self.rows.append(row | {"server_rss_mb": event.get("server_rss_mb")})
        if len(self.transcripts) < 20:
            keys = ("id", "turn", "heard", "answer", "ms", "server_ms")
            self.transcripts.append({k: event.get(k) for k in keys})

    def as_dict(self, running_s: float = 0.0) -> dict[str, Any]:
        return {
            "setup_attempted": self.setup_attempted,
            "setup_ok": self.setup_ok,
            "setup_failed": dict(self.setup_failed),
            "turns_answered": self.turns_answered,
            "turns_failed": dict(self.turns_failed),
            "ended": self.ended,
            "call_s": self.call_s + running_s,
            "rows": self.rows,
            "transcripts": self.transcripts,
            "failed_rows": self.failed_rows,
            "resumes": self.resumes,
        }

    def merge(self, other: dict[str, Any]) -> None:
        self.setup_attempted += other["setup_attempted"]
        self.setup_ok += other["setup_ok"]
        self.setup_failed.update(other["setup_failed"])
        self.turns_answered += other["turns_answered"]
        self.turns_failed.update(other["turns_failed"])
        self.ended += other["ended"]
        self.call_s += other["call_s"]
        self.rows += other["rows"]
        self.transcripts += other["transcripts"]
        self.failed_rows += other.get("failed_rows", [])
        self.resumes += other.get("resumes", [])

    def resume(self, event: dict[str, Any]) -> None:
        if len(self.resumes) < MAX_RESUME_ROWS:
            self.resumes.append({k: v for k, v in event.items() if k != "ev"})

    @property
    def failures(self) -> int:
        """What fails a knee step: failed set-ups and turns, and calls that lost their media
        (resumed: a turn cut, even when the call went on)."""
        lost = len(self.resumes)
        return sum(self.setup_failed.values()) + sum(self.turns_failed.values()) + lost


class ProcessSampler:
    """CPU cores (since the last sample) and RSS of named process trees on this host."""

    def __init__(self, named_pids: str) -> None:
        pairs = (item.split("=", 1) for item in named_pids.split(",") if "=" in item)
        self.trees = {name: ProcessCpu([int(pid)], descendants=True) for name, pid in pairs}

    def sample(self) -> dict[str, dict[str, float]]:
        cores = {name: round(tree.sample(), 3) for name, tree in self.trees.items()}
        rss = {name: round(tree.rss_mb(), 1) for name, tree in self.trees.items()}
        return {"cpu_cores": cores, "rss_mb": rss}


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 when it is gone)."""
    stat = read_stat(pid)
    return stat.cpu_s if stat is not None else 0.0


# --- the knee -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KneePlan:
    sessions: list[int]  # one step each
    step_s: float  # how long each step holds
    settle_s: float  # the start of a step not measured (calls setting up)
    spawn_rate: float
    threshold: float  # a step fails when its turn p95 > threshold x the one-call p95
    baseline_ms: float | None  # the one-call p95, if known; else the first step's
    refine: int = 0  # past the first failed step, bisect until good and failed are this close
    first_step_s: float = 0.0  # the first step's hold (the one-call baseline), if not step_s
    confined_cores: float | None = None  # the CPU the transceivers were given (a cgroup)

    @property
    def threshold_ms(self) -> float | None:
        return None if self.baseline_ms is None else self.threshold * self.baseline_ms


@dataclass
class _Step:
    sessions: int
    started_s: float
    failures_at_start: int
    hist: Hist = field(default_factory=Hist)
    stages: dict[str, list[float]] = field(default_factory=dict)
    scrapes: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (t, /metrics)
    cpu_cores: list[float] = field(default_factory=list)
    throttling: list[dict[str, float]] = field(default_factory=list)  # cgroup cpu.stat reads
    generator_full: list[bool] = field(default_factory=list)  # per sample: its pinned cores full
    recovery_s: float = 0.0  # after a failed step: held and settled this much longer

    def throttled_share(self) -> float | None:
        """The share of the step's quota periods in which the transceivers were throttled."""
        if len(self.throttling) < 2:
            return None
        first, last = self.throttling[0], self.throttling[-1]
        periods = last["periods"] - first["periods"]
        return round((last["throttled"] - first["throttled"]) / periods, 3) if periods else None

    def measuring(self, now_s: float, settle_s: float) -> bool:
        return now_s >= self.started_s + settle_s + self.recovery_s


class Knee:
    """Steps of sessions, each held ``step_s``; stops at the first step whose turn p95 passes
    the threshold or that saw any failure, or, with ``refine``, bisects between the highest
    step that held and the lowest that did not until they are ``refine`` sessions apart. The
    knee is the highest step that held. A step after a failed one settles and holds half a step
    longer: the calls hung up and the turns queued in the overload are not its own (measured:
    the step right after a failed one failed too, worse than it, while the steps below held)."""

    def __init__(self, plan: KneePlan) -> None:
        self.plan = plan
        self.baseline_ms = plan.baseline_ms
        self.steps: list[dict[str, Any]] = []
        self._step: _Step | None = None
        self._index = 0
        self._sessions = list(plan.sessions)  # the steps to come (bisection appends)

    def add(self, encoded: dict[str, Any], now_s: float) -> None:
        if self._step is not None and self._step.measuring(now_s, self.plan.settle_s):
            self._step.hist.add(encoded.get("turn", ""))
            for name, values in (encoded.get("stages") or {}).items():
                self._step.stages.setdefault(name, []).extend(values)

    def sample(
        self,
        server: dict[str, Any],
        now_s: float,
        metrics: dict[str, float] | None = None,
        generator: dict[str, float] | None = None,
    ) -> None:
        """``metrics``: the transceivers' /metrics samples, summed (``metric_samples`` keys);
        ``generator``: the series row's (its pinned cores' busy share, when it was pinned)."""
        if self._step is not None and self._step.measuring(now_s, self.plan.settle_s):
            if metrics:
                self._step.scrapes.append((now_s, metrics))
            if generator and generator.get("pinned_cores"):
                busy = generator.get("pinned_busy") or 0.0
                full = busy > CPU_SHARE_LIMIT * generator["pinned_cores"]
                self._step.generator_full.append(full)
            cores = server.get("cpu_cores", {})
            self._step.cpu_cores.append(sum(v for k, v in cores.items() if "transceiver" in k))
            if server.get("throttling"):
                self._step.throttling.append(server["throttling"])

    def tick(self, now_s: float, failures: int) -> tuple[int, float] | None:
        """The sessions to hold now; None once the knee is found (or the plan is done)."""
        if self._step is None:
            if self._index >= len(self._sessions):
                return None
            recovery_s = self.plan.step_s / 2 if self.steps and not self.steps[-1]["ok"] else 0.0
            self._step = _Step(self._sessions[self._index], now_s, failures, recovery_s=recovery_s)
        elif now_s - self._step.started_s >= self._hold_s() + self._step.recovery_s:
            self._finish(failures)
            self._index += 1
            self._plan_next()
            self._step = None
            return self.tick(now_s, failures)
        return self._step.sessions, self.plan.spawn_rate

    def _hold_s(self) -> float:
        first = self._index == 0 and self.plan.first_step_s > 0
        return self.plan.first_step_s if first else self.plan.step_s

    def _plan_next(self) -> None:
        """Once a step failed: no more planned steps; with ``refine``, the midpoint of the
        highest step that held and the lowest that failed, while they are further apart."""
        failed = [step["sessions"] for step in self.steps if not step["ok"]]
        if not failed:
            return
        del self._sessions[self._index :]
        held = [step["sessions"] for step in self.steps if step["ok"]]
        low, high = max(held, default=0), min(failed)
        if self.plan.refine and held and high - low > self.plan.refine:
            self._sessions.append((low + high) // 2)

    def _finish(self, failures: int) -> bool:
        assert self._step is not None
        step, turn = self._step, self._step.hist.percentiles()
        failed = failures - step.failures_at_start
        if self.baseline_ms is None and turn is not None:
            self.baseline_ms = turn["p95"]  # the first step: the one-call figure
        limit_ms = None if self.baseline_ms is None else self.plan.threshold * self.baseline_ms
        ok = turn is not None and failed == 0 and limit_ms is not None and turn["p95"] <= limit_ms
        cores = statistics.mean(step.cpu_cores) if step.cpu_cores else None
        self.steps.append(
            {
                "sessions": step.sessions,
                "turn_ms": None if turn is None else {"p50": turn["p50"], "p95": turn["p95"]},
                "turns": step.hist.h.get_total_count(),
                "failures": failed,
                "server_cpu_cores": None if cores is None else round(cores, 3),
                "sessions_per_core": round(step.sessions / cores, 2) if cores else None,
                "ok": ok,
                "stages_ms": stage_percentiles(step.stages),
            }
            | self._confined(step)
            | self._loop(step)
            | self._generator(step)
        )
        return ok

    @staticmethod
    def _generator(step: _Step) -> dict[str, Any]:
        """The share of the step's samples in which the generator's pinned cores were full: a
        step that failed with them full measured the generator as much as the server."""
        if not step.generator_full:
            return {}
        return {"generator_full_share": round(statistics.mean(step.generator_full), 2)}

    @staticmethod
    def _loop(step: _Step) -> dict[str, Any]:
        if len(step.scrapes) < 2:
            return {}
        (first_s, first), (last_s, last) = step.scrapes[0], step.scrapes[-1]
        return {"loop": loop_lag(first, last, last_s - first_s)}

    def _confined(self, step: _Step) -> dict[str, Any]:
        confined = self.plan.confined_cores
        if not confined:
            return {}
        per_core = round(step.sessions / confined, 2)
        return {"sessions_per_confined_core": per_core, "throttled_share": step.throttled_share()}

    @property
    def knee(self) -> dict[str, Any] | None:
        held = [step for step in self.steps if step["ok"]]
        if not held:
            return None
        best = max(held, key=lambda step: int(step["sessions"]))
        keys: tuple[str, ...] = ("sessions", "sessions_per_core", "turn_ms", "server_cpu_cores")
        keys += ("sessions_per_confined_core", "throttled_share")
        return {k: best[k] for k in keys if k in best}


STAGE_COLUMNS = ("decision", "stt", "llm", "tts", "server", "outside")


def where_time_goes(steps: Sequence[dict[str, Any]]) -> str:
    """Per knee step: each stage's p50/p95 (ms), the loop's mean lag and share of ticks later
    than 10 and 50 ms, and the collector's gen-2 pauses: the text beside the summary."""
    head = ["sessions"] + [f"{name} p50/p95" for name in STAGE_COLUMNS]
    head += ["lag mean", ">10ms", ">50ms", "gc2 /s", "gc2 ms"]
    lines = ["where the turn time goes (ms; loop lag and gc from the transceivers' /metrics):"]
    lines.append("  ".join(head))
    for step in steps:
        stages, loop = step.get("stages_ms") or {}, step.get("loop") or {}
        cells = [str(step["sessions"])]
        for name in STAGE_COLUMNS:
            got = stages.get(name)
            cells.append("-" if got is None else f"{got['p50']:.0f}/{got['p95']:.0f}")
        late, gc2 = loop.get("late_share") or {}, loop.get("gc2") or {}
        cells += [str(loop.get("mean_ms", "-")), str(late.get(">10ms", "-"))]
        cells += [str(late.get(">50ms", "-")), str(gc2.get("per_s", "-"))]
        cells.append(str(gc2.get("mean_ms", "-")))
        lines.append("  ".join(cells))
    return "\n".join(lines)


# --- the report -----------------------------------------------------------------------------


def build_report(
    config: dict[str, Any],
    hist: Histograms,
    totals: RunTotals,
    snapshots: Sequence[dict[str, Any]],
    series: list[dict[str, Any]],
    knee: Knee | None,
    fault: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report JSON (key names read by ``loadtest.figures``); ``fault``: the record of a
    transceiver the scenario killed (``fault.json``), which adds the ``faults`` section."""
    if knee is not None:
        config = config | {"knee_threshold_ms": knee.plan.threshold * (knee.baseline_ms or 0)}
    return {
        "scenario": "voice",
        "config": config,
        "setup": {
            "attempted": totals.setup_attempted,
            "succeeded": totals.setup_ok,
            "failed": dict(totals.setup_failed),
            "ms": hist.setup.percentiles(with_max=True),
        },
        "turns": {
            "answered": totals.turns_answered,
            "failed": dict(totals.turns_failed),
            "ms": hist.turn.percentiles(with_max=True),
            "failures": totals.failed_rows,  # the first few, with the server events seen
        },
        "series": series,
        "steps": knee.steps if knee is not None else [],
        "knee": knee.knee if knee is not None else None,
        "turns_by_number": sorted(totals.rows, key=lambda row: int(row["turn"])),
        "transcripts": totals.transcripts,
        "client": client_cost(totals, snapshots),
        "resumes": totals.resumes,
        "faults": [fault_section(fault, totals.resumes)] if fault is not None else [],
    }


def client_cost(totals: RunTotals, snapshots: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """CPU per second of call: the driver children (the calls themselves) and the Locust
    worker processes (users, stats, messaging), each in ms of CPU per call-second."""
    driver_s = sum(float(s.get("driver_cpu_s", 0.0)) for s in snapshots)
    worker_s = sum(float(s.get("worker_cpu_s", 0.0)) for s in snapshots)
    call_s = totals.call_s

    def per_call_s(cpu_s: float) -> float | None:
        return round(1000 * cpu_s / call_s, 2) if call_s > 0 else None

    return {
        "cpu_ms_per_call_s": per_call_s(driver_s),
        "locust_worker_cpu_ms_per_call_s": per_call_s(worker_s),
        "driver_cpu_s": round(driver_s, 2),
        "call_s": round(call_s, 1),
    }


# --- a transceiver killed during the run ----------------------------------------------------


def fault_section(fault: dict[str, Any], resumes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The kill (``fault``: ``kind``, ``name``, ``pid``, ``at_s``, ``killed_unix_s``,
    ``sessions``) and the calls it cut: those whose last packet came before the kill (or in
    flight just after it) and which noticed the silence after it. Per call, in ms from the
    kill: silence noticed, resume answered (201), ``session.created``, media again (the first
    packet from the new transceiver) and the first answer audio of the re-asked question; what
    was lost: the turn cut, the stored conversation replayed or not. Any other resume (a
    silence not caused by the kill) is counted apart."""
    killed = float(fault["killed_unix_s"])

    def cut_by_kill(row: dict[str, Any]) -> bool:
        last, noticed = row.get("last_packet_unix_s"), float(row["detected_unix_s"])
        return last is not None and float(last) <= killed + AFTER_KILL_S and noticed >= killed

    def since_kill(value: float | None) -> float | None:
        return None if value is None else round((value - killed) * 1000, 1)

    calls = []
    for row in sorted(filter(cut_by_kill, resumes), key=lambda r: float(r["detected_unix_s"])):
        expected, items = int(row.get("history_expected", 0)), row.get("history_items")
        calls.append(
            {
                "id": row["id"],
                "resumed": bool(row["ok"]),
                "reason": row.get("reason", ""),
                "cut_turn": row.get("cut_turn"),
                "cut_stage": row.get("cut_stage"),
                "turns_before": row.get("turns_before"),
                "detected_ms": since_kill(row.get("detected_unix_s")),
                "resume_answered_ms": since_kill(row.get("answered_unix_s")),
                "session_created_ms": since_kill(row.get("created_unix_s")),
                "media_ms": since_kill(row.get("media_unix_s")),
                "answer_ms": since_kill(row.get("answer_unix_s")),
                "reasked": row.get("reasked"),
                "attempts": row.get("attempts"),
                "history_items": items,
                "history_expected": expected,
                "history_kept": None if items is None else items >= expected,
                "cut_events": row.get("cut_events"),
            }
        )
    resumed = [c for c in calls if c["resumed"]]
    section: dict[str, Any] = {
        **{k: fault.get(k) for k in ("kind", "name", "pid", "at_s", "sessions")},
        "killed_unix_s": killed,
        "affected": len(calls),
        "resumed": len(resumed),
        "recovered": sum(c["reasked"] == "answered" for c in calls),  # answered after it
        "not_resumed": dict(Counter(c["reason"] for c in calls if not c["resumed"])),
        "turns_cut": sum(c["cut_turn"] is not None for c in calls),
        "history_kept": sum(bool(c["history_kept"]) for c in resumed),
        "history_lost": sum(c["history_kept"] is False for c in resumed),
        "other_resumes": len(resumes) - len(calls),
    }
    for key, name in (
        ("gap_ms", "media_ms"),  # kill -> media flows again: the figure's "gap"
        ("answer_gap_ms", "answer_ms"),
        ("detected_ms", "detected_ms"),
        ("session_created_ms", "session_created_ms"),
    ):
        section[key] = _spread([c[name] for c in resumed if c[name] is not None])
    return section | {"calls": calls}


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    """p50, p99 and max of a few values (numpy's interpolated percentiles)."""
    if not values:
        return None
    return {
        "p50": round(float(np.percentile(values, 50)), 1),
        "p99": round(float(np.percentile(values, 99)), 1),
        "max": round(float(max(values)), 1),
    }


def pause_after(ended: dict[str, Any], knee: bool) -> float:
    """How long a user waits after its call ended before the next: for the whole run in fixed and
    long-call runs (one call per user); in a knee, at once after a call that ended well, and
    ``FAILED_CALL_PAUSE_S`` after one that failed, so that a server refusing calls (503 past its
    capacity) is asked again a few times a second, not in a loop of set-ups (without the pause a
    knee step past a transceiver's capacity made 28,000 set-ups in 3 minutes, filled the
    generator's core, and the step's failure was put down to the generator)."""
    if not knee:
        return RUN_LONG_S
    return 0.0 if ended.get("ok") else FAILED_CALL_PAUSE_S
