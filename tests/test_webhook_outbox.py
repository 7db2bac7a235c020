"""The ``call.ended`` outbox (``transceiver.store.outbox``) and its sender
(``transceiver.webhooks``) against a real redis-server, in process, with a receiver on loopback:
claims lease an event, a retry keeps its attempt count and due time in Redis, only the latest
claim may reschedule, an ack removes it, the outbox is bounded (a counted drop); a leg's end
reserves its event in the same transaction, and a sender builds the body from the record when
the writer that ended the leg never did; retries, giving up, and a crash of the sender's loop
(logged, counted, the event delivered after its claim times out).

Across processes: a pipeline transceiver (the WebSocket harness: the ``openai`` SDK, the fake
OpenAI server) ends a session while the receiver is down, so its event waits with a failed
attempt; the transceiver is SIGKILLed; the receiver comes up and a second transceiver delivers
the event exactly once, with the first one's idempotency id and body."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from websocket_harness import EventLog, openai_client

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
from deploy.survival import redis_env
from deploy.waiting import eventually
from relay.wire.redis_config import RedisConfig
from transceiver.background import crash_counts
from transceiver.restarts import RestartPolicy
from transceiver.store.call_log import CallRecordStore
from transceiver.store.call_records import BeginLeg, CallRecordPolicy, EndLeg
from transceiver.store.connection import open_redis
from transceiver.store.keys import OutboxKeys
from transceiver.store.outbox import WebhookOutbox, event_id
from transceiver.webhook_signing import ID_HEADER, WebhookPolicy, verify
from transceiver.webhooks import WebhookSender

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server")
SECRET = "s" * 16
MINUTE_MS = 60_000


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("outbox"), "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[CallRecordStore]:
    """A record store under a prefix of its own."""
    connection = open_redis(RedisConfig(url=redis_server.url))
    try:
        yield CallRecordStore(connection.client, f"t{uuid.uuid4().hex[:8]}", CallRecordPolicy())
    finally:
        await connection.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def redis_of(store: CallRecordStore) -> Redis:
    return store._redis


async def reserve(outbox: WebhookOutbox, redis: Redis, call_id: str) -> Any:
    end = EndLeg("sess_" + call_id, call_id, "hangup", 1_760_000_000_000)
    async with redis.pipeline(transaction=True) as pipe:
        outbox.reserve_in(pipe, end)
        (reply,) = await pipe.execute()
    outbox.reserved(end, reply)
    return reply


async def test_claims_lease_retries_keep_their_count_only_the_latest_claim_reschedules(
    store: CallRecordStore,
) -> None:
    outbox = store.open_outbox(max_pending=10, grace_ms=MINUTE_MS)
    assert await reserve(outbox, redis_of(store), "rtc_a") == 1
    assert await outbox.claim(MINUTE_MS) is None  # reserved: waits for its body (the grace)
    state = await outbox.state()
    assert state.depth == 1 and state.next_due_ms is not None and state.next_due_ms > 50_000

    assert await outbox.freeze("evt_rtc_a", b'{"v":1}') == b'{"v":1}'  # due at once
    assert await outbox.freeze("evt_rtc_a", b'{"v":2}') == b'{"v":1}'  # set once
    claimed = await outbox.claim(MINUTE_MS)
    assert claimed is not None
    assert (claimed.event_id, claimed.session_id, claimed.call_id) == (
        "evt_rtc_a", "sess_rtc_a", "rtc_a",
    )  # fmt: skip
    assert (claimed.attempts, claimed.body, claimed.ended_at_ms) == (
        1, b'{"v":1}', 1_760_000_000_000,
    )  # fmt: skip
    assert await outbox.claim(MINUTE_MS) is None  # leased

    assert await outbox.retry(claimed, 0, "HTTP 500")
    again = await outbox.claim(MINUTE_MS)
    assert again is not None and again.attempts == 2
    assert not await outbox.retry(claimed, 0, "late")  # an older claim: not its to reschedule
    entry = await outbox.entry("evt_rtc_a")
    assert entry is not None and (entry["attempts"], entry["last_error"]) == (2, "HTTP 500")
    assert await outbox.retry(again, MINUTE_MS, "HTTP 502")
    assert await outbox.claim(MINUTE_MS) is None  # due in a minute
    assert await outbox.ack("evt_rtc_a") and not await outbox.ack("evt_rtc_a")
    assert await outbox.state() == type(state)(0, None)
    assert await outbox.freeze("evt_rtc_a", b"{}") is None  # gone: no body is left behind


async def test_a_lapsed_claim_is_claimed_again_and_the_outbox_is_bounded(
    store: CallRecordStore,
) -> None:
    outbox = store.open_outbox(max_pending=2, grace_ms=0)
    redis = redis_of(store)
    replies = [await reserve(outbox, redis, call) for call in ("rtc_1", "rtc_2", "rtc_3")]
    assert replies == [1, 1, -1] and outbox.dropped == 1
    assert await reserve(outbox, redis, "rtc_1") == 0  # already there: unchanged, not dropped
    assert outbox.dropped == 1
    first = await outbox.claim(50)  # a sender that will die holding it
    second = await outbox.claim(MINUTE_MS)
    assert first is not None and second is not None and first.event_id != second.event_id

    async def claimed_again() -> bool:
        found = await outbox.claim(MINUTE_MS)
        return found is not None and (found.event_id, found.attempts) == (first.event_id, 2)

    await eventually(claimed_again, 10, "the lapsed claim to be claimed again", 0.02)


class Hook:
    """A loopback receiver answering each event with its next status (then 200)."""

    def __init__(self, statuses: dict[str, list[int]] | None = None, port: int = 0) -> None:
        self.statuses = statuses or {}
        self.port = port
        self.headers: list[dict[str, str]] = []
        self.raw: list[bytes] = []
        self.ids: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = (line.partition(":") for line in head.split("\r\n")[1:] if line)
        headers = {name.strip().lower(): value.strip() for name, _, value in lines}
        body = await reader.readexactly(int(headers["content-length"]))
        event = headers[ID_HEADER.lower()]
        self.headers.append(headers)
        self.raw.append(body)
        self.bodies.append(json.loads(body))
        self.ids.append(event)
        waiting = self.statuses.get(event, [])
        status = waiting.pop(0) if waiting else 200
        writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status)
        await writer.drain()
        writer.close()


def fast_policy(url: str, **changes: Any) -> WebhookPolicy:
    settings = {"max_attempts": 3, "retry_first_s": 0.01, "timeout_s": 2.0,
                "claim_timeout_s": 3.0, "poll_s": 0.05, **changes}  # fmt: skip
    return WebhookPolicy(url, SECRET, **settings)


async def test_the_sender_retries_gives_up_and_counts_from_the_outbox(
    store: CallRecordStore,
) -> None:
    hook = Hook({"evt_rtc_lost": [503, 500], "evt_rtc_kept": [502]})
    async with hook as url:
        policy = fast_policy(url, max_attempts=2)
        outbox = store.open_outbox(policy.max_pending, grace_ms=MINUTE_MS)
        sender = WebhookSender(policy, outbox, store, jitter=lambda: 1.0)
        async with sender:
            for call in ("rtc_lost", "rtc_kept"):
                await reserve(outbox, redis_of(store), call)
                await outbox.freeze(event_id(call), b'{"call":"%s"}' % call.encode())
            await eventually(lambda: sum(sender.outcomes.values()) == 4, 20, "four outcomes")
            await eventually(lambda: sender.depth == 0, 10, "an empty outbox")
    assert sender.outcomes == {"failed": 1, "retried": 2, "delivered": 1}
    assert sorted(hook.ids) == ["evt_rtc_kept"] * 2 + ["evt_rtc_lost"] * 2


async def test_an_ended_leg_is_announced_from_its_record_even_if_its_writer_never_read_it_back(
    store: CallRecordStore,
) -> None:
    """The writer's end and the reservation are one transaction; nobody called ``call_ended``
    (the writer died), so after the grace a sender reads the record and builds the event. A leg
    whose call moved on to another connection announces nothing."""
    hook = Hook()
    async with hook as url:
        policy = fast_policy(url)
        outbox = store.open_outbox(policy.max_pending, grace_ms=0)
        at_ms = 1_760_000_000_000
        for write in (
            BeginLeg("sess_r", "rtc_old", "tx-a", at_ms),
            BeginLeg("sess_r", "rtc_new", "tx-b", at_ms + 10),
            EndLeg("sess_r", "rtc_old", "taken_over", at_ms + 20),  # moved on: not announced
            EndLeg("sess_r", "rtc_new", "hangup", at_ms + 30_000),
        ):
            await store.apply(write)
        assert await outbox.entry("evt_rtc_old") is not None
        assert await outbox.entry("evt_rtc_new") is not None
        async with WebhookSender(policy, outbox, store) as sender:
            await eventually(lambda: sender.outcomes["delivered"] == 1, 20, "the delivery")
            await eventually(lambda: sender.depth == 0, 10, "an empty outbox")
    assert hook.ids == ["evt_rtc_new"] and sender.outcomes["skipped"] == 1
    (event,) = hook.bodies
    assert event["created_at"] == (at_ms + 30_000) // 1000
    assert event["data"]["id"] == "sess_r" and event["data"]["end_reason"] == "hangup"


async def test_a_crash_of_the_senders_loop_is_counted_and_its_event_still_delivered(
    store: CallRecordStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hook = Hook()
    async with hook as url:
        policy = fast_policy(url, claim_timeout_s=2.5)
        outbox = store.open_outbox(policy.max_pending, grace_ms=MINUTE_MS)
        restarts = RestartPolicy(first_s=0.01, max_s=0.01)
        sender = WebhookSender(policy, outbox, store, restarts)
        crashed = crash_counts["webhook delivery"]
        real_attempt = sender._attempt
        calls = 0

        async def crash_once(*args: Any) -> str | None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug in delivery")
            return await real_attempt(*args)

        monkeypatch.setattr(sender, "_attempt", crash_once)
        async with sender:
            await reserve(outbox, redis_of(store), "rtc_c")
            await outbox.freeze("evt_rtc_c", b"{}")
            await eventually(lambda: sender.outcomes["delivered"] == 1, 20, "the delivery")
    assert crash_counts["webhook delivery"] == crashed + 1
    assert "webhook delivery crashed" in caplog.text and "a bug in delivery" in caplog.text
    assert hook.ids == ["evt_rtc_c"] and await outbox.entry("evt_rtc_c") is None


def test_a_claim_must_outlast_an_attempt(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="claim_timeout_s > timeout_s"):
        WebhookPolicy("http://127.0.0.1:9/hook", SECRET, timeout_s=10, claim_timeout_s=5)


API_KEY = "vr-outbox-" + uuid.uuid4().hex
PREFIX = "voicerelay"


@asynccontextmanager
async def pipeline_transceiver(
    fake_openai_url: str, log_dir: Path, name: str, env: dict[str, str]
) -> AsyncIterator[tuple[Process, str]]:
    """A pipeline transceiver process (the WebSocket harness's settings) and its base URL;
    stopped at the end unless the test killed it."""
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake_openai_url + "/v1",
           "PIPELINE_STT": "pocketsphinx", "PIPELINE_LLM": "openai", "PIPELINE_TTS": "openai",
           "TRANSCEIVER_API_KEY": API_KEY, "TRANSCEIVER_SECRET_KEYS": random_keys(),
           **env}  # fmt: skip
    process = transceiver_process(
        name, ("127.0.0.1", free_port()), http, "127.0.0.1:3478", random_keys(), log_dir, env,
        agent="pipeline", auth="required",
    )  # fmt: skip
    process.start()
    try:
        await process.ready(timeout_s=90)
        yield process, f"http://{text(http)}"
    finally:
        await process.stop()


async def a_session_that_hangs_up(base_url: str) -> str:
    """One Realtime session over WebSocket, closed by the client; its record id."""
    client = openai_client(base_url, API_KEY)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        created = await EventLog(connection).next("session.created")
    return str(created["session"]["id"])


async def outbox_entries(redis: Redis) -> dict[str, dict[str, Any]]:
    raw = await redis.hgetall(OutboxKeys.of(PREFIX).entries)
    return {_text(key): json.loads(value) for key, value in raw.items()}


@pytest.mark.slow
async def test_an_event_left_by_a_killed_transceiver_is_delivered_once_by_another(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    hook_port = free_port(socket.SOCK_STREAM)  # nothing listens there yet: attempts fail
    env = {**redis_env(RedisConfig(url=redis_server.url, key_prefix=PREFIX)),
           "TRANSCEIVER_WEBHOOK_URL": f"http://127.0.0.1:{hook_port}/hook",
           "TRANSCEIVER_WEBHOOK_SECRET": SECRET}  # fmt: skip
    connection = open_redis(RedisConfig(url=redis_server.url))
    redis = connection.client

    async def outbox_empty() -> bool:
        return await redis.zcard(OutboxKeys.of(PREFIX).due) == 0

    try:
        with FakeOpenAIServer() as fake:
            async with pipeline_transceiver(fake.base_url, tmp_path, "first", env) as (first, url):
                session_id = await a_session_that_hangs_up(url)

                async def refused() -> bool:
                    entries = await outbox_entries(redis)
                    return any(e["attempts"] >= 1 and e["last_error"] for e in entries.values())

                await eventually(refused, 30, "an attempt refused by the absent receiver")
                first.send_signal(signal.SIGKILL)
                assert await first.exited(10) == -signal.SIGKILL
            (event, entry), *others = (await outbox_entries(redis)).items()
            assert not others and entry["session_id"] == session_id
            frozen = await redis.hget(OutboxKeys.of(PREFIX).bodies, event)
            assert frozen is not None  # the first transceiver had built the body

            hook = Hook(port=hook_port)
            second = pipeline_transceiver(fake.base_url, tmp_path, "second", env)
            async with hook, second as (_, url), httpx.AsyncClient() as http:
                await eventually(lambda: bool(hook.ids), 60, "the delivery")
                await eventually(outbox_empty, 10, "an empty outbox")
                metrics = (await http.get(url + "/metrics")).text
    finally:
        await connection.aclose()
    assert hook.ids == [event] and event == f"evt_{entry['call_id']}"  # once, the same id
    assert hook.raw == [frozen]  # the same bytes
    assert verify(SECRET, hook.headers[0], hook.raw[0], time.time())
    assert hook.bodies[0]["data"]["id"] == session_id
    assert metric_values(metrics, "transceiver_webhook_deliveries_total")["delivered"] == 1
