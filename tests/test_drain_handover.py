"""SIGTERM drain with hand-over: a real redis-server, relay and two pipeline transceivers.

A's /readyz turns 503 at once and it takes no new session; the answer in progress is finished
(not cut); then the client is told ``voicerelay.session.reconnect``, resumes on B through the
relay with its conversation, and A exits once its sessions are gone.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from deploy.redis_server import redis_server_binary
from deploy.survival import Survival, stored, survival_stack
from deploy.waiting import eventually
from loadtest.realtime_client import SESSION_HEADER, TOKEN_HEADER, RealtimeClient, ask, call

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def survival(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Survival]:
    async with survival_stack(tmp_path_factory.mktemp("drain")) as running:
        yield running


async def test_sigterm_hands_sessions_over_after_their_turn(survival: Survival) -> None:
    first, second, late = RealtimeClient(), RealtimeClient(), RealtimeClient()
    draining = survival.stack.transceivers[0]
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            base_a, base_b = survival.stack.base_url(0), survival.stack.base_url(1)
            created = await call(first, http, base_a)
            session_id, token = created.headers[SESSION_HEADER], created.headers[TOKEN_HEADER]
            start = len(first.events)
            content = [{"type": "input_text", "text": "Tell me about water."}]
            item = {"type": "message", "role": "user", "content": content}
            first.send({"type": "conversation.item.create", "item": item})
            first.send({"type": "response.create"})
            await first.wait_for("response.output_audio_transcript.delta", after=start)

            draining.send_signal(signal.SIGTERM)  # mid-answer
            ready_codes: list[int] = []

            async def not_ready() -> bool:
                ready_codes.append((await http.get(base_a + "/readyz")).status_code)
                return ready_codes[-1] == 503

            for _ in range(100):  # bounded: 100 probes
                if await not_ready():
                    break
            assert ready_codes[-1] == 503, ready_codes
            refused = await call(late, http, base_a)
            assert refused.status_code == 503, refused.text

            done = await first.wait_for("response.done", after=start, timeout_s=60)
            assert done["response"]["status"] == "completed"  # not cut mid-answer
            moved = await first.wait_for("voicerelay.session.reconnect", after=start)
            assert moved["session_id"] == session_id and moved["reason"] == "draining"
            assert first.index(moved) > first.index(done)
            state = await stored(survival, session_id)
            assert ("assistant", done["response"]["output"][0]["content"][0]["transcript"]) in [
                (i["role"], i["content"]) for i in state.items
            ]

            resumed = await call(
                second, http, base_b, {TOKEN_HEADER: token, SESSION_HEADER: session_id}
            )
            assert resumed.status_code == 201, resumed.text
            await first.close()
            assert await ask(second, "What did I just ask?") == "You asked: Tell me about water."
            await eventually(lambda: not draining.alive(), 30, "the drained transceiver to exit")
            assert await draining.exited(1) == 0
    finally:
        for client in (first, second, late):
            await client.close()
