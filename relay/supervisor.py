"""The relay's parent process: spawn the workers, keep them alive, serve HTTP, stop on signal.

I/O layer. Lifecycle: load config (``relay.__main__``), start the HTTP port, spawn N workers,
wait until each has bound its sockets, print ``relay ready``, then watch the workers and
replace any that dies. SIGTERM/SIGINT only set a flag; the main task then stops the workers
(SIGTERM, then SIGKILL after ``timing.stop_timeout_s``) and returns 0.

Workers publish counters into one shared ``multiprocessing.Array`` of uint64 (a row each).
When a worker is replaced its last counts are folded into ``retired`` so that the totals served
on ``/metrics`` never go backwards. Each process watches its own event loop
(``relay.loop_lag``): a row each of a second shared array (row 0 this process's, then one per
worker: a replacement goes on counting in its predecessor's row) is served as the histogram
``relay_event_loop_lag_seconds{process}``; a stall is logged by the process it stalled, naming
what blocked it. ``RELAY_LOOP_LAG_WARN_MS`` (100) is the stall threshold.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from multiprocessing.context import SpawnProcess

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import counters as c
from relay.config import RelayConfig
from relay.http import HttpEndpoints, Snapshot, start_http
from relay.loop_lag import (
    SHARED_ROW,
    LoopLagMonitor,
    LoopLagPolicy,
    shared_histogram,
    shared_observer,
)
from relay.worker import run_worker


class StartError(RuntimeError):
    """The relay could not start; the message says why."""


class Supervisor:
    """Owns the worker processes and their shared counter array."""

    def __init__(self, config: RelayConfig, lag_policy: LoopLagPolicy | None = None) -> None:
        self.config = config
        self.timing = config.timing
        self._context = multiprocessing.get_context("spawn")
        self.shared = self._context.Array("Q", config.workers * c.ROW, lock=False)
        self.lag_policy = lag_policy or LoopLagPolicy()
        self.lag = self._context.Array("Q", (config.workers + 1) * SHARED_ROW, lock=False)
        self.retired = [0] * c.ROW
        self.restarts = 0
        self.processes: list[SpawnProcess | None] = [None] * config.workers

    def spawn(self, index: int) -> None:
        process = self._context.Process(
            target=run_worker,
            args=(self.config, index, self.shared, self.lag, self.lag_policy),
            name=f"relay-worker-{index}",
            daemon=False,
        )
        process.start()
        self.processes[index] = process

    def row(self, index: int) -> list[int]:
        base = index * c.ROW
        return list(self.shared[base : base + c.ROW])

    def alive(self) -> int:
        return sum(1 for p in self.processes if p is not None and p.is_alive())

    def ready(self) -> bool:
        """Every worker alive with its sockets bound (what start waits for)."""
        return all(
            p is not None and p.is_alive() and self.shared[i * c.ROW + c.READY] == 1
            for i, p in enumerate(self.processes)
        )

    def serving(self) -> bool:
        """Ready, and every worker knows a transceiver to forward to: /readyz is 200."""
        return self.ready() and all(
            self.shared[i * c.ROW + c.TRANSCEIVERS] > 0 for i in range(self.config.workers)
        )

    def status(self) -> str:
        """The body of /readyz: why not ready, or ready and what is missing."""
        if not self.ready():
            return "not ready: workers starting"
        rows = range(self.config.workers)
        unresolved = max(self.shared[i * c.ROW + c.NAMES_UNRESOLVED] for i in rows)
        names = f"{unresolved} RELAY_TRANSCEIVERS name(s) do not resolve (asked again)"
        if not self.serving():
            return f"not ready: no transceiver address known yet; {names}"
        return f"ready; {names}" if unresolved else "ready"

    def snapshot(self) -> Snapshot:
        rows = [self.row(i) for i in range(self.config.workers)]
        totals = list(self.retired)
        for row in rows:
            totals = [total + value for total, value in zip(totals, row, strict=True)]
        return totals, rows, self.alive(), self.restarts

    def replace(self, index: int) -> None:
        """Fold the dead worker's counters into ``retired``, clear its row, start another."""
        for slot, value in enumerate(self.row(index)):
            if slot not in c.GAUGES:
                self.retired[slot] += value
            self.shared[index * c.ROW + slot] = 0
        self.restarts += 1
        self.spawn(index)

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every worker has bound its sockets; StartError if one exits first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.ready():
            for index, process in enumerate(self.processes):
                if process is not None and process.exitcode is not None:
                    raise StartError(
                        f"worker {index} exited with code {process.exitcode} before it was ready"
                    )
            if loop.time() > deadline:
                raise StartError(f"workers not ready after {timeout_s:.0f} s")
            await asyncio.sleep(self.timing.watch_interval_s)

    async def watch(self, stop: asyncio.Event) -> None:
        """Replace dead workers until ``stop`` is set."""
        while not stop.is_set():
            for index, process in enumerate(self.processes):
                if process is not None and process.exitcode is not None:
                    print(
                        f"relay: worker {index} exited with code {process.exitcode}; restarting",
                        file=sys.stderr,
                        flush=True,
                    )
                    process.close()
                    self.replace(index)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.timing.respawn_pause_s)
            except TimeoutError:
                pass

    async def stop_workers(self) -> None:
        """SIGTERM every worker, SIGKILL what is left after ``timing.stop_timeout_s``."""
        live = [p for p in self.processes if p is not None and p.exitcode is None]
        for process in live:
            process.terminate()
        watch_s = self.timing.watch_interval_s
        for _ in range(int(self.timing.stop_timeout_s / watch_s)):
            if all(p.exitcode is not None for p in live):
                break
            await asyncio.sleep(watch_s)
        for process in live:
            if process.exitcode is None:
                process.kill()
                process.join(1.0)


