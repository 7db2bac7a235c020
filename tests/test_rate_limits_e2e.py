"""Rate limits shared by two transceiver processes through a real Redis.

Two pipeline transceivers (the fake OpenAI server is the model and the voice) share one
redis-server; each key's requests, each client address's sessions and each key's tokens are
one bucket for both. Auth is off so that each test speaks with a key of its own (every bearer
is its own key then); the trusted proxy is 127.0.0.1, so a request from 127.0.0.1 names its
client in X-Forwarded-For and one from 127.0.0.2 (an untrusted peer on loopback) cannot.
While a key's tokens are spent, its responses (a ``response.create``'s, a server-VAD turn's,
an out-of-band one's) end as OpenAI ends them: ``response.done`` ``failed``,
``status_details.error`` of type ``tokens`` and code ``rate_limit_exceeded``. Client secrets
and GPT-Live's offer and WebSocket take from the same requests bucket and answer 429 the same
way (the SDK's ``RateLimitError``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
import pytest_asyncio
import websockets
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.resources.realtime.translations.translations import AsyncTranslationsConnection
from openai.types.realtime import RateLimitsUpdatedEvent
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from test_sdp import CHROME_OFFER
from websocket_harness import EventLog, openai_client, spoken_question

from deploy.fake_openai import FakeOpenAIServer
from deploy.processes import (
    Process,
    free_port,
    metric_values,
    random_keys,
    text,
    transceiver_process,
)
from deploy.redis_server import RedisServer, redis_server_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
# A key's next request refills in WINDOW_S / REQUESTS (10 s): the refill test waits that out,
# and the others spend a bucket in well under it.
REQUESTS, SESSIONS, TOKENS, WINDOW_S = 3, 2, 20, 30
UNTRUSTED_PEER = "127.0.0.2"
DEADLINE_S = 120.0
SERVER_EVENT = pydantic.TypeAdapter(RealtimeServerEvent)
TRANSCRIBED = "conversation.item.input_audio_transcription"


@dataclass
class Stack:
    urls: tuple[str, str]


@contextmanager
def transceivers(fake_url: str, redis: RedisServer, log_dir: Path) -> Iterator[tuple[str, str]]:
    """Two transceivers started side by side (logs under ``log_dir``/a and /b), ready; each
    must stop cleanly."""
    processes, urls = [], []
    for name in ("a", "b"):
        (log_dir / name).mkdir()
        process, url = transceiver(fake_url, redis, log_dir / name)
        processes.append(process)
        urls.append(url)
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_ready(timeout_s=90)  # both start at once: a loaded machine's pace
        yield urls[0], urls[1]
    finally:
        returncodes = [asyncio.run(process.stop()) for process in processes]
    for name, process, returncode in zip("ab", processes, returncodes, strict=True):
        assert returncode == 0, process.log_tail()
        log = (log_dir / name / "transceiver.log").read_text()
        assert "Traceback" not in log, process.log_tail()


def transceiver(fake_url: str, redis: RedisServer, log_dir: Path) -> tuple[Process, str]:
    """A transceiver process (not started) logging to ``log_dir``, and its HTTP base URL."""
    link = ("127.0.0.1", free_port())
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_url + "/v1",
        "PIPELINE_STT": "pocketsphinx",
        "PIPELINE_LLM": "openai",
        "PIPELINE_TTS": "openai",
        "REDIS_URL": redis.url,
        "TRANSCEIVER_CAPACITY": "10",
        "TRANSCEIVER_RATE_LIMIT_REQUESTS": str(REQUESTS),
        "TRANSCEIVER_RATE_LIMIT_SESSIONS": str(SESSIONS),
        "TRANSCEIVER_RATE_LIMIT_TOKENS": str(TOKENS),
        "TRANSCEIVER_RATE_LIMIT_WINDOW_S": str(WINDOW_S),
        "TRANSCEIVER_TRUSTED_PROXIES": "127.0.0.1/32",
    }
    process = transceiver_process(
        "transceiver", link, http, "127.0.0.1:3478", random_keys(), log_dir, env,
        agent="pipeline", auth="off",
    )  # fmt: skip
    return process, f"http://{text(http)}"


@pytest.fixture(scope="module")
def stack(server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("rate_limits")
    redis = RedisServer(log_dir, "redis").start()
    try:
        with transceivers(server.base_url, redis, log_dir) as urls:
            yield Stack(urls)
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def question() -> bytes:
    """ "Tell me about the moon." (piper, noise off) between silences, PCM16 at 24 kHz."""
    return spoken_question()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def new_key() -> str:
    return "key-" + os.urandom(8).hex()


def client_at(n: int) -> str:
    return f"198.51.100.{n}"


async def offer(
    http: httpx.AsyncClient, base_url: str, key: str, forwarded_for: str | None = None
) -> httpx.Response:
    headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {key}"}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    response = await http.post(
        base_url + "/v1/realtime/calls", content=CHROME_OFFER, headers=headers
    )
    if response.status_code == 201:  # the call will never connect: hang it up now
        hangup = await http.delete(base_url + response.headers["Location"], headers=headers)
        assert hangup.status_code == 204
    return response


def assert_refused(response: httpx.Response, kind: str, name: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (kind, "rate_limit_exceeded", None)
    assert "Rate limit reached" in error["message"]
    headers = response.headers
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
    assert headers[f"x-ratelimit-limit-{name}"] == str(REQUESTS if name == "requests" else SESSIONS)
    assert headers[f"x-ratelimit-remaining-{name}"] == "0"
    assert headers[f"x-ratelimit-reset-{name}"].endswith("s")


async def test_a_keys_next_offer_is_refused_on_either_transceiver_until_it_refills(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    key = new_key()
    first, second = stack.urls
    remaining = []
    for n, base_url in enumerate((first, second, first)):
        response = await offer(http, base_url, key, client_at(n))  # a trusted proxy's clients
        assert response.status_code == 201, response.text
        assert response.headers["x-ratelimit-limit-requests"] == str(REQUESTS)
        remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] < REQUESTS - 1
    for n, base_url in enumerate((second, first), start=10):
        assert_refused(await offer(http, base_url, key, client_at(n)), "requests", "requests")
    metrics = (await http.get(second + "/metrics")).text
    assert metric_values(metrics, "transceiver_rate_limit_refusals_total")["requests"] >= 1
    accepted = await offer_when_refilled(http, second, key)
    assert accepted.status_code == 201, accepted.text
    assert int(accepted.headers["x-ratelimit-remaining-requests"]) == 0


async def offer_when_refilled(http: httpx.AsyncClient, base_url: str, key: str) -> httpx.Response:
    """The key's next accepted offer, trying again as each refusal's retry-after says."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    for n in range(20, 200):
        response = await offer(http, base_url, key, client_at(n))
        if response.status_code == 201 or loop.time() > deadline:
            return response
        assert response.status_code == 429, response.text
        await asyncio.sleep(int(response.headers["retry-after-ms"]) / 1000)  # as a client would
    raise AssertionError("never accepted again")


