"""The survival stack: redis-server, then a relay in front of pipeline transceivers that store
their sessions in it, and a store to read back what they stored (resume, take-over, hang-up,
drain and failover tests and benchmarks share it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from deploy.processes import Stack
from deploy.redis_server import RedisServer
from deploy.waiting import poll
from relay.wire.redis_config import RedisConfig
from transceiver.store.keys import SessionState
from transceiver.store.sessions import RedisSessionStore


@dataclass
class Survival:
    redis: RedisServer
    stack: Stack
    store: RedisSessionStore


@asynccontextmanager
async def survival_stack(
    log_dir: Path,
    transceivers: int = 2,
    redis_args: tuple[str, ...] = (),
    capacity: int | None = None,
) -> AsyncIterator[Survival]:
    """redis-server, then a relay in front of pipeline transceivers that store sessions in it
    (each taking at most ``capacity`` sessions, when given)."""
    redis = RedisServer(log_dir, "redis", redis_args).start()
    config = RedisConfig(url=redis.url)
    try:
        async with pipeline_stack(log_dir, config, transceivers, capacity) as running:
            yield Survival(redis, *running)
    finally:
        redis.stop()


@asynccontextmanager
async def pipeline_stack(
    log_dir: Path, config: RedisConfig, transceivers: int = 2, capacity: int | None = None
) -> AsyncIterator[tuple[Stack, RedisSessionStore]]:
    """A relay in front of pipeline transceivers storing sessions per ``config``; a store to
    read what they stored."""
    stack = Stack(log_dir, transceivers=transceivers, workers=1, agent="pipeline")
    env = {**redis_env(config), "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}
    env |= {"PIPELINE_PIPER_NOISE_SCALE": "0", "PIPELINE_PIPER_NOISE_W_SCALE": "0"}
    for process in stack.transceivers:
        process.env.update(env)
        process.argv += [] if capacity is None else ["--capacity", str(capacity)]
    store = RedisSessionStore.from_config(config)
    try:
        for process in [*stack.transceivers, stack.relay]:
            process.start()
        for process in [*stack.transceivers, stack.relay]:
            await process.ready(timeout_s=90)
        yield stack, store
    finally:
        await stack.stop()
        await store.aclose()


def redis_env(config: RedisConfig) -> dict[str, str]:
    """The ``REDIS_*`` variables from which a transceiver loads exactly ``config``."""
    env = {
        "REDIS_URL": config.url or "",
        "REDIS_SENTINELS": ",".join(f"{host}:{port}" for host, port in config.sentinels),
        "REDIS_SENTINEL_SERVICE": config.sentinel_service or "",
        "REDIS_PASSWORD": config.password or "",
        "REDIS_KEY_PREFIX": config.key_prefix,
        "REDIS_SESSION_TTL_S": str(config.session_ttl_s),
        "REDIS_MAX_ITEMS": str(config.max_items),
        "REDIS_WAIT_REPLICAS": str(config.wait_replicas),
        "REDIS_WAIT_TIMEOUT_MS": str(config.wait_timeout_ms),
        "REDIS_CONNECT_TIMEOUT_S": str(config.connect_timeout_s),
        "REDIS_SOCKET_TIMEOUT_S": str(config.socket_timeout_s),
        "REDIS_ROUTE_TTL_S": str(config.route_ttl_s),
    }
    assert RedisConfig.from_env(env) == config, env
    return env


async def stored(survival: Survival, session_id: str) -> SessionState:
    return await survival.store.load(session_id)


async def stored_until(
    survival: Survival,
    session_id: str,
    predicate: Callable[[SessionState], bool],
    timeout_s: float = 10.0,
) -> SessionState:
    """The stored session once ``predicate`` holds (polled with a deadline)."""
    return await poll(
        lambda: stored(survival, session_id),
        predicate,
        timeout_s,
        lambda state: f"never matched: turn {state.turn}, {contents(state)}",
        0.05,
    )


def contents(state: SessionState) -> list[tuple[str, str]]:
    return [(item["role"], item["content"]) for item in state.items]
