"""Resume after a transceiver dies: a real redis-server, a real relay, two pipeline transceivers
and an aiortc Realtime client. The client asks a knowledge question on transceiver A; A is
SIGKILLed; the client posts a new offer naming its session (with its resume token) through the
relay to transceiver B and asks "what did I just ask?" - B answers from the stored history.
A wrong or missing resume token is refused (401/403) and leaves the stored session alone.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
from aiortc import RTCSessionDescription
from realtime_client import RealtimeClient
from redis_server import RedisServer, redis_server_binary
from stack import Stack, eventually

from transceiver.redis_config import RedisConfig
from transceiver.session_keys import SessionState
from transceiver.session_store import RedisSessionStore

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
SESSION_HEADER = "X-Voicerelay-Session"
TOKEN_HEADER = "X-Voicerelay-Resume-Token"
Event = dict[str, object]


@dataclass
class Survival:
    redis: RedisServer
    stack: Stack
    store: RedisSessionStore


@asynccontextmanager
async def survival_stack(
    log_dir: Path,
    transceivers: int = 2,
    redis_args: tuple[str, ...] = (),
    capacity: int | None = None,
) -> AsyncIterator[Survival]:
    """redis-server, then a relay in front of pipeline transceivers that store sessions in it
    (each taking at most ``capacity`` sessions, when given)."""
    redis = RedisServer(log_dir, "redis", redis_args).start()
    config = RedisConfig(url=redis.url)
    try:
        async with pipeline_stack(log_dir, config, transceivers, capacity) as running:
            yield Survival(redis, *running)
    finally:
        redis.stop()


@asynccontextmanager
async def pipeline_stack(
    log_dir: Path, config: RedisConfig, transceivers: int = 2, capacity: int | None = None
) -> AsyncIterator[tuple[Stack, RedisSessionStore]]:
    """A relay in front of pipeline transceivers storing sessions per ``config``; a store to
    read what they stored."""
    stack = Stack(log_dir, transceivers=transceivers, workers=1, agent="pipeline")
    env = {**redis_env(config), "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}
    env |= {"PIPELINE_PIPER_NOISE_SCALE": "0", "PIPELINE_PIPER_NOISE_W_SCALE": "0"}
    for process in stack.transceivers:
        process.env.update(env)
        process.argv += [] if capacity is None else ["--capacity", str(capacity)]
    store = RedisSessionStore.from_config(config)
    try:
        for process in [*stack.transceivers, stack.relay]:
            process.start()
        for process in [*stack.transceivers, stack.relay]:
            await process.ready(timeout_s=90)
        yield stack, store
    finally:
        await stack.stop()
        await store.aclose()


def redis_env(config: RedisConfig) -> dict[str, str]:
    """The ``REDIS_*`` variables from which a transceiver loads exactly ``config``."""
    env = {
        "REDIS_URL": config.url or "",
        "REDIS_SENTINELS": ",".join(f"{host}:{port}" for host, port in config.sentinels),
        "REDIS_SENTINEL_SERVICE": config.sentinel_service or "",
        "REDIS_PASSWORD": config.password or "",
        "REDIS_KEY_PREFIX": config.key_prefix,
        "REDIS_SESSION_TTL_S": str(config.session_ttl_s),
        "REDIS_MAX_ITEMS": str(config.max_items),
        "REDIS_WAIT_REPLICAS": str(config.wait_replicas),
        "REDIS_WAIT_TIMEOUT_MS": str(config.wait_timeout_ms),
        "REDIS_CONNECT_TIMEOUT_S": str(config.connect_timeout_s),
        "REDIS_SOCKET_TIMEOUT_S": str(config.socket_timeout_s),
        "REDIS_ROUTE_TTL_S": str(config.route_ttl_s),
    }
    assert RedisConfig.from_env(env) == config, env
    return env


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def survival(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Survival]:
    async with survival_stack(tmp_path_factory.mktemp("resume")) as running:
        yield running


async def call(
    client: RealtimeClient,
    http: httpx.AsyncClient,
    base_url: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> httpx.Response:
    """POST the client's offer; on 201 apply the answer and wait for session.created."""
    if client.pc.localDescription is None:
        await client.pc.setLocalDescription(await client.pc.createOffer())
    response = await http.post(
        base_url + "/v1/realtime/calls",
        content=client.pc.localDescription.sdp,
        headers={"Content-Type": "application/sdp", **(headers or {})},
        params=params,
    )
    if response.status_code == 201:
        answer = RTCSessionDescription(sdp=response.text, type="answer")
        await client.pc.setRemoteDescription(answer)
        await client.wait_for("session.created", timeout_s=15)
    return response


async def opened(client: RealtimeClient, http: httpx.AsyncClient, base_url: str) -> tuple[str, str]:
    """A new call from ``client``: its session id and resume token."""
    created = await call(client, http, base_url)
    assert created.status_code == 201, created.text
    return created.headers[SESSION_HEADER], created.headers[TOKEN_HEADER]


async def resume(
    client: RealtimeClient, http: httpx.AsyncClient, base_url: str, session_id: str, token: str
) -> httpx.Response:
    return await call(client, http, base_url, {TOKEN_HEADER: token}, {"session_id": session_id})


