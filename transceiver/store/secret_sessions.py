"""The sessions of ``ek_`` client secrets too large to carry their own, kept in Redis.

I/O layer. A secret whose session does not fit in it (``transceiver.http.client_secrets``,
``too_large``) names the session by a random id instead; the session is kept here, under
``P:secret-session:ID``, for as long as the secret lives (its TTL is the secret's), so any
transceiver sharing the Redis opens a call with it. A missing key is a secret that has expired
or a session the store lost: ``load`` answers None. Redis unreachable: ``StoreUnavailableError``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

from redis.asyncio import Redis

from relay.wire.redis_config import RedisConfig
from transceiver.store.connection import open_redis, unavailable_as_store_error
from transceiver.store.keys import MAX_CONFIG_BYTES

REFERENCE_BYTES = 16  # 128 random bits: 22 base64url characters, not guessable


def secret_session_key(prefix: str, reference: str) -> str:
    return f"{prefix}:secret-session:{reference}"


class RedisSecretSessions:
    """Keeps a secret's session under a fresh random id (``put``) and reads it back (``load``)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    async def put(self, session: Mapping[str, Any], ttl_s: int) -> str:
        """A new reference to ``session``, kept ``ttl_s`` seconds."""
        reference = secrets.token_urlsafe(REFERENCE_BYTES)
        text = json.dumps(session, separators=(",", ":"), ensure_ascii=False)
        if len(text.encode()) > MAX_CONFIG_BYTES:
            raise ValueError(f"a secret's session over {MAX_CONFIG_BYTES} bytes is not kept")
        key = secret_session_key(self._prefix, reference)
        with unavailable_as_store_error("client secret sessions"):
            await self._redis.set(key, text, ex=ttl_s, nx=True)
        return reference

    async def load(self, reference: str) -> Mapping[str, Any] | None:
        """The session ``reference`` names; None when it is no longer kept."""
        key = secret_session_key(self._prefix, reference)
        with unavailable_as_store_error("client secret sessions"):
            text = await self._redis.get(key)
        if text is None:
            return None
        session = json.loads(text)
        if not isinstance(session, dict):
            raise ValueError(f"{key} holds no session object")
        return session


@contextlib.asynccontextmanager
async def open_secret_sessions(
    config: RedisConfig | None,
) -> AsyncIterator[RedisSecretSessions | None]:
    """The store on a connection of its own; None without Redis (large sessions are refused)."""
    if config is None:
        yield None
        return
    connection = open_redis(config)
    try:
        yield RedisSecretSessions(connection.client, config.key_prefix)
    finally:
        await connection.aclose()
