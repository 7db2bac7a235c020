"""The providers' lean HTTP path (``pipeline.openai_http`` over ``pipeline.provider_http``)
against the SDK's own, over real loopback sockets.

Against the fake OpenAI server (its own process): the three requests of a turn give the same
results by either path. Against a scripted HTTP/1.1 server on loopback that records the bytes
it receives: each request is the SDK's byte for byte (but a form's random boundary); a
kept-alive connection carries the next request, one the server closed while idle is not
used; chunked and Content-Length bodies; a 4xx/5xx JSON error, a 429 with retry-after, a
silent server, one closing mid-answer: the same exception (type, message, body, headers) by
either path. A body bigger than the sockets' buffers drains before its answer is awaited;
to a server that never reads it, it is a write timeout. HTTPS against a server with a
self-signed certificate: trusted, untrusted, or not for the host asked.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import openai
import pytest
import uvloop
from loopback_peer import DeafPeer, HeldConnections, serving
from self_signed import self_signed

from deploy.fake_openai import FakeOpenAIServer
from pipeline.config import ConfigError, PipelineConfig
from pipeline.openai_http import LeanRequests
from pipeline.openai_providers import (
    OpenAILanguageModel,
    OpenAISpeechToText,
    OpenAITextToSpeech,
    openai_client,
)
from pipeline.provider_http import Origin, ProviderHTTP, Timeouts
from pipeline.providers import (
    AudioChunk,
    LanguageModelEvent,
    Message,
    ProviderError,
    ToolSpec,
    Transcript,
)

PATHS = ("lean", "sdk")
LOOKUP = ToolSpec("lookup", "Look a word up.", {"type": "object", "properties": {}})
HISTORY = [Message("system", "Be brief."), Message("user", "héllo there, what's up?")]
PCM = bytes(range(256)) * 40  # 10,240 bytes of "speech"


async def utterance(ms: int = 400) -> AsyncIterator[AudioChunk]:
    for _ in range(ms // 20):
        yield AudioChunk(b"\x01\x00" * 320, 16_000)


def client_for(base_url: str, path: str, timeout_s: float = 10.0) -> openai.AsyncOpenAI:
    return openai_client("sk-test", http=path).with_options(
        base_url=f"{base_url}/v1", timeout=timeout_s
    )


Turn = tuple[list[Transcript], list[LanguageModelEvent], bytes]


async def turn(client: openai.AsyncOpenAI) -> Turn:
    """A turn's three requests: its transcripts, the chat's events, the speech's PCM."""
    transcripts = [t async for t in OpenAISpeechToText(client).transcribe(utterance())]
    events = [e async for e in OpenAILanguageModel(client).generate(HISTORY, [LOOKUP])]
    tts = OpenAITextToSpeech(client)
    pcm = b"".join([c.pcm async for c in tts.synthesize("one two three", speed=1.25)])
    return transcripts, events, pcm


async def test_a_turns_requests_give_the_same_results_by_either_path() -> None:
    with FakeOpenAIServer() as server:
        results = {}
        for path in PATHS:
            async with client_for(server.base_url, path) as client:
                lean = OpenAILanguageModel(client)._lean
                assert (lean is not None) is (path == "lean")
                results[path] = await turn(client)
    transcripts, events, pcm = results["lean"]
    assert transcripts and transcripts[-1].final
    assert events and len(pcm) > 1000
    assert results["lean"] == results["sdk"]


# --- a scripted server ----------------------------------------------------------------------

Answer = Callable[[bytes], bytes]  # a request's head -> the bytes answered


