"""Call records end to end: a real redis-server, a relay, two pipeline transceivers (API key
required, a call.ended webhook to a receiver in this test) and aiortc Realtime clients.

A call on transceiver A asks a question (answered through a tool call), changes its
instructions mid-call, and A is SIGKILLed; the client resumes on B, asks again and hangs up.
Then: one record spans both transceivers (two legs, every turn, both config versions), readable at
``GET /v1/calls/{id}`` by session id and by call id and listed by ``GET /v1/calls`` under the
filters that match it (not under those that do not), behind the API key; its keys expire with
the retention; the webhook receiver, which fails the first attempt, gets the event again and
sees one idempotency id with a valid signature; ``python -m transceiver export`` writes it as a
JSON line; and both kinds of process serve their event-loop lag histogram.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import websockets
from records_stack import Receiver, recording_stack
from websocket_harness import openai_client

from deploy.processes import Stack, metric_values
from deploy.redis_server import RedisServer, redis_server_binary
from deploy.waiting import poll
from loadtest.realtime_client import TOKEN_HEADER, RealtimeClient, ask, call
from transceiver.__main__ import main as transceiver_main
from transceiver.store.call_records import CallRecordKeys
from transceiver.webhook_signing import ID_HEADER, verify

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
API_KEY = "test-api-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WEBHOOK_SECRET = "whsec-test-0123456789abcdef"


@dataclass
class Running:
    stack: Stack
    redis: RedisServer
    receiver: Receiver


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    log_dir = tmp_path_factory.mktemp("call-records")
    receiver = await Receiver().start()
    redis = RedisServer(log_dir, "redis").start()
    env = {"TRANSCEIVER_API_KEY": API_KEY, "TRANSCEIVER_WEBHOOK_URL": receiver.url,
           "TRANSCEIVER_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "TRANSCEIVER_WEBHOOK_RETRY_FIRST_S": "0.05"}  # fmt: skip
    try:
        async with recording_stack(log_dir, redis, 2, env) as stack:
            yield Running(stack, redis, receiver)
    finally:
        redis.stop()
        receiver.close()


async def record_when(
    http: httpx.AsyncClient, base_url: str, record_id: str, done: Any
) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        response = await http.get(f"{base_url}/v1/calls/{record_id}", headers=AUTH)
        return response.json()  # type: ignore[no-any-return]

    return await poll(read, done, 15, lambda last: f"record never got there: {last}", 0.05)


async def test_a_resumed_call_leaves_one_record_readable_listed_exported_and_announced_once(
    running: Running, tmp_path: Path
) -> None:
    stack = running.stack
    base_a, base_b = stack.base_url(0), stack.base_url(1)
    first, second = RealtimeClient(), RealtimeClient()
    started_s = time.time()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            created = await call(first, http, base_a, AUTH)
            assert created.status_code == 201, created.text
            session_id, token = (
                created.headers["X-Voicerelay-Session"],
                created.headers[TOKEN_HEADER],
            )
            first_call = created.headers["Location"].rsplit("/", 1)[1]
            answer = await ask(first, "Tell me about water.")
            # A turn is recorded once its answer has played (response.done comes before that)
            await first.wait_for("output_audio_buffer.stopped", timeout_s=60)
            first.send({"type": "session.update", "session": {"instructions": "Be brief."}})
            await record_when(http, base_b, session_id, lambda r: len(r["config_versions"]) == 2)

            stack.transceivers[0].send_signal(signal.SIGKILL)
            await stack.transceivers[0].exited(10)
            await first.close()
            resumed = await call(
                second, http, base_b, {**AUTH, TOKEN_HEADER: token}, {"session_id": session_id}
            )
            assert resumed.status_code == 201, resumed.text
            second_call = resumed.headers["Location"].rsplit("/", 1)[1]
            recall = await ask(second, "What did I just ask?")
            hung_up = await http.delete(base_b + resumed.headers["Location"], headers=AUTH)
            assert hung_up.status_code == 204, hung_up.text

            record = await record_when(
                http, base_b, session_id, lambda r: r.get("status") == "ended"
            )
            assert record == await record_when(http, base_b, second_call, bool)  # by call id too
            await check_the_list(http, base_b, session_id, started_s)
            await check_retention(running, session_id)
            await check_lag_metrics(http, stack, base_b)
    finally:
        await first.close()
        await second.close()

    assert record["call_ids"] == [first_call, second_call]
    assert len(set(record["transceivers"])) == 2
    legs = record["legs"]
    assert [leg["end_reason"] for leg in legs] == ["resumed_elsewhere", "hangup"]
    assert legs[1]["resumed_from"] == first_call and record["end_reason"] == "hangup"
    turns = record["turns"]
    assert [(t["index"], t["call_id"]) for t in turns] == [(1, first_call), (2, second_call)]
    assert turns[0]["user"] == "Tell me about water." and turns[0]["assistant"] == answer
    assert turns[1]["user"] == "What did I just ask?" and turns[1]["assistant"] == recall
    assert turns[1]["origin"] == "response_created"  # a typed turn: timed from its response
    assert turns[1]["latency_ms"]["voice_to_voice"] > 0
    assert turns[0]["tools"][0]["name"] == "lookup_knowledge"
    assert turns[0]["tools"][0]["side"] == "server" and turns[0]["tools"][0]["ok"]
    assert turns[0]["stages"]["llm"] == {"provider": "local-rule-based", "model": None}
    assert turns[0]["usage"]["tts_chars"] > 0 and turns[0]["cost_usd"]["total"] == 0
    assert turns[0]["latency_ms"]["tts_first_audio"] is not None
    versions = record["config_versions"]
    assert [v["from_turn"] for v in versions] == [1, 2]
    assert versions[1]["config"]["instructions"] == "Be brief."

    await check_the_webhook(running.receiver, session_id, second_call)
    await check_the_export(running, session_id, tmp_path)


async def check_the_list(
    http: httpx.AsyncClient, base_url: str, session_id: str, started_s: float
) -> None:
    async def ids(**query: Any) -> list[str]:
        response = await http.get(f"{base_url}/v1/calls", params=query, headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and "has_more" in body
        return [r["id"] for r in body["data"]]

    assert session_id in await ids()
    assert session_id in await ids(end_reason="hangup", since=int(started_s) - 1, limit=5)
    assert session_id in await ids(min_latency_ms=0)
    assert session_id not in await ids(end_reason="error")
    assert session_id not in await ids(min_latency_ms=10**9)
    assert session_id not in await ids(since=int(started_s) + 3600)
    refused = await http.get(f"{base_url}/v1/calls")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_authorization"
    bad = await http.get(f"{base_url}/v1/calls", params={"limit": "many"}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    unknown = await http.get(f"{base_url}/v1/calls/sess_nobody", headers=AUTH)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "call_not_found"


async def check_retention(running: Running, session_id: str) -> None:
    with running.redis.client() as redis:
        for key in CallRecordKeys.of("voicerelay", session_id).all():
            assert 0 < redis.pttl(key) <= 7 * 24 * 3600 * 1000, key


async def check_lag_metrics(http: httpx.AsyncClient, stack: Stack, base_url: str) -> None:
    served = (await http.get(base_url + "/metrics")).text
    assert metric_values(served, "transceiver_event_loop_lag_seconds_count")[""] > 0
    assert metric_values(served, "transceiver_gc_frozen_objects")[""] > 0  # TRANSCEIVER_GC_FREEZE
    assert sum(metric_values(served, "transceiver_gc_pause_seconds_count").values()) > 0
    written = metric_values(served, "transceiver_call_record_writes_total")
    assert written["written"] > 0 and written["failed"] == written["dropped"] == 0
    relay = metric_values(await stack.relay_metrics(http), "relay_event_loop_lag_seconds_count")
    assert relay["supervisor"] > 0 and relay["worker0"] > 0


async def check_the_webhook(receiver: Receiver, session_id: str, call_id: str) -> None:
    await poll(
        lambda: receiver.requests,
        lambda got: any(status == 200 for status, _, _ in got),
        15,
        lambda got: f"no delivery answered 200: {[s for s, _, _ in got]}",
        0.05,
    )
    assert [status for status, _, _ in receiver.requests] == [500, 200]
    assert {headers[ID_HEADER.lower()] for _, headers, _ in receiver.requests} == {f"evt_{call_id}"}
    for _, headers, body in receiver.requests:
        assert verify(WEBHOOK_SECRET, headers, body, time.time())
        assert not verify("another-secret-0123456789", headers, body, time.time())
    event = json.loads(receiver.requests[-1][2])
    assert (event["type"], event["data"]["id"]) == ("call.ended", session_id)
    assert event["data"]["end_reason"] == "hangup" and len(event["data"]["turns"]) == 2


async def check_the_export(running: Running, session_id: str, tmp_path: Path) -> None:
    """``python -m transceiver export`` (its ``main``, on a thread: no second interpreter)."""
    out = tmp_path / "calls.jsonl"
    argv = ["export", "--redis-url", running.redis.url, "--output", str(out)]
    assert await asyncio.to_thread(transceiver_main, argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert session_id in [record["id"] for record in lines]
    assert all(len(record["turns"]) == record["turn_count"] for record in lines)


async def test_the_rule_based_agent_refuses_translation_sessions_by_name(running: Running) -> None:
    """This stack's language model is the offline rule-based agent, which cannot translate:
    ``client.realtime.translations.connect`` is refused before the upgrade, saying so
    (translation itself: ``test_realtime_translation.py``). Transceiver 1: the resume test
    above kills transceiver 0."""
    client: openai.AsyncOpenAI = openai_client(running.stack.base_url(1), API_KEY)
    with pytest.raises(websockets.InvalidStatus) as denied:
        async with client.realtime.translations.connect(model="gpt-realtime-translate"):
            pass
    assert denied.value.response.status_code == 404
    error = json.loads(denied.value.response.body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "translation_unavailable")
    assert "local-rule-based" in error["message"], error
