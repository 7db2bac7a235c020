"""The transceiver server: one process (bind the link and HTTP, serve, drain on SIGTERM), alone
(``run_alone``) or as a pod's worker (``run_worker``). ``python -m transceiver``
(``transceiver.__main__``) loads and checks the configuration first, then runs one of them, or
a pod's supervisor (``transceiver.workers.supervisor``), which does not import this module.

Lifecycle (as uvicorn/stunnerd): SIGTERM or SIGINT only sets a flag; then the transceiver stops
admitting (``/readyz`` 503, POST 503), lets calls end for up to ``drain_timeout_s``, closes
the rest, stops HTTP and closes the link socket. With ``REDIS_URL`` or ``REDIS_SENTINELS``
set (see ``redis_config``), sessions are stored in Redis and can be resumed elsewhere
(``persistence``); draining then hands each session over to another transceiver. An HTTP
server that fails (cannot bind, or raises) or stops by itself is logged with its traceback and
the process exits 1 after the same shutdown. An event-loop lag monitor (``relay.loop_lag``)
runs throughout: ``transceiver_event_loop_lag_seconds`` and a warning naming what blocked the
loop. With call records, ``call.ended`` webhooks go out as calls end (``webhooks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import uvicorn
import uvloop
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Histogram

from relay.loop_lag import BUCKETS_S, LoopLagMonitor, LoopLagPolicy
from relay.wire.redis_config import RedisConfig
from transceiver.agents import Agents, open_agents
from transceiver.config import TransceiverConfig
from transceiver.cpu_cost import CpuBudget, CpuMeter
from transceiver.http.app import capacity_collector, create_app
from transceiver.http.auth import AuthConfig, Authenticator
from transceiver.http.owner_hop import OwnerForwarder
from transceiver.http.rate_limiting import RateLimiting
from transceiver.http.worker_routing import WorkerRouting
from transceiver.metrics import GcPauses, TaskCrashCollector, freeze_heap
from transceiver.store.call_log import CallRecordCollector
from transceiver.store.rate_limit_store import open_rate_limits
from transceiver.store.route_publishing import RoutePublishing
from transceiver.store.secret_sessions import open_secret_sessions
from transceiver.store.sideband_directory import open_sideband_directory
from transceiver.webhooks import call_ended_webhooks
from transceiver.webrtc import ice, rtp_tuning, sctp_bundling
from transceiver.webrtc.calls import CallLimits, Calls
from transceiver.webrtc.link import Address, Link, RoutePublisherFactory
from transceiver.workers.seats import Seat, worker_link
from transceiver.workers.supervisor import WORKER_READY, stop_on_signals

logger = logging.getLogger("transceiver")
STARTUP_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: our lifecycle owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    config: TransceiverConfig, auth: AuthConfig, redis: RedisConfig | None, seat: Seat | None = None
) -> int:
    """One transceiver process: alone, or worker ``seat`` of a pod (``transceiver.workers``)."""
    ice.install()
    rtp_tuning.install()
    sctp_bundling.install()
    registry = CollectorRegistry()
    registry.register(TaskCrashCollector())
    async with (
        _loop_lag(config, registry),
        open_agents(config, registry, redis) as agents,
        call_ended_webhooks(
            config.webhook,
            None if agents.persistence is None else agents.persistence.records,
            registry,
            config.survival.restarts,
        ),
        open_sideband_directory(
            redis,
            None if agents.persistence is None else agents.persistence.owner_id,
            config.http_advertise,
            config.survival,
            None if seat is None else seat.index,
        ) as sideband_directory,
        open_rate_limits(redis if config.rate_limits.enabled else None) as rate_limit_store,
        open_secret_sessions(redis) as secret_sessions,  # large ek_ secrets' sessions
    ):
        records = None if agents.persistence is None else agents.persistence.records
        if records is not None:
            registry.register(CallRecordCollector(records))
        stop = stop_on_signals()
        link = Link(
            config.link,
            config.keyring,
            routes=_route_publisher(config, redis),
            policy=config.link_policy,
            restarts=config.survival.restarts,
        )
        try:
            link_address = await link.start()
        except OSError as exc:
            logger.error("cannot bind the link socket %s: %s", _text(config.link), exc)
            return 1
        try:
            calls = _calls(config, link, registry, agents, None if seat is None else seat.index)
            routing = None if seat is None else WorkerRouting(seat)
            # hang-ups for calls on other transceivers
            forwarder = OwnerForwarder(config.forward_timeout_s)
            app = create_app(
                calls,
                link,
                registry,
                Authenticator(auth, secret_sessions=secret_sessions),
                agents.persistence,
                agents.resume,
                agents.websocket,
                sideband_directory,
                routing=routing,
                rate_limits=RateLimiting(config.rate_limits, rate_limit_store),
                describe=agents.describe,
                forwarder=forwarder,
            )
            if config.gc_freeze:
                _freeze_start_up_heap()
            try:
                return await _serve(config, calls, app, link_address, stop, seat)
            finally:
                await forwarder.aclose()
                if routing is not None:
                    await routing.aclose()
        finally:
            await link.aclose()


@contextlib.asynccontextmanager
async def _loop_lag(config: TransceiverConfig, registry: CollectorRegistry) -> AsyncIterator[None]:
    """The event-loop lag histogram, warnings naming what blocked the loop, and the garbage
    collector's pauses (``transceiver_gc_pause_seconds``)."""
    lag = Histogram(
        "transceiver_event_loop_lag_seconds",
        "How late the event loop ran a 50 ms tick (a stall: everything on the loop waited)",
        buckets=BUCKETS_S,
        registry=registry,
    )
    policy = LoopLagPolicy(warn_s=config.loop_lag_warn_s)
    async with LoopLagMonitor(policy, lag.observe, logger, "transceiver event loop"):
        with GcPauses(registry):
            yield


