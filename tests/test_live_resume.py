"""GPT-Live sessions survive their transceiver: a real redis-server, a relay and three pipeline
transceivers (offline providers), and the official ``openai`` SDK's ``client.live.create(...)``,
unchanged but for its base URL, posting aiortc offers.

- SIGKILL: a Live session with Responses delegation (a function tool, backend instructions,
  instructions appended) is asked a spoken question on transceiver A; A is killed. The client's
  new offer names the session (``?session_id=`` and its resume token) and lands on B:
  ``session.started`` reports the stored config, not the resume request's; the data channel
  speaks Live (every event validates as the SDK's type); a spoken "what did I just ask?" is
  answered from the stored conversation. The same session cannot then be resumed as a Realtime
  call (409), and B keeps it (nothing is claimed).
- SIGTERM (drain): B's Live session finishes its answer, is told
  ``voicerelay.session.reconnect`` and resumes on C with its conversation; B exits.
- The other way round: a Realtime call's session named in ``POST /v1/live/sessions`` is refused
  (409 ``session_contract_mismatch``) and the call goes on.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
import pytest_asyncio
from aiortc import RTCSessionDescription
from openai.types.live.server_event import ServerEvent

from deploy.redis_server import redis_server_binary
from deploy.survival import Survival, contents, stored, stored_until, survival_stack
from deploy.waiting import eventually
from loadtest.realtime_client import (
    SESSION_HEADER,
    TOKEN_HEADER,
    RealtimeClient,
    ask,
    call,
    opened,
    silence,
    speak,
)
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech
from transceiver.store.contracts import CONTRACT_KEY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
SERVER_EVENT = pydantic.TypeAdapter(ServerEvent)
TURN_TIMEOUT_S = 60.0  # generous: the machine is shared
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
SESSION = {
    "model": "gpt-live-1",
    "instructions": "Be brief.",
    "delegation": {
        "type": "responses",
        "responses": {"model": "gpt-5-mini", "instructions": "Use tools.", "tools": [WEATHER]},
    },
}
RECONNECT = "voicerelay.session.reconnect"  # the drain's notice: a voicerelay extension


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def survival(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Survival]:
    async with survival_stack(tmp_path_factory.mktemp("live-resume"), transceivers=3) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def spoken() -> dict[str, bytes]:
    """The questions (piper, noise off) between silences, at the peer's 48 kHz."""
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    try:
        return {
            words: silence(500) + await speak(tts, words) + silence(1500)
            for words in ("Tell me about water.", "What did I just ask?")
        }
    finally:
        await tts.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def peers() -> AsyncIterator[list[RealtimeClient]]:
    clients = [RealtimeClient() for _ in range(3)]  # a microphone and the oai-events channel
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


async def created(
    survival: Survival,
    index: int,
    peer: RealtimeClient,
    session: dict[str, Any],
    resumed: tuple[str, str] | None = None,
) -> tuple[str, str]:
    """A Live session from the peer's offer on transceiver ``index`` (or the one ``resumed``
    names, with its token), once started: its id and resume token."""
    base_url = survival.stack.base_url(index) + "/v1"
    client = openai.AsyncOpenAI(api_key="unused", base_url=base_url, max_retries=0)
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    transport = {"type": "webrtc", "sdp": peer.pc.localDescription.sdp}
    extra: dict[str, Any] = {}
    if resumed is not None:
        extra = {"extra_query": {"session_id": resumed[0]}}
        extra["extra_headers"] = {TOKEN_HEADER: resumed[1]}
    raw = await client.live.with_raw_response.create(
        session=session,  # type: ignore[arg-type]
        transport=transport,  # type: ignore[arg-type]
        **extra,
    )
    assert raw.status_code == 201, raw.text
    answer = raw.parse()
    await peer.pc.setRemoteDescription(RTCSessionDescription(answer.transport.sdp, "answer"))
    started = await peer.wait_for("session.started", timeout_s=15)
    assert started["session"]["id"] == answer.session.id == raw.headers[SESSION_HEADER]
    return answer.session.id, raw.headers[TOKEN_HEADER]


async def spoken_turn(peer: RealtimeClient, pcm: bytes) -> str:
    """Speak ``pcm``; the answer's transcript once the turn is over."""
    start = len(peer.events)
    peer.mic.say(pcm)
    await peer.wait_for("session.usage.updated", after=start, timeout_s=TURN_TIMEOUT_S)
    deltas = peer.events[start:]
    return "".join(e["delta"] for e in deltas if e["type"] == "session.output_transcript.delta")


def checked(peer: RealtimeClient) -> None:
    """Every event the peer received is one the SDK's types accept (the drain's notice aside)."""
    for event in peer.events:
        if event["type"] != RECONNECT:
            assert SERVER_EVENT.validate_python(event).type == event["type"], event


