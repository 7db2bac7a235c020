"""``pipeline.asyncio_network`` against the interface it implements: httpx's transport and
httpcore's network stream, over real loopback sockets (plain and TLS).

Each behaviour is asserted of httpx's own transport (the reference, on anyio) and of ours
alike: a kept-alive connection reused, a peer that closes an idle connection (the next request
opens another), a peer that closes mid-body, one that never answers (a read timeout, the SDK's
``APITimeoutError``), a body that must drain first, a peer that never reads it (a write
timeout), one that refuses the connection, a body past the buffer's high water, HTTPS with a
certificate trusted or not; ours again on uvloop, the transceiver's loop. The stream's reads
are checked on any cut of the bytes sent and any sizes asked (hypothesis); connecting falls
through to the next address when one does not answer.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpcore2
import httpx2
import openai
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loopback_peer import DeafPeer, HeldConnections, serving
from self_signed import self_signed

from deploy.fake_openai import FakeOpenAIServer
from pipeline.asyncio_network import (
    HIGH_WATER_BYTES,
    AsyncioHTTPTransport,
    AsyncioNetworkBackend,
    _interleaved,
)
from pipeline.openai_providers import NETWORKS, OpenAILanguageModel, openai_client
from pipeline.providers import Message, TextDelta

LIMITS = httpx2.Limits(max_connections=10, max_keepalive_connections=5)
Transport = Callable[[ssl.SSLContext | None], httpx2.AsyncBaseTransport]


def reference(context: ssl.SSLContext | None) -> httpx2.AsyncBaseTransport:
    return httpx2.AsyncHTTPTransport(limits=LIMITS, verify=context or True)


def ours(context: ssl.SSLContext | None) -> httpx2.AsyncBaseTransport:
    return AsyncioHTTPTransport(LIMITS, ssl_context=context)


TRANSPORTS = pytest.mark.parametrize("transport", [reference, ours], ids=["anyio", "asyncio"])


class Peer:
    """An HTTP/1.1 server on loopback answering each request as ``behaviour`` says:
    "keep" (200, the connection kept), "close" (200, then the connection closed without
    saying so), "cut" (a body shorter than its Content-Length, then closed), "silent" (no
    answer), "big" (a body of ``big_bytes``). Counts the connections it accepted."""

    def __init__(self, behaviour: str, big_bytes: int = 0) -> None:
        self.behaviour = behaviour
        self.big_bytes = big_bytes
        self.connections = 0
        self.bodies: list[bytes] = []
        self.held = HeldConnections()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.held.hold(writer)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = _content_length(head)
                self.bodies.append(await reader.readexactly(length))
                if not await self._answer(writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False: the connection is to close."""
        if self.behaviour == "silent":
            await self.held.stopping.wait()
            return False
        body = b"x" * self.big_bytes if self.behaviour == "big" else b"hello"
        declared = len(body) + (100 if self.behaviour == "cut" else 0)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % declared + body)
        await writer.drain()
        return self.behaviour in ("keep", "big")


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@asynccontextmanager
async def http_client(
    transport: Transport, timeout_s: float = 10.0, context: ssl.SSLContext | None = None
) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(transport=transport(context), timeout=timeout_s) as client:
        yield client


@TRANSPORTS
async def test_a_kept_alive_connection_carries_the_next_request(transport: Transport) -> None:
    peer = Peer("keep")
    async with serving(peer) as url, http_client(transport) as client:
        answers = [await client.post(url, content=b"q%d" % n) for n in range(3)]
    assert [(a.status_code, a.content) for a in answers] == [(200, b"hello")] * 3
    assert peer.bodies == [b"q0", b"q1", b"q2"] and peer.connections == 1


@TRANSPORTS
async def test_an_idle_connection_the_peer_closed_is_not_reused(transport: Transport) -> None:
    peer = Peer("close")
    async with serving(peer) as url, http_client(transport) as client:
        first = await client.get(url)
        await wait_for(lambda: peer.connections == 1 and len(peer.bodies) == 1)
        await asyncio.sleep(0.05)  # the peer's FIN reaches the pooled connection
        second = await client.get(url)
    assert first.content == second.content == b"hello"
    assert peer.connections == 2


@TRANSPORTS
async def test_a_peer_closing_mid_body_is_a_remote_protocol_error(transport: Transport) -> None:
    async with serving(Peer("cut")) as url, http_client(transport) as client:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(url)


@TRANSPORTS
async def test_a_silent_peer_is_a_read_timeout(transport: Transport) -> None:
    async with serving(Peer("silent")) as url, http_client(transport, timeout_s=0.2) as client:
        with pytest.raises(httpx2.ReadTimeout):
            await client.get(url)


BIG_BODY_BYTES = 16 * 1024 * 1024  # past what loopback sockets buffer for a peer not reading


