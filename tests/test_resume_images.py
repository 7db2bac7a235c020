"""A user message's image survives a resume on another transceiver.

Real processes: redis-server, a relay, two pipeline transceivers whose stages are the fake
OpenAI server (a language model that sees images; no local model loaded, as nothing is spoken;
the API key required). An aiortc client shows
the model an image on transceiver A (``conversation.item.create`` with an ``input_image``
part); a second client resumes the session on B: the replayed item has its image, so has
``conversation.item.retrieve``, and B's request to the model carries it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiortc import RTCSessionDescription
from records_stack import recording_stack
from test_image_parts import data_url, png_bytes

from deploy.fake_openai import FakeOpenAIServer
from deploy.processes import Stack
from deploy.redis_server import RedisServer, redis_server_binary
from deploy.waiting import poll
from loadtest.realtime_client import SESSION_HEADER, TOKEN_HEADER, RealtimeClient
from relay.wire.redis_config import RedisConfig
from transceiver.store.errors import StoreError
from transceiver.store.keys import SessionState
from transceiver.store.sessions import RedisSessionStore

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
API_KEY = "vr-resume-images-" + os.urandom(8).hex()
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 60.0  # ICE and DTLS through the relay, a turn: seconds on a loaded machine
QUESTION = "What is in this picture?"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Stack, str]]:
    log_dir = tmp_path_factory.mktemp("resume-images")
    redis = RedisServer(log_dir, "redis").start()
    env = {
        "TRANSCEIVER_API_KEY": API_KEY,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": server.base_url + "/v1",
        "PIPELINE_LLM": "openai",
        "PIPELINE_TTS": "openai",
        "PIPELINE_STT": "openai",  # unused (no speech): no decoder processes started
        "PIPELINE_FALLBACK": "false",
    }
    try:
        async with recording_stack(log_dir, redis, 2, env) as running:
            yield running, redis.url
    finally:
        redis.stop()
    for name in ("transceiver0.log", "transceiver1.log"):
        assert "Traceback" not in (log_dir / name).read_text(), name


async def offered(
    client: RealtimeClient, base_url: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """The client's call on the transceiver at ``base_url``, connected."""
    await client.pc.setLocalDescription(await client.pc.createOffer())
    async with httpx.AsyncClient(timeout=30) as http:
        created = await http.post(
            base_url + "/v1/realtime/calls",
            content=client.pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", **AUTH, **(headers or {})},
        )
    assert created.status_code == 201, created.text
    await client.pc.setRemoteDescription(RTCSessionDescription(created.text, "answer"))
    await client.wait_for("session.created", timeout_s=TIMEOUT_S)
    return created


async def stored_state(redis_url: str, session_id: str) -> SessionState | None:
    async with RedisSessionStore.from_config(RedisConfig(url=redis_url)) as store:
        try:
            return await store.load(session_id)
        except StoreError:
            return None


def with_user_item(state: SessionState | None) -> bool:
    return state is not None and any(item.get("role") == "user" for item in state.items)


async def test_an_image_shown_before_a_resume_is_retrieved_and_sent_to_the_model_after_it(
    stack: tuple[Stack, str], server: FakeOpenAIServer
) -> None:
    running, redis_url = stack
    url = data_url(png_bytes(6, 6))
    image = {"type": "input_image", "image_url": url, "detail": "low"}
    first, second = RealtimeClient(), RealtimeClient()
    try:
        created = await offered(first, running.base_url(0))
        content = [{"type": "input_text", "text": QUESTION}, image]
        first.send({"type": "conversation.item.create",
                    "item": {"type": "message", "role": "user", "content": content}})  # fmt: skip
        added = await first.wait_for("conversation.item.added", timeout_s=TIMEOUT_S)
        assert added["item"]["content"] == content, added
        session_id = created.headers[SESSION_HEADER]
        await poll(lambda: stored_state(redis_url, session_id), with_user_item, TIMEOUT_S, repr)
        resume = {SESSION_HEADER: session_id, TOKEN_HEADER: created.headers[TOKEN_HEADER]}
        await offered(second, running.base_url(1), resume)
        replayed = await second.wait_for(
            "conversation.item.added",
            lambda e: e["item"].get("role") == "user",
            timeout_s=TIMEOUT_S,
        )
        assert replayed["item"]["content"] == content, replayed  # words, then the image
        await answered_with_the_image(second, replayed["item"]["id"], content, server)
    finally:
        await first.close()
        await second.close()


async def answered_with_the_image(
    client: RealtimeClient, item_id: str, content: list[dict[str, Any]], server: FakeOpenAIServer
) -> None:
    client.send({"type": "conversation.item.retrieve", "item_id": item_id})
    retrieved = await client.wait_for("conversation.item.retrieved", timeout_s=TIMEOUT_S)
    assert retrieved["item"]["content"] == content, retrieved
    client.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
    done = await client.wait_for("response.done", timeout_s=TIMEOUT_S)
    said = done["response"]["output"][0]["content"][0]["text"].strip()
    assert said == f"You said: {QUESTION} (and 1 image)", done
    sent = (await server.stats())["last_request"]["chat"]["messages"][-1]["content"]
    shown = {"url": content[1]["image_url"], "detail": content[1]["detail"]}
    assert sent[1] == {"type": "image_url", "image_url": shown}, sent