@dataclass
class Scripted:
    """An HTTP/1.1 server on loopback recording each request (head and body, as received)
    and answering ``answer(head)``; then ``after``: "keep" the connection, "close" it
    without saying so, or "hold" it (no more bytes, not closed)."""

    answer: Answer
    after: str = "keep"
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    held: HeldConnections = field(default_factory=HeldConnections)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.held.hold(writer)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
                self.requests.append(head + await reader.readexactly(length))
                writer.write(self.answer(head))
                await writer.drain()
                if self.after == "hold":
                    await self.held.stopping.wait()
                if self.after != "keep":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def chunked_answer(content_type: bytes, body: bytes, piece_bytes: int = 7) -> bytes:
    pieces = [body[at : at + piece_bytes] for at in range(0, len(body), piece_bytes)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type
    return head + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"


def length_answer(content_type: bytes, body: bytes, status: bytes = b"200 OK") -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type
    return head + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body


CHAT = (
    b"".join(
        b"data: " + json.dumps(chunk).encode() + b"\n\n"
        for chunk in (
            {"choices": [{"index": 0, "delta": {"content": "Hi "}}]},
            {"choices": [{"index": 0, "delta": {"content": "there"}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}},
        )
    )
    + b"data: [DONE]\n\n"
)
TRANSCRIPTION = (
    b'data: {"type":"transcript.text.delta","delta":"hello"}\n\n'
    b'data: {"type":"transcript.text.done","text":"hello"}\n\n'
)


def by_path(head: bytes) -> bytes:
    """What the real API answers, framed as a server may: streams chunked, speech by length."""
    if b"/chat/completions" in head:
        return chunked_answer(b"text/event-stream", CHAT)
    if b"/audio/transcriptions" in head:
        return chunked_answer(b"text/event-stream", TRANSCRIPTION, 5)
    return length_answer(b"application/octet-stream", PCM)


def unbounded(request: bytes) -> bytes:
    """A request with its form's random boundary (and nothing else) made the same."""
    found = re.search(rb"boundary=([0-9a-f]{32})", request)
    return request if found is None else request.replace(found[1], b"B" * 32)


async def test_each_request_is_the_sdks_byte_for_byte_and_answers_alike() -> None:
    peer = Scripted(by_path)
    async with serving(peer) as url:
        results = {}
        for path in PATHS:
            async with client_for(url, path) as client:
                results[path] = await turn(client)
    sdk, lean = peer.requests[:3], peer.requests[3:]
    assert len(lean) == 3 and [unbounded(r) for r in lean] == [unbounded(r) for r in sdk]
    assert sdk[1].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nauthorization: Bearer sk-test\r\n" in sdk[1]
    assert b'"stream":true' in sdk[1] and b"Content-Type: multipart/form-data;" in sdk[0]
    assert results["lean"] == results["sdk"] and results["lean"][2] == PCM


async def test_organization_and_project_are_sent_as_the_sdk_sends_them() -> None:
    peer = Scripted(by_path)
    async with serving(peer) as url:
        for path in PATHS:
            client = client_for(url, path).with_options(organization="org-1", project="proj-2")
            async with client:
                _ = [e async for e in OpenAILanguageModel(client).generate(HISTORY, [])]
    assert len(peer.requests) == 2 and peer.requests[0] == peer.requests[1]
    assert b"\r\nopenai-organization: org-1\r\nopenai-project: proj-2\r\n" in peer.requests[0]


async def test_a_kept_alive_connection_carries_every_request() -> None:
    peer = Scripted(by_path)
    async with serving(peer) as url, client_for(url, "lean") as client:
        for _ in range(3):
            await turn(client)
        http = OpenAILanguageModel(client)._lean._http  # type: ignore[union-attr]
    assert len(peer.requests) == 9 and peer.connections == 1 and http.connections_made == 1


async def test_an_idle_connection_the_server_closed_is_not_used() -> None:
    peer = Scripted(by_path, after="close")
    async with serving(peer) as url, client_for(url, "lean") as client:
        tts = OpenAITextToSpeech(client)
        first = b"".join([c.pcm async for c in tts.synthesize("one")])
        http = tts._lean._http  # type: ignore[union-attr]
        await wait_for(lambda: http.idle_connections == 1 and _idle_ended(http))
        second = b"".join([c.pcm async for c in tts.synthesize("two")])
    assert first == second == PCM
    assert peer.connections == 2 and len(peer.requests) == 2 and http.connections_made == 2


SPEECH_REQUEST = b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
SAID_CLOSE = length_answer(b"audio/pcm", PCM).replace(b"OK\r\n", b"OK\r\nConnection: close\r\n")


@pytest.mark.parametrize(
    ("answer", "after", "read_whole", "reused"),
    [
        (length_answer(b"audio/pcm", PCM), "keep", True, True),
        (length_answer(b"audio/pcm", PCM), "keep", False, False),  # closed before its end
        (SAID_CLOSE, "keep", True, False),  # the server said close (and did not)
        (b"HTTP/1.1 200 OK\r\n\r\n" + PCM, "close", True, False),  # its end: the connection's
    ],
)
async def test_a_connection_is_reused_only_after_a_whole_framed_response(
    answer: bytes, after: str, read_whole: bool, reused: bool
) -> None:
    peer = Scripted(lambda _: answer, after=after)
    http = ProviderHTTP()
    async with serving(peer) as url:
        origin = Origin.of(httpx2.URL(url))
        for _ in range(2):
            response = await http.send(origin, SPEECH_REQUEST, Timeouts())
            if read_whole:
                assert await response.aread() == PCM
            await response.aclose()
        await http.aclose()
    assert http.connections_made == (1 if reused else 2) == peer.connections


BIG_BODY_BYTES = 16 * 1024 * 1024  # past what loopback sockets buffer for a peer not reading


def big_request() -> bytes:
    head = b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    return head % BIG_BODY_BYTES + b"y" * BIG_BODY_BYTES


async def test_a_requests_bytes_drain_before_its_answer_is_awaited() -> None:
    """A body bigger than the sockets' buffers (writing pauses): to a peer that reads it and
    does not answer, the request is sent whole, then waits for its answer (``ReadTimeout``,
    not ``WriteTimeout``); to a peer that never reads, the write's wait is ``WriteTimeout``."""
    reading, deaf = Scripted(lambda _: b"", after="hold"), DeafPeer()
    http = ProviderHTTP()
    try:
        async with serving(reading) as url:
            timeouts = Timeouts(read_s=0.3, write_s=10.0)
            with pytest.raises(httpx2.ReadTimeout, match="no progress in 0.3 s"):
                await http.send(Origin.of(httpx2.URL(url)), big_request(), timeouts)
        async with serving(deaf) as url:
            timeouts = Timeouts(read_s=10.0, write_s=0.3)
            with pytest.raises(httpx2.WriteTimeout, match="no progress in 0.3 s"):
                await http.send(Origin.of(httpx2.URL(url)), big_request(), timeouts)
    finally:
        await http.aclose()
    assert reading.requests == [big_request()]
    assert deaf.connections == 1 and http.connections_made == 2


def _idle_ended(http: ProviderHTTP) -> bool:
    return all(wire.ended for idle in http._idle.values() for wire in idle)


async def test_a_response_cut_mid_body_closes_its_connection() -> None:
    """Read to its end a response is kept; a body broken off is httpx's error, by either
    path, and the connection is not used again."""
    cut = length_answer(b"application/octet-stream", PCM)[:-100]
    for path in PATHS:
        peer = Scripted(lambda _: cut, after="close")
        async with serving(peer) as url, client_for(url, path) as client:
            with pytest.raises(ProviderError) as caught:
                _ = [c async for c in OpenAITextToSpeech(client).synthesize("x")]
        assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError), path
        assert caught.value.retryable


async def test_a_gzip_coded_body_is_undone_as_httpx_undoes_it() -> None:
    coded = gzip.compress(PCM)
    answer = length_answer(b"application/octet-stream", coded).replace(
        b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n", 1
    )
    for path in PATHS:
        peer = Scripted(lambda _: answer)
        async with serving(peer) as url, client_for(url, path) as client:
            tts = OpenAITextToSpeech(client)
            assert b"".join([c.pcm async for c in tts.synthesize("x")]) == PCM, path


def test_a_turn_on_uvloop_as_the_transceiver_runs_it() -> None:
    async def on_uvloop() -> tuple[Turn, int]:
        peer = Scripted(by_path)
        async with serving(peer) as url, client_for(url, "lean") as client:
            said = await turn(client)
            said = await turn(client)
        return said, peer.connections

    said, connections = uvloop.run(on_uvloop())
    assert said[2] == PCM and connections == 1


# --- errors: the SDK's, by either path --------------------------------------------------------


async def sdk_error_by_each_path(answer: bytes, after: str = "keep") -> list[BaseException]:
    """The exception under the ProviderError a speech request raises by the SDK's path, then
    by the lean one."""
    errors = []
    for path in ("sdk", "lean"):
        peer = Scripted(lambda _: answer, after=after)
        async with serving(peer) as url, client_for(url, path, timeout_s=0.3) as client:
            with pytest.raises(ProviderError) as caught:
                _ = [c async for c in OpenAITextToSpeech(client).synthesize("x")]
        assert caught.value.__cause__ is not None
        errors.append(caught.value.__cause__)
    return errors


ERROR_BODY = json.dumps(
    {"error": {"message": "Invalid voice", "type": "invalid_request_error", "code": "voice"}}
).encode()


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (b"400 Bad Request", openai.BadRequestError),
        (b"401 Unauthorized", openai.AuthenticationError),
        (b"404 Not Found", openai.NotFoundError),
        (b"500 Internal Server Error", openai.InternalServerError),
        (b"503 Service Unavailable", openai.InternalServerError),
    ],
)
async def test_an_error_status_is_the_sdks_exception_with_its_json_body(
    status: bytes, kind: type[openai.APIStatusError]
) -> None:
    answer = length_answer(b"application/json", ERROR_BODY, status)
    sdk, lean = await sdk_error_by_each_path(answer)
    assert type(sdk) is type(lean) is kind
    assert isinstance(lean, openai.APIStatusError) and isinstance(sdk, openai.APIStatusError)
    assert str(lean) == str(sdk) == f"Error code: {int(status[:3])} - Invalid voice"
    assert lean.body == sdk.body == json.loads(ERROR_BODY)["error"]
    assert lean.status_code == sdk.status_code and lean.response.text == sdk.response.text