def acknowledged(client: RealtimeClient, after: int = 0) -> list[tuple[str, str]]:
    """(role, text) of every message the server told the client is done (from event index
    ``after``), in that order."""
    told = []
    for event in client.events[after:]:
        item = event.get("item", {})
        if event["type"] == "conversation.item.done" and item["type"] == "message":
            part = item["content"][0]
            told.append((item["role"], part.get("text", part.get("transcript", ""))))
    return told


async def ask(client: RealtimeClient, words: str) -> str:
    """A text turn; the answer's transcript as heard."""
    start = len(client.events)
    content = [{"type": "input_text", "text": words}]
    item = {"type": "message", "role": "user", "content": content}
    client.send({"type": "conversation.item.create", "item": item})
    client.send({"type": "response.create"})
    done = await client.wait_for("response.done", after=start, timeout_s=60)
    output = done["response"]["output"]
    return " ".join(part["transcript"] for i in output for part in i.get("content", ()))


async def stored(survival: Survival, session_id: str) -> SessionState:
    return await survival.store.load(session_id)


async def stored_until(
    survival: Survival,
    session_id: str,
    predicate: Callable[[SessionState], bool],
    timeout_s: float = 10.0,
) -> SessionState:
    """The stored session once ``predicate`` holds (polled with a deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate(state := await stored(survival, session_id)):
        assert loop.time() < deadline, f"never matched: turn {state.turn}, {contents(state)}"
        await asyncio.sleep(0.05)
    return state


async def answered_and_stored(
    survival: Survival, client: RealtimeClient, session_id: str, words: str
) -> tuple[str, SessionState]:
    """A text turn (see ``ask``) and the stored session once its answer is stored."""
    answer = await ask(client, words)
    state = await stored_until(
        survival, session_id, lambda st: ("assistant", answer) in contents(st)
    )
    return answer, state


def contents(state: SessionState) -> list[tuple[str, str]]:
    return [(item["role"], item["content"]) for item in state.items]


def audible(client: RealtimeClient) -> bool:
    return any(np.frombuffer(frame, dtype=np.int16).any() for frame in client.heard)


async def test_a_killed_transceivers_session_resumes_elsewhere_with_its_conversation(
    survival: Survival,
) -> None:
    first, second = RealtimeClient(), RealtimeClient()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            session_id, token = await opened(first, http, survival.stack.base_url(0))
            hello = await first.wait_for("session.created")
            assert hello["voicerelay"] == {"session_id": session_id, "resume_token": token}
            answer = await ask(first, "Tell me about water.")
            assert answer.startswith("Water covers"), answer

            state = await stored_until(
                survival, session_id, lambda st: ("assistant", answer) in contents(st)
            )
            before = contents(state)

            killed_at = time.monotonic()
            survival.stack.transceivers[0].send_signal(signal.SIGKILL)
            await survival.stack.transceivers[0].exited(10)
            resumed = await resume(second, http, survival.stack.base_url(1), session_id, token)
            assert resumed.status_code == 201, resumed.text
            assert resumed.headers[SESSION_HEADER] == session_id
            await second.wait_for("session.updated")
            recall = await ask(second, "What did I just ask?")
            await eventually(lambda: audible(second), 30, "the resumed session's first audio")
            print(f"\ntransceiver kill to first audio on the new one: "
                  f"{(time.monotonic() - killed_at) * 1000:.0f} ms")  # fmt: skip
        assert recall == "You asked: Tell me about water.", recall
        after = await stored(survival, session_id)
        assert contents(after)[: len(before)] == before  # no committed item lost
        assert ("user", "What did I just ask?") in contents(after)
        assert after.owner_id != state.owner_id and after.token > state.token
    finally:
        await first.close()
        await second.close()


async def test_resume_without_or_with_a_wrong_token_is_refused_and_the_session_untouched(
    survival: Survival,
) -> None:
    owner = RealtimeClient()
    stranger = RealtimeClient()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            base_url = survival.stack.base_url(1)
            created = await call(owner, http, base_url)
            session_id = created.headers[SESSION_HEADER]
            before = await stored(survival, session_id)
            missing = await call(stranger, http, base_url, {SESSION_HEADER: session_id})
            assert missing.status_code == 401, missing.text
            assert missing.json()["error"]["code"] == "missing_resume_token"
            wrong = await call(
                stranger, http, base_url, {TOKEN_HEADER: "not-the-token"},
                {"session_id": session_id},
            )  # fmt: skip
            assert wrong.status_code == 403, wrong.text
            assert wrong.json()["error"]["code"] == "invalid_resume_token"
            unknown = await call(
                stranger, http, base_url, {TOKEN_HEADER: created.headers[TOKEN_HEADER]},
                {"session_id": "sess_nobody"},
            )  # fmt: skip
            assert unknown.status_code == 403, unknown.text
            after = await stored(survival, session_id)
            assert (after.owner_id, after.token) == (before.owner_id, before.token)
            assert after.items == before.items
            assert await ask(owner, "Tell me about the moon.")  # the owner goes on talking
    finally:
        await owner.close()
        await stranger.close()