async def test_a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(
    stack: Stack,
) -> None:
    key = new_key()
    first, second = stack.urls
    transport = httpx.AsyncHTTPTransport(local_address=UNTRUSTED_PEER)
    async with httpx.AsyncClient(transport=transport, timeout=30) as untrusted:
        for n in range(SESSIONS):
            response = await offer(untrusted, first, key, client_at(100 + n))
            assert response.status_code == 201, response.text
        spoofed = await offer(untrusted, first, key, client_at(150))
    assert_refused(spoofed, "requests", "sessions")
    # A WebSocket handshake from the same peer, to the other transceiver: 429 before the upgrade.
    host, port = second.removeprefix("http://").rsplit(":", 1)
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(
            f"ws://{host}:{port}/v1/realtime?model=m",
            additional_headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": "1.2.3.4"},
            local_addr=(UNTRUSTED_PEER, 0),
        ):
            pass
    response = refused.value.response
    assert response.status_code == 429
    assert json.loads(response.body)["error"]["code"] == "rate_limit_exceeded"
    assert response.headers["x-ratelimit-remaining-sessions"] == "0"


async def test_rate_limits_updated_follows_a_response_and_spent_tokens_fail_the_next(
    stack: Stack, question: bytes
) -> None:
    client = openai_client(stack.urls[1], new_key())
    async with client.realtime.connect(model="gpt-realtime") as connection:
        events = Events(connection)
        await events.next("session.created")
        long = "Answer in the fewest words you can. " * 20  # over the tokens limit by itself
        await connection.session.update(session={"type": "realtime", "instructions": long})
        await events.next("session.updated")
        item = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "hi"}],
        }
        await connection.conversation.item.create(item=item)
        await connection.response.create()
        done = await events.next("response.done")
        assert done["response"]["usage"]["total_tokens"] > TOKENS
        updated = RateLimitsUpdatedEvent.model_validate(await events.next("rate_limits.updated"))
        limits = {limit.name: limit for limit in updated.rate_limits}
        assert set(limits) == {"requests", "tokens"}
        assert (limits["tokens"].limit, limits["tokens"].remaining) == (TOKENS, 0)
        assert limits["tokens"].reset_seconds is not None
        assert limits["tokens"].reset_seconds > WINDOW_S  # in debt: more than a window to full
        requests = limits["requests"]
        assert requests.limit == REQUESTS and requests.remaining is not None
        assert REQUESTS - 1 <= requests.remaining <= REQUESTS
        spent = len(events.seen)
        await connection.response.create()  # the key's tokens are spent
        assert_failed_for_tokens(await events.next("response.done"), events)
        await append(connection, question)  # a server-VAD turn: heard, transcribed, not answered
        heard = await events.next(f"{TRANSCRIBED}.completed", timeout_s=DEADLINE_S)
        assert "moon" in heard["transcript"].lower().split(), heard
        assert_failed_for_tokens(await events.next("response.done"), events)
        await connection.response.create(response={"conversation": "none"})  # out of band
        beside = await events.next("response.done")
        assert_failed_for_tokens(beside, events)
        assert beside["response"]["conversation_id"] is None, beside
        after = [e["type"] for e in events.seen[spent:]]
        assert "error" not in after and "response.output_item.added" not in after, after


