"""The shared rate-limit buckets in Redis: ``rate_limits``' arithmetic run by one Lua script.

I/O layer. When Redis is unreachable it raises ``StoreUnavailableError``; the caller
(``transceiver.http.rate_limiting``) fails open.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from relay.wire.redis_config import RedisConfig
from transceiver.store.connection import open_redis, unavailable_as_store_error
from transceiver.store.errors import StoreError
from transceiver.store.rate_limits import BucketState, RateLimit, bucket_key
from transceiver.store.scripts import TAKE_BUCKETS


class RedisRateLimits:
    """Takes from and spends into the shared buckets (``TAKE_BUCKETS``)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    async def take(self, asks: Sequence[tuple[RateLimit, str]], cost: int = 1) -> list[BucketState]:
        """``cost`` from each ``(limit, subject)`` bucket, from all of them or from none."""
        return await self._run("take", [(limit, subject, cost) for limit, subject in asks])

    async def spend(self, uses: Sequence[tuple[RateLimit, str, int]]) -> list[BucketState]:
        """Record each ``(limit, subject, used)`` (a response's tokens), even below zero; a use
        of 0 reads a bucket. The buckets after."""
        return await self._run("spend", uses)

    async def _run(
        self, mode: str, asks: Sequence[tuple[RateLimit, str, int]]
    ) -> list[BucketState]:
        if not asks:
            return []
        keys = [bucket_key(self._prefix, limit.name, subject) for limit, subject, _ in asks]
        args: list[Any] = [mode]
        for limit, _, cost in asks:
            args += [limit.limit, limit.window_ms, cost]
        with unavailable_as_store_error("rate limits"):
            try:
                replies = await self._redis.eval(TAKE_BUCKETS.text, len(keys), *keys, *args)
            except redis_errors.ResponseError as error:
                raise StoreError(f"{TAKE_BUCKETS.name}: {error}") from None
        return [_state(limit, reply) for (limit, _, _), reply in zip(asks, replies, strict=True)]


def _state(limit: RateLimit, reply: Sequence[Any]) -> BucketState:
    allowed, remaining, reset_ms, retry_ms = (int(value) for value in reply)
    return BucketState(limit, bool(allowed), remaining, reset_ms, retry_ms)


@contextlib.asynccontextmanager
async def open_rate_limits(config: RedisConfig | None) -> AsyncIterator[RedisRateLimits | None]:
    """The shared buckets on a connection of their own; None without Redis (no limits)."""
    if config is None:
        yield None
        return
    connection = open_redis(config)
    try:
        yield RedisRateLimits(connection.client, config.key_prefix)
    finally:
        await connection.aclose()
