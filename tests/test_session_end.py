"""Which closes end a stored session, and resumes that fail without leaving a claim behind.

Real redis-server, relay, two pipeline transceivers taking one session each, aiortc clients.

- A resume that admission refuses (503: the transceiver filled up while the offer was still
  arriving) claims nothing: the session stays its owner's, the refusing transceiver renews no
  lease for it, and once there is room the same resume works.
- A resume whose offer cannot be negotiated hands its claim back.
- The caller's hang-up (``DELETE`` or ``POST .../hangup``) ends the stored session: its resume
  answers 410 ``session_ended``.
- A connection its peer closes without hanging up stays resumable. (So do killed, drained and
  taken-over sessions: test_resume, test_drain_handover.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from test_sdp import CHROME_OFFER

from deploy.processes import gauge
from deploy.redis_server import redis_server_binary
from deploy.survival import Survival, stored, survival_stack
from deploy.waiting import poll
from loadtest.realtime_client import TOKEN_HEADER, RealtimeClient, call, opened, resume
from transceiver.store.errors import SessionEndedError
from transceiver.store.keys import SessionKeys

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
CALLS = "/v1/realtime/calls"
SETTLE_TIMEOUT_S = 40.0  # a closed peer is noticed at once; a silent one by consent expiry


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def survival(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Survival]:
    log_dir = tmp_path_factory.mktemp("session-end")
    async with survival_stack(log_dir, capacity=1) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def http(survival: Survival) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        for index in range(len(survival.stack.transceivers)):  # earlier tests' calls are gone
            await settled(client, survival.stack.base_url(index), 0)
        yield client


async def settled(http: httpx.AsyncClient, base_url: str, sessions: int) -> None:
    """Wait until the transceiver has ``sessions`` live sessions."""
    await poll(
        lambda: gauge(http, base_url, "transceiver_sessions"),
        lambda live: live == sessions,
        SETTLE_TIMEOUT_S,
        lambda live: f"{base_url}: {live} live sessions, not {sessions}",
        0.1,
    )


def lease_holder(survival: Survival, session_id: str) -> bytes | None:
    keys = SessionKeys.of("voicerelay", session_id)
    with survival.redis.client() as redis:
        holder = redis.get(keys.lease)
    assert holder is None or isinstance(holder, bytes)
    return holder


async def test_a_resume_refused_for_capacity_claims_nothing(
    survival: Survival, http: httpx.AsyncClient
) -> None:
    owner, filler, mover = RealtimeClient(), RealtimeClient(), RealtimeClient()
    base_a, base_b = survival.stack.base_url(0), survival.stack.base_url(1)
    try:
        session_id, token = await opened(owner, http, base_a)
        before = await stored(survival, session_id)
        await mover.pc.setLocalDescription(await mover.pc.createOffer())
        offer = mover.pc.localDescription.sdp.encode()
        headers_sent, rest = asyncio.Event(), asyncio.Event()

        async def slow_offer() -> AsyncIterator[bytes]:
            yield offer[:64]
            headers_sent.set()
            await rest.wait()
            yield offer[64:]

        # B admits the resume (it has room) and waits for the rest of its offer; meanwhile a
        # new call takes B's one place.
        refused_task = asyncio.create_task(
            http.post(
                base_b + CALLS,
                content=slow_offer(),
                headers={"Content-Type": "application/sdp", TOKEN_HEADER: token},
                params={"session_id": session_id},
            )
        )
        await asyncio.wait_for(headers_sent.wait(), 10)
        filled = await call(filler, http, base_b)
        assert filled.status_code == 201, filled.text
        rest.set()
        refused = await refused_task
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "transceiver_full"

        after = await stored(survival, session_id)
        assert (after.owner_id, after.token) == (before.owner_id, before.token)
        assert lease_holder(survival, session_id) == before.owner_id.encode()
        assert await gauge(http, base_b, "transceiver_session_leases") == 1  # the filler's

        assert (await http.delete(base_b + filled.headers["Location"])).status_code == 204
        moved = await resume(mover, http, base_b, session_id, token)
        assert moved.status_code == 201, moved.text
        assert (await stored(survival, session_id)).owner_id != before.owner_id
    finally:
        for client in (owner, filler, mover):
            await client.close()


async def test_a_resume_whose_offer_fails_hands_its_claim_back(
    survival: Survival, http: httpx.AsyncClient
) -> None:
    owner, mover = RealtimeClient(), RealtimeClient()
    base_a, base_b = survival.stack.base_url(0), survival.stack.base_url(1)
    unusable = CHROME_OFFER.replace("opus/48000/2", "nocodec/8000").replace("111 63 9 0 8", "111")
    try:
        session_id, token = await opened(owner, http, base_a)
        failed = await http.post(
            base_b + CALLS,
            content=unusable,
            headers={"Content-Type": "application/sdp", TOKEN_HEADER: token},
            params={"session_id": session_id},
        )
        assert failed.status_code == 400, failed.text
        assert failed.json()["error"]["code"] == "offer_rejected"
        after = await stored(survival, session_id)
        assert (after.owner_id, after.token) == ("", 0)  # released, not left claimed by B
        assert lease_holder(survival, session_id) is None
        assert await gauge(http, base_b, "transceiver_session_leases") == 0
        moved = await resume(mover, http, base_b, session_id, token)
        assert moved.status_code == 201, moved.text
    finally:
        await owner.close()
        await mover.close()


@pytest.mark.parametrize(("method", "suffix"), [("DELETE", ""), ("POST", "/hangup")])
async def test_a_hung_up_session_cannot_be_resumed(
    survival: Survival, http: httpx.AsyncClient, method: str, suffix: str
) -> None:
    caller, again = RealtimeClient(), RealtimeClient()
    base_a, base_b = survival.stack.base_url(0), survival.stack.base_url(1)
    try:
        created = await call(caller, http, base_a)
        session_id = created.headers["X-Voicerelay-Session"]
        token = created.headers[TOKEN_HEADER]
        hung_up = await http.request(method, base_a + created.headers["Location"] + suffix)
        assert hung_up.status_code == 204, hung_up.text

        async def ended() -> bool:
            try:
                await stored(survival, session_id)
            except SessionEndedError:
                return True
            return False

        failure = "the hung-up session was never ended in the store"
        await poll(ended, bool, 10, lambda _: failure, 0.05)  # the end is written behind
        assert await gauge(http, base_a, "transceiver_session_leases") == 0
        refused = await resume(again, http, base_b, session_id, token)
        assert refused.status_code == 410, refused.text
        assert refused.json()["error"]["code"] == "session_ended"
        assert refused.json()["error"]["param"] == "session_id"
        wrong = await resume(again, http, base_b, session_id, "not-the-token")
        assert wrong.status_code == 403, wrong.text  # only its caller learns that it ended
    finally:
        await caller.close()
        await again.close()


async def test_a_connection_closed_without_a_hang_up_stays_resumable(
    survival: Survival, http: httpx.AsyncClient
) -> None:
    first, second = RealtimeClient(), RealtimeClient()
    base_a, base_b = survival.stack.base_url(0), survival.stack.base_url(1)
    try:
        session_id, token = await opened(first, http, base_a)
        await first.close()  # the peer goes away (as a client moving elsewhere does)
        await settled(http, base_a, 0)
        resumed = await resume(second, http, base_b, session_id, token)
        assert resumed.status_code == 201, resumed.text
    finally:
        await first.close()
        await second.close()