async def test_a_429_keeps_its_retry_after_and_a_text_body_its_text() -> None:
    answer = length_answer(b"text/plain", b"slow down", b"429 Too Many Requests")
    answer = answer.replace(b"\r\n\r\n", b"\r\nRetry-After: 7\r\nx-request-id: req-1\r\n\r\n")
    sdk, lean = await sdk_error_by_each_path(answer)
    assert type(sdk) is type(lean) is openai.RateLimitError
    assert isinstance(lean, openai.RateLimitError) and isinstance(sdk, openai.RateLimitError)
    assert str(lean) == str(sdk) == "Error code: 429" and lean.body == sdk.body == "slow down"
    assert lean.response.headers["retry-after"] == sdk.response.headers["retry-after"] == "7"
    assert lean.request_id == sdk.request_id == "req-1"


async def test_a_silent_server_is_the_sdks_timeout() -> None:
    sdk, lean = await sdk_error_by_each_path(b"", after="hold")
    assert type(sdk) is type(lean) is openai.APITimeoutError
    assert str(lean) == str(sdk) == "Request timed out."


async def test_a_server_silent_mid_body_is_httpxs_read_timeout() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + PCM[:10]
    sdk, lean = await sdk_error_by_each_path(head, after="hold")
    assert type(sdk) is type(lean) is httpx2.ReadTimeout


