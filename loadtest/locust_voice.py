"""The Locust file of the ``voice`` scenario: one Locust user = one real WebRTC voice call.

Run by ``loadtest.voice_scenario`` as ``python -m locust -f <this file> --headless ...``;
never imported by the test process (Locust patches the process with gevent on import).

- **Worker** (or a local runner): the calls run in one ``loadtest.voice_calls`` driver child
  per worker process (asyncio; see that module for why), spoken to in JSON lines. Call set-up
  and every turn are Locust requests (``CALL``/``setup``, ``TURN``/``turn``) and go into
  HdrHistograms, shipped every report interval through ``report_to_master``; so is a call's
  resume after its transceiver went away (``CALL``/``resume``, the silence noticed ->
  ``session.created``), whose row goes into the totals whole.
- **Master**: merges them (``worker_report``), samples the server's processes from /proc
  (``--voice-server-pids name=pid,...``: CPU cores and RSS of each process tree), keeps a
  time series and drives ``VoiceShape``: a fixed number of calls, one long call, or the knee
  (steps of sessions until turn p95 passes ``--voice-threshold`` x the one-call figure or
  anything fails). From ``test_stopping`` it asks every worker for its last figures and
  writes the report (``--voice-report``). Beside it, it writes ``started.json`` when the test
  starts, and reads ``fault.json`` (the transceiver the scenario killed) for the report's
  ``faults``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import gevent
from gevent import subprocess
from gevent.event import AsyncResult
from locust import LoadTestShape, User, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtest.cpu_confinement import parse_cpus, read_throttling
from loadtest.hosts import CoresBusy
from loadtest.voice_report import (
    RUN_LONG_S,
    Histograms,
    Knee,
    KneePlan,
    ProcessSampler,
    RunTotals,
    build_report,
    cpu_seconds,
    pause_after,
    scrape_loop_metrics,
)

FLUSH_TIMEOUT_S = 10.0
SAMPLE_S = 3.0
CALL_WAIT_S = RUN_LONG_S  # a call is bounded by the run, and by the driver's own timeouts
STARTED_FILE = "started.json"  # beside the report: when the test started (a fault counts from it)
FAULT_FILE = "fault.json"  # beside the report: the transceiver the scenario killed, if any


def _options(parser: Any) -> None:
    group = parser.add_argument_group("voice scenario")
    group.add_argument("--voice-url", default="", help="the stack's base URL")
    group.add_argument("--voice-questions", default="", help="pre-encoded questions (JSON)")
    group.add_argument("--voice-turns", type=int, default=2, help="turns per call (0: endless)")
    group.add_argument("--voice-calls", type=int, default=1, help="concurrent calls (fixed)")
    group.add_argument("--voice-spawn-rate", type=float, default=1.0)
    group.add_argument("--voice-long-call", type=int, default=0, help="one call of N turns")
    group.add_argument("--voice-knee", action="store_true", help="steps until the knee")
    group.add_argument("--voice-steps", default="1,2,4,6,8,10,12,16,20,24,32")
    group.add_argument("--voice-step-s", type=float, default=30.0)
    group.add_argument("--voice-first-step-s", type=float, default=0.0)
    group.add_argument("--voice-settle-s", type=float, default=6.0)
    group.add_argument("--voice-threshold", type=float, default=1.5)
    group.add_argument("--voice-baseline-ms", type=float, default=0.0)
    group.add_argument("--voice-server-pids", default="", help="name=pid,... on this host")
    group.add_argument("--voice-report", default="", help="the report JSON to write")
    group.add_argument("--voice-config", default="{}", help="JSON echoed in the report")
    group.add_argument(
        "--voice-silence-s", type=float, default=1.0, help="no media this long: resume (0: never)"
    )
    group.add_argument("--voice-refine", type=int, default=0, help="knee: bisect to this")
    group.add_argument("--voice-client", default="aiortc", help="the calls' media: aiortc, lean")
    group.add_argument("--voice-cgroup-stat", default="", help="the transceivers' cpu.stat")
    group.add_argument("--voice-confined-cores", type=float, default=0.0)
    group.add_argument(
        "--voice-metrics-urls", default="", help="transceivers' base URLs: loop lag per step"
    )


# --- worker side: the driver child and the figures it produces -------------------------------


class DriverLink:
    """The driver child of this worker process and what its lines say."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        options = options_of(environment)
        argv = [sys.executable, "-m", "loadtest.voice_calls", "--url", options.voice_url]
        argv += ["--questions", options.voice_questions] if options.voice_questions else []
        argv += ["--silence-s", str(options.voice_silence_s), "--client", options.voice_client]
        if options.voice_long_call:
            argv += ["--server-pids", _pids_text(options.voice_server_pids, "transceiver")]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.ready: AsyncResult = AsyncResult()
        self.ended: dict[int, AsyncResult] = {}
        self.started_s: dict[int, float] = {}
        self.hist = Histograms()
        self.totals = RunTotals(keep_rows=not options.voice_knee)
        self.cpu_at_ready = 0.0
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = json.loads(line)
            getattr(self, "_on_" + event["ev"])(event)

    def _on_ready(self, event: dict[str, Any]) -> None:
        self.cpu_at_ready = cpu_seconds(self.process.pid)
        self.ready.set(True)

    def _on_setup(self, event: dict[str, Any]) -> None:
        ms = float(event.get("ms") or 0.0)
        self.totals.setup(event["ok"], event.get("reason", ""))
        if event["ok"]:
            self.hist.setup.record(ms)
            self.started_s[event["id"]] = time.monotonic()
        _fire(self.environment, "CALL", "setup", ms, event)

    def _on_turn(self, event: dict[str, Any]) -> None:
        ms = float(event.get("ms") or 0.0)
        self.totals.turn(event["ok"], event.get("reason", ""), event)
        if event["ok"]:
            self.hist.turn.record(ms)
            self.hist.stage(event.get("stages"))
        _fire(self.environment, "TURN", "turn", ms, event)

    def _on_resume(self, event: dict[str, Any]) -> None:
        self.totals.resume(event)
        created, detected = event.get("created_unix_s"), event["detected_unix_s"]
        ms = 1000 * (created - detected) if created is not None else 0.0  # noticed -> created
        _fire(self.environment, "CALL", "resume", ms, event)

    def _on_ended(self, event: dict[str, Any]) -> None:
        started = self.started_s.pop(event["id"], None)
        if started is not None:
            self.totals.call_s += time.monotonic() - started
        self.totals.ended += 1
        if (waiter := self.ended.pop(event["id"], None)) is not None:
            waiter.set(event)
        if not options_of(self.environment).voice_knee:
            self._report_now()

    def _report_now(self) -> None:
        """A fixed or long-call run ends when its calls have (``VoiceShape``): the master is
        told now, not at the next report (every ``WORKER_REPORT_INTERVAL``, 3 s, in Locust)."""
        runner = self.environment.runner
        if isinstance(runner, WorkerRunner):
            runner.send_message("voice_ended", {"voice": self.snapshot()})

    def send(self, **order: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(order) + "\n")
        self.process.stdin.flush()

    def snapshot(self) -> dict[str, Any]:
        """The interval's histograms (reset) and the running totals, as shipped to the master."""
        running_s = sum(time.monotonic() - s for s in self.started_s.values())
        return {
            "hist": self.hist.take(),
            "totals": self.totals.as_dict(running_s),
            "driver_cpu_s": cpu_seconds(self.process.pid) - self.cpu_at_ready,
            "worker_cpu_s": cpu_seconds(os.getpid()),
        }

    def close(self) -> None:
        if self.process.poll() is None:
            self.send(op="quit")
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_link: DriverLink | None = None
_call_ids = iter(range(1, 1 << 62))


