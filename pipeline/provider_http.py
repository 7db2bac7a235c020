"""A lean HTTP/1.1 client for the providers' requests: keep-alive connections per origin on
asyncio, each response read by ``http1.ResponseReader`` as its bytes arrive.

I/O layer. A provider request through the ``openai`` SDK passes its request building (options,
headers, auth and retry wrappers), httpx's send, redirect and auth layers and models, and
httpcore's connection with h11's state machine at every read: more CPU than the provider's own
parsing (``loadtest.bench_provider_http``). Here a request is its bytes, head and body, written
at once; the response is parsed in the connection's ``data_received``, its body's pieces wait
in a list until read, and a read that must wait does so on one future with one timer.

A connection goes back to its origin's pool only when its response was read to its framed end
and the server did not say close; an idle one the server has closed (its end seen), that
received bytes nobody asked for, or idle over ``idle_expiry_s`` is closed, not used, so a
request never goes out on a connection known dead. Connecting races the host's addresses
(``asyncio_network``); TLS is the loop's own (``start_tls``: SNI, the host name checked against
the certificate, httpx's CA set unless told another context). Errors are httpx's
(``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``, ``WriteTimeout``, ``ReadError``,
``RemoteProtocolError``, ``DecodingError``), so callers map them as they map the SDK's.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

import httpx2

from pipeline.asyncio_network import WaitingProtocol, first_of
from pipeline.http1 import HTTPFramingError, ResponseHead, ResponseReader

HIGH_WATER_BYTES = 256 * 1024  # reading pauses while this much of a body waits unread
MAX_IDLE_PER_ORIGIN = 100  # idle connections kept (httpx's max_keepalive_connections)
IDLE_EXPIRY_S = 5.0  # an idle connection older than this is closed (httpx's keepalive_expiry)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a connection goes: ``scheme`` is ``http`` or ``https``."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: httpx2.URL) -> Origin:
        if url.scheme not in ("http", "https"):
            raise ValueError(f"{url} is not an http or https URL")
        return cls(url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))


@dataclass(frozen=True, slots=True)
class Timeouts:
    """httpx's: to connect (with TLS), for each wait of a read, for a write to drain."""

    connect_s: float | None = 5.0
    read_s: float | None = 600.0
    write_s: float | None = 600.0