async def test_a_server_closing_without_an_answer_is_a_connection_error() -> None:
    sdk, lean = await sdk_error_by_each_path(b"", after="close")
    assert type(sdk) is type(lean) is openai.APIConnectionError
    assert str(lean) == str(sdk) == "Connection error."
    assert isinstance(lean.__cause__, httpx2.RemoteProtocolError)


async def test_a_refused_connection_is_a_connection_error() -> None:
    peer = Scripted(by_path)
    async with serving(peer) as url:
        pass  # closed: nothing listens on its port now
    for path in PATHS:
        async with client_for(url, path) as client:
            with pytest.raises(ProviderError) as caught:
                _ = [e async for e in OpenAILanguageModel(client).generate(HISTORY, [])]
        assert type(caught.value.__cause__) is openai.APIConnectionError and caught.value.retryable


async def test_an_answer_that_is_not_http_is_a_connection_error() -> None:
    _, lean = await sdk_error_by_each_path(b"SSH-2.0-OpenSSH\r\n\r\n", after="close")
    assert type(lean) is openai.APIConnectionError
    assert "is not HTTP/1.1 nor HTTP/1.0" in str(lean.__cause__)


# --- TLS ------------------------------------------------------------------------------------


def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the server's context, a client's trusting the server's self-signed certificate)."""
    cert, key = self_signed(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    return served, ssl.create_default_context(cafile=str(cert))


def lean_over(http: ProviderHTTP, base_url: str) -> OpenAITextToSpeech:
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=f"{base_url}/v1", max_retries=0)
    tts = OpenAITextToSpeech(client)
    tts._lean = LeanRequests(tts._client, http)
    return tts


