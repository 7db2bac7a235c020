"""Locust file of the ``relay`` scenario: one Locust user is one session through the relay.

Run it through ``python -m loadtest relay`` (which also starts a local lab when no target is
given), or directly with Locust's own flags for a distributed run::

    locust -f loadtest/locust_relay.py --master --headless --expect-workers 8 \\
        --lt-target relay.example:3478 --lt-transceiver 10.0.0.7:7000 --lt-sessions 100000 ...
    locust -f loadtest/locust_relay.py --worker --master-host MASTER

Design (LOADTEST.md):
- Each worker process runs one ``SessionEngine`` (``loadtest.relay_engine``) on a plain OS
  thread: the packets of all its sessions go through one timer wheel with ``sendmmsg`` and
  ``recvmmsg``. Users only open and close sessions; gevent never touches a packet, so spawning
  thousands of users cannot stall the media clock (the engine's own tick lag is reported).
- Setups appear in Locust's stats as request type ``STUN``, name ``setup`` (failures by reason).
- Latency is recorded in HdrHistograms on the workers (``loadtest.hdr``), shipped every report
  interval through ``report_to_master`` and merged exactly at the master in ``worker_report``.
- The final per-session quality (loss and jitter per canary) is requested from the master's
  ``test_stopping`` hook; a worker's own ``test_stop`` comes too late to reach the master.
- The master samples the servers it was told about (``--lt-server-pids`` on this host or
  ``--lt-server-metrics`` URLs), keeps a time series, and writes ``report.json`` and plots.

Options (Locust forwards them from the master to the workers): see ``_options``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import gevent
from gevent import monkey
from locust import LoadTestShape, User, constant, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtest.hosts import udp_errors
from loadtest.relay_engine import EngineConfig, Interval, SessionEngine
from loadtest.relay_report import RelayReport, parse_servers
from relay.wire.ufrag import Keyring

_real_sleep = monkey.get_original("time", "sleep")
# The engine thread needs the GIL every tick; gevent's thread hands it over after at most this.
sys.setswitchinterval(0.001)
_start_thread = monkey.get_original("_thread", "start_new_thread")
POLL_S = 0.05
INTERVAL_S = 1.0
FLUSH_TIMEOUT_S = 15.0


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("voicerelay relay scenario")
    group.add_argument("--lt-target", default="127.0.0.1:3478", help="relay public HOST:PORT")
    group.add_argument(
        "--lt-transceiver", default="127.0.0.1:7000", help="the lab transceiver's link HOST:PORT"
    )
    group.add_argument("--lt-sessions", type=int, default=1000, help="sessions at the peak")
    group.add_argument("--lt-spawn-rate", type=float, default=500.0, help="sessions per second")
    group.add_argument("--lt-hold-s", type=float, default=60.0, help="seconds held at the peak")
    group.add_argument(
        "--lt-steps", default="", help="comma list of session levels to hold in turn (a step shape)"
    )
    group.add_argument("--lt-canaries", type=int, default=100, help="full-rate media sessions")
    group.add_argument("--lt-address-mode", default="pktinfo", choices=("pktinfo", "sockets"))
    group.add_argument("--lt-consent-s", type=float, default=5.0)
    group.add_argument("--lt-payload-bytes", type=int, default=172)
    group.add_argument("--lt-capacity", type=int, default=0, help="sessions per worker (0: all)")
    group.add_argument("--lt-report-dir", default="loadtest-report")
    group.add_argument("--lt-server-pids", default="", help="NAME:PID,... sampled from /proc")
    group.add_argument("--lt-server-metrics", default="", help="NAME=URL,... /metrics scraped")
    group.add_argument("--lt-fault", default="", help="what the driver will kill, for the report")
    group.add_argument("--lt-no-figures", action="store_true", help="the report without PNGs")


class _Worker:
    """This process's engine and what it has not yet reported."""

    engine: SessionEngine | None = None
    opened = 0
    canaries = 0
    pending: Interval | None = None
    cpu_at_report = 0.0
    crashed = ""