class _Wire(WaitingProtocol):
    """One connection: the reader of its response, the body bytes read and not yet taken; a
    request waits on it until bytes, the end or a write's drain."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: asyncio.Transport | None = None
        self.reader: ResponseReader | None = None  # None: idle
        self.pieces: list[bytes] = []
        self.buffered = 0
        self.failure: Exception | None = None  # why the response cannot be read, as httpx's
        self.ended = False  # the peer's end seen, or the connection lost
        self.spoiled = False  # bytes arrived that no request asked for: never reused
        self.paused = False
        self.idle_since = 0.0
        self.origin: Origin | None = None  # set once connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one, not a subclass

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            self.spoiled = True
            return
        try:
            pieces = reader.feed(data)
        except HTTPFramingError as error:
            self.failure, self.spoiled = httpx2.RemoteProtocolError(str(error)), True
        else:
            if pieces:
                self._keep(pieces)
        self._wake()

    def _keep(self, pieces: list[bytes]) -> None:
        self.pieces += pieces
        self.buffered += sum(len(piece) for piece in pieces)
        if self.buffered > HIGH_WATER_BYTES and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def take(self) -> list[bytes]:
        """The body pieces read so far (reading resumes if it was paused)."""
        pieces, self.pieces, self.buffered = self.pieces, [], 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return pieces

    def eof_received(self) -> bool:
        self._end(None)
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    def _end(self, exc: Exception | None) -> None:
        if self.ended:
            self._wake()
            return
        self.ended = True
        if self.reader is not None and self.failure is None:
            try:
                self.reader.end_of_input()
            except HTTPFramingError as error:
                said = f"{error} ({exc})" if exc is not None else str(error)
                kind = httpx2.ReadError if exc is not None else httpx2.RemoteProtocolError
                self.failure = kind(said)
        self._wake()

    def usable(self, now: float, expiry_s: float) -> bool:
        """Whether an idle connection may carry a request."""
        transport = self.transport
        fresh = now - self.idle_since <= expiry_s
        alive = transport is not None and not transport.is_closing()
        return fresh and alive and not (self.ended or self.spoiled)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ProviderResponse:
    """A response whose head has come: ``status_code``, ``headers`` (lower-case names,
    repeated fields joined), its body read with ``aiter_bytes`` or ``aread``. Read to its end,
    its connection goes back to the pool; ``aclose`` before that closes the connection.
    ``request`` is httpx's view of the request (made when asked: the SDK's errors carry one)."""

    def __init__(
        self,
        pool: ProviderHTTP,
        wire: _Wire,
        head: ResponseHead,
        read_s: float | None,
        request: Callable[[], httpx2.Request],
    ) -> None:
        self.status_code = head.status
        self.head = head
        self.headers = head.mapping()
        self._pool, self._wire, self._read_s = pool, wire, read_s
        self._request = request
        self._done = False

    @property
    def request(self) -> httpx2.Request:
        return self._request()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, as sent (no content coding undone)."""
        wire = self._wire
        reader = wire.reader
        assert reader is not None and not self._done, "a response's body is read once"
        while True:
            if wire.pieces:
                for piece in wire.take():
                    yield piece
            elif reader.complete:
                break
            elif wire.failure is not None:
                raise wire.failure
            elif wire.ended:
                raise httpx2.ReadError("the connection was lost mid-body")
            else:
                await wire.wait(self._read_s, httpx2.ReadTimeout)
        self._finish(reader.reusable)

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, its content coding undone (gzip, deflate, br)."""
        coding = self.headers.get("content-encoding", "").strip().lower()
        if coding in ("", "identity") or coding not in DECODERS:
            return self.aiter_raw()
        return _decoded(self.aiter_raw(), DECODERS[coding]())

    async def aread(self) -> bytes:
        return b"".join([piece async for piece in self.aiter_bytes()])

    async def aclose(self) -> None:
        """Done with the response: its connection is closed unless it was read to its end."""
        self._finish(False)

    def _finish(self, reusable: bool) -> None:
        if not self._done:
            self._done = True
            self._pool.release(self._wire, reusable)


class _Decoder:
    """A content coding undone piece by piece (the zlib and brotli decompressors' shape)."""

    def __init__(self, decompress: Callable[[bytes], bytes], flush: Callable[[], bytes]) -> None:
        self.decompress, self.flush = decompress, flush


def _zlib(wbits: int) -> _Decoder:
    decompressor = zlib.decompressobj(wbits)
    return _Decoder(decompressor.decompress, decompressor.flush)


def _brotli() -> _Decoder:
    import brotli  # type: ignore[import-untyped]  # httpx asks br only with it

    decompressor = brotli.Decompressor()
    return _Decoder(decompressor.process, lambda: b"")


# The codings httpx asks for; deflate is the zlib format (RFC 9110 section 8.4.1.2).
DECODERS: dict[str, Callable[[], _Decoder]] = {
    "gzip": lambda: _zlib(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: _zlib(16 + zlib.MAX_WBITS),
    "deflate": lambda: _zlib(zlib.MAX_WBITS),
    "br": _brotli,
}


async def _decoded(raw: AsyncIterator[bytes], decoder: _Decoder) -> AsyncIterator[bytes]:
    async for piece in raw:
        if data := _undone(decoder.decompress, piece):
            yield data
    if data := _undone(lambda _: decoder.flush(), b""):
        yield data


def _undone(decompress: Callable[[bytes], bytes], piece: bytes) -> bytes:
    try:
        return decompress(piece)
    except Exception as error:  # zlib.error, brotli.error: the decompressors' own
        said = f"the body is not what its content coding says: {error}"
        raise httpx2.DecodingError(said) from error


def _no_request() -> httpx2.Request:
    raise RuntimeError("this response was not told its request")


class ProviderHTTP:
    """Keep-alive HTTP/1.1 connections per origin and the requests sent on them.

    ``send`` writes a request's bytes (its head and body, framed by the caller) on an idle
    connection to the origin, or a new one, and answers once the response's head has come.
    ``connections_made`` counts the connections opened (what keep-alive saved)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_idle_per_origin: int = MAX_IDLE_PER_ORIGIN,
        idle_expiry_s: float = IDLE_EXPIRY_S,
    ) -> None:
        self._ssl_context = ssl_context
        self._max_idle, self._expiry_s = max_idle_per_origin, idle_expiry_s
        self._idle: dict[Origin, list[_Wire]] = {}
        self._open: set[_Wire] = set()
        self._closed = False
        self.connections_made = 0

    async def send(
        self,
        origin: Origin,
        request: bytes,
        timeouts: Timeouts,
        describe: Callable[[], httpx2.Request] = _no_request,
    ) -> ProviderResponse:
        """The response to ``request`` (its bytes whole), once its head has come."""
        if self._closed:
            raise RuntimeError("the provider HTTP client is closed")
        wire = self._pooled(origin) or await self._connect(origin, timeouts.connect_s)
        try:
            head = await self._exchange(wire, request, timeouts)
        except BaseException:
            self._drop(wire)
            raise
        return ProviderResponse(self, wire, head, timeouts.read_s, describe)

    async def _exchange(self, wire: _Wire, request: bytes, timeouts: Timeouts) -> ResponseHead:
        reader = wire.reader = ResponseReader()
        assert wire.transport is not None
        wire.transport.write(request)
        while wire.writing_paused and not wire.ended:
            await wire.wait(timeouts.write_s, httpx2.WriteTimeout)
        while reader.head is None:
            if wire.failure is not None:
                raise wire.failure
            if wire.ended:
                raise httpx2.RemoteProtocolError("Server disconnected without sending a response.")
            await wire.wait(timeouts.read_s, httpx2.ReadTimeout)
        return reader.head

    def _pooled(self, origin: Origin) -> _Wire | None:
        """The most recently idle connection to ``origin`` still usable (the others closed)."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            wire = idle.pop()
            if wire.usable(now, self._expiry_s):
                return wire
            self._drop(wire)
        return None

    def release(self, wire: _Wire, reusable: bool) -> None:
        """A response is done with: its connection kept idle when it may be reused."""
        assert wire.origin is not None
        idle = self._idle.setdefault(wire.origin, [])
        if (
            not reusable
            or self._closed
            or wire.ended
            or wire.spoiled
            or len(idle) >= self._max_idle
        ):
            self._drop(wire)
            return
        wire.reader = None
        wire.idle_since = asyncio.get_running_loop().time()
        idle.append(wire)

    def _drop(self, wire: _Wire) -> None:
        wire.close()
        self._open.discard(wire)

    async def _connect(self, origin: Origin, timeout_s: float | None) -> _Wire:
        made: list[asyncio.BaseTransport] = []
        try:
            async with asyncio.timeout(timeout_s):
                transport, wire = await first_of(origin.host, origin.port, None, _Wire)
                made.append(transport)
                if origin.scheme == "https":
                    await self._tls(transport, wire, origin.host)
        except TimeoutError:
            _close_all(made)
            raise httpx2.ConnectTimeout(
                f"not connected to {origin.host} in {timeout_s} s"
            ) from None
        except (OSError, ssl.SSLError) as error:
            _close_all(made)
            raise httpx2.ConnectError(str(error)) from error
        except BaseException:
            _close_all(made)
            raise
        wire.origin = origin
        self._open.add(wire)
        self.connections_made += 1
        return cast(_Wire, wire)

    async def _tls(self, transport: asyncio.BaseTransport, wire: _Wire, host: str) -> None:
        if self._ssl_context is None:
            self._ssl_context = httpx2.create_ssl_context()  # httpx's CAs, as the SDK's
        loop = asyncio.get_running_loop()
        tls = await loop.start_tls(
            cast(asyncio.Transport, transport), wire, self._ssl_context, server_hostname=host
        )
        if tls is None:
            raise ssl.SSLError(f"no TLS session with {host}")
        wire.transport = tls

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def aclose(self) -> None:
        """Close every connection; a request after this is refused."""
        self._closed = True
        for wire in list(self._open):
            self._drop(wire)
        self._idle.clear()


def _close_all(transports: list[asyncio.BaseTransport]) -> None:
    for transport in transports:
        transport.close()