async def test_a_killed_transceivers_live_session_resumes_elsewhere_speaking_live(
    survival: Survival, spoken: dict[str, bytes], peers: list[RealtimeClient]
) -> None:
    first, second, stranger = peers
    session_id, token = await created(survival, 0, first, SESSION)
    appended = {"type": "session.instructions.append", "content": "Be kind."}
    first.send({**appended, "delegation_id": None})
    await first.wait_for("session.instructions.appended")
    answer = await spoken_turn(first, spoken["Tell me about water."])
    assert answer.startswith("Water covers"), answer

    def answered(state: Any) -> bool:
        live = state.config.get(CONTRACT_KEY, {})
        return ("assistant", answer) in contents(state) and bool(live["instructions_appended"])

    state = await stored_until(survival, session_id, answered)
    live = state.config[CONTRACT_KEY]
    assert live["type"] == "live" and live["instructions_appended"] == ["Be kind."]
    assert live["session"]["delegation"]["responses"]["tools"][0]["name"] == "get_weather"

    killed_at = time.monotonic()
    survival.stack.transceivers[0].send_signal(signal.SIGKILL)
    await survival.stack.transceivers[0].exited(10)
    await created(survival, 1, second, {"model": "another-model"}, (session_id, token))
    resumed_ms = (time.monotonic() - killed_at) * 1000  # reported, not asserted
    print(f"\ntransceiver kill to the Live session started again elsewhere: {resumed_ms:.0f} ms")
    started = second.events[0]["session"]
    assert started["model"] == "gpt-live-1"  # the stored config, not the resume request's
    assert started["delegation"] == first.events[0]["session"]["delegation"]
    recall = await spoken_turn(second, spoken["What did I just ask?"])
    assert recall.startswith("You asked:") and "water" in recall.lower(), recall
    assert not [e for e in second.events if e["type"] == "error"], second.events
    checked(first)
    checked(second)
    after = await stored(survival, session_id)
    assert contents(after)[: len(contents(state))] == contents(state)  # nothing lost
    assert after.owner_id != state.owner_id and after.token > state.token
    assert after.config[CONTRACT_KEY] == live  # stored on, unchanged
    async with httpx.AsyncClient(timeout=30) as http:  # a Realtime resume of a Live session
        wrong = await call(
            stranger, http, survival.stack.base_url(2), {TOKEN_HEADER: token},
            {"session_id": session_id},
        )  # fmt: skip
    assert wrong.status_code == 409, wrong.text
    assert wrong.json()["error"]["code"] == "session_contract_mismatch"
    untouched = await stored(survival, session_id)  # B keeps it: nothing was claimed
    assert (untouched.owner_id, untouched.token) == (after.owner_id, after.token)


async def test_a_draining_transceiver_hands_its_live_session_over(
    survival: Survival, spoken: dict[str, bytes], peers: list[RealtimeClient]
) -> None:
    first, second, _ = peers
    draining = survival.stack.transceivers[1]
    session_id, token = await created(survival, 1, first, SESSION)
    first.mic.say(spoken["Tell me about water."])
    await first.wait_for("session.output_transcript.delta", timeout_s=TURN_TIMEOUT_S)
    draining.send_signal(signal.SIGTERM)  # mid-answer
    moved = await first.wait_for(RECONNECT, timeout_s=TURN_TIMEOUT_S)
    assert moved["session_id"] == session_id and moved["reason"] == "draining"
    done = await first.wait_for("session.usage.updated")
    assert first.index(done) < first.index(moved)  # the answer finished first
    completed = await first.wait_for("response.event", lambda e: e["event"]["type"].startswith(
        "response.completed"))  # fmt: skip
    assert first.index(completed) < first.index(moved)

    await created(survival, 2, second, SESSION, (session_id, token))
    await first.close()
    recall = await spoken_turn(second, spoken["What did I just ask?"])
    assert recall.startswith("You asked:") and "water" in recall.lower(), recall
    checked(second)
    await eventually(lambda: not draining.alive(), 30, "the drained transceiver to exit")
    assert await draining.exited(1) == 0


async def test_a_realtime_session_is_not_resumed_as_a_live_one(
    survival: Survival, peers: list[RealtimeClient]
) -> None:
    realtime, live, _ = peers
    async with httpx.AsyncClient(timeout=30) as http:
        session_id, token = await opened(realtime, http, survival.stack.base_url(2))
    with pytest.raises(openai.ConflictError) as refused:
        await created(survival, 2, live, SESSION, (session_id, token))
    assert refused.value.code == "session_contract_mismatch"
    assert (await ask(realtime, "Tell me about water.")).startswith("Water covers")
