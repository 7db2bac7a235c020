"""Owned background loops that crash are seen: logged with the traceback, counted, restarted;
the ones readiness depends on turn it red when they keep crashing.

Each loop runs against a real redis-server; its dependency (the session store, the route cache,
the relay's route table) is a subclass whose method raises a programming error a set number of
times, as a bug of ours would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from deploy.redis_server import RedisServer, redis_server_binary
from deploy.waiting import eventually
from relay import counters as c
from relay.route_lookup import RouteLookups
from relay.routing import Router, RouteTable, StunRateLimit
from relay.timing import RelayTiming
from relay.wire.redis_config import RedisConfig
from relay.wire.route_record import encode_route, route_key
from relay.wire.ufrag import Keyring
from transceiver.background import BackgroundLoop
from transceiver.metrics import RedisHealthCollector, TaskCrashCollector
from transceiver.store.catch_up import CatchUp
from transceiver.store.connection import open_redis
from transceiver.store.errors import StoreUnavailableError
from transceiver.store.health import RedisHealth
from transceiver.store.heartbeat import LeaseHeartbeat
from transceiver.store.keys import Lease, new_credential
from transceiver.store.persistence import SessionPersistence
from transceiver.store.route_cache import RouteCache
from transceiver.store.route_publishing import RoutePublishing
from transceiver.store.sessions import RedisSessionStore
from transceiver.store.survival import SurvivalPolicy
from transceiver.store.write_behind import AppendItem, PendingWrite, WriteBehindQueue

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server")
Address = tuple[str, int]
TIMEOUT_S = 15.0  # the first restart pauses 0.5 s, the third crash comes after 1.5 s more


class Bug(TypeError):
    """What a programming error in our code looks like to the loop."""


class Faults:
    """Per method: how many calls raise first, and how many calls were made."""

    def __init__(self, **faults: int) -> None:
        self.left = dict(faults)
        self.calls: dict[str, int] = {}

    def hit(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.left.get(method, 0) != 0:
            self.left[method] -= 1
            raise Bug(f"{method} called with the wrong arguments")


class FaultyStore(RedisSessionStore):
    faults = Faults()
    creates_while_away = 0  # creates that first meet Redis unavailable (no bug)

    async def renew_all(self, leases: Sequence[Lease], *, lease_s: float) -> Any:
        self.faults.hit("renew")
        return await super().renew_all(leases, lease_s=lease_s)

    async def write_all(self, lease: Lease, writes: Sequence[PendingWrite]) -> Any:
        self.faults.hit("write_all")
        return await super().write_all(lease, writes)

    async def ping(self) -> bool:
        self.faults.hit("ping")
        return await super().ping()

    async def create(self, session_id: str, owner_id: str, **options: Any) -> Lease:
        if self.creates_while_away:
            self.creates_while_away -= 1
            raise StoreUnavailableError("Redis is away (the call begins unstored)")
        self.faults.hit("create")
        return await super().create(session_id, owner_id, **options)


class FaultyRouteCache(RouteCache):
    faults = Faults()

    async def publish_many(self, routes: Mapping[Address, Address]) -> None:
        self.faults.hit("publish_many")
        await super().publish_many(routes)


def crashes(registry: CollectorRegistry, task: str) -> float:
    return registry.get_sample_value("transceiver_task_crashes_total", {"task": task}) or 0.0


def crash_logged(caplog: pytest.LogCaptureFixture, task: str) -> logging.LogRecord:
    for record in caplog.records:
        if record.name == "transceiver.background" and record.getMessage().startswith(task):
            assert record.levelno == logging.ERROR
            assert record.exc_info is not None and isinstance(record.exc_info[1], Bug)
            assert "Traceback" in caplog.text and "Bug: " in caplog.text
            return record
    raise AssertionError(f"no crash of {task} logged:\n{caplog.text}")


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(TaskCrashCollector())
    return registry


@pytest.fixture
def redis_config(tmp_path: Path) -> AsyncIterator[RedisConfig]:
    server = RedisServer(tmp_path, "redis").start()
    try:
        yield RedisConfig(
            url=server.url, key_prefix=f"o{uuid.uuid4().hex[:10]}",
            connect_timeout_s=0.2, socket_timeout_s=0.5,
        )  # fmt: skip
    finally:
        server.stop()


@pytest.fixture
async def store(redis_config: RedisConfig) -> AsyncIterator[FaultyStore]:
    async with FaultyStore.from_config(redis_config) as store:
        store.faults = Faults()
        yield store  # type: ignore[misc]


async def stored_lease(store: RedisSessionStore) -> Lease:
    return await store.create(
        f"s{uuid.uuid4().hex[:8]}", "owner", config={}, credential=new_credential(), lease_s=6.0
    )


async def assert_crash_seen_and_restarted(
    loop: BackgroundLoop,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    ran_again: Callable[[], Awaitable[bool] | bool],
) -> None:
    before = crashes(registry, loop.task_name)
    async with loop:
        await eventually(
            lambda: crashes(registry, loop.task_name) == before + 1, TIMEOUT_S, "the crash count"
        )
        crash_logged(caplog, loop.task_name)
        await eventually(ran_again, TIMEOUT_S, f"{loop.task_name} to run again after its crash")
        assert not loop.failing


# --- every loop: logged, counted, restarted -------------------------------------------------


async def test_the_lease_heartbeat_is_restarted(
    store: FaultyStore, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    lease = await stored_lease(store)
    store.faults = Faults(renew=1)
    heartbeat = LeaseHeartbeat(store, lease_s=6.0, interval_s=0.05)
    heartbeat.hold(lease)
    await assert_crash_seen_and_restarted(
        heartbeat, registry, caplog, lambda: store.faults.calls["renew"] >= 3
    )
    assert heartbeat.held == (lease,)  # the restarted run renews the same leases


async def test_the_write_behind_flusher_is_restarted_and_writes_what_waited(
    store: FaultyStore, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    lease = await stored_lease(store)
    store.faults = Faults(write_all=1)
    queue = WriteBehindQueue(store)
    queue.submit(lease, AppendItem({"id": "h1", "role": "user", "content": "hello"}))

    async def written() -> bool:
        state = await store.load(lease.session_id)
        return [item["id"] for item in state.items] == ["h1"] and queue.pending == 0

    await assert_crash_seen_and_restarted(queue, registry, caplog, written)


async def test_the_redis_health_check_is_restarted(
    store: FaultyStore, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    store.faults = Faults(ping=1)
    health = RedisHealth(store, interval_s=0.05)
    await assert_crash_seen_and_restarted(
        health, registry, caplog, lambda: store.faults.calls["ping"] >= 3
    )
    assert health.down_for_s() == 0.0


async def test_catch_up_is_restarted_and_stores_the_session_begun_during_an_outage(
    store: FaultyStore, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    persistence = SessionPersistence(store, SurvivalPolicy())
    store.creates_while_away, store.faults = 1, Faults(create=1)
    journal = await persistence.create(f"s{uuid.uuid4().hex[:8]}", {"voice": "joe"})
    assert journal.session_id in persistence.unstored
    catch_up = CatchUp(persistence, interval_s=0.05)
    await assert_crash_seen_and_restarted(
        catch_up, registry, caplog, lambda: journal.session_id not in persistence.unstored
    )
    assert (await store.load(journal.session_id)).config == {"voice": "joe"}


async def test_route_publishing_is_restarted(
    redis_config: RedisConfig, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    connection = open_redis(redis_config)
    cache = FaultyRouteCache(connection.client, redis_config.key_prefix, 30.0)
    cache.faults = Faults(publish_many=1)
    link, client = ("127.0.0.1", 7000), ("192.0.2.1", 5000)
    publishing = RoutePublishing(connection, cache, link, lambda: {client: link}, 0.05)

    async def published() -> bool:
        raw = await connection.client.get(route_key(redis_config.key_prefix, client))
        return cache.faults.calls["publish_many"] >= 2 and raw == encode_route(link)

    await assert_crash_seen_and_restarted(publishing, registry, caplog, published)


# --- crash-looping: red readiness, or counted only ------------------------------------------


async def test_a_heartbeat_that_keeps_crashing_turns_readiness_red(
    store: FaultyStore, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    persistence = SessionPersistence(store, SurvivalPolicy())
    persistence.heartbeat = LeaseHeartbeat(store, lease_s=6.0, interval_s=0.05)
    persistence.heartbeat.hold(await stored_lease(store))
    store.faults = Faults(renew=-1)  # always
    await persistence.start()
    try:
        assert persistence.not_ready_reason() is None
        await eventually(
            lambda: persistence.not_ready_reason() == "task_failing", TIMEOUT_S, "red readiness"
        )
        assert crashes(registry, "lease heartbeat") >= 3
        crash_logged(caplog, "lease heartbeat")
    finally:
        await persistence.aclose(flush_timeout_s=0.5)


async def test_a_health_check_that_keeps_crashing_is_counted_but_stays_ready(
    store: FaultyStore, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    persistence = SessionPersistence(store, SurvivalPolicy())
    persistence.health = RedisHealth(store, interval_s=0.05)
    store.faults = Faults(ping=-1)
    await persistence.start()
    try:
        await eventually(
            lambda: persistence.health.failing, TIMEOUT_S, "the health check to crash-loop"
        )
        assert crashes(registry, "redis health") >= 3
        assert persistence.not_ready_reason() is None  # its answer never costs readiness
    finally:
        await persistence.aclose(flush_timeout_s=0.5)


async def test_redis_away_is_reported_not_a_readiness_failure(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    server = RedisServer(tmp_path, "away").start()
    config = RedisConfig(url=server.url, key_prefix="away", connect_timeout_s=0.2)
    async with RedisSessionStore.from_config(config) as store:
        persistence = SessionPersistence(store, SurvivalPolicy())
        persistence.health = RedisHealth(store, interval_s=0.05)
        registry.register(RedisHealthCollector(persistence.health.down_for_s))
        await persistence.start()
        try:
            server.stop()
            await eventually(
                lambda: persistence.status() == "degraded", TIMEOUT_S, "Redis seen as away"
            )
            await eventually(
                lambda: (
                    (registry.get_sample_value("transceiver_redis_unreachable_seconds") or 0) > 0.5
                ),
                TIMEOUT_S,
                "the unreachable gauge to grow",
            )
            assert persistence.not_ready_reason() is None
        finally:
            await persistence.aclose(flush_timeout_s=0.5)


# --- the relay's route-cache lookups --------------------------------------------------------


class FaultyRouteTable(RouteTable):
    faults = Faults()

    def learn(self, client: Any, link: Any, socket_index: int, now: float) -> bool:
        self.faults.hit("learn")
        return super().learn(client, link, socket_index, now)


async def test_the_relays_route_lookups_are_restarted(
    redis_config: RedisConfig, caplog: pytest.LogCaptureFixture
) -> None:
    link = ("127.0.0.1", 7000)
    connection = open_redis(redis_config)
    await RouteCache(connection.client, redis_config.key_prefix, 30.0).publish_many(
        {("192.0.2.1", 5000): link, ("192.0.2.2", 5000): link}
    )
    await connection.aclose()
    routes = FaultyRouteTable(30.0)
    routes.faults = Faults(learn=1)
    keyring = Keyring.parse("1:" + "ab" * 32)
    router = Router(keyring, [link], [4], routes, StunRateLimit(20, 40))
    counts = [0] * c.ROW
    lookups = RouteLookups(redis_config, router, counts, RelayTiming())
    lookups.start()
    try:
        now = asyncio.get_running_loop().time()
        lookups.want(("192.0.2.1", 5000), 0, now)
        await eventually(lambda: counts[c.ROUTE_LOOKUP_CRASHES] == 1, TIMEOUT_S, "the crash count")
        lookups.want(("192.0.2.2", 5000), 0, now)
        await eventually(
            lambda: counts[c.ROUTES_FROM_CACHE] == 1, TIMEOUT_S, "a lookup after the restart"
        )
    finally:
        await lookups.aclose()
    record = next(r for r in caplog.records if r.name == "relay.restarts")
    assert record.exc_info is not None and isinstance(record.exc_info[1], Bug)


# --- the transceiver's HTTP server ----------------------------------------------------------


def test_a_transceiver_whose_http_server_fails_exits_1_with_the_traceback() -> None:
    """The HTTP port is taken: uvicorn gives up (it calls sys.exit); the transceiver logs the
    failure with its traceback, shuts down as usual and exits 1 (not 0, not uvicorn's code)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "TRANSCEIVER_KEYS": "1:" + "5a" * 32, "TRANSCEIVER_AUTH": "off"}
        env = {k: v for k, v in env.items() if not k.startswith("REDIS_")}
        done = subprocess.run(
            [sys.executable, "-m", "transceiver", "--agent", "echo", "--link", "127.0.0.1:0",
             "--http", f"127.0.0.1:{port}"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "the HTTP server failed" in done.stderr, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert "address already in use" in done.stderr
