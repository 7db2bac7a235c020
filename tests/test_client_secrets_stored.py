"""Client secrets whose session is too large to carry, kept in a real Redis.

Two pipeline transceivers (auth required, one secret keyring, one redis-server; the fake
OpenAI server is the model and the voice). A session of ~40 KB of instructions does not fit in
an ``ek_`` secret, so the secret names it in Redis, for as long as the secret lives; a session
opened with that secret on either transceiver starts with those instructions, and a WebRTC
offer with it is answered (and hung up with it). A secret naming a
session no longer stored, or expired, is refused as an expired secret is. Driven by the
official ``openai`` SDK, unchanged but for its base URL.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from test_sdp import CHROME_OFFER
from websocket_harness import EventLog, openai_client, transceiver_process_with

from deploy.fake_openai import FakeOpenAIServer
from deploy.processes import random_secret_keys
from deploy.redis_server import RedisServer, redis_server_binary
from transceiver.http import client_secrets
from transceiver.store.secret_sessions import secret_session_key

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
API_KEY = "vr-stored-" + os.urandom(12).hex()
SECRET_KEYS = random_secret_keys()
SIGNING_KEY = client_secrets.signing_key(bytes.fromhex(SECRET_KEYS.partition(":")[2]))
PREFIX = "voicerelay"  # REDIS_KEY_PREFIX's default


def long_instructions(size_bytes: int = 40_000) -> str:
    """Instructions that deflate to far more than a secret carries (random words, not a run)."""
    words: list[str] = []
    while sum(len(word) + 1 for word in words) < size_bytes:
        words.append(os.urandom(4).hex())
    return "Answer briefly. " + " ".join(words)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("stored-secrets-redis"), "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def transceivers(
    server: FakeOpenAIServer, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    env = {"REDIS_URL": redis_url, "TRANSCEIVER_SECRET_KEYS": SECRET_KEYS}
    first_dir, second_dir = (tmp_path_factory.mktemp(name) for name in ("minter", "other"))
    with (
        transceiver_process_with(server.base_url, API_KEY, 2, Path(first_dir), env) as first,
        transceiver_process_with(server.base_url, API_KEY, 2, Path(second_dir), env) as second,
    ):
        yield first, second


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def created_session(base_url: str, secret: str) -> dict[str, Any]:
    """The session ``session.created`` reports on a WebSocket opened with ``secret``."""
    async with openai_client(base_url, secret).realtime.connect(model="m") as connection:
        events = EventLog[AsyncRealtimeConnection](connection)
        session: dict[str, Any] = (await events.next("session.created"))["session"]
        return session


async def call_with(base_url: str, secret: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/sdp"}
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(
            base_url + "/v1/realtime/calls", content=CHROME_OFFER, headers=headers
        )


async def test_a_large_session_is_kept_in_redis_and_opens_sessions_on_any_transceiver(
    transceivers: tuple[str, str], store: aioredis.Redis
) -> None:
    minter, other = transceivers
    instructions = long_instructions()
    asked = {"type": "realtime", "instructions": instructions}
    secret = await openai_client(minter, API_KEY).realtime.client_secrets.create(
        session=asked,  # type: ignore[arg-type]
        expires_after={"anchor": "created_at", "seconds": 120},
    )
    assert secret.session.type == "realtime"
    assert secret.session.instructions == instructions  # the session it starts, reported
    assert len(secret.value) < 200  # the reference, not the session
    reference = client_secrets.verify(SIGNING_KEY, secret.value, time.time()).reference
    assert reference is not None
    ttl_s = await store.ttl(secret_session_key(PREFIX, reference))
    assert 0 < ttl_s <= 120  # kept as long as the secret lives, no longer
    for base_url in (minter, other):
        assert (await created_session(base_url, secret.value))["instructions"] == instructions
    offered = await call_with(other, secret.value)  # a WebRTC offer takes it too
    assert offered.status_code == 201, offered.text
    headers = {"Authorization": f"Bearer {secret.value}"}
    async with httpx.AsyncClient(timeout=30) as http:
        hung_up = await http.delete(other + offered.headers["location"], headers=headers)
    assert hung_up.status_code == 204, hung_up.text


async def test_a_secret_whose_session_is_no_longer_stored_is_refused_as_expired(
    transceivers: tuple[str, str], store: aioredis.Redis
) -> None:
    minter, other = transceivers
    session = {"type": "realtime", "instructions": long_instructions()}
    secret = await openai_client(minter, API_KEY).realtime.client_secrets.create(session=session)  # type: ignore[arg-type]
    reference = client_secrets.verify(SIGNING_KEY, secret.value, time.time()).reference
    assert reference is not None
    assert await store.delete(secret_session_key(PREFIX, reference)) == 1  # as if it expired
    unknown = client_secrets.mint_reference(SIGNING_KEY, time.time(), 60, "x" * 22, session)
    expired = client_secrets.mint_reference(SIGNING_KEY, time.time() - 600, 60, "y" * 22, session)
    for value in (secret.value, unknown.value, expired.value):
        for base_url in (minter, other):
            response = await call_with(base_url, value)
            assert response.status_code == 401, response.text
            error = response.json()["error"]
            assert error["code"] == "client_secret_expired", error
    missing = (await call_with(other, unknown.value)).json()["error"]["message"]
    assert "no longer stored" in missing and "mint a new client secret" in missing


async def test_a_small_session_still_rides_in_the_secret(
    transceivers: tuple[str, str], store: aioredis.Redis
) -> None:
    minter, other = transceivers
    asked = {"type": "realtime", "instructions": "Answer in one short sentence."}
    kept_before = await store.keys(f"{PREFIX}:secret-session:*")
    secret = await openai_client(minter, API_KEY).realtime.client_secrets.create(session=asked)  # type: ignore[arg-type]
    carried = client_secrets.verify(SIGNING_KEY, secret.value, time.time())
    assert carried.reference is None and carried.session == asked
    assert await store.keys(f"{PREFIX}:secret-session:*") == kept_before  # nothing stored
    assert (await created_session(other, secret.value))["instructions"] == asked["instructions"]
