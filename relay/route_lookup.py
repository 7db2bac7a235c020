"""Ask the Redis route cache about unknown client addresses, off the hot path.

I/O layer (redis.asyncio on the worker's uvloop). A worker that receives DTLS or SRTP from an
address it has no route for (after a relay restart, or a load-balancer re-hash to a relay that
never saw the session) calls ``RouteLookups.want`` from its miss path: a few dict operations and
a ``put_nowait``, never a wait. One task per worker drains the queue in batches, asks Redis with
one MGET per batch and installs each hit through ``RouteTable.learn``, so the never-overwrite
rule holds and only configured transceivers are ever named. The datagram that triggered the
lookup is dropped (counted as ``unknown_address``); the client's next one is forwarded.

The keys and values are the transceivers' (``transceiver.store.route_cache``): that module is the
wire contract of the cache, as ``relay.wire.header`` is of the link.

Bounds: one lookup per source per ``timing.lookup_retry_s`` (dedupes in-flight lookups, caches
misses and rate-limits each source), at most ``MAX_RECENT_SOURCES`` remembered, a queue of at most
``QUEUE_MAX`` addresses (overflow counted), short Redis timeouts and no retries: a Redis that is
down costs failed lookups, never forwarding of known routes. The Redis is the transceivers'
(``relay.wire.redis_config``): a plain URL, or the primary the Sentinels name, asked again on
each reconnect. The transceiver's client (``transceiver.store.connection``) is not shared: the
relay may not import it, and this one differs (no retries, no ``WAIT``). A crash of the lookup
task (a bug, not Redis being away) is logged, counted and the task restarted (``relay.restarts``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import MutableSequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from relay import counters as c
from relay.restarts import run_restarting
from relay.routing import Address, ClientKey, Router, normalize_address
from relay.timing import RelayTiming
from relay.wire.redis_config import RedisConfig
from relay.wire.route_record import RouteValueError, decode_route, route_key

MAX_RECENT_SOURCES = 100_000
QUEUE_MAX = 1024
BATCH_MAX = 64


class LookupAdmission:
    """Pure: whether an unknown source may be looked up now (one per ``retry_after_s``)."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        self.asked: dict[ClientKey, float] = {}  # source -> when it was last looked up

    def admit(self, source: ClientKey, now: float) -> bool:
        asked = self.asked.get(source)
        if asked is not None and now - asked < self.retry_after_s:
            return False
        if len(self.asked) >= MAX_RECENT_SOURCES and not self.sweep(now):
            return False  # a flood of sources: refuse newcomers until the old ones age out
        self.asked[source] = now
        return True

    def sweep(self, now: float) -> int:
        """Forget sources asked about long enough ago; returns how many."""
        old = [s for s, at in self.asked.items() if now - at >= self.retry_after_s]
        for source in old:
            del self.asked[source]
        return len(old)


class RouteLookups:
    """One worker's route-cache client: ``start()``, ``want()`` from the miss path, ``aclose()``."""

    def __init__(
        self,
        redis: RedisConfig,
        router: Router,
        counts: MutableSequence[int],
        timing: RelayTiming,
    ) -> None:
        self.redis_config = redis
        self.prefix = redis.key_prefix
        self.router = router
        self.counts = counts
        self.timing = timing
        self.admission = LookupAdmission(timing.lookup_retry_s)
        self._queue: asyncio.Queue[tuple[ClientKey, int]] = asyncio.Queue(QUEUE_MAX)
        self._redis: Redis | None = None
        self._sentinels: tuple[Redis, ...] = ()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._redis, self._sentinels = _open_redis(self.redis_config)
        self._task = asyncio.create_task(
            run_restarting("route cache lookups", self._run, self._crashed, self.timing.restarts),
            name="route cache lookups",
        )

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for client in (*([self._redis] if self._redis is not None else []), *self._sentinels):
            await client.aclose()

    def want(self, source: ClientKey, socket_index: int, now: float) -> None:
        """Queue a lookup of ``source`` unless it was asked about lately; never waits."""
        if not self.admission.admit(source, now):
            return
        try:
            self._queue.put_nowait((source, socket_index))
        except asyncio.QueueFull:
            self.counts[c.ROUTE_CACHE_QUEUE_FULL] += 1

    def _crashed(self) -> None:
        self.counts[c.ROUTE_LOOKUP_CRASHES] += 1

    async def _run(self) -> None:
        assert self._redis is not None
        with contextlib.suppress(RedisError, OSError):
            await self._redis.ping()  # connect now, not on the first unknown client
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._lookup(batch)

    async def _lookup(self, batch: list[tuple[ClientKey, int]]) -> None:
        assert self._redis is not None
        self.counts[c.ROUTE_CACHE_LOOKUPS] += len(batch)
        keys = [route_key(self.prefix, (source[0], source[1])) for source, _ in batch]
        try:
            values = await self._redis.mget(keys)
        except (RedisError, OSError):
            self.counts[c.ROUTE_CACHE_ERRORS] += len(batch)
            return
        now = asyncio.get_running_loop().time()
        for (source, socket_index), raw in zip(batch, values, strict=True):
            self._answer(source, socket_index, raw, now)

    def _answer(self, source: ClientKey, socket_index: int, raw: object, now: float) -> None:
        link = _usable_link(raw, self.router)
        if link is None:
            self.counts[c.ROUTE_CACHE_MISSES] += 1
            return
        self.counts[c.ROUTE_CACHE_HITS] += 1
        if self.router.routes.learn(source, link, socket_index, now):
            self.counts[c.ROUTES_FROM_CACHE] += 1


def _open_redis(config: RedisConfig) -> tuple[Redis, tuple[Redis, ...]]:
    """A client that fails fast and never retries; with Sentinel, the sentinel clients too."""
    options: dict[str, Any] = {
        "socket_connect_timeout": config.connect_timeout_s,
        "socket_timeout": config.socket_timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }
    if config.url is not None:
        return Redis.from_url(config.url, **options), ()
    assert config.sentinel_service is not None  # RedisConfig validates this pairing
    sentinel_options = {k: options[k] for k in ("socket_connect_timeout", "socket_timeout")}
    manager = Sentinel(
        list(config.sentinels),
        sentinel_kwargs=sentinel_options,
        password=config.password,
        **options,
    )
    return manager.master_for(config.sentinel_service), tuple(manager.sentinels)


def _usable_link(raw: object, router: Router) -> Address | None:
    """The cached link if it names a configured transceiver (never an open proxy), else None."""
    if not isinstance(raw, bytes):
        return None
    try:
        link = normalize_address(decode_route(raw))
    except RouteValueError:
        return None
    return link if link in router.transceivers else None