def _options_of(environment: Environment) -> Any:
    """The command line's options (``--lt-*`` included); Locust sets them before any hook."""
    options = environment.parsed_options
    if options is None:
        raise RuntimeError("Locust started without parsed options")
    return options


def _config(environment: Environment) -> EngineConfig:
    options = _options_of(environment)
    keys = os.environ.get("LOADTEST_KEYS") or os.environ.get("RELAY_KEYS")
    if not keys:
        raise SystemExit("set LOADTEST_KEYS to the relay's keyring (ID:HEX)")
    target_host, _, target_port = options.lt_target.rpartition(":")
    lab_host, _, lab_port = options.lt_transceiver.rpartition(":")
    capacity = options.lt_capacity or max(options.lt_sessions, 1)
    if options.lt_address_mode == "pktinfo":
        capacity = min(capacity, 65_536)
    runner = environment.runner
    index = runner.worker_index if isinstance(runner, WorkerRunner) else 0
    return EngineConfig(
        target=(socket.gethostbyname(target_host), int(target_port)),
        transceiver=(socket.gethostbyname(lab_host), int(lab_port)),
        keyring=Keyring.parse(keys),
        capacity=capacity,
        media_capacity=min(capacity, max(options.lt_canaries, 0)),
        worker_index=max(index, 0),
        address_mode=options.lt_address_mode,
        consent_s=options.lt_consent_s,
        payload_bytes=options.lt_payload_bytes,
    )


def _start_engine(environment: Environment) -> None:
    if _Worker.engine is not None:
        return
    engine = SessionEngine(_config(environment))
    _Worker.engine = engine
    _start_thread(engine.run, (_real_sleep,))
    gevent.spawn(_pump_outbox, environment, engine)


def _pump_outbox(environment: Environment, engine: SessionEngine) -> None:
    """Carry the engine's results into Locust: setups as requests, intervals and finals."""
    next_interval = time.monotonic()
    while True:
        if time.monotonic() >= next_interval:
            next_interval += INTERVAL_S
            engine.request_interval()
        while engine.outbox:
            kind, value = engine.outbox.popleft()
            if kind == "setup":
                ok, took_ms, reason = value
                environment.events.request.fire(
                    request_type="STUN",
                    name="setup",
                    response_time=took_ms,
                    response_length=0,
                    exception=None if ok else RuntimeError(reason),
                    context={},
                )
            elif kind == "interval":
                _Worker.pending = _merge_interval(_Worker.pending, value)
            elif kind == "final":
                value["interval"] = _merge_interval(_Worker.pending, value["interval"])
                _Worker.pending = None
                _send_final(environment, value)
            elif kind == "crashed":
                _Worker.crashed = value
                environment.events.request.fire(
                    request_type="ENGINE",
                    name="crashed",
                    response_time=0,
                    response_length=0,
                    exception=RuntimeError(value),
                    context={},
                )
        gevent.sleep(POLL_S)


def _merge_interval(into: Interval | None, more: Interval) -> Interval:
    if into is None:
        return more
    into.rtt_us.add(more.rtt_us)
    into.setup_us.add(more.setup_us)
    into.tick_lag_us.add(more.tick_lag_us)
    for name, value in more.counters.items():
        into.counters[name] = into.counters.get(name, 0) + value
    into.gauges = more.gauges
    return into


def _wire(interval: Interval | None) -> dict[str, Any] | None:
    if interval is None:
        return None
    return {
        "rtt": interval.rtt_us.encode(),
        "setup": interval.setup_us.encode(),
        "tick_lag": interval.tick_lag_us.encode(),
        "counters": interval.counters,
        "gauges": interval.gauges,
    }


def _process_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _send_final(environment: Environment, final: dict[str, Any]) -> None:
    final["interval"] = _wire(final["interval"])
    final["crashed"] = _Worker.crashed
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.send_message("lt_final", final)
    elif _Report.current is not None:  # a single local process: master and worker in one
        _Report.current.add_final("local", final)


