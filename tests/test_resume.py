"""Resume after a transceiver dies: a real redis-server, a real relay, two pipeline transceivers
and an aiortc Realtime client. The client asks a knowledge question on transceiver A; A is
SIGKILLed; the client posts a new offer naming its session (with its resume token) through the
relay to transceiver B and asks "what did I just ask?" - B answers from the stored history.
A wrong or missing resume token is refused (401/403) and leaves the stored session alone.
Conversation edits (an item created then deleted, a played answer truncated over WebRTC) are
stored, so after a SIGKILL the resumed session and its model see the edited conversation.
A transcription session (its ``ek_`` secret minted by the SDK's ``client_secrets.create``)
resumes after a SIGKILL as a transcription session with its stored config, transcribes the next
utterance and never answers; resumed as the other kind (either way round) it is 409.

Take-over: a session resumed elsewhere while its first connection is still up: the new
connection gets the conversation replayed as ``conversation.item.*`` events, and the old owner,
refused by the fencing token, tells its client (``error`` ``session_taken_over``) and hangs up.
The same when the resume lands on the transceiver that holds the old connection. A late hang-up
of the old connection never ends the session that moved on (the store refuses the old token's
end). These run first, on the stack as it started; a test finding a transceiver killed by
another starts a new one in its place.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from deploy.processes import Process, gauge, metric_values
from deploy.redis_server import redis_server_binary
from deploy.survival import (
    Survival,
    contents,
    stored,
    stored_until,
    survival_stack,
)
from deploy.waiting import eventually
from loadtest.realtime_client import (
    SESSION_HEADER,
    TOKEN_HEADER,
    RealtimeClient,
    acknowledged,
    answered_and_stored,
    ask,
    audible,
    call,
    opened,
    resume,
    silence,
    speak,
    user_text,
)
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech
from transceiver.store.contracts import CONTRACT_KEY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
Event = dict[str, object]
Item = dict[str, Any]
TRANSCRIBED = "conversation.item.input_audio_transcription.completed"
HANG_UP_TIMEOUT_S = 20.0  # the old owner notices at its next write or lease renewal (~2 s)
TRANSCRIPTION = {
    "type": "transcription",
    "audio": {
        "input": {
            "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 700},
        }
    },
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def survival(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Survival]:
    async with survival_stack(tmp_path_factory.mktemp("resume")) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def clients(survival: Survival) -> AsyncIterator[tuple[RealtimeClient, RealtimeClient]]:
    """Two clients for a test, once an earlier test's kills are healed; closed after it."""
    await survival.stack.heal(ready_timeout_s=90)
    first, second = RealtimeClient(), RealtimeClient()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_a_session_taken_over_hangs_up_the_old_connection_and_replays_the_items(
    survival: Survival,
    clients: tuple[RealtimeClient, RealtimeClient],
) -> None:
    first, second = clients
    async with httpx.AsyncClient(timeout=30) as http:
        ended_before = await taken_over(http, survival.stack.base_url(0))
        session_id, token = await opened(first, http, survival.stack.base_url(0))
        answer, _ = await answered_and_stored(survival, first, session_id, "Tell me about water.")

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
        kinds = [e["item"]["type"] for e in second.events if e["type"] == "conversation.item.done"]
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
        # this session's end (the count is the process's: other tests' take-overs in it)
        assert await taken_over(http, survival.stack.base_url(0)) == ended_before + 1

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


async def test_a_session_resumed_on_its_own_transceiver_outlives_its_old_connection(
    survival: Survival,
    clients: tuple[RealtimeClient, RealtimeClient],
) -> None:
    """The client moves while its old connection is still up, and the resume lands on the
    transceiver that already holds the session: the old connection is told and hung up as after
    a take-over, and its late hang-up leaves the session now live there alone (its lease still
    renewed, its writes stored)."""
    first, second = clients
    base = survival.stack.base_url(0)
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
        _, state = await answered_and_stored(survival, second, session_id, "Tell me about water.")
    assert state.token == 2


