"""Each turn's retries and fallbacks in its call record, end to end: a real transceiver process
(language model and speech from the fake OpenAI server, hardened, with the offline fallbacks;
Redis for the records) and the official ``openai`` SDK over the Realtime WebSocket.

The fake refuses the turn's first chat request with a 503 (retryable: the same model answers the
retry) and its first speech request with a 400 (a refusal for good: piper takes over). The
record at ``GET /v1/calls/{id}`` lists both, in order, with the stage, from and to, the reason,
the attempts and that they were served; and, as this client never reports a heard time, the
turn's ``heard`` is null. In process, against the same fake: what a reporting view tells of a
call whose retries run out, with a fallback and without, and of a fallback that fails too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from websocket_harness import EventLog, ask_in_text, openai_client, transceiver_process_with

from deploy.fake_openai import FakeOpenAIServer
from deploy.redis_server import RedisServer, redis_server_binary
from deploy.survival import redis_env
from deploy.waiting import poll
from pipeline.openai_providers import OpenAILanguageModel
from pipeline.providers import Message, ProviderError
from pipeline.resilience import Detour, harden_llm, reporting
from relay.wire.redis_config import RedisConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
API_KEY = "detours-api-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The transceiver's HTTP base URL (its records in a redis-server of its own)."""
    log_dir = tmp_path_factory.mktemp("detours")
    redis = RedisServer(log_dir, "redis").start()
    env = redis_env(RedisConfig(url=redis.url))
    try:
        with transceiver_process_with(server.base_url, API_KEY, 1, log_dir, env) as base_url:
            yield base_url
    finally:
        redis.stop()


async def test_a_turns_retry_and_fallback_are_in_its_record(
    server: FakeOpenAIServer, transceiver: str
) -> None:
    await server.reset()
    await server.control(fail={"chat": [503], "speech": [400]})
    sdk = openai_client(transceiver, API_KEY)
    async with sdk.realtime.connect(model="gpt-realtime") as connection:
        events = EventLog[AsyncRealtimeConnection](connection)
        session_id = (await events.next("session.created"))["session"]["id"]
        await ask_in_text(connection, "Tell me about the moon.")
        done = await events.next("response.done")
        assert done["response"]["status"] == "completed", done
        assert "error" not in events.types(), events.seen
        async with httpx.AsyncClient(timeout=10) as http:
            record = await turned(http, f"{transceiver}/v1/calls/{session_id}")
    stats = await server.stats()
    assert stats["hits"]["chat"] == 2 and stats["hits"]["speech"] >= 1, stats

    (turn,) = record["turns"]
    retry, fallback = turn["detours"]
    llm, tts = turn["stages"]["llm"], turn["stages"]["tts"]
    assert llm["provider"] == "openai-llm" and tts["provider"] == "openai-tts", turn["stages"]
    primary_llm, primary_tts = f"openai-llm/{llm['model']}", f"openai-tts/{tts['model']}"
    assert {k: retry[k] for k in ("stage", "kind", "from", "to", "attempts", "served")} == {
        "stage": "llm", "kind": "retry", "from": primary_llm, "to": primary_llm,
        "attempts": 2, "served": True,
    }  # fmt: skip
    assert "503" in retry["reason"], retry
    assert {k: fallback[k] for k in ("stage", "kind", "from", "attempts", "served")} == {
        "stage": "tts", "kind": "fallback", "from": primary_tts, "attempts": 1, "served": True,
    }  # fmt: skip
    assert fallback["to"].startswith("piper") and "400" in fallback["reason"], fallback
    assert turn["heard"] is None  # this client never said when it heard the answer


async def turned(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """The record once its first turn is stored."""

    async def read() -> dict[str, Any]:
        response = await http.get(url, headers=AUTH)
        found: dict[str, Any] = response.json() if response.status_code == 200 else {}
        return found

    def stored(record: dict[str, Any]) -> bool:
        return bool(record.get("turns"))

    return await poll(read, stored, 15, lambda last: f"no turn stored: {last}", 0.05)


async def no_pause(_: float) -> None:
    pass


async def detours_of(llm: Any, failing: bool = False) -> list[Detour]:
    """The detours one call through a reporting view of ``llm`` tells."""
    told: list[Detour] = []
    stream = reporting(llm, told.append).generate([Message("user", "hello")], [])
    if failing:
        with pytest.raises(ProviderError):
            [event async for event in stream]
    else:
        assert [event async for event in stream]
    return told


async def test_a_view_tells_each_calls_retries_and_fallbacks(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    first, second = OpenAILanguageModel(client, "m1"), OpenAILanguageModel(client, "m2")
    both = harden_llm(first, second, sleep=no_pause)
    assert await detours_of(both) == []  # answered at once: nothing to tell
    await server.control(fail={"chat:m1": [503, 503, 503]})
    (told,) = await detours_of(both)
    assert told == Detour("llm", "fallback", first.name, second.name, told.reason, 3, True)
    assert told.reason == f"{first.name}: HTTP 503: Error code: 503 - injected 503 on chat:m1"

    await server.control(fail={"chat:m1": [503, 503, 503]})
    (told,) = await detours_of(harden_llm(first, sleep=no_pause), failing=True)
    assert (told.kind, told.to_provider, told.attempts, told.served) == (
        "retry",
        first.name,
        3,
        False,
    )

    await server.control(fail={"chat:m1": [400], "chat:m2": [400]})
    (told,) = await detours_of(both, failing=True)
    assert (told.kind, told.from_provider, told.to_provider) == (
        "fallback",
        first.name,
        second.name,
    )
    assert (told.attempts, told.served) == (1, False) and "400" in told.reason, told
    assert await detours_of(second) == []  # not hardened: it takes no detours, tells none
