"""A session resumed elsewhere while its first connection is still up: the new connection gets
the conversation replayed as ``conversation.item.*`` events, and the old owner, refused by the
fencing token, tells its client (``error`` ``session_taken_over``) and hangs up. The same when
the resume lands on the transceiver that holds the old connection. A late hang-up of the old
connection never ends the session that moved on (the store refuses the old token's end).

Real redis-server, relay, two pipeline transceivers and aiortc clients (``test_resume``'s stack).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from deploy.processes import Process, gauge, metric_values
from deploy.redis_server import redis_server_binary
from deploy.survival import Survival, contents, stored_until, survival_stack
from deploy.waiting import eventually
from loadtest.realtime_client import (
    SESSION_HEADER,
    TOKEN_HEADER,
    RealtimeClient,
    acknowledged,
    answered_and_stored,
    ask,
    call,
    opened,
    resume,
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
            answer, _ = await answered_and_stored(
                survival, first, session_id, "Tell me about water."
            )

            resumed = await resume(second, http, survival.stack.base_url(1), session_id, token)
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
        # The answer is stored after the question (its own write): wait for both.
        state = await stored_until(
            survival, session_id, lambda st: ("assistant", recall) in contents(st)
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


async def test_a_session_resumed_on_its_own_transceiver_outlives_its_old_connection(
    survival: Survival,
) -> None:
    """The client moves while its old connection is still up, and the resume lands on the
    transceiver that already holds the session: the old connection is told and hung up as after
    a take-over, and its late hang-up leaves the session now live there alone (its lease still
    renewed, its writes stored)."""
    first, second = RealtimeClient(), RealtimeClient()
    base = survival.stack.base_url(0)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            created = await call(first, http, base)
            session_id, token = created.headers[SESSION_HEADER], created.headers[TOKEN_HEADER]
            resumed = await resume(second, http, base, session_id, token)
            assert resumed.status_code == 201, resumed.text
            await first.wait_for(
                "error",
                lambda e: e["error"]["code"] == "session_taken_over",
                timeout_s=HANG_UP_TIMEOUT_S,
            )
            stale = await http.delete(base + created.headers["Location"])
            assert stale.status_code in (204, 404), stale.text  # 404: already hung up
            assert await leases(http, base) == 1.0  # the live session's, still renewed
            _, state = await answered_and_stored(
                survival, second, session_id, "Tell me about water."
            )
        assert state.token == 2
    finally:
        await first.close()
        await second.close()


async def test_a_late_hang_up_of_the_old_connection_does_not_end_a_moved_session(
    survival: Survival,
) -> None:
    """The old connection's hang-up reaches its transceiver after the session moved on (before
    or after that transceiver noticed): the store refuses the old token's end, and the session
    goes on where it is now."""
    first, second = RealtimeClient(), RealtimeClient()
    old, new = survival.stack.base_url(0), survival.stack.base_url(1)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            created = await call(first, http, old)
            session_id, token = created.headers[SESSION_HEADER], created.headers[TOKEN_HEADER]
            resumed = await resume(second, http, new, session_id, token)
            assert resumed.status_code == 201, resumed.text
            stale = await http.delete(old + created.headers["Location"])
            assert stale.status_code in (204, 404), stale.text  # 404: already hung up
            await let_go(survival.stack.transceivers[0], session_id)
            _, state = await answered_and_stored(
                survival, second, session_id, "Tell me about water."
            )
        assert state.token == 2
    finally:
        await first.close()
        await second.close()


async def leases(http: httpx.AsyncClient, base_url: str) -> float:
    return await gauge(http, base_url, "transceiver_session_leases")


async def let_go(process: Process, session_id: str) -> None:
    """Wait until the old owner is done with the session: it noticed the take-over, or the
    store refused one of its writes (the late hang-up's end among them)."""
    marks = (f"session {session_id} lost here", f"dropping session {session_id}'s writes")
    await eventually(
        lambda: any(mark in process.log_path.read_text() for mark in marks),
        HANG_UP_TIMEOUT_S,
        f"the old owner to let {session_id} go",
    )