@TRANSPORTS
async def test_a_body_drains_before_the_answer_is_awaited_and_a_deaf_peer_times_out(
    transport: Transport,
) -> None:
    """A body bigger than the sockets' buffers (writing pauses): to a silent peer, which reads
    it, the request is sent whole and waits for its answer (a read timeout); to a peer that
    never reads, the write's wait is a write timeout."""
    body = b"y" * BIG_BODY_BYTES
    silent = Peer("silent")
    async with serving(silent) as url, http_client(transport) as client:
        with pytest.raises(httpx2.ReadTimeout):
            await client.post(url, content=body, timeout=httpx2.Timeout(10.0, read=0.3))
    assert silent.bodies == [body]
    async with serving(DeafPeer()) as url, http_client(transport) as client:
        with pytest.raises(httpx2.WriteTimeout):
            await client.post(url, content=body, timeout=httpx2.Timeout(10.0, write=0.3))


@TRANSPORTS
async def test_a_refused_connection_is_a_connect_error(transport: Transport) -> None:
    async with serving(Peer("keep")) as url:
        pass  # closed: nothing listens on its port now
    async with http_client(transport) as client:
        with pytest.raises(httpx2.ConnectError):
            await client.get(url)


@TRANSPORTS
async def test_a_body_past_the_high_water_arrives_whole(transport: Transport) -> None:
    size = 3 * HIGH_WATER_BYTES + 17
    peer = Peer("big", big_bytes=size)
    async with serving(peer) as url, http_client(transport) as client:
        async with client.stream("POST", url, content=b"y" * size) as response:
            await asyncio.sleep(0.1)  # the body waits unread: reading pauses
            body = await response.aread()
        again = await client.get(url)
    assert body == b"x" * size and len(again.content) == size
    assert peer.bodies[0] == b"y" * size and peer.connections == 1


