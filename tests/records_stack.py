"""A relay and pipeline transceivers with Redis and the API key required: the stack the call
record tests (records, the history page) run their calls through; and a webhook receiver on
loopback that fails its first request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
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


@dataclass
class Receiver:
    """A webhook receiver on loopback: answers 500 to its first request, 200 after."""

    requests: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> Receiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hooks/voicerelay"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")[1:]
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)
            }
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
            status = 500 if not self.requests else 200
            self.requests.append((status, headers, body))
            reason = b"OK" if status == 200 else b"Internal Server Error"
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                         % (status, reason))  # fmt: skip
            await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
