"""The sideband across transceivers, driven by the official ``openai`` SDK (unchanged but for
its base URL): the call runs on transceiver A, the sideband lands on transceiver B, which
forwards it to A (``transceiver.http.sideband``, ``owner_hop``).

Real processes: redis-server, a relay, two pipeline transceivers (offline providers, the API key
required, sessions found through Redis). The calls are aiortc peers through the relay: a
Realtime call (``POST /v1/realtime/calls``) whose tool call is answered by a sideband
(``client.realtime.connect(call_id=...)``) and the answer spoken on the call; a GPT-Live call
(``client.live.create``) watched and steered by ``client.live.sideband.connect``; the web client
in headless Chromium, whose tool a sideband answers. Then the bad input (``ek_`` secret, wrong
key, unknown call, forged hop header, unknown parameter) and, last, the owner killed under a
forwarded sideband, which attaches again once the client resumed the session elsewhere.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pydantic
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import websockets
from aiortc import RTCSessionDescription
from openai.resources.live.sideband import AsyncSidebandConnection
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.types.live.connect_server_event import ConnectServerEvent
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from playwright.async_api import Page
from records_stack import recording_stack
from websocket_harness import EventLog

from deploy.processes import Stack
from deploy.redis_server import RedisServer, redis_server_binary
from deploy.waiting import eventually, poll
from loadtest.browser import chromium, recorded_audio
from loadtest.realtime_client import (
    TOKEN_HEADER,
    RealtimeClient,
    audible,
    silence,
    speak,
    user_text,
)
from loadtest.voice_audio import silence_pcm, write_wav
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech
from relay.wire.redis_config import RedisConfig
from relay.wire.ufrag import Keyring
from transceiver.http.hop_signature import HOP_HEADER, PREVIOUS_HOP_HEADER, HopKeys
from transceiver.http.owner_hop import BAD_GATEWAY, OWNER_GONE
from transceiver.store.journal import SESSION_HEADER
from transceiver.store.sideband_directory import locate_owner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
API_KEY = "test-sideband-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TURN_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 60.0
REALTIME_EVENT = pydantic.TypeAdapter(RealtimeServerEvent)
LIVE_EVENT = pydantic.TypeAdapter(ConnectServerEvent)
TOOL = {
    "type": "function",
    "name": "lookup_knowledge",  # the built-in the local agent calls: declared, it is the client's
    "description": "Look a topic up.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
}
SIDEBAND_ANSWER = "The sideband says the moon is made of rock."


@dataclass
class Running:
    stack: Stack
    redis: RedisServer


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    log_dir = tmp_path_factory.mktemp("sideband")
    redis = RedisServer(log_dir, "redis").start()
    try:
        async with recording_stack(log_dir, redis, 2, {"TRANSCEIVER_API_KEY": API_KEY}) as stack:
            yield Running(stack, redis)
    finally:
        redis.stop()
    assert "Traceback" not in (log_dir / "transceiver1.log").read_text()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def question() -> bytes:
    """A spoken question (piper, noise off) between silences, at the peer's 48 kHz."""
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    try:
        return silence(500) + await speak(tts, "Tell me about the moon.") + silence(1500)
    finally:
        await tts.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def peer() -> AsyncIterator[RealtimeClient]:
    client = RealtimeClient()  # a microphone track and the oai-events channel
    try:
        yield client
    finally:
        await client.close()


def sdk(base_url: str, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=api_key, base_url=base_url + "/v1", max_retries=0)


