"""Keep the Redis route cache in step with the link's live sessions.

I/O layer. The link calls ``learned`` when a session first sends to a client address and
``withdrawn`` when the session ends; both only record the address and wake one owned task, so
the link's datagram path never waits on Redis. The task publishes what was learned at once,
withdraws what ended, and republishes every live route each ``refresh_s`` (under the TTL), so a
route lost to a Redis restart or a failed write comes back within one refresh. Redis being
down costs log lines, never a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from relay.wire.redis_config import RedisConfig
from transceiver.background import BackgroundLoop
from transceiver.store.connection import RedisConnection, open_redis
from transceiver.store.errors import StoreUnavailableError
from transceiver.store.route_cache import RouteCache
from transceiver.store.survival import SurvivalPolicy

Address = tuple[str, int]
log = logging.getLogger(__name__)


class RoutePublishing(BackgroundLoop):
    """Publishes ``client -> link`` for every live client of one link; owns its Redis client."""

    task_name = "route publishing"
    # Crash-looping: counted only. Unpublished routes cost a relay that never saw a session one
    # STUN check to relearn it; refusing calls over it would cost more than it saves.
    unready_when_failing = False

    def __init__(
        self,
        connection: RedisConnection,
        cache: RouteCache,
        link: Address,
        current: Callable[[], Mapping[Address, Address]],
        refresh_s: float,
        policy: SurvivalPolicy | None = None,
    ) -> None:
        """``policy``: the pending-change bound, exit flush and restarts (``None``: defaults)."""
        self._policy = policy or SurvivalPolicy()
        super().__init__(self._policy.restarts)
        self._connection = connection
        self._cache = cache
        self._link = link
        self._current = current
        self._refresh_s = refresh_s
        self._learned: set[Address] = set()
        self._withdrawn: set[Address] = set()
        self._event = asyncio.Event()

    @classmethod
    def from_config(
        cls,
        config: RedisConfig,
        link: Address,
        current: Callable[[], Mapping[Address, Address]],
        policy: SurvivalPolicy | None = None,
    ) -> RoutePublishing:
        connection = open_redis(config)
        cache = RouteCache(connection.client, config.key_prefix, config.route_ttl_s)
        return cls(connection, cache, link, current, config.route_ttl_s / 3, policy)

    def learned(self, client: Address) -> None:
        if len(self._learned) < self._policy.max_pending_routes:
            self._learned.add(client)
            self._withdrawn.discard(client)
            self._event.set()

    def withdrawn(self, client: Address) -> None:
        self._learned.discard(client)
        if len(self._withdrawn) < self._policy.max_pending_routes:
            self._withdrawn.add(client)
            self._event.set()

    def _wake(self) -> None:
        self._event.set()

    async def aclose(self) -> None:
        await super().aclose()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._policy.route_flush_timeout_s):
                await self._flush_withdrawn()  # best effort: the TTL removes what is left
        await self._connection.aclose()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        refresh_at = loop.time()
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), max(0.0, refresh_at - loop.time()))
            self._event.clear()
            if loop.time() >= refresh_at:
                refresh_at = loop.time() + self._refresh_s
                self._learned.clear()
                await self._publish(dict(self._current()))
            await self._publish(dict.fromkeys(self._take(self._learned), self._link))
            await self._flush_withdrawn()

    async def _publish(self, routes: Mapping[Address, Address]) -> None:
        try:
            await self._cache.publish_many(routes)
        except StoreUnavailableError as exc:
            log.info("route cache: %d routes not published: %s", len(routes), exc)

    async def _flush_withdrawn(self) -> None:
        for client in self._take(self._withdrawn):
            try:
                await self._cache.withdraw(client, self._link)
            except StoreUnavailableError as exc:
                log.info("route cache: withdraw skipped (the TTL will expire it): %s", exc)
                return

    @staticmethod
    def _take(pending: set[Address]) -> list[Address]:
        taken = list(pending)
        pending.clear()
        return taken