async def test_https_with_a_trusted_certificate_keeps_its_connection(tmp_path: Path) -> None:
    served, trusting = tls_contexts(tmp_path)
    peer = Scripted(by_path)
    http = ProviderHTTP(trusting)
    async with serving(peer, served) as url:
        tts = lean_over(http, url)
        for _ in range(2):
            assert b"".join([c.pcm async for c in tts.synthesize("x")]) == PCM
        await http.aclose()
    assert peer.connections == 1 and len(peer.requests) == 2


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_https_is_refused_untrusted_or_for_another_host(tmp_path: Path, host: str) -> None:
    """Untrusted: the CA set without the certificate; another host: the certificate is for
    127.0.0.1 and the client asked for localhost (its name checked, SNI sent)."""
    served, trusting = tls_contexts(tmp_path)
    peer = Scripted(by_path)
    http = ProviderHTTP(trusting if host == "localhost" else None)
    async with serving(peer, served) as url:
        tts = lean_over(http, url.replace("127.0.0.1", host))
        with pytest.raises(ProviderError) as caught:
            _ = [c async for c in tts.synthesize("x")]
        await http.aclose()
    assert type(caught.value.__cause__) is openai.APIConnectionError
    said = str(caught.value.__cause__.__cause__)
    assert "CERTIFICATE_VERIFY_FAILED" in said or "match" in said, said
    assert peer.requests == []


# --- the switch -------------------------------------------------------------------------------


def test_the_switch_is_a_setting_with_a_clear_error() -> None:
    assert PipelineConfig().provider_http == "lean"
    assert PipelineConfig.from_env({"PIPELINE_PROVIDER_HTTP": "sdk"}).provider_http == "sdk"
    with pytest.raises(ConfigError, match="PIPELINE_PROVIDER_HTTP must be one of lean, sdk"):
        PipelineConfig.from_env({"PIPELINE_PROVIDER_HTTP": "h2"})
    with pytest.raises(ValueError, match="http must be one of lean, sdk, not 'h2'"):
        openai_client("sk-test", http="h2")


async def test_a_client_with_a_key_provider_keeps_the_sdks_path() -> None:
    async def key() -> str:
        return "sk-rotated"

    async with openai_client("sk-test") as client:
        assert OpenAILanguageModel(client)._lean is not None
        assert OpenAILanguageModel(client.with_options(api_key=key))._lean is None


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