class RealtimeSideband(EventLog[AsyncRealtimeConnection]):
    def check(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if not kind.startswith("voicerelay."):
            REALTIME_EVENT.validate_python(event)


class LiveSideband(EventLog[AsyncSidebandConnection]):
    def check(self, event: dict[str, Any]) -> None:
        assert LIVE_EVENT.validate_python(event).type == event["type"], event


async def announced(running: Running, target_id: str) -> None:
    """Wait until Redis leads from ``target_id`` to its owner (the call's record, written
    within ms of the call's answer, the session's lease, the owner's address record; a
    sideband that comes sooner would get its 404)."""
    prefix = RedisConfig(url=running.redis.url).key_prefix
    client = aioredis.Redis.from_url(running.redis.url)
    try:
        found = await poll(
            lambda: locate_owner(client, prefix, target_id), lambda o: o is not None, 10, repr, 0.02
        )
    finally:
        await client.aclose()
    assert found is not None and found.worker is None, found


async def realtime_call(
    running: Running, peer: RealtimeClient, index: int = 0, headers: dict[str, str] | None = None
) -> str:
    """A Realtime call from ``peer`` on transceiver ``index`` (A; ``headers``: a resume's);
    its call id, once connected (a generous deadline: ICE and DTLS through the relay take
    seconds on a loaded machine) and found through Redis."""
    created = await answered_call(running, peer, index, headers)
    return created.headers["Location"].rsplit("/", 1)[1]


async def answered_call(
    running: Running, peer: RealtimeClient, index: int = 0, headers: dict[str, str] | None = None
) -> httpx.Response:
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    async with httpx.AsyncClient(timeout=30) as http:
        created = await http.post(
            running.stack.base_url(index) + "/v1/realtime/calls",
            content=peer.pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", **AUTH, **(headers or {})},
        )
    assert created.status_code == 201, created.text
    await peer.pc.setRemoteDescription(RTCSessionDescription(created.text, "answer"))
    await peer.wait_for("session.created", timeout_s=CONNECT_TIMEOUT_S)
    await announced(running, created.headers["Location"].rsplit("/", 1)[1])
    return created


def spoken(events: list[dict[str, Any]], response_id: str) -> str:
    deltas = (e for e in events if e["type"] == "response.output_audio_transcript.delta")
    return "".join(e["delta"] for e in deltas if e["response_id"] == response_id)


async def answer_the_tool(side: RealtimeSideband) -> str:
    """Wait for the call's ``lookup_knowledge`` call, answer it as the sideband; the id of the
    response that answers with it."""
    called = await side.next("response.function_call_arguments.done", TURN_TIMEOUT_S)
    assert called["name"] == "lookup_knowledge", called
    await side.next("response.done")  # the tool call ends its response: answer after it
    output = json.dumps({"found": True, "answer": SIDEBAND_ANSWER})
    item = {"type": "function_call_output", "call_id": called["call_id"], "output": output}
    await side.connection.conversation.item.create(item=item)
    await side.connection.response.create()
    response_id: str = (await side.next("response.created"))["response"]["id"]
    return response_id


async def test_a_sideband_on_another_transceiver_answers_the_calls_tool(
    running: Running, peer: RealtimeClient, question: bytes
) -> None:
    call_id = await realtime_call(running, peer)
    async with sdk(running.stack.base_url(1)).realtime.connect(call_id=call_id) as connection:
        side = RealtimeSideband(connection)
        await connection.session.update(session={"type": "realtime", "tools": [TOOL]})
        assert (await side.next("session.updated"))["session"]["tools"][0]["name"] == TOOL["name"]
        await peer.wait_for("session.updated")  # the call's client is told too
        peer.mic.say(question)
        response_id = await answer_the_tool(side)
        heard = await peer.wait_for("conversation.item.input_audio_transcription.completed")
        assert "moon" in re.findall(r"[a-z']+", heard["transcript"].lower()), heard
        answered = await side.next("response.done", TURN_TIMEOUT_S)
        # the sideband saw the call's events: the words heard, and the answer it caused
        assert heard in side.of("conversation.item.input_audio_transcription.completed")
        assert answered["response"]["id"] == response_id
    await peer.wait_for("response.done", lambda e: e["response"]["id"] == response_id)
    assert spoken(peer.events, response_id) == SIDEBAND_ANSWER  # the call spoke it
    await peer.wait_for("output_audio_buffer.stopped", lambda e: e["response_id"] == response_id)
    assert audible(peer)
    assert not [e for e in peer.events if e["type"] == "error"], peer.events


async def live_call(
    running: Running, index: int, peer: RealtimeClient, resumed: tuple[str, str] | None = None
) -> tuple[str, str]:
    """A GPT-Live WebRTC session from ``peer`` on transceiver ``index`` (or the one ``resumed``
    names, with its token), once started: its id and resume token."""
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    transport = {"type": "webrtc", "sdp": peer.pc.localDescription.sdp}
    extra: dict[str, Any] = {}
    if resumed is not None:
        extra = {"extra_query": {"session_id": resumed[0]}}
        extra["extra_headers"] = {TOKEN_HEADER: resumed[1]}
    raw = await sdk(running.stack.base_url(index)).live.with_raw_response.create(
        session={"model": "gpt-live-1"}, transport=transport, **extra
    )
    assert raw.status_code == 201, raw.text
    answer = raw.parse()
    await peer.pc.setRemoteDescription(RTCSessionDescription(answer.transport.sdp, "answer"))
    await peer.wait_for("session.started", timeout_s=CONNECT_TIMEOUT_S)
    return answer.session.id, raw.headers[TOKEN_HEADER]


async def test_a_live_sideband_through_another_transceiver_sees_and_steers_the_session(
    running: Running, peer: RealtimeClient
) -> None:
    session_id, _ = await live_call(running, 0, peer)
    await announced(running, session_id)
    sideband = sdk(running.stack.base_url(1)).live.sideband
    async with sideband.connect(session_id=session_id) as connection:
        side = LiveSideband(connection)
        await connection.session.instructions.append(
            content="Be kind.", delegation_id=None, event_id="i1"
        )
        appended = await side.next("session.instructions.appended")
        assert appended["client_event_id"] == "i1"
        await peer.wait_for("session.instructions.appended")  # the session's client sees it too
        peer.send({"type": "session.explode", "event_id": "x"})  # the client's bad event
        error = (await side.next("error"))["error"]
        assert (error["code"], error["client_event_id"]) == ("invalid_value", "x")
        await connection.session.close(event_id="bye")
        closed = await side.next("session.closed")
        assert (closed["reason"], closed["session"]["id"]) == ("close_requested", session_id)
        with pytest.raises(websockets.ConnectionClosedOK) as ended:  # the owner's 1000, passed on
            await connection.recv_bytes()
    assert ended.value.rcvd is not None and ended.value.rcvd.reason == "session ended"
    await peer.wait_for("session.closed")


async def test_bad_sidebands_are_refused_before_the_upgrade(
    running: Running, peer: RealtimeClient
) -> None:
    call_id = await realtime_call(running, peer)
    base_a, base_b = running.stack.base_url(0), running.stack.base_url(1)
    async with httpx.AsyncClient(timeout=10) as http:
        minted = await http.post(base_a + "/v1/realtime/client_secrets", headers=AUTH)
    assert minted.status_code == 200, minted.text
    refusals = {
        "ek_ secret": (sdk(base_b, minted.json()["value"]), call_id, {}, {}),
        "wrong key": (sdk(base_b, "wrong-key-" + "x" * 16), call_id, {}, {}),
        "unknown call": (sdk(base_b), "rtc_" + "0" * 24, {}, {}),
        "forged hop": (sdk(base_a), call_id, {HOP_HEADER: "1.4.99999999999.forged"}, {}),
        "unknown parameter": (sdk(base_b), call_id, {}, {"voice": "x"}),
    }
    found = {}
    for name, (client, target, headers, query) in refusals.items():
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with client.realtime.connect(
                call_id=target, extra_headers=headers, extra_query=query
            ):
                pass
        body = json.loads(refused.value.response.body)["error"]
        found[name] = (refused.value.response.status_code, body["code"])
    assert found == {
        "ek_ secret": (401, "invalid_api_key"),
        "wrong key": (401, "invalid_api_key"),
        "unknown call": (404, "call_not_found"),
        "forged hop": (403, "invalid_hop"),
        "unknown parameter": (400, "unknown_parameter"),
    }
    async with sdk(base_b).realtime.connect(call_id=call_id) as connection:  # and it is there
        await connection.session.update(session={"type": "realtime", "instructions": "Hi."})
        assert (await RealtimeSideband(connection).next("session.updated"))["session"]


async def test_a_sideband_answers_the_tool_of_a_chromium_call(
    running: Running, tmp_path: Path
) -> None:
    """The web client in headless Chromium calls transceiver A (an ``ek_`` secret from A); the
    sideband, through B, declares the tool and answers it; the page hears the answer."""
    base_a = running.stack.base_url(0)
    async with httpx.AsyncClient(timeout=10) as http:
        minted = await http.post(base_a + "/v1/realtime/client_secrets", headers=AUTH)
    assert minted.status_code == 200, minted.text
    quiet = write_wav(tmp_path / "silence.wav", silence_pcm(60.0))  # the question is typed
    async with chromium(quiet) as browser:
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(base_a + "/")
        await page.wait_for_function("window.voicerelay !== undefined", timeout=10_000)
        connect = "(key) => window.voicerelay.connect({key, record: true})"
        await page.evaluate(connect, minted.json()["value"])
        await page_event(page, "e.type === 'session.created'")
        call_id = str(await page.text_content("#state-call")).rsplit("/", 1)[1]
        await announced(running, call_id)
        async with sdk(running.stack.base_url(1)).realtime.connect(call_id=call_id) as connection:
            side = RealtimeSideband(connection)
            await connection.session.update(session={"type": "realtime", "tools": [TOOL]})
            await side.next("session.updated")
            await page.evaluate("(e) => window.voicerelay.send(e)", user_text("The moon?"))
            await page.evaluate("window.voicerelay.send({type: 'response.create'})")
            response_id = await answer_the_tool(side)
        stopped = f"e.type === 'output_audio_buffer.stopped' && e.response_id === '{response_id}'"
        await page_event(page, stopped)
        said = await page.evaluate(
            "(id) => window.voicerelay.events.filter((e) => e.response_id === id &&"
            " e.type === 'response.output_audio_transcript.delta').map((e) => e.delta).join('')",
            response_id,
        )
        assert said == SIDEBAND_ANSWER
        samples, _ = await recorded_audio(page)
        assert np.abs(samples).max() > 0.05, "the page heard no answer"
        await page.evaluate("window.voicerelay.hangup()")
    assert errors == []


async def page_event(page: Page, predicate: str) -> Any:
    """The first event the page received satisfying the JS ``predicate`` on ``e``."""
    script = f"window.voicerelay.events.find((e) => {predicate}) || null"
    handle = await page.wait_for_function(script, timeout=TURN_TIMEOUT_S * 1000, polling=100)
    return await handle.json_value()


async def test_a_hang_up_on_another_transceiver_reaches_the_call(
    running: Running, peer: RealtimeClient
) -> None:
    """A hang-up for A's call sent to B is forwarded to A, which ends the call. Before it: a
    forged hop header is refused, and a hop that B verifies as already between transceivers
    is not forwarded again (404), so the call runs on: under the header's name and, for one
    release, its previous one."""
    call_id = await realtime_call(running, peer)
    path = f"/v1/realtime/calls/{call_id}"
    base_a, base_b = running.stack.base_url(0), running.stack.base_url(1)
    keys = HopKeys(Keyring.parse(running.stack.secret_keys))
    hopped = keys.sign(f"hangup:{call_id}", AUTH["Authorization"], time.time())
    async with httpx.AsyncClient(timeout=30) as http:
        forged = await http.delete(base_b + path, headers={**AUTH, HOP_HEADER: "1.4.9.forged"})
        looped = await http.delete(base_b + path, headers={**AUTH, HOP_HEADER: hopped})
        old_forged = {**AUTH, PREVIOUS_HOP_HEADER: "1.4.9.forged"}
        forged_as_before = await http.delete(base_b + path, headers=old_forged)
        looped_as_before = await http.delete(
            base_b + path, headers={**AUTH, PREVIOUS_HOP_HEADER: hopped}
        )
        unauthorised = await http.delete(base_b + path)
        hung_up = await http.post(base_b + path + "/hangup", headers=AUTH)
        gone_at_a = await http.delete(base_a + path, headers=AUTH)
        gone_at_b = await http.delete(base_b + path, headers=AUTH)
    for refused in (forged, forged_as_before):
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "invalid_hop")
    for stopped in (looped, looped_as_before):
        assert (stopped.status_code, stopped.json()["error"]["code"]) == (404, "call_not_found")
    assert unauthorised.status_code == 401
    assert hung_up.status_code == 204, hung_up.text  # only A runs the call: A ended it
    for gone in (gone_at_a, gone_at_b):
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "call_not_found")


