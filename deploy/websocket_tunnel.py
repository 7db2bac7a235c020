"""A WebSocket carried through the front door: the handshake with one transceiver, then its
bytes copied both ways.

I/O layer (asyncio streams both sides; the frames are never parsed: the transceiver and the
client speak RFC 6455 to each other, and the front door only moves bytes):

- ``handshake`` connects to a transceiver and sends it the client's upgrade request; a refused
  or timed-out connect is ``BackendRefused`` (the caller tries the next one). It returns the
  transceiver's answer head, its stream still open.
- ``refusal`` reads the body of any answer but ``101`` (``Content-Length``, or until close;
  at most ``max_body_bytes``), so it can be relayed as a normal answer.
- ``pump`` copies bytes both ways until both directions have ended. Each chunk is written and
  drained before the next read, so a slow reader backs up into the fast writer's TCP window and
  nothing is queued here beyond the streams' own bounded buffers. An end of stream on one side
  is passed on as a half-close (``write_eof``); a reset ends both. A tunnel with no byte either
  way for ``idle_timeout_s`` is closed (the transceivers ping far more often than that).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from deploy.websocket_wire import ResponseHead, UpstreamError, parse_response_head

CHUNK_BYTES = 64 * 1024
HEAD_END = b"\r\n\r\n"


class BackendRefused(Exception):
    """The transceiver could not be reached (refused, or no connection in time)."""


class TunnelIdleError(Exception):
    """No byte went either way for the idle timeout."""


@dataclass
class TunnelCounts:
    """The front door's tunnels since it started, and the bytes they carried."""

    open: int = 0
    total: int = 0
    bytes_up: int = 0  # client -> transceiver
    bytes_down: int = 0  # transceiver -> client


@dataclass
class Upstream:
    backend: str
    head: ResponseHead
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def handshake(
    backend: str, request: bytes, connect_timeout_s: float, answer_timeout_s: float, limit: int
) -> Upstream:
    """Send ``request`` to ``backend``; its answer head (``TimeoutError`` when none comes)."""
    host, _, port = backend.rpartition(":")
    try:
        async with asyncio.timeout(connect_timeout_s):
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port), limit=limit)
    except (OSError, TimeoutError) as exc:
        raise BackendRefused(f"{backend}: {exc!r}") from None
    try:
        writer.write(request)
        async with asyncio.timeout(answer_timeout_s):
            await writer.drain()
            raw = await reader.readuntil(HEAD_END)
        return Upstream(backend, parse_response_head(raw), reader, writer)
    except asyncio.LimitOverrunError:
        writer.close()
        raise UpstreamError(f"{backend}: answer head over {limit} bytes") from None
    except asyncio.IncompleteReadError:
        writer.close()
        raise ConnectionResetError(f"{backend} closed before answering the handshake") from None
    except BaseException:
        writer.close()
        raise


async def refusal(upstream: Upstream, max_body_bytes: int, timeout_s: float) -> bytes:
    """The body of an answer that is not ``101``; the transceiver's stream is closed after."""
    try:
        length = upstream.head.body_bytes(max_body_bytes)
        async with asyncio.timeout(timeout_s):
            if length is not None:
                return await upstream.reader.readexactly(length)
            body = await upstream.reader.read(max_body_bytes + 1)
            while len(body) <= max_body_bytes and (more := await upstream.reader.read(CHUNK_BYTES)):
                body += more
        if len(body) > max_body_bytes:
            raise UpstreamError(f"{upstream.backend}: answer body over {max_body_bytes} bytes")
        return body
    finally:
        await upstream.aclose()


class _Activity:
    """When a byte last went either way, on the loop's clock."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.last_s = self.loop.time()

    def touch(self) -> None:
        self.last_s = self.loop.time()

    def idle_for_s(self) -> float:
        return self.loop.time() - self.last_s


async def pump(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    upstream: Upstream,
    idle_timeout_s: float,
    counts: tuple[TunnelCounts, ...],
) -> str:
    """Copy both ways until both directions end (or one fails: then both stop); how it ended."""
    activity = _Activity()
    ended = "closed"
    try:
        async with asyncio.TaskGroup() as group:
            up, down = (client[0], upstream.writer), (upstream.reader, client[1])
            group.create_task(_copy(*up, idle_timeout_s, activity, counts, True))
            group.create_task(_copy(*down, idle_timeout_s, activity, counts, False))
    except* TunnelIdleError as idle:
        ended = str(idle.exceptions[0])
    except* ConnectionError as reset:
        ended = f"reset ({reset.exceptions[0]!r})"
    return ended


async def _copy(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    idle_timeout_s: float,
    activity: _Activity,
    counts: tuple[TunnelCounts, ...],
    up: bool,
) -> None:
    while chunk := await _read_unless_idle(source, idle_timeout_s, activity):
        sink.write(chunk)
        await sink.drain()  # back-pressure: the next read waits for this write
        activity.touch()
        for count in counts:  # the tunnel's own and the front door's
            if up:
                count.bytes_up += len(chunk)
            else:
                count.bytes_down += len(chunk)
    if sink.can_write_eof() and not sink.is_closing():
        with contextlib.suppress(OSError, RuntimeError):
            sink.write_eof()  # RFC 9293 half-close: the other direction goes on


async def _read_unless_idle(
    source: asyncio.StreamReader, idle_timeout_s: float, activity: _Activity
) -> bytes:
    """The next chunk; a quiet direction waits as long as the other one is busy."""
    while True:
        wait_s = idle_timeout_s - activity.idle_for_s()
        if wait_s <= 0:
            raise TunnelIdleError(f"no byte either way for {idle_timeout_s} s")
        try:
            async with asyncio.timeout(wait_s):
                chunk = await source.read(CHUNK_BYTES)
        except TimeoutError:
            continue
        activity.touch()
        return chunk
