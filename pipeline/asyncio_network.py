"""httpcore's network backend on asyncio itself, and an httpx transport that uses it.

I/O layer. The providers' requests go through the ``openai`` SDK, which sends them with httpx
over httpcore; httpcore's own backend under asyncio is anyio's, which enters a cancel scope
(``fail_after``) for every read and write and pauses and resumes the socket's reading around
each ``receive``. Without them a request costs 10-20 % less CPU (``loadtest.bench_provider_http``:
a streamed chat 0.80-0.90 of it, a transcription 0.82-0.90, speech 0.87-0.97, on uvloop under
shared load). ``AsyncioNetworkBackend`` implements httpcore's public
``AsyncNetworkBackend``/``AsyncNetworkStream`` interface on an ``asyncio.Protocol``: bytes
that arrive wait in a buffer until read; a read that must wait does so on one future, its
timeout one timer handle (none when the data is already there): ``WaitingProtocol``, which
``provider_http``'s connections share. Reading pauses only when the buffer is past
``HIGH_WATER_BYTES``. Connecting races the host's addresses (``first_of``); the TLS handshake
is the loop's own (``start_tls``). ``AsyncioHTTPTransport`` is httpx's
``AsyncHTTPTransport`` for the case the providers use (HTTP/1.1, no proxy): an httpcore
connection pool on this backend, its errors mapped to httpx's as httpx maps them.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, cast

import httpcore2
import httpx2

HIGH_WATER_BYTES = 256 * 1024  # reading pauses while this much waits unread
HAPPY_EYEBALLS_DELAY_S = 0.25  # RFC 8305's recommended connection attempt delay

SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class WaitingProtocol(asyncio.Protocol):
    """A connection its owner waits on: one future at a time, woken by the subclass's events
    (``_wake``) and by the transport's write flow (``pause_writing``, ``resume_writing``)."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future[bool] | None = None  # a read (or a write) waiting: True
        # when its time ran out
        self.writing_paused = False

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(False)

    async def wait(self, timeout_s: float | None, timed_out: type[Exception]) -> None:
        """Until the next wake or ``timeout_s`` (then ``timed_out``)."""
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        timer = None if timeout_s is None else loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()
        if waiter.result():
            raise timed_out(f"no progress in {timeout_s} s")


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


