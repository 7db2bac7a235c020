"""A test peer's server on loopback: the connections it accepted are held, so that leaving
``serving`` closes each and waits for its handler (one holding its connection open included)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol


class HeldConnections:
    """A peer's accepted connections and their handlers. ``stopping`` is set when the peer
    stops: a handler that holds its connection without answering waits on it."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def hold(self, writer: asyncio.StreamWriter) -> None:
        """Keep the running handler and its connection, for ``stop`` to end."""
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(writer)

    async def stop(self) -> None:
        """Close every connection and wait for its handler to end."""
        self.stopping.set()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._handlers)


class LoopbackPeer(Protocol):
    """A server's connection handler that holds each connection it is given."""

    held: HeldConnections

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None: ...


@asynccontextmanager
async def serving(peer: LoopbackPeer, context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """``peer`` listening on loopback (TLS with ``context``); yields its base URL."""
    server = await asyncio.start_server(peer.serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if context else 'http'}://127.0.0.1:{port}"
    finally:
        server.close()
        await peer.held.stop()
        await server.wait_closed()


class DeafPeer:
    """A peer that accepts each connection and neither reads nor answers until it stops: a
    request's bytes fill the sockets' buffers and the writer's transport pauses writing."""

    def __init__(self) -> None:
        self.held = HeldConnections()
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.held.hold(writer)
        try:
            await self.held.stopping.wait()
        finally:
            writer.close()
