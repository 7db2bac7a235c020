"""A session resumed elsewhere while its first connection is still up: the new connection gets
the conversation replayed as ``conversation.item.*`` events, and the old owner, refused by the
fencing token, tells its client (``error`` ``session_taken_over``) and hangs up.

Real redis-server, relay, two pipeline transceivers and aiortc clients (``test_resume``'s stack).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from realtime_client import RealtimeClient
from redis_server import redis_server_binary
from stack import eventually, metric_values
from test_resume import (
    TOKEN_HEADER,
    Survival,
    acknowledged,
    ask,
    call,
    contents,
    opened,
    stored_until,
    survival_stack,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
HANG_UP_TIMEOUT_S = 20.0  # the old owner notices at its next write or lease renewal (~2 s)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def survival(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Survival]:
    async with survival_stack(tmp_path_factory.mktemp("takeover")) as running:
        yield running


async def test_a_session_taken_over_hangs_up_the_old_connection_and_replays_the_items(
    survival: Survival,
) -> None:
    first, second = RealtimeClient(), RealtimeClient()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            session_id, token = await opened(first, http, survival.stack.base_url(0))
            answer = await ask(first, "Tell me about water.")
            await stored_until(
                survival, session_id, lambda st: ("assistant", answer) in contents(st)
            )

            resumed = await call(
                second, http, survival.stack.base_url(1), {TOKEN_HEADER: token},
                {"session_id": session_id},
            )  # fmt: skip
            assert resumed.status_code == 201, resumed.text
            updated = await second.wait_for("session.updated")
            await second.wait_for(
                "conversation.item.done",
                lambda e: e["item"].get("role") == "assistant",
                after=second.index(updated),
            )
            assert acknowledged(second, second.index(updated)) == [
                ("user", "Tell me about water."),
                ("assistant", answer),
            ]
            kinds = [
                e["item"]["type"] for e in second.events if e["type"] == "conversation.item.done"
            ]
            assert kinds == ["message", "function_call", "function_call_output", "message"]

            taken = await first.wait_for(
                "error",
                lambda e: e["error"]["code"] == "session_taken_over",
                timeout_s=HANG_UP_TIMEOUT_S,
            )
            assert taken["error"]["type"] == "invalid_request_error"
            await eventually(
                lambda: first.pc.connectionState in ("closed", "failed"),
                HANG_UP_TIMEOUT_S,
                "the old connection to be hung up",
            )
            metrics = (await http.get(survival.stack.base_url(0) + "/metrics")).text
            ended = metric_values(metrics, "transceiver_sessions_ended_total")
            assert ended.get("taken_over") == 1.0, ended

            recall = await ask(second, "What did I just ask?")
        assert recall == "You asked: Tell me about water.", recall
        state = await stored_until(
            survival, session_id, lambda st: ("user", "What did I just ask?") in contents(st)
        )
        spoken = [(role, text) for role, text in contents(state) if role != "tool" and text]
        assert spoken == [
            ("user", "Tell me about water."),
            ("assistant", answer),
            ("user", "What did I just ask?"),
            ("assistant", recall),
        ]
    finally:
        await first.close()
        await second.close()
