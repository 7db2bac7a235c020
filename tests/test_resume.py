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


async def test_conversation_edits_survive_a_kill_and_resume_elsewhere(survival: Survival) -> None:
    stack = survival.stack
    if not stack.transceivers[0].alive():  # killed by the first test: a new one in its place
        await stack.transceivers[0].start().ready(timeout_s=90)
    first, second = RealtimeClient(), RealtimeClient()
    try:
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
    finally:
        await first.close()
        await second.close()


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
    for process in stack.transceivers:  # killed by the tests before: new ones in their place
        if not process.alive():
            await process.start().ready(timeout_s=90)
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
