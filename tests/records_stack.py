"""A relay and pipeline transceivers with Redis and the API key required: the stack the call
record tests (records, the history page) run their calls through."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from deploy.processes import Stack
from deploy.redis_server import RedisServer
from deploy.survival import redis_env
from relay.wire.redis_config import RedisConfig


@asynccontextmanager
async def recording_stack(
    log_dir: Path, redis: RedisServer, transceivers: int, env: Mapping[str, str]
) -> AsyncIterator[Stack]:
    """Start, wait ready and keyed; ``env`` adds to each transceiver's (the API key at least)."""
    stack = Stack(log_dir, transceivers=transceivers, workers=1, agent="pipeline")
    base = {**redis_env(RedisConfig(url=redis.url)), "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}
    base |= {"PIPELINE_PIPER_NOISE_SCALE": "0", "PIPELINE_PIPER_NOISE_W_SCALE": "0"}
    for process in stack.transceivers:
        process.env.update({**base, **env})
        process.argv[process.argv.index("--auth") + 1] = "required"
    try:
        for process in [*stack.transceivers, stack.relay]:
            process.start()
        for process in [*stack.transceivers, stack.relay]:
            await process.ready(timeout_s=90)
        await stack.keyed()
        yield stack
    finally:
        await stack.stop()