def assert_failed_for_tokens(done: dict[str, Any], events: Events) -> None:
    """``done`` is OpenAI's failed response of a key whose tokens are spent: created first, no
    output, the error's type ``tokens`` and code ``rate_limit_exceeded``; no tokens used."""
    response = done["response"]
    assert response["status"] == "failed", response
    error = response["status_details"]["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded"), error
    assert "Rate limit reached on tokens" in error["message"], error
    created = [e["response"]["id"] for e in events.of("response.created")]
    assert created[-1] == response["id"] and response["output"] == [], response
    assert response["usage"]["total_tokens"] == 0, response


class Events(EventLog[AsyncRealtimeConnection]):
    def check(self, event: dict[str, Any]) -> None:
        assert SERVER_EVENT.validate_python(event).type == event["type"], event


async def append(connection: AsyncRealtimeConnection, pcm: bytes) -> None:
    step = 24_000 * 2 // 5  # 200 ms per append, as a microphone would send
    for start in range(0, len(pcm), step):
        chunk = base64.b64encode(pcm[start : start + step]).decode()
        await connection.input_audio_buffer.append(audio=chunk)


async def test_a_translation_spends_its_keys_tokens_and_the_next_one_fails(
    stack: Stack, question: bytes
) -> None:
    """A translation session's translations take from its key's tokens too: the interpreter's
    instruction alone is over the limit, so the utterance after the first is not translated
    and an ``error`` says why (a translation session has no ``rate_limits.updated``)."""
    client = openai_client(stack.urls[0], new_key()).realtime.translations
    async with client.connect(model="gpt-realtime-translate") as connection:
        events = EventLog(connection)
        await events.next("session.created")
        await append_to_translate(connection, question)
        await events.next("session.output_transcript.delta", timeout_s=DEADLINE_S)
        await append_to_translate(connection, question)
        error = (await events.next("error", timeout_s=DEADLINE_S))["error"]
        assert error["code"] == "translation_failed", error
        assert "Rate limit reached on tokens" in error["message"], error


async def append_to_translate(connection: AsyncTranslationsConnection, pcm: bytes) -> None:
    step = 24_000 * 2 // 5  # 200 ms per append, as OpenAI advises
    for start in range(0, len(pcm), step):
        chunk = base64.b64encode(pcm[start : start + step]).decode()
        await connection.session.input_audio_buffer.append(audio=chunk)


async def test_client_secrets_are_refused_in_openais_shape_once_the_keys_requests_are_spent(
    stack: Stack,
) -> None:
    client = openai_client(stack.urls[0], new_key())
    for spent in range(1, REQUESTS + 1):
        minted = await client.realtime.client_secrets.with_raw_response.create()
        assert minted.status_code == 200, minted.text
        assert minted.headers["x-ratelimit-remaining-requests"] == str(REQUESTS - spent)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.realtime.client_secrets.create()
    assert_refused(refused.value.response, "requests", "requests")
    assert "x-ratelimit-limit-sessions" not in refused.value.response.headers  # no session


async def test_live_sessions_and_their_websocket_are_refused_once_the_keys_requests_are_spent(
    stack: Stack,
) -> None:
    key = new_key()
    client = openai_client(stack.urls[1], key)
    for _ in range(REQUESTS):  # the key's requests, spent on either transceiver
        assert (await openai_client(stack.urls[0], key).realtime.client_secrets.create()).value
    offer = {"type": "webrtc", "sdp": CHROME_OFFER}
    with pytest.raises(openai.RateLimitError) as refused:
        await client.live.create(session={"model": "gpt-live-1"}, transport=offer)  # type: ignore[arg-type]
    assert_refused(refused.value.response, "requests", "requests")
    assert refused.value.code == "rate_limit_exceeded"
    host, port = stack.urls[0].removeprefix("http://").rsplit(":", 1)
    with pytest.raises(websockets.InvalidStatus) as handshake:
        async with websockets.connect(
            f"ws://{host}:{port}/v1/live/sessions",
            additional_headers={"Authorization": f"Bearer {key}"},
        ):
            pass
    response = handshake.value.response
    assert response.status_code == 429
    error = json.loads(response.body)["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded"), error
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(response.headers["retry-after-ms"]) > 0
