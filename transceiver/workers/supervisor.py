"""The pod's supervisor: start N workers, restart the ones that die, answer for the pod, drain.

I/O layer (processes, sockets, HTTP). Lifecycle: bind a private loopback socket per worker and
one for itself, start every worker (``python -m transceiver`` again, with the same flags and its
``Seat`` in ``TRANSCEIVER_POD_SEAT``), wait for each to print its ready line, then print the
pod's (``transceiver ready link=A,B,... http=H workers=N``). A worker that exits while the pod
is not draining is logged (how it ended), counted in ``transceiver_worker_deaths_total{worker,
cause}`` and started again after the restart pause (``TRANSCEIVER_RESTART_*``, growing while it
keeps dying); its calls are gone from it, and their clients resume elsewhere through the usual
resume path. SIGTERM or SIGINT only sets a flag: then every worker gets SIGTERM and drains
(``TRANSCEIVER_DRAIN_TIMEOUT_S``), and the supervisor exits once all have, killing any that
outlive the drain by ``EXIT_MARGIN_S``. A worker that fails before its first ready line fails
the pod (exit 1): a bad flag or a port in use would fail every restart the same way.

The supervisor's own HTTP (loopback; the workers' ``/readyz`` and ``/metrics`` ask it): ``/readyz``
is 200 while any worker takes calls (a worker that cannot spills new offers to one that can),
503 while draining or when none does, naming each worker's state; ``/metrics`` is the workers'
folded (``pod_metrics``) with the supervisor's own counters.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
import uvloop
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from transceiver.background import RestartBackoff
from transceiver.config import TransceiverConfig
from transceiver.http.hop_signature import hop_headers, pod_keys, pod_target
from transceiver.workers.pod_metrics import exposition, fold
from transceiver.workers.seats import LOOPBACK, SEAT_ENV, Seat, worker_link

logger = logging.getLogger("transceiver.workers")
WORKER_READY = "transceiver worker "  # + "<index> ready ..." on a worker's stdout
STARTUP_TIMEOUT_S = 60.0
EXIT_MARGIN_S = 15.0
ASK_TIMEOUT_S = 3.0


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    return max(1, cores)


@dataclass
class Worker:
    """One seat of the pod and the process in it now."""

    index: int
    private: socket.socket
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    started_s: float = 0.0


def run_pod(config: TransceiverConfig, argv: Sequence[str], count: int) -> int:
    """``python -m transceiver`` with ``count`` > 1 workers: the pod until SIGTERM or SIGINT
    and its drain; its exit code. The supervisor imports only this module's world (fastapi,
    uvicorn, httpx for its own port), not the server its workers run."""
    return uvloop.run(_run_until_signalled(config, argv, count))


async def _run_until_signalled(config: TransceiverConfig, argv: Sequence[str], count: int) -> int:
    return await Pod(config, argv, count).run(stop_on_signals())


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM and SIGINT set, and nothing more (a pod's and a server's stop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


class Pod:
    def __init__(self, config: TransceiverConfig, argv: Sequence[str], count: int) -> None:
        self.config, self.argv, self.count = config, list(argv), count
        self.workers: list[Worker] = []
        self.draining = False
        self.deaths: collections.Counter[tuple[int, str]] = collections.Counter()
        self.restarts: collections.Counter[int] = collections.Counter()
        self._own: socket.socket | None = None
        self._failed = asyncio.Event()  # a worker ended before its first ready line
        self.hop_key = secrets.token_hex(32)  # the pod's own: signs the hops between its processes
        self._hops = pod_keys(self.hop_key)
        self._http = httpx.AsyncClient(timeout=ASK_TIMEOUT_S, verify=False, trust_env=False)

    @property
    def links(self) -> list[tuple[str, int]]:
        return [worker_link(self.config.link, index) for index in range(self.count)]

    async def run(self, stop: asyncio.Event) -> int:
        """Serve the pod until ``stop``; drain; the exit code."""
        self._own = _listener()
        self.workers = [Worker(index, _listener()) for index in range(self.count)]
        server = _Server(_uvicorn_config(pod_app(self)))
        http = asyncio.create_task(server.serve(sockets=[self._own]), name="pod http")
        try:
            async with asyncio.TaskGroup() as keepers:
                for worker in self.workers:
                    keepers.create_task(self._keep(worker), name=f"worker {worker.index}")
                if not await self._all_ready():
                    self.draining = True
                    self._signal_all(signal.SIGKILL)
                    return 1
                links = ",".join(f"{host}:{port}" for host, port in self.links)
                host, port = self.config.http
                print(f"transceiver ready link={links} http={host}:{port} workers={self.count}")
                sys.stdout.flush()
                await stop.wait()
                await self._drain()
            return 0
        finally:
            server.should_exit = True
            await http
            await self._http.aclose()

    async def _all_ready(self) -> bool:
        """Every worker printed its ready line (False: one failed first, or the deadline)."""
        waiters = [asyncio.ensure_future(w.ready.wait()) for w in self.workers]
        failed = asyncio.ensure_future(self._failed.wait())
        ready = asyncio.ensure_future(asyncio.wait(waiters))
        first = asyncio.FIRST_COMPLETED
        await asyncio.wait([ready, failed], timeout=STARTUP_TIMEOUT_S, return_when=first)
        for waiter in (ready, failed, *waiters):
            waiter.cancel()
        alive = all(w.process is not None and w.process.returncode is None for w in self.workers)
        if all(w.ready.is_set() for w in self.workers) and alive:
            return True
        logger.error("the pod's workers did not all start (see their log lines above)")
        return False

    async def _keep(self, worker: Worker) -> None:
        """Run the worker's seat: start, wait for the exit, restart unless draining."""
        backoff = RestartBackoff(self.config.survival.restarts)
        loop = asyncio.get_running_loop()
        while True:
            process = await self._spawn(worker)
            reader = asyncio.create_task(self._read(worker, process), name="worker stdout")
            code = await process.wait()
            await reader  # the pipe ends with the process
            if self.draining:
                return
            if not worker.ready.is_set():  # never started: every restart would fail alike
                logger.error("worker %d (pid %d) exited %s before it was ready", worker.index,
                             process.pid, code)  # fmt: skip
                self.draining = True
                self._failed.set()
                return
            self.deaths[(worker.index, _cause(code))] += 1
            pause_s = backoff.crashed(loop.time() - worker.started_s)
            logger.error("worker %d (pid %d) died (%s); restarting in %.1f s", worker.index,
                         process.pid, _cause(code), pause_s)  # fmt: skip
            await asyncio.sleep(pause_s)
            if self.draining:
                return
            self.restarts[worker.index] += 1

    async def _spawn(self, worker: Worker) -> asyncio.subprocess.Process:
        assert self._own is not None
        seat = Seat(
            worker.index,
            tuple(w.private.getsockname()[1] for w in self.workers),
            self._own.getsockname()[1],
            worker.private.fileno(),
            self.hop_key,
        )
        env = {**os.environ, SEAT_ENV: seat.to_env()}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "transceiver", *self.argv,
            env=env, stdout=asyncio.subprocess.PIPE, pass_fds=(worker.private.fileno(),),
        )  # fmt: skip
        worker.process, worker.started_s = process, asyncio.get_running_loop().time()
        worker.ready.clear()
        return process

    async def _read(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        """Pass the worker's stdout on and notice its ready line (ends with the process)."""
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            print(line, flush=True)
            if line.startswith(f"{WORKER_READY}{worker.index} ready"):
                worker.ready.set()

    async def _drain(self) -> None:
        """SIGTERM to every worker; wait for them to drain; kill what outlives the deadline."""
        self.draining = True
        logger.info("draining %d workers", self.count)
        self._signal_all(signal.SIGTERM)
        processes = [w.process for w in self.workers if w.process is not None]
        deadline_s = self.config.drain_timeout_s + EXIT_MARGIN_S
        done, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in processes],
                                           timeout=deadline_s)  # fmt: skip
        if pending:
            logger.error("%d workers outlived the drain; killing them", len(pending))
            self._signal_all(signal.SIGKILL)
            await asyncio.wait(pending)

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            process = worker.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)

    async def ask(self, path: str) -> dict[int, httpx.Response | None]:
        """Every worker's answer to GET ``path`` on its private port (None: no answer)."""

        async def one(worker: Worker) -> httpx.Response | None:
            port = worker.private.getsockname()[1]
            hop = hop_headers(self._hops.sign(pod_target(path), None, time.time()))
            try:
                return await self._http.get(f"http://{LOOPBACK}:{port}{path}", headers=hop)
            except httpx.HTTPError:
                return None

        answers = await asyncio.gather(*(one(worker) for worker in self.workers))
        return dict(enumerate(answers))

    def own_metrics(self, up: int) -> list[Metric]:
        workers = GaugeMetricFamily("transceiver_workers", "Worker processes of this pod",
                                    value=self.count)  # fmt: skip
        answering = GaugeMetricFamily("transceiver_workers_up",
                                      "Workers that answered this scrape", value=up)  # fmt: skip
        deaths = CounterMetricFamily(
            "transceiver_worker_deaths",
            "Worker processes that exited while the pod was not draining (each was restarted), "
            "by worker and how it ended (signal_KILL, exit_1, ...)",
            labels=["worker", "cause"],
        )
        for (index, cause), count in sorted(self.deaths.items()):
            deaths.add_metric([str(index), cause], count)
        restarts = CounterMetricFamily(
            "transceiver_worker_restarts", "Workers started again after a death", labels=["worker"]
        )
        for index, count in sorted(self.restarts.items()):
            restarts.add_metric([str(index)], count)
        return [workers, answering, deaths, restarts]


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the pod's lifecycle owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _cause(code: int) -> str:
    if code < 0:
        return "signal_" + signal.Signals(-code).name.removeprefix("SIG")
    return f"exit_{code}"