async def test_a_late_hang_up_of_the_old_connection_does_not_end_a_moved_session(
    survival: Survival,
    clients: tuple[RealtimeClient, RealtimeClient],
) -> None:
    """The old connection's hang-up reaches its transceiver after the session moved on (before
    or after that transceiver noticed): the store refuses the old token's end, and the session
    goes on where it is now."""
    first, second = clients
    old, new = survival.stack.base_url(0), survival.stack.base_url(1)
    async with httpx.AsyncClient(timeout=30) as http:
        created = await call(first, http, old)
        session_id, token = created.headers[SESSION_HEADER], created.headers[TOKEN_HEADER]
        resumed = await resume(second, http, new, session_id, token)
        assert resumed.status_code == 201, resumed.text
        stale = await http.delete(old + created.headers["Location"])
        assert stale.status_code in (204, 404), stale.text  # 404: already hung up
        await let_go(survival.stack.transceivers[0], session_id)
        _, state = await answered_and_stored(survival, second, session_id, "Tell me about water.")
    assert state.token == 2


async def leases(http: httpx.AsyncClient, base_url: str) -> float:
    return await gauge(http, base_url, "transceiver_session_leases")


async def taken_over(http: httpx.AsyncClient, base_url: str) -> float:
    """Sessions the transceiver ended because another took them over."""
    metrics = (await http.get(base_url + "/metrics")).text
    return metric_values(metrics, "transceiver_sessions_ended_total").get("taken_over", 0.0)


async def let_go(process: Process, session_id: str) -> None:
    """Wait until the old owner is done with the session: it noticed the take-over, or the
    store refused one of its writes (the late hang-up's end among them)."""
    marks = (f"session {session_id} lost here", f"dropping session {session_id}'s writes")
    await eventually(
        lambda: any(mark in process.log_path.read_text() for mark in marks),
        HANG_UP_TIMEOUT_S,
        f"the old owner to let {session_id} go",
    )


async def test_a_killed_transceivers_session_resumes_elsewhere_with_its_conversation(
    survival: Survival,
    clients: tuple[RealtimeClient, RealtimeClient],
) -> None:
    first, second = clients
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


async def test_resume_without_or_with_a_wrong_token_is_refused_and_the_session_untouched(
    survival: Survival,
) -> None:
    await survival.stack.heal(ready_timeout_s=90)
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


async def test_conversation_edits_survive_a_kill_and_resume_elsewhere(
    survival: Survival, clients: tuple[RealtimeClient, RealtimeClient]
) -> None:
    stack = survival.stack
    first, second = clients
    async with httpx.AsyncClient(timeout=30) as http:
        session_id, token = await opened(first, http, stack.base_url(1))
        answer, full = await answered_and_played(first, "Tell me about water.")
        cut = await edited(first, answer)
        moon = ("user", "Tell me about the moon.")
        state = await stored_until(
            survival, session_id, lambda st: ("assistant", cut) in contents(st)
        )
        assert moon not in contents(state) and ("assistant", full) not in contents(state)

        stack.transceivers[1].send_signal(signal.SIGKILL)
        await stack.transceivers[1].exited(10)
        resumed = await resume(second, http, stack.base_url(0), session_id, token)
        assert resumed.status_code == 201, resumed.text
        await second.wait_for("session.updated")
        recall = await ask(second, "What did I just ask?")
        told = acknowledged(second)  # the stored conversation came before the answer
    assert ("assistant", cut) in told and moon not in told, told  # the edited conversation
    assert recall == "You asked: Tell me about water.", recall  # not the deleted question


async def answered_and_played(client: RealtimeClient, words: str) -> tuple[Item, str]:
    """A text turn whose answer has played out: (its answer item, its transcript)."""
    start = len(client.events)
    await ask(client, words)
    done = await client.wait_for("response.done", after=start)
    response_id = done["response"]["id"]
    await client.wait_for(
        "output_audio_buffer.stopped", lambda e: e["response_id"] == response_id, timeout_s=60
    )
    (item,) = done["response"]["output"]
    return item, item["content"][0]["transcript"]