def server_context(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


@TRANSPORTS
async def test_https_with_a_trusted_certificate(transport: Transport, tmp_path: Path) -> None:
    context, cert = server_context(tmp_path)
    peer = Peer("keep")
    trusting = ssl.create_default_context(cafile=str(cert))
    async with serving(peer, context) as url, http_client(transport, context=trusting) as client:
        answers = [await client.post(url, content=b"secret") for _ in range(2)]
        stream = answers[0].extensions["network_stream"]
        assert stream.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    assert [a.content for a in answers] == [b"hello", b"hello"]
    assert peer.bodies == [b"secret", b"secret"] and peer.connections == 1


@TRANSPORTS
async def test_https_with_an_untrusted_certificate_is_refused(
    transport: Transport, tmp_path: Path
) -> None:
    context, _ = server_context(tmp_path)
    peer = Peer("keep")
    async with serving(peer, context) as url, http_client(transport) as client:
        with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(url)
    assert peer.bodies == []


@asynccontextmanager
async def tls_proxy(target: str, context: ssl.SSLContext) -> AsyncIterator[str]:
    """TLS in front of ``target`` (an http URL): yields the https URL; bytes copied both ways."""
    host, port = target.removeprefix("http://").rsplit(":", 1)
    copies: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65_536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def bridge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        inner_reader, inner_writer = await asyncio.open_connection(host, int(port))
        writers.extend((writer, inner_writer))
        both = (copy(reader, inner_writer), copy(inner_reader, writer))
        copies.update(asyncio.ensure_future(one) for one in both)

    server = await asyncio.start_server(bridge, "127.0.0.1", 0, ssl=context)
    try:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await asyncio.gather(*copies)
        await server.wait_closed()


@pytest.mark.parametrize("network", NETWORKS)
async def test_the_pipelines_client_streams_a_chat_over_https(
    network: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``openai_client`` as a deployment uses it: https, the certificate trusted through
    ``SSL_CERT_FILE``, a streamed chat answer read whole, twice on one connection."""
    context, cert = server_context(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with FakeOpenAIServer() as server:
        async with tls_proxy(server.base_url, context) as url:
            sdk = openai_client("sk-test", network).with_options(base_url=f"{url}/v1")
            async with sdk:
                model = OpenAILanguageModel(sdk)
                for _ in range(2):
                    said = [e async for e in model.generate([Message("user", "hi there")], [])]
                    text = "".join(e.text for e in said if isinstance(e, TextDelta))
                    assert text.strip() == "You said: hi there"
            stats = await server.stats()
    assert stats["hits"]["chat"] == 2


@pytest.mark.parametrize("network", NETWORKS)
async def test_the_sdk_sees_a_silent_server_as_its_timeout(network: str) -> None:
    """The SDK's own errors through our transport: a read timeout is ``APITimeoutError``, a
    refused connection ``APIConnectionError``, a status its ``APIStatusError``."""
    async with serving(Peer("silent")) as url:
        sdk = openai_client("sk-test", network).with_options(
            base_url=f"{url}/v1", timeout=0.2, max_retries=0
        )
        async with sdk:
            with pytest.raises(openai.APITimeoutError):
                await sdk.models.list()
    sdk = openai_client("sk-test", network).with_options(base_url=f"{url}/v1", max_retries=0)
    async with sdk:
        with pytest.raises(openai.APIConnectionError):
            await sdk.models.list()


# --- the stream's reads ---------------------------------------------------------------------


async def read_all(pieces: list[bytes], sizes: list[int]) -> bytes:
    """What ``AsyncioStream.read`` returns, asked ``sizes`` in turn (the last size again once
    they run out), from a peer that sends ``pieces`` one write each and closes."""

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)
        writer.close()

    server = await asyncio.start_server(send, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stream = await AsyncioNetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)
    got = []
    try:
        for number in range(sum(map(len, pieces)) + 2):  # at least a byte a read, then the end
            data = await stream.read(sizes[min(number, len(sizes) - 1)], timeout=5)
            if not data:
                break
            got.append(data)
    finally:
        await stream.aclose()
        server.close()
        await server.wait_closed()
    return b"".join(got)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=3_000), max_size=12),
    sizes=st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=8),
)
def test_reads_return_the_bytes_sent_in_order_whatever_the_cuts(
    pieces: list[bytes], sizes: list[int]
) -> None:
    assert asyncio.run(read_all(pieces, sizes)) == b"".join(pieces)


async def test_a_read_past_the_end_is_empty_and_a_silent_read_times_out() -> None:
    closed = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await closed.wait()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stream = await AsyncioNetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)
    with pytest.raises(httpcore2.ReadTimeout):
        await stream.read(100, timeout=0.1)
    assert stream.get_extra_info("is_readable") is False  # idle, open: reusable
    closed.set()
    assert await stream.read(100, timeout=5) == b""
    assert stream.get_extra_info("is_readable") is True  # the peer closed it: not reusable
    with pytest.raises(httpcore2.WriteError):
        for _ in range(100):  # the peer's RST arrives after a write or two
            await stream.write(b"x" * 1000, timeout=5)
            await asyncio.sleep(0.01)
    await stream.aclose()
    server.close()
    await server.wait_closed()


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- connecting -------------------------------------------------------------------------------

V6, V4 = socket.AF_INET6, socket.AF_INET


def test_addresses_are_tried_families_alternating_from_the_resolvers_first() -> None:
    found: list[tuple[int, tuple[Any, ...]]] = [
        (V6, ("::1",)), (V6, ("::2",)), (V6, ("::3",)), (V4, ("1.1.1.1",)), (V4, ("2.2.2.2",))
    ]  # fmt: skip
    assert [a[1][0] for a in _interleaved(found)] == ["::1", "1.1.1.1", "::2", "2.2.2.2", "::3"]
    assert _interleaved([]) == []


async def test_an_address_that_does_not_answer_yields_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resolver (the one thing stood in for: no name here has two addresses) names first
    an address that does not answer (a listener whose backlog is full: its SYNs are dropped),
    then the peer's: the connection is the peer's, well within the connect timeout (tried
    one by one, it would be a ConnectTimeout)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        silent_port = silent.getsockname()[1]
        queued = [socket.socket() for _ in range(3)]  # fill its backlog
        for waiting in queued:
            waiting.setblocking(False)
            waiting.connect_ex(("127.0.0.1", silent_port))
        async with serving(Peer("keep")) as url:
            port = int(url.rsplit(":", 1)[1])
            answers = [
                (V4, socket.SOCK_STREAM, 6, "", ("127.0.0.1", silent_port)),
                (V4, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            ]

            async def resolve(host: str, port: int, **_: object) -> list[object]:
                return list(answers)

            monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", resolve)
            stream = await AsyncioNetworkBackend().connect_tcp("provider.test", port, timeout=3)
            assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
            await stream.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
            assert (await stream.read(1000, timeout=3)).startswith(b"HTTP/1.1 200 OK")
            await stream.aclose()
        for waiting in queued:
            waiting.close()


def test_the_transport_on_uvloop_as_the_transceiver_runs_it(tmp_path: Path) -> None:
    """The transceiver's loop is uvloop's (``create_connection`` without happy eyeballs, its
    own ``start_tls``): kept-alive HTTPS, a read timeout, a peer closing an idle connection."""
    context, cert = server_context(tmp_path)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def scenario() -> tuple[list[bytes], int, int]:
        kept, closing = Peer("keep"), Peer("close")
        async with serving(kept, context) as url, http_client(ours, context=trusting) as client:
            bodies = [(await client.get(url)).content for _ in range(2)]
        async with serving(Peer("silent")) as url, http_client(ours, timeout_s=0.2) as client:
            with pytest.raises(httpx2.ReadTimeout):
                await client.get(url)
        async with serving(closing) as url, http_client(ours) as client:
            await client.get(url)
            await wait_for(lambda: len(closing.bodies) == 1)
            await asyncio.sleep(0.05)
            bodies.append((await client.get(url)).content)
        return bodies, kept.connections, closing.connections

    bodies, kept_connections, closing_connections = uvloop.run(scenario())
    assert bodies == [b"hello"] * 3
    assert (kept_connections, closing_connections) == (1, 2)