def driver(environment: Environment) -> DriverLink:
    """This process's driver child, started (``start_driver``) and ready."""
    link = start_driver(environment)
    link.ready.get(timeout=120)
    return link


def start_driver(environment: Environment) -> DriverLink:
    """The driver child, started if it is not yet: a worker starts it when Locust starts it, so
    its imports are done while the master starts the test."""
    global _link
    if _link is None:
        _link = DriverLink(environment)
    return _link


def options_of(environment: Environment) -> Any:
    """The parsed command line, with this file's ``--voice-*`` options."""
    assert environment.parsed_options is not None
    return environment.parsed_options


def _fire(environment: Environment, kind: str, name: str, ms: float, event: dict[str, Any]) -> None:
    failure = None if event["ok"] else Exception(event.get("reason") or "failed")
    context = {"call": event["id"], "turn": event.get("turn")}
    request: Any = environment.events.request  # Locust's EventHook.fire is untyped
    request.fire(
        request_type=kind,
        name=name,
        response_time=ms,
        response_length=len(event.get("answer", "")),
        exception=failure,
        context=context,
    )


def _pids_text(named: str, prefix: str) -> str:
    pairs = (item.split("=", 1) for item in named.split(",") if "=" in item)
    return ",".join(pid for name, pid in pairs if name.startswith(prefix))