class LoopLagCollector(Collector):
    """Every relay process's event-loop lag, from the shared rows, at scrape time."""

    def __init__(self, lag: Sequence[int], workers: int) -> None:
        self._lag = lag
        self._names = ["supervisor", *(f"worker{index}" for index in range(workers))]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "relay_event_loop_lag_seconds",
            "How late each relay process's event loop ran a 50 ms tick",
            labels=["process"],
        )
        for row, name in enumerate(self._names):
            buckets, total_s = shared_histogram(self._lag, row)
            family.add_metric([name], buckets, total_s)
        yield family


async def run(config: RelayConfig) -> int:
    """The whole lifecycle; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        lag_policy = LoopLagPolicy.from_env(os.environ, "RELAY_")
    except ValueError as error:
        print(f"relay: bad configuration: {error}", file=sys.stderr, flush=True)
        return 2
    supervisor = Supervisor(config, lag_policy)
    endpoints = HttpEndpoints(supervisor.snapshot, supervisor.serving, supervisor.status)
    endpoints.registry.register(LoopLagCollector(supervisor.lag, config.workers))
    try:
        server = await start_http(endpoints, *config.http)
    except OSError as error:
        print(f"relay: cannot serve HTTP on {config.http}: {error}", file=sys.stderr, flush=True)
        return 1
    observe = shared_observer(supervisor.lag, 0)
    logger = logging.getLogger("relay.supervisor")
    monitor = LoopLagMonitor(lag_policy, observe, logger, "relay supervisor event loop")
    monitor.start()
    try:
        return await _serve(supervisor, stop)
    finally:
        await monitor.aclose()
        server.close()
        await supervisor.stop_workers()
        await server.wait_closed()


async def _serve(supervisor: Supervisor, stop: asyncio.Event) -> int:
    for index in range(supervisor.config.workers):
        supervisor.spawn(index)
    try:
        await supervisor.wait_ready(supervisor.timing.ready_timeout_s)
    except StartError as error:
        print(f"relay: {error}", file=sys.stderr, flush=True)
        return 1
    print("relay ready", flush=True)
    await supervisor.watch(stop)
    return 0