async def test_an_earlier_call_s_id_reaches_its_session_resumed_on_another_transceiver(
    running: Running, peer: RealtimeClient
) -> None:
    """A Realtime call on A, resumed by a new call on B: a sideband naming the first call's id,
    landing on A, reaches the session on B (the call's record names the session, its lease B);
    so does a hang-up naming it, once A's call has ended: it ends the call on B."""
    first = await answered_call(running, peer)
    first_id = first.headers["Location"].rsplit("/", 1)[1]
    resume = {name: first.headers[name] for name in (SESSION_HEADER, TOKEN_HEADER)}
    resumed = RealtimeClient()
    base_a, base_b = running.stack.base_url(0), running.stack.base_url(1)
    try:
        second_id = await realtime_call(running, resumed, 1, resume)
        assert second_id != first_id
        async with sdk(base_a).realtime.connect(call_id=first_id) as connection:
            await connection.session.update(session={"type": "realtime", "instructions": "Hi."})
            assert (await RealtimeSideband(connection).next("session.updated"))["session"]
            await resumed.wait_for("session.updated")  # the resumed call's client is told
        await peer.wait_for("error", lambda e: e["error"]["code"] == "session_taken_over")
        await eventually(lambda: peer.pc.connectionState in ("closed", "failed"), TURN_TIMEOUT_S,
                         "A to hang up the call it lost")  # fmt: skip
        async with httpx.AsyncClient(timeout=30) as http:
            hung_up = await http.delete(f"{base_a}/v1/realtime/calls/{first_id}", headers=AUTH)
            gone = await http.delete(f"{base_b}/v1/realtime/calls/{second_id}", headers=AUTH)
        assert hung_up.status_code == 204, hung_up.text  # through A, the call on B ended
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "call_not_found")
    finally:
        await resumed.close()


