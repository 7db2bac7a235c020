"""Open a Redis client from ``RedisConfig`` (plain URL or Sentinel), and map its failures.

I/O layer. Timeouts are short so a down server fails a write quickly instead of after
redis-py's 5 s defaults: a refused connection fails at once; a server that accepts but never
answers (paused, partitioned) costs the reply timeout twice, ~2.4 s with the defaults, because
the one retry also covers timeouts. The caller (a live voice session) never waits for it: its
writes are queued (``write_behind``). The retry, with a tiny backoff, lets a pooled connection
that died with a restarted or failed-over server reconnect transparently; with Sentinel, the
reconnect asks the sentinels for the new primary.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

from relay.wire.redis_config import RedisConfig
from transceiver.store.errors import StoreUnavailableError

RETRIES = 1
BACKOFF_BASE_S = 0.01
BACKOFF_CAP_S = 0.1

# Failures that say "Redis is not there right now", not "your request is wrong". BusyLoading,
# MasterNotFound and Sentinel's demoted-primary case are ConnectionError subclasses; a READONLY
# reply comes from a primary demoted by a failover we have not noticed yet.
UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.ReadOnlyError)


@dataclass
class RedisConnection:
    """A client plus, with Sentinel, the sentinel clients it asks for the primary."""

    client: Redis
    sentinels: tuple[Redis, ...] = ()

    async def aclose(self) -> None:
        await self.client.aclose()
        for sentinel in self.sentinels:
            await sentinel.aclose()


def open_redis(config: RedisConfig) -> RedisConnection:
    """A client for the configured primary; connects lazily, on first use."""
    options = _connection_options(config)
    if config.url is not None:
        return RedisConnection(Redis.from_url(config.url, **options))
    assert config.sentinel_service is not None  # RedisConfig validates this pairing
    sentinel_options = {
        "socket_connect_timeout": config.connect_timeout_s,
        "socket_timeout": config.socket_timeout_s,
    }
    manager = Sentinel(  # redis-py leaves __init__ untyped
        list(config.sentinels),
        sentinel_kwargs=sentinel_options,
        password=config.password,
        **options,
    )
    client = manager.master_for(config.sentinel_service)
    return RedisConnection(client, tuple(manager.sentinels))


def _connection_options(config: RedisConfig) -> dict[str, Any]:
    return {
        "socket_connect_timeout": config.connect_timeout_s,
        "socket_timeout": config.reply_timeout_s,
        "retry": Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES),
    }


@contextmanager
def unavailable_as_store_error(what: str) -> Iterator[None]:
    """Re-raise redis-py's connection-level failures as ``StoreUnavailableError``."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise StoreUnavailableError(f"{what}: Redis unavailable: {exc}") from exc
