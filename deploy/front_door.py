"""``python -m deploy.front_door``: one HTTP address in front of the local stack's
transceivers, standing in for the Kubernetes Service that balances signalling in production.

I/O layer: asyncio streams towards the client, httpx towards the transceivers. Per request:

- Read and check it: the request line and headers (at most ``max_head_bytes``, the blank
  line that ends them included) and a ``Content-Length`` body (at most ``max_body_bytes``;
  chunked bodies are refused). Anything wrong gets a JSON error shaped like the transceivers'
  own, ``{"error": {"type", "code", "message", "param"}}``. Only origin-form targets
  (``/path?query``) are accepted: this is never a forward proxy. No JSON is parsed here.
- Forward it to a backend picked round-robin: method, path and query, body, and the headers that
  matter (Content-Type, Authorization, Accept, Origin, X-Voicerelay-*, CORS preflight), plus
  X-Forwarded-For/-Host/-Proto. A backend that refuses the connection or answers 503 is passed
  over for the next, each tried at most once per request. A request that reached a backend and
  then failed there (timeout, reset) is not retried: it may already have had its effect.
- A request naming a call (``/v1/realtime/calls/{call_id}...``, i.e. hang-up) goes first to
  the backend whose 201 announced that call in its Location; elsewhere a 404 only means "not
  here", so the other backends are asked too.
- Answer with the backend's status and body and its relevant headers (Content-Type, Location,
  Retry-After, WWW-Authenticate, Cache-Control, Vary, X-Voicerelay-*, Access-Control-*).

WebSockets (RFC 6455; the Realtime and GPT-Live sockets and their sidebands): a request whose
``Upgrade`` names ``websocket`` is checked as a handshake (``websocket_wire``: a GET with no
body, Connection: Upgrade, one Host, a 16-byte key, version 13) and sent, with its handshake
headers and the ones above, to a backend picked the same way (a Realtime sideband's call first
to the backend that made it). Refused or 503 is passed over: a handshake has no body and no
effect before its ``101``. The ``101`` is relayed and the bytes are copied both ways until both
sides have closed (``websocket_tunnel``); any other answer (401, 404, 400 and its JSON body) is
relayed as one. ``tunnels`` counts them (open, total, bytes each way) and each is logged when it
opens and closes.

One request per connection (``Connection: close``): loopback connections are cheap, and no
keep-alive connection to a backend outlives the backend (a dead one must refuse, not reset).
Lifecycle as the transceiver's: SIGTERM/SIGINT set a flag, the listener closes, requests and
tunnels in flight get ``drain_timeout_s`` to finish and the rest are cancelled (a tunnel's
sockets are then closed: the clients reconnect, as to a transceiver that went away). A tunnel
with no byte either way for ``tunnel_idle_timeout_s`` is closed too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from deploy.http_wire import (
    CALLS_PATH,
    HttpError,
    Reply,
    RequestHead,
    body_length,
    downstream_headers,
    error_reply,
    parse_head,
    upstream_headers,
)
from deploy.websocket_tunnel import (
    BackendRefused,
    TunnelCounts,
    Upstream,
    handshake,
    pump,
    refusal,
)
from deploy.websocket_wire import (
    HandshakeError,
    UpstreamError,
    check_handshake,
    request_version,
    sideband_call_id,
    upstream_handshake,
    websocket_requested,
)

log = logging.getLogger("front_door")
READY_LINE = "front door ready"
MAX_REMEMBERED_CALLS = 10_000
LINGER_S = 1.0  # after an early error, drain what the client still sends before closing
LINGER_BYTES = 1 << 20
CALL_TARGET = re.compile(re.escape(CALLS_PATH) + r"/([^/?#]+)")
HEAD_END = b"\r\n\r\n"


# --- config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontDoorConfig:
    host: str
    port: int
    backends: tuple[str, ...]  # "host:port" of each transceiver's HTTP listener
    connect_timeout_s: float = 2.0
    upstream_timeout_s: float = 30.0
    read_timeout_s: float = 10.0
    drain_timeout_s: float = 5.0
    tunnel_idle_timeout_s: float = 300.0
    max_head_bytes: int = 16 * 1024
    max_body_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("front door: at least one backend (host:port) is required")
        for backend in self.backends:
            _host, sep, port = backend.rpartition(":")
            if not sep or not _host or not port.isascii() or not port.isdigit():
                raise ValueError(f"front door: backend {backend!r} is not host:port")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"front door: port {self.port} is out of range")
        for name in ("drain_timeout_s", "tunnel_idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"front door: {name} must be positive")


def parse_args(argv: Sequence[str]) -> FrontDoorConfig:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m deploy.front_door", description=__doc__)
    parser.add_argument("--host", default=env.get("FRONT_DOOR_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env.get("FRONT_DOOR_PORT", "8080")))
    parser.add_argument(
        "--backends",
        default=env.get("FRONT_DOOR_BACKENDS", ""),
        help="comma-separated host:port of the transceivers (env FRONT_DOOR_BACKENDS)",
    )
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=float(env.get("FRONT_DOOR_DRAIN_TIMEOUT_S", "5")),
        help="after SIGTERM, how long requests and WebSockets in flight may go on",
    )
    parser.add_argument(
        "--tunnel-idle-timeout-s",
        type=float,
        default=float(env.get("FRONT_DOOR_TUNNEL_IDLE_TIMEOUT_S", "300")),
        help="a WebSocket with no byte either way for this long is closed",
    )
    args = parser.parse_args(argv)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    timeouts = {"drain_timeout_s": args.drain_timeout_s}
    timeouts["tunnel_idle_timeout_s"] = args.tunnel_idle_timeout_s
    try:
        return FrontDoorConfig(args.host, args.port, backends, **timeouts)
    except ValueError as exc:
        parser.error(str(exc))


def call_id_of(target: str) -> str | None:
    """The call a target (or a Location) names, if it is under the calls path."""
    match = CALL_TARGET.match(target)
    return match.group(1) if match else None


def passes_over(status: int, call_id: str | None) -> bool:
    """Whether another backend should be asked: this one is unavailable (503), or the call
    named in the target lives elsewhere (404)."""
    return status == 503 or (call_id is not None and status == 404)


class BackendRing:
    """Round-robin order of the backends, with the backend that owns a known call first."""

    def __init__(self, backends: Sequence[str]) -> None:
        self.backends = list(backends)
        self._next = 0
        self._calls: OrderedDict[str, str] = OrderedDict()

    def order(self, call_id: str | None = None) -> list[str]:
        start, self._next = self._next, (self._next + 1) % len(self.backends)
        ring = self.backends[start:] + self.backends[:start]
        owner = self._calls.get(call_id) if call_id else None
        return [owner, *(b for b in ring if b != owner)] if owner else ring

    def remember(self, call_id: str, backend: str) -> None:
        self._calls[call_id] = backend
        self._calls.move_to_end(call_id)
        while len(self._calls) > MAX_REMEMBERED_CALLS:
            self._calls.popitem(last=False)


# --- I/O ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    head: RequestHead
    body: bytes
    client_host: str
    websocket: bool = False  # a checked WebSocket handshake (no body)


class ClientGoneError(Exception):
    """The client closed the connection before sending a whole request."""


class FrontDoor:
    """``await start()``, then serve until ``await aclose()``."""

    def __init__(self, config: FrontDoorConfig) -> None:
        self.config = config
        self.ring = BackendRing(config.backends)
        self._server: asyncio.Server | None = None
        self._http: httpx.AsyncClient | None = None
        self._active: set[asyncio.Task[None]] = set()
        self.tunnels = TunnelCounts()
        self.port = 0  # the bound port, once started (config.port may be 0)

    async def start(self) -> None:
        timeout = httpx.Timeout(
            self.config.upstream_timeout_s, connect=self.config.connect_timeout_s
        )
        limits = httpx.Limits(max_keepalive_connections=0)
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False)
        # The reader's limit counts the bytes before the separator readuntil looks for.
        head_limit = self.config.max_head_bytes - len(HEAD_END)
        self._server = await asyncio.start_server(
            self._connection, self.config.host, self.config.port, limit=head_limit
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        """Stop accepting; let requests in flight finish within the drain timeout."""
        if self._server is not None:
            self._server.close()
        if self._active:
            _, late = await asyncio.wait(set(self._active), timeout=self.config.drain_timeout_s)
            if late:
                log.info(
                    "front door: drained for %s s; closing %d connections (%d WebSockets)",
                    self.config.drain_timeout_s,
                    len(late),
                    self.tunnels.open,
                )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        try:
            await self._exchange(reader, writer)
        except (ConnectionError, ClientGoneError):
            pass  # the client left; nothing to answer
        finally:
            self._active.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, one answer."""
        try:
            request = await asyncio.wait_for(self._read(reader, writer), self.config.read_timeout_s)
        except HttpError as exc:
            await self._send(writer, _error_of(exc))
            await _linger(reader, writer)
            return
        except TimeoutError:
            message = f"no complete request within {self.config.read_timeout_s} s"
            await self._send(writer, error_reply(408, "request_timeout", message))
            return
        if request.websocket:
            await self._websocket(request, reader, writer)
            return
        try:
            reply = await self.forward(request)
        except Exception:  # a bug of ours must cost one request, not the connection unanswered
            log.exception("front door: %s failed", _what(request))
            reply = error_reply(502, "front_door_error", "the front door failed; see its log")
        await self._send(writer, reply, head_only=request.head.method == "HEAD")

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request:
        try:
            raw = await reader.readuntil(HEAD_END)
        except asyncio.LimitOverrunError:
            limit = self.config.max_head_bytes
            raise HttpError(
                431, "headers_too_large", f"request head exceeds {limit} bytes"
            ) from None
        except asyncio.IncompleteReadError:
            raise ClientGoneError from None
        head = parse_head(raw)
        websocket = websocket_requested(head)
        if websocket:
            check_handshake(head, request_version(raw))
        length = 0 if websocket else body_length(head, self.config.max_body_bytes)
        if length and (head.get("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ClientGoneError from None
        peer = writer.get_extra_info("peername")
        return Request(head, body, str(peer[0]) if peer else "", websocket)

    async def _send(
        self, writer: asyncio.StreamWriter, reply: Reply, head_only: bool = False
    ) -> None:
        writer.write(reply.encode(head_only))
        await writer.drain()

    async def forward(self, request: Request) -> Reply:
        """The first answer that is not a pass-over, trying each backend at most once."""
        call_id = call_id_of(request.head.target)
        refused: list[str] = []
        passed: Reply | None = None
        for backend in self.ring.order(call_id):
            try:
                reply = await self._upstream(backend, request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                log.warning(
                    "front door: %s refused %s (%s); trying the next", backend, _what(request), exc
                )
                refused.append(backend)
                continue
            except httpx.TimeoutException:
                return error_reply(504, "upstream_timeout", f"{backend} did not answer in time")
            except httpx.HTTPError as exc:
                return error_reply(502, "upstream_failed", f"{backend} failed: {exc!r}"[:300])
            if not passes_over(reply.status, call_id):
                return reply
            log.warning(
                "front door: %s answered %d to %s; trying the next",
                backend,
                reply.status,
                _what(request),
            )
            passed = reply
        return passed or error_reply(
            502, "no_backend", f"no backend reachable (tried {', '.join(refused)})"
        )

    async def _upstream(self, backend: str, request: Request) -> Reply:
        assert self._http is not None, "not started"
        response = await self._http.request(
            request.head.method,
            f"http://{backend}{request.head.target}",
            headers=upstream_headers(request.head, request.client_host),
            content=request.body,
        )
        self._note_call(backend, response)
        return Reply(
            response.status_code, downstream_headers(response.headers.raw), response.content
        )

    def _note_call(self, backend: str, response: httpx.Response) -> None:
        call_id = call_id_of(response.headers.get("location", ""))
        if response.status_code == 201 and call_id:
            self.ring.remember(call_id, backend)
            session = response.headers.get("x-voicerelay-session", "-")
            log.info("front door: call %s (session %s) on %s", call_id, session, backend)

    # --- WebSockets ------------------------------------------------------------------------------

    async def _websocket(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Forward a checked handshake; carry the tunnel after a ``101``, else relay the answer."""
        try:
            answer = await self.upgrade(request)
        except Exception:  # a bug of ours must cost one request, not the connection unanswered
            log.exception("front door: %s failed", _what(request))
            answer = error_reply(502, "front_door_error", "the front door failed; see its log")
        if isinstance(answer, Reply):
            await self._send(writer, answer)
            return
        await self._carry(request, answer, reader, writer)

    async def upgrade(self, request: Request) -> Upstream | Reply:
        """The first backend's ``101`` (its stream open), or the first answer that is not a
        pass-over, trying each backend at most once."""
        refused: list[str] = []
        passed: Reply | None = None
        for backend in self.ring.order(sideband_call_id(request.head.target)):
            try:
                answer = await self._try_upgrade(backend, request)
            except BackendRefused as exc:
                log.warning("front door: %s; trying the next for %s", exc, _what(request))
                refused.append(backend)
                continue
            except TimeoutError:
                return error_reply(504, "upstream_timeout", f"{backend} did not answer in time")
            except (UpstreamError, ConnectionError, asyncio.IncompleteReadError) as exc:
                return error_reply(502, "upstream_failed", f"{backend} failed: {exc!r}"[:300])
            if isinstance(answer, Upstream) or answer.status != 503:
                return answer
            log.warning(
                "front door: %s answered 503 to %s; trying the next", backend, _what(request)
            )
            passed = answer
        return passed or error_reply(
            502, "no_backend", f"no backend reachable (tried {', '.join(refused)})"
        )

    async def _try_upgrade(self, backend: str, request: Request) -> Upstream | Reply:
        config = self.config
        data = upstream_handshake(request.head, backend, request.client_host)
        timeouts = (config.connect_timeout_s, config.upstream_timeout_s)
        upstream = await handshake(backend, data, *timeouts, limit=config.max_head_bytes)
        if upstream.head.status == 101:
            return upstream
        body = await refusal(upstream, config.max_body_bytes, config.upstream_timeout_s)
        return Reply(upstream.head.status, upstream.head.reply_headers(), body)

    async def _carry(
        self,
        request: Request,
        upstream: Upstream,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Relay the ``101``, then the bytes both ways until the tunnel ends."""
        mine, counts = TunnelCounts(), self.tunnels  # this tunnel's bytes, and everyone's
        counts.open, counts.total = counts.open + 1, counts.total + 1
        what = f"WebSocket {_what(request)} via {upstream.backend}"
        log.info("front door: %s opened (%d open, %d so far)", what, counts.open, counts.total)
        ended = "ended"
        try:
            writer.write(upstream.head.switch_head())
            await writer.drain()
            ended = await pump(
                (reader, writer), upstream, self.config.tunnel_idle_timeout_s, (mine, counts)
            )
        except asyncio.CancelledError:
            ended = "closed: the front door stopped and its drain timeout passed"
            raise
        except ConnectionError as exc:
            ended = f"closed: the client went away before the 101 ({exc!r})"
            raise
        finally:
            counts.open -= 1
            await upstream.aclose()
            log.info(
                "front door: %s %s; %d bytes up, %d down (%d open)",
                what, ended, mine.bytes_up, mine.bytes_down, counts.open,
            )  # fmt: skip


def _error_of(exc: HttpError) -> Reply:
    reply = error_reply(exc.status, exc.code, exc.message)
    extra = exc.headers if isinstance(exc, HandshakeError) else []
    return Reply(reply.status, reply.headers + extra, reply.body)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _what(request: Request) -> str:
    return f"{request.head.method} {request.head.target.split('?', 1)[0]}"


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After answering early, read (and drop) what the client is still sending for a moment,
    so closing does not reset the connection before it reads our answer."""
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_S):
            dropped = 0
            while dropped < LINGER_BYTES and (chunk := await reader.read(65536)):
                dropped += len(chunk)


# --- process -------------------------------------------------------------------------------------


async def serve(config: FrontDoorConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)  # the handler only sets a flag
    door = FrontDoor(config)
    try:
        await door.start()
    except OSError as exc:
        print(f"front door: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        await door.aclose()
        return 1
    backends = ", ".join(config.backends)
    print(f"{READY_LINE} http://{url_host(config.host)}:{door.port}/ -> {backends}", flush=True)
    try:
        await stop.wait()
    finally:
        await door.aclose()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(message)s")  # others' loggers (httpx) stay at WARNING
    log.setLevel(logging.INFO)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