class VoiceCaller(User):
    """One call at a time: set up, ``--voice-turns`` turns, hang up; again unless fixed.

    The pause after a call (``pause_after``) is the user's wait time, not a sleep in its task:
    a waiting user is stopped at once, where one in its task is waited for up to
    ``--stop-timeout`` (a fixed run's users, paused for the rest of the run, held every worker's
    exit 10 s past the master's, and with it the output pipes a caller reads to their end)."""

    def on_start(self) -> None:
        self.call_id = 0
        self.pause_s = 0.0

    def wait_time(self) -> float:
        return self.pause_s

    @task
    def call(self) -> None:
        options = options_of(self.environment)
        link = driver(self.environment)
        self.call_id = next(_call_ids) + 1_000_000 * _worker_index(self.environment)
        turns = options.voice_long_call or options.voice_turns
        waiter = link.ended[self.call_id] = AsyncResult()
        link.send(op="call", id=self.call_id, turns=turns)
        ended = waiter.get(timeout=CALL_WAIT_S)
        self.call_id = 0
        self.pause_s = pause_after(ended, options.voice_knee)

    def on_stop(self) -> None:
        if self.call_id and _link is not None:
            _link.send(op="hangup", id=self.call_id)


def _worker_index(environment: Environment) -> int:
    runner = environment.runner
    return int(getattr(runner, "worker_index", 0)) if isinstance(runner, WorkerRunner) else 0


def _report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    if _link is not None:
        data["voice"] = _link.snapshot()


def _quit(environment: Environment, **_: Any) -> None:
    if _link is not None:
        _link.close()


# --- master side: merging, sampling the server, the shape, the report -------------------------