class Session(User):
    """One session through the relay: opened on start, closed on stop."""

    wait_time = constant(60)

    def on_start(self) -> None:
        engine = _Worker.engine
        if engine is None:
            raise RuntimeError("the packet engine did not start")
        options = _options_of(self.environment)
        share = options.lt_canaries / max(options.lt_sessions, 1)
        _Worker.opened += 1
        media = _Worker.canaries < share * _Worker.opened
        _Worker.canaries += int(media)
        engine.open(media)

    def on_stop(self) -> None:
        if _Worker.engine is not None:
            _Worker.engine.close()

    @task
    def hold(self) -> None:
        """Sessions keep themselves alive in the engine; the user only holds its place."""


class RampHold(LoadTestShape):
    """Ramp to ``--lt-sessions`` at ``--lt-spawn-rate``, hold ``--lt-hold-s``, stop; or with
    ``--lt-steps``, hold each level in turn for ``--lt-hold-s``."""

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        options = _options_of(self.runner.environment)
        elapsed = self.get_run_time()
        rate = options.lt_spawn_rate
        levels = [int(x) for x in options.lt_steps.split(",") if x] or [options.lt_sessions]
        start = 0.0
        previous = 0
        for level in levels:
            ramp_s = abs(level - previous) / rate
            if elapsed < start + ramp_s + options.lt_hold_s:
                return level, rate
            start += ramp_s + options.lt_hold_s
            previous = level
        return None


class _Report:
    current: RelayReport | None = None


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.register_message("lt_flush", _on_flush)
        return
    if isinstance(runner, MasterRunner):
        runner.register_message("lt_final", _on_final)
    options = _options_of(environment)
    _Report.current = RelayReport(
        report_dir=Path(options.lt_report_dir),
        config={
            name.removeprefix("lt_"): value
            for name, value in vars(options).items()
            if name.startswith("lt_")
        },
        servers=parse_servers(options.lt_server_pids, options.lt_server_metrics),
        figures=not options.lt_no_figures,
    )
    gevent.spawn(_sample_forever)


def _on_flush(environment: Environment, msg: Any, **_: Any) -> None:
    _flush_worker()


def _flush_worker() -> None:
    if _Worker.engine is not None:
        _Worker.engine.request_final()


def _on_final(environment: Environment, msg: Any, **_: Any) -> None:
    if _Report.current is not None:
        _Report.current.add_final(msg.node_id, msg.data)


def _sample_forever() -> None:
    report = _Report.current
    while report is not None:
        gevent.sleep(report.interval_s)
        report.close_interval()
        print(report.progress(), flush=True)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, MasterRunner):
        _start_engine(environment)
    if _Report.current is not None:
        _Report.current.start()


@events.report_to_master.add_listener
def _on_report_to_master(client_id: str, data: dict[str, Any]) -> None:
    interval, _Worker.pending = _Worker.pending, None
    cpu_s = _process_cpu_s()
    data["lt"] = {
        "interval": _wire(interval),
        "cpu_s": cpu_s - _Worker.cpu_at_report,
        "host": socket.gethostname(),
        "udp": udp_errors(),
        "crashed": _Worker.crashed,
    }
    _Worker.cpu_at_report = cpu_s


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any]) -> None:
    if _Report.current is not None and "lt" in data:
        _Report.current.add_worker_report(client_id, data["lt"])


@events.test_stopping.add_listener
def _on_test_stopping(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    report = _Report.current
    if report is None:
        return
    if isinstance(runner, MasterRunner):
        expected = len(runner.clients)
        runner.send_message("lt_flush", None)
    else:
        expected = 1
        _flush_worker()
    deadline = time.monotonic() + FLUSH_TIMEOUT_S
    while len(report.finals) < expected and time.monotonic() < deadline:
        gevent.sleep(0.1)
    report.expected_finals = expected


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    report = _Report.current
    if report is None or report.written:
        return
    stats = environment.stats.get("setup", "STUN")
    report.locust_setup = {"requests": stats.num_requests, "failures": stats.num_failures}
    path = report.write()
    print(f"relay scenario report: {path}", flush=True)
    print(json.dumps(report.headline(), indent=None), flush=True)
    if _Worker.engine is not None:
        _Worker.engine.stop()