def _listener() -> socket.socket:
    """A loopback TCP listener on a free port, inheritable by a worker."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(256)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: FastAPI) -> uvicorn.Config:
    return uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)


def pod_app(pod: Pod) -> FastAPI:
    """The supervisor's loopback HTTP: the pod's readiness and metrics."""
    app = FastAPI(title="voicerelay transceiver pod", docs_url=None, redoc_url=None)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        answers = await pod.ask("/readyz")
        states = {str(i): _state(answer) for i, answer in answers.items()}
        if pod.draining:
            return _not_ready("draining", "the pod is draining", states)
        if "ready" in states.values():
            ready = [a for a in answers.values() if a is not None and a.status_code == 200]
            sessions = sum(answer.json().get("sessions", 0) for answer in ready)
            return JSONResponse({"status": "ready", "sessions": sessions, "workers": states})
        reason = next((s for s in states.values() if s != "down"), "down")
        return _not_ready(reason, "no worker of the pod takes a call", states)

    @app.get("/metrics")
    async def metrics() -> Response:
        answers = await pod.ask("/metrics")
        texts = {i: a.text for i, a in answers.items() if a is not None and a.status_code == 200}
        body = exposition([*fold(texts), *pod.own_metrics(len(texts))])
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


def _state(answer: httpx.Response | None) -> str:
    """ "ready", the worker's not-ready code ("full", "overloaded", ...) or "down"."""
    if answer is None:
        return "down"
    if answer.status_code == 200:
        return "ready"
    try:
        return str(answer.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{answer.status_code}"


def _not_ready(code: str, message: str, states: dict[str, str]) -> JSONResponse:
    body = {"error": {"type": "server_error", "code": code, "message": message, "param": None}}
    return JSONResponse({**body, "workers": states}, status_code=503)