class Master:
    """What the master (or a local runner) knows: merged figures, samples, the knee."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        options = options_of(environment)
        self.knee = Knee(knee_plan(options))
        self.sampler = ProcessSampler(options.voice_server_pids)
        self.started = time.monotonic()
        self.workers: dict[str, dict[str, Any]] = {}  # the latest snapshot of each
        self.finals: dict[str, dict[str, Any]] = {}
        self.hist = Histograms()  # the whole run
        self.interval = Histograms()  # since the last series row
        self.series: list[dict[str, Any]] = []
        self._generator: dict[str, tuple[float, float]] = {}  # worker -> (cpu_s, at)
        self._generator_cores: dict[str, float] = {}
        pinned = json.loads(options.voice_config or "{}").get("generator_cpus") or ""
        self.pinned = CoresBusy(parse_cpus(pinned)) if pinned else None
        self._sampling = gevent.spawn(self._sample_forever)

    def merge(self, worker: str, snapshot: dict[str, Any]) -> None:
        self.hist.add(snapshot["hist"])
        self.interval.add(snapshot["hist"])
        self.knee.add(snapshot["hist"], time.monotonic())
        self.workers[worker] = snapshot
        cpu_s, now = snapshot["driver_cpu_s"] + snapshot["worker_cpu_s"], time.monotonic()
        last = self._generator.get(worker)
        if last is not None and now > last[1]:
            self._generator_cores[worker] = (cpu_s - last[0]) / (now - last[1])
        self._generator[worker] = (cpu_s, now)

    def _sample_forever(self) -> None:
        while True:
            gevent.sleep(SAMPLE_S)
            self.sample()

    def sample(self) -> None:
        server = self.sampler.sample()
        options = options_of(self.environment)
        if options.voice_cgroup_stat:
            server["throttling"] = read_throttling(options.voice_cgroup_stat)
        sessions = self.environment.runner.user_count if self.environment.runner else 0
        generator: dict[str, float] = {"cpu_cores": round(sum(self._generator_cores.values()), 3)}
        if self.pinned is not None:  # its cores, whoever used them
            generator["pinned_busy"] = round(self.pinned.sample(), 3)
            generator["pinned_cores"] = len(self.pinned.cpus)
        row = {
            "t_s": round(time.monotonic() - self.started, 1),
            "sessions": sessions,
            "turn_ms": self.interval.take_turn_percentiles(),
            "server": server,
            "generator": generator,
        }
        self.series.append(row)
        urls = [url for url in options.voice_metrics_urls.split(",") if url]
        metrics = scrape_loop_metrics(urls) if urls else None
        self.knee.sample(server, time.monotonic(), metrics, generator)

    def totals(self) -> RunTotals:
        merged = RunTotals()
        for snapshot in {**self.workers, **self.finals}.values():
            merged.merge(snapshot["totals"])
        return merged

    def write_report(self) -> None:
        self._sampling.kill()
        options = options_of(self.environment)
        if not options.voice_report:
            return
        snapshots = list({**self.workers, **self.finals}.values())
        config = json.loads(options.voice_config)
        knee = self.knee if options.voice_knee else None
        fault_path = Path(options.voice_report).with_name(FAULT_FILE)
        fault = json.loads(fault_path.read_text()) if fault_path.exists() else None
        totals = self.totals()
        report = build_report(config, self.hist, totals, snapshots, self.series, knee, fault)
        report["config"]["final_from_workers"] = f"{len(self.finals)}/{len(self.workers)}"
        path = Path(options.voice_report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


def knee_plan(options: Any) -> KneePlan:
    return KneePlan(
        sessions=[int(n) for n in options.voice_steps.split(",") if n],
        step_s=options.voice_step_s,
        settle_s=options.voice_settle_s,
        spawn_rate=options.voice_spawn_rate,
        threshold=options.voice_threshold,
        baseline_ms=options.voice_baseline_ms or None,
        refine=options.voice_refine,
        first_step_s=options.voice_first_step_s,
        confined_cores=options.voice_confined_cores or None,
    )


_master: Master | None = None


def _init(environment: Environment, **_: Any) -> None:
    global _master
    runner = environment.runner
    if runner is None or isinstance(runner, WorkerRunner):
        if isinstance(runner, WorkerRunner):
            runner.register_message("voice_flush", _on_flush)
            start_driver(environment)
        return
    _master = Master(environment)
    if isinstance(runner, MasterRunner):
        runner.register_message("voice_final", _on_final)
        runner.register_message("voice_ended", _on_ended)


def _test_start(environment: Environment, **_: Any) -> None:
    """The master notes when the test started, beside the report: the scenario's fault is
    timed from this moment."""
    options = options_of(environment)
    if _master is None or not options.voice_report:
        return
    path = Path(options.voice_report).with_name(STARTED_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"unix_s": time.time()}))


def _on_flush(environment: Environment, msg: Any, **_: Any) -> None:
    snapshot = _link.snapshot() if _link is not None else None
    assert isinstance(environment.runner, WorkerRunner)
    environment.runner.send_message("voice_final", {"voice": snapshot})


def _on_final(environment: Environment, msg: Any, **_: Any) -> None:
    if _master is not None and msg.data.get("voice") is not None:
        _master.merge(msg.node_id, msg.data["voice"])
        _master.finals[msg.node_id] = msg.data["voice"]


def _on_ended(environment: Environment, msg: Any, **_: Any) -> None:
    if _master is not None and msg.data.get("voice") is not None:
        _master.merge(msg.node_id, msg.data["voice"])


def _on_worker_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    if _master is not None and "voice" in data:
        _master.merge(client_id, data["voice"])


def _flush(environment: Environment, **_: Any) -> None:
    """Before the workers stop: their last figures, then the report (a worker's test_stop
    would be too late: a headless shape run ends with quit)."""
    if _master is None:
        return
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        workers = len(runner.clients)
        runner.send_message("voice_flush", {})
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while len(_master.finals) < workers and time.monotonic() < deadline:
            gevent.sleep(0.1)
    elif _link is not None:
        _master.merge("local", _link.snapshot())
        _master.finals["local"] = _master.workers["local"]
    _master.sample()
    _master.write_report()


class VoiceShape(LoadTestShape):
    """Fixed calls, one long call, or the knee's steps; ends when the calls are done (fixed,
    long) or at the knee."""

    def tick(self) -> tuple[int, float] | None:
        if _master is None or self.runner is None:
            return None
        options = options_of(self.runner.environment)
        if options.voice_knee:
            return _master.knee.tick(time.monotonic(), _master.totals().failures)
        calls = 1 if options.voice_long_call else options.voice_calls
        if _master.totals().ended >= calls:
            return None
        return calls, options.voice_spawn_rate


# Locust's hooks (its EventHook is untyped).
hooks: Any = events
hooks.init_command_line_parser.add_listener(_options)
hooks.report_to_master.add_listener(_report)
hooks.quitting.add_listener(_quit)
hooks.init.add_listener(_init)
hooks.worker_report.add_listener(_on_worker_report)
hooks.test_stopping.add_listener(_flush)
hooks.test_start.add_listener(_test_start)