def _freeze_start_up_heap() -> None:
    """Collect, then move every object start-up made (modules, the providers' and models'
    Python objects, the app) into the collector's permanent generation: a full collection
    otherwise walks all of it, with the event loop stopped (measured at 45 calls on the lean
    path: a 152 ms pause every ~14 s). Calls and turns made later are collected as before."""
    freeze_heap()


def _route_publisher(
    config: TransceiverConfig, redis: RedisConfig | None
) -> RoutePublisherFactory | None:
    """With Redis, the link publishes its client routes to the route cache."""
    if redis is None:
        return None
    return functools.partial(RoutePublishing.from_config, redis, policy=config.survival)


def _calls(
    config: TransceiverConfig,
    link: Link,
    registry: CollectorRegistry,
    agents: Agents,
    worker: int | None = None,
) -> Calls:
    relayed = ice.RelayedIce(link, config.keyring, config.public)
    limits = CallLimits(config.capacity, config.connect_timeout_s)
    meter = CpuMeter(CpuBudget(config.cpu_budget_cores, config.cpu_window_s))
    overload = agents.overload
    calls = Calls(
        relayed,
        limits,
        registry,
        agents.factory,
        config.media_path,
        overload,
        meter,
        worker,
        caller_dtx=config.caller_dtx,
    )
    overloaded = None if overload is None else (lambda: overload() is not None)
    registry.register(capacity_collector(calls, meter, overloaded))
    return calls


async def _serve(
    config: TransceiverConfig,
    calls: Calls,
    app: FastAPI,
    link: Address,
    stop: asyncio.Event,
    seat: Seat | None = None,
) -> int:
    """Serve HTTP until a signal (or the server's own end), drain the calls, stop HTTP."""
    server = _Server(_uvicorn_config(app, config))
    try:
        sockets = None if seat is None else _worker_sockets(config, seat)
    except OSError as exc:
        logger.error("cannot bind the HTTP listener %s: %s", _text(config.http), exc)
        return 1
    server_task = asyncio.create_task(_serve_http(server, sockets), name="http")
    try:
        if not await _started(server, server_task):
            logger.error("HTTP listener on %s:%d did not start", *config.http)
            return 1
        print(_ready_line(link, config, seat), flush=True)
        await _first(stop.wait(), server_task)
        if server_task.done():
            logger.error("the HTTP server stopped by itself")
            return 1
        logger.info("draining %d calls for up to %.1f s", len(calls), config.drain_timeout_s)
        await calls.drain(config.drain_timeout_s)
    finally:
        await calls.aclose()
        server.should_exit = True
        failed = await _http_failed(server_task)
    return 1 if failed else 0


class HttpServerExit(RuntimeError):
    """uvicorn asked to exit the process (it does so when it cannot start)."""


def _worker_sockets(config: TransceiverConfig, seat: Seat) -> list[socket.socket]:
    """A pod worker's listeners: the public port, shared with the other workers
    (SO_REUSEPORT), and its private loopback one, held by the supervisor across restarts."""
    host, port = config.http
    public = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    public.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    public.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    public.bind((host, port))
    public.listen(2048)
    return [public, socket.socket(fileno=seat.private_fd)]


async def _serve_http(server: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
    """``server.serve()``, with uvicorn's ``sys.exit`` turned into an error of this task: a
    ``SystemExit`` would escape the event loop and skip our shutdown."""
    try:
        await server.serve(sockets)
    except SystemExit as exc:
        raise HttpServerExit(f"uvicorn exited with code {exc.code}") from exc


async def _http_failed(task: asyncio.Task[None]) -> bool:
    """Wait for the HTTP server to end; True, logged with its traceback, if it raised."""
    try:
        await task
    except Exception:
        logger.exception("the HTTP server failed")
        return True
    return False


def _ready_line(link: Address, config: TransceiverConfig, seat: Seat | None) -> str:
    """What the process prints once serving; a pod worker adds its index, pid and private
    port (read by its supervisor, and by tests that speak to one worker)."""
    line = f"ready link={_text(link)} http={_text(config.http)}"
    if seat is None:
        return "transceiver " + line
    private = _text(seat.private_address(seat.index))
    return f"{WORKER_READY}{seat.index} {line} pid={os.getpid()} private={private}"


def _uvicorn_config(app: FastAPI, config: TransceiverConfig) -> uvicorn.Config:
    host, port = config.http
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # the peer is the client; X-Forwarded-For: http.rate_limiting
    )


async def _started(server: uvicorn.Server, task: asyncio.Task[None]) -> bool:
    """Wait for uvicorn to bind (or fail), with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT_S
    # uvicorn exposes only a flag for "bound and serving", so poll it with a deadline.
    while not server.started and not task.done() and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return server.started and not task.done()


async def _first(signal_wait: object, task: asyncio.Task[None]) -> None:
    assert asyncio.iscoroutine(signal_wait)
    waiter = asyncio.ensure_future(signal_wait)
    try:
        await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter


def _text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_alone(config: TransceiverConfig, auth: AuthConfig, redis: RedisConfig | None) -> int:
    """One transceiver process, until SIGTERM or SIGINT and its drain: its exit code."""
    return uvloop.run(serve(config, auth, redis))


def run_worker(
    config: TransceiverConfig, auth: AuthConfig, redis: RedisConfig | None, seat: Seat
) -> int:
    """Worker ``seat`` of a pod (``transceiver.workers``), on its own link port."""
    worker = replace(config, link=worker_link(config.link, seat.index))
    return uvloop.run(serve(worker, auth, redis, seat))