async def test_the_owner_dying_closes_a_forwarded_sideband_which_attaches_again_once_resumed(
    running: Running, peer: RealtimeClient
) -> None:
    """Last: transceiver A is killed under a Live session's sideband forwarded by B; the client
    resumes the session on B, and the sideband attaches to it again."""
    session_id, token = await live_call(running, 0, peer)
    await announced(running, session_id)
    sideband = sdk(running.stack.base_url(1)).live.sideband
    async with sideband.connect(session_id=session_id) as connection:
        await connection.session.instructions.append(content="Hi.", delegation_id=None)
        await LiveSideband(connection).next("session.instructions.appended")  # through the hop
        running.stack.transceivers[0].send_signal(signal.SIGKILL)
        with pytest.raises(websockets.ConnectionClosedError) as gone:
            await LiveSideband(connection).next("never")
    assert gone.value.rcvd is not None, gone.value
    assert (gone.value.rcvd.code, gone.value.rcvd.reason) == (BAD_GATEWAY, OWNER_GONE)
    with pytest.raises(websockets.InvalidStatus) as again:  # until the session runs again
        async with sideband.connect(session_id=session_id):
            pass
    assert again.value.response.status_code == 404
    assert json.loads(again.value.response.body)["error"]["code"] == "session_not_found"
    resumed = RealtimeClient()
    try:
        await live_call(running, 1, resumed, (session_id, token))
        async with sideband.connect(session_id=session_id) as connection:
            await connection.session.instructions.append(content="Again.", delegation_id=None)
            appended = await LiveSideband(connection).next("session.instructions.appended")
            assert appended["type"] == "session.instructions.appended"
            await resumed.wait_for("session.instructions.appended")  # the resumed client's
    finally:
        await resumed.close()