class _Connection(WaitingProtocol):
    """One connection's received bytes and its state, kept for ``AsyncioStream``: a read
    waits until data, the end or a write's resumption."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost: Exception | None = None  # why the connection was lost, when not cleanly
        self.paused = False  # reading paused: the buffer is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not a subclass of asyncio.Transport, but is one)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HIGH_WATER_BYTES and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = exc
        self._wake()


class AsyncioStream(httpcore2.AsyncNetworkStream):
    """A connection as httpcore reads and writes it."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def read(
        self,
        max_bytes: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's)
    ) -> bytes:
        connection = self._connection
        if not connection.buffer and not connection.eof:
            await connection.wait(timeout, httpcore2.ReadTimeout)
        if connection.buffer:
            return self._take(max_bytes)
        if connection.lost is not None:
            raise httpcore2.ReadError(str(connection.lost) or type(connection.lost).__name__)
        return b""  # the peer's end of the stream

    def _take(self, max_bytes: int) -> bytes:
        connection = self._connection
        data = bytes(connection.buffer[:max_bytes])
        del connection.buffer[:max_bytes]
        if connection.paused and len(connection.buffer) <= HIGH_WATER_BYTES // 4:
            connection.paused = False
            assert connection.transport is not None
            connection.transport.resume_reading()
        return data

    async def write(
        self,
        buffer: bytes,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's)
    ) -> None:
        if not buffer:
            return
        connection = self._connection
        transport = connection.transport
        if transport is None or transport.is_closing() or connection.lost is not None:
            raise httpcore2.WriteError("the connection is closed")
        transport.write(buffer)
        while connection.writing_paused and not connection.eof:
            await connection.wait(timeout, httpcore2.WriteTimeout)
        if connection.lost is not None:
            raise httpcore2.WriteError(str(connection.lost) or type(connection.lost).__name__)

    async def aclose(self) -> None:
        if self._connection.transport is not None:
            self._connection.transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
    ) -> httpcore2.AsyncNetworkStream:
        connection = self._connection
        assert connection.transport is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                tls = await loop.start_tls(
                    connection.transport, connection, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            connection.transport.close()
            raise httpcore2.ConnectTimeout(f"TLS handshake took over {timeout} s") from None
        except (OSError, ssl.SSLError) as error:
            connection.transport.close()
            raise httpcore2.ConnectError(str(error)) from error
        connection.transport = cast(asyncio.Transport, tls)
        return self

    def get_extra_info(self, info: str) -> Any:
        connection = self._connection
        transport = connection.transport
        if info == "is_readable":  # asked of an idle connection: the peer closed it, or spoke
            closing = transport is None or transport.is_closing()
            return bool(connection.buffer) or connection.eof or closing
        if transport is None:
            return None
        name = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
        if name in ("ssl_object", "sockname", "peername", "socket"):
            return transport.get_extra_info(name)
        return None


class AsyncioNetworkBackend(httpcore2.AsyncNetworkBackend):
    """httpcore's connections made with the running asyncio loop."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        local = None if local_address is None else (local_address, 0)
        return await _connected(first_of(host, port, local), timeout, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        connect = asyncio.get_running_loop().create_unix_connection(_Connection, path)
        return await _connected(connect, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


Connected = tuple[asyncio.BaseTransport, Any]  # the protocol: ``_Connection`` unless told


async def first_of(
    host: str,
    port: int,
    local: tuple[str, int] | None,
    protocol: Callable[[], asyncio.Protocol] = _Connection,
) -> Connected:
    """A connection (transport, ``protocol()``) to the first of ``host``'s addresses to
    answer, tried as RFC 8305 says (families alternating, each attempt
    ``HAPPY_EYEBALLS_DELAY_S`` after the last or at once when it failed): uvloop's
    ``create_connection`` tries them one by one and takes no ``happy_eyeballs_delay``, so a
    black-holed IPv6 route would cost the connect timeout."""
    loop = asyncio.get_running_loop()
    found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = iter(_interleaved([(family, address) for family, *_, address in found]))
    attempts: set[asyncio.Task[Connected]] = set()
    errors: list[str] = []
    try:
        while (address := next(addresses, None)) is not None or attempts:
            if address is not None:
                attempts.add(loop.create_task(_attempt(*address, local, protocol)))
            delay_s = HAPPY_EYEBALLS_DELAY_S if address is not None else None
            done, attempts = await asyncio.wait(
                attempts, timeout=delay_s, return_when="FIRST_COMPLETED"
            )
            made = [attempt.result() for attempt in done if attempt.exception() is None]
            errors += [str(attempt.exception()) for attempt in done if attempt.exception()]
            for extra in made[1:]:  # two answered at once: one is enough
                extra[0].close()
            if made:
                return made[0]
        raise OSError(f"no address of {host} port {port} answered: {'; '.join(errors)}")
    finally:
        await _abandon(attempts)


async def _attempt(
    family: int,
    address: tuple[Any, ...],
    local: tuple[str, int] | None,
    protocol: Callable[[], asyncio.Protocol],
) -> Connected:
    loop = asyncio.get_running_loop()
    return await loop.create_connection(
        protocol, address[0], address[1], family=family, local_addr=local
    )


async def _abandon(attempts: set[asyncio.Task[Connected]]) -> None:
    """Cancel the attempts still running; close what one made anyway."""
    for attempt in attempts:
        attempt.cancel()
    for made in await asyncio.gather(*attempts, return_exceptions=True):
        if isinstance(made, tuple):
            made[0].close()


def _interleaved(
    addresses: list[tuple[int, tuple[Any, ...]]],
) -> list[tuple[int, tuple[Any, ...]]]:
    """The resolver's order, families alternating from the first's (RFC 8305 section 4)."""
    first = [a for a in addresses if a[0] == addresses[0][0]] if addresses else []
    others = [a for a in addresses if a not in first]
    mixed = [a for pair in zip(first, others, strict=False) for a in pair]
    return mixed + first[len(others) :] + others[len(first) :]


async def _connected(
    connect: Any, timeout_s: float | None, socket_options: Iterable[SocketOption] | None
) -> AsyncioStream:
    try:
        async with asyncio.timeout(timeout_s):
            transport, connection = await connect
    except TimeoutError:
        raise httpcore2.ConnectTimeout(f"not connected in {timeout_s} s") from None
    except OSError as error:
        raise httpcore2.ConnectError(str(error)) from error
    sock: socket.socket = transport.get_extra_info("socket")
    for option in socket_options or ():
        sock.setsockopt(*option)
    return AsyncioStream(connection)


# httpcore's errors as httpx's, most specific first (httpx's own transport maps them alike).
ERRORS: tuple[tuple[type[Exception], type[httpx2.HTTPError]], ...] = (
    (httpcore2.ConnectTimeout, httpx2.ConnectTimeout),
    (httpcore2.ReadTimeout, httpx2.ReadTimeout),
    (httpcore2.WriteTimeout, httpx2.WriteTimeout),
    (httpcore2.PoolTimeout, httpx2.PoolTimeout),
    (httpcore2.TimeoutException, httpx2.TimeoutException),
    (httpcore2.ConnectError, httpx2.ConnectError),
    (httpcore2.ReadError, httpx2.ReadError),
    (httpcore2.WriteError, httpx2.WriteError),
    (httpcore2.NetworkError, httpx2.NetworkError),
    (httpcore2.UnsupportedProtocol, httpx2.UnsupportedProtocol),
    (httpcore2.LocalProtocolError, httpx2.LocalProtocolError),
    (httpcore2.RemoteProtocolError, httpx2.RemoteProtocolError),
    (httpcore2.ProtocolError, httpx2.ProtocolError),
)


def httpx_error(error: Exception) -> Exception | None:
    """httpx's error for one of httpcore's (None: another exception, raised as it is)."""
    for raised, mapped in ERRORS:
        if isinstance(error, raised):
            return mapped(str(error))
    return None


class _ResponseBody(httpx2.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._stream:
                yield piece
        except Exception as error:
            if (mapped := httpx_error(error)) is None:
                raise
            raise mapped from error

    async def aclose(self) -> None:
        await self._stream.aclose()


class AsyncioHTTPTransport(httpx2.AsyncBaseTransport):
    """httpx's transport over an httpcore pool on ``AsyncioNetworkBackend`` (HTTP/1.1, no
    proxy; TLS verified against the system's or ``ssl_context``'s certificates)."""

    def __init__(self, limits: httpx2.Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=ssl_context or httpx2.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioNetworkBackend(),
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        asked = httpcore2.Request(
            method=request.method,
            url=httpcore2.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            answer = await self._pool.handle_async_request(asked)
        except Exception as error:
            if (mapped := httpx_error(error)) is None:
                raise
            raise mapped from error
        return httpx2.Response(
            status_code=answer.status,
            headers=answer.headers,
            stream=_ResponseBody(answer.stream),
            extensions=answer.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