async def edited(client: RealtimeClient, answer: Item) -> str:
    """A user item created then deleted, and ``answer`` truncated at 1.5 s: its words left."""
    start = len(client.events)
    client.send(user_text("Tell me about the moon."))
    moon = (await client.wait_for("conversation.item.done", after=start))["item"]["id"]
    client.send({"type": "conversation.item.delete", "item_id": moon})
    await client.wait_for("conversation.item.deleted", after=start)
    cut = {"item_id": answer["id"], "content_index": 0, "audio_end_ms": 1500}
    client.send({"type": "conversation.item.truncate", **cut})
    await client.wait_for("conversation.item.truncated", after=start)
    client.send({"type": "conversation.item.retrieve", "item_id": answer["id"]})
    retrieved = await client.wait_for("conversation.item.retrieved", after=start)
    words = str(retrieved["item"]["content"][0]["transcript"])
    full = str(answer["content"][0]["transcript"])
    assert words and full.startswith(words) and len(words) < len(full), (words, full)
    return words


async def test_a_transcription_session_resumes_elsewhere_as_one_and_only_as_one(
    survival: Survival,
) -> None:
    stack = survival.stack
    await survival.stack.heal(ready_timeout_s=90)
    sdk = openai.AsyncOpenAI(api_key="unused", base_url=stack.base_url(0) + "/v1", max_retries=0)
    secret = (await sdk.realtime.client_secrets.create(session=TRANSCRIPTION)).value  # type: ignore[arg-type]
    bearer = {"Authorization": f"Bearer {secret}"}
    moon, ocean = await spoken("Tell me about the moon.", "Tell me about the ocean.")
    first, second, stranger, other = (RealtimeClient() for _ in range(4))
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            created = await call(first, http, stack.base_url(0), bearer)
            assert created.status_code == 201, created.text
            session_id, token = created.headers[SESSION_HEADER], created.headers[TOKEN_HEADER]
            hello = first.events[0]
            assert hello["session"]["type"] == "transcription", hello
            assert hello["voicerelay"] == {"session_id": session_id, "resume_token": token}
            asked = hello["session"]["audio"]["input"]
            assert asked["transcription"] == {"model": "gpt-4o-transcribe", "language": "en"}
            assert asked["turn_detection"]["silence_duration_ms"] == 700
            asked = hello["session"]["audio"]["input"]
            assert asked["transcription"] == {"model": "gpt-4o-transcribe", "language": "en"}
            assert asked["turn_detection"]["silence_duration_ms"] == 700
            assert "moon" in await transcribed(first, moon)
            state = await stored_until(survival, session_id, lambda st: bool(st.items))
            assert state.config[CONTRACT_KEY] == {"type": "transcription"}

            stack.transceivers[0].send_signal(signal.SIGKILL)
            await stack.transceivers[0].exited(10)
            as_realtime = await resume(stranger, http, stack.base_url(1), session_id, token)
            assert as_realtime.status_code == 409, as_realtime.text
            assert as_realtime.json()["error"]["code"] == "session_contract_mismatch"
            resumed = await call(
                second, http, stack.base_url(1), {**bearer, TOKEN_HEADER: token},
                {"session_id": session_id},
            )  # fmt: skip
            assert resumed.status_code == 201, resumed.text
            assert second.events[0]["session"] == hello["session"]  # the stored config
            assert "ocean" in await transcribed(second, ocean)
            assert not [e for e in second.events if e["type"].startswith("response.")]

            realtime_id, realtime_token = await opened(stranger, http, stack.base_url(1))
            before = await stored(survival, realtime_id)
            as_transcription = await call(
                other, http, stack.base_url(1), {**bearer, TOKEN_HEADER: realtime_token},
                {"session_id": realtime_id},
            )  # fmt: skip
        assert as_transcription.status_code == 409, as_transcription.text
        assert as_transcription.json()["error"]["code"] == "session_contract_mismatch"
        after = await stored(survival, realtime_id)
        assert (after.owner_id, after.token) == (before.owner_id, before.token)
    finally:
        for client in (first, second, stranger, other):
            await client.close()


async def spoken(*sentences: str) -> list[bytes]:
    """Each sentence (piper, noise off) between silences, at the peer's 48 kHz."""
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    try:
        return [silence(500) + await speak(tts, words) + silence(1500) for words in sentences]
    finally:
        await tts.aclose()


async def transcribed(client: RealtimeClient, pcm: bytes) -> list[str]:
    """The words of the transcript of ``pcm`` spoken into the client's microphone."""
    start = len(client.events)
    client.mic.say(pcm)
    completed = await client.wait_for(TRANSCRIBED, after=start, timeout_s=60)
    return re.findall(r"[a-z']+", str(completed["transcript"]).lower())
