"""GPT-Live over WebRTC and its sideband, driven by the official ``openai`` SDK.

A real relay process (one worker, one public port) in front of a real transceiver process
(``--agent pipeline``, offline providers, auth required). An aiortc peer (a microphone track and
the ``oai-events`` data channel) makes its offer; ``client.live.create(...)``, unchanged but for
its base URL, posts it to ``/v1/live/sessions`` and gets the answer, whose candidates are the
relay's public port. Piper's spoken question goes on the track and must be heard and answered
(the transcripts on the data channel). A trusted server attaches with
``client.live.sideband.connect(session_id=...)`` and sees the session's events and drives it.
Mute works on the media track: speech while muted is never heard or answered, speech after
the unmute is. Every event either side receives must validate as the SDK's own type.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
import pytest_asyncio
import websockets
from aiortc import RTCSessionDescription
from openai.resources.live.sideband import AsyncSidebandConnection
from openai.types.live.connect_server_event import ConnectServerEvent
from openai.types.live.live_create_response import LiveCreateResponse
from openai.types.live.server_event import ServerEvent
from websocket_harness import EventLog

from deploy.processes import Stack, free_port, transceiver_process
from deploy.waiting import eventually
from loadtest.realtime_client import RealtimeClient, silence, speak
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech
from transceiver.webrtc.sdp import candidate_addresses

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
API_KEY = "vr-live-rtc-" + os.urandom(12).hex()
SERVER_EVENT = pydantic.TypeAdapter(ServerEvent)
SIDEBAND_EVENT = pydantic.TypeAdapter(ConnectServerEvent)
TURN_TIMEOUT_S = 30.0


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """One relay worker in front of one pipeline transceiver that requires the API key."""
    log_dir: Path = tmp_path_factory.mktemp("live-webrtc")
    running = Stack(log_dir, transceivers=1, workers=1, agent="pipeline")
    env = {"TRANSCEIVER_SECRET_KEYS": running.secret_keys, "TRANSCEIVER_API_KEY": API_KEY}
    env |= {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}  # offline providers whatever the host
    env |= {"PIPELINE_PIPER_NOISE_SCALE": "0", "PIPELINE_PIPER_NOISE_W_SCALE": "0"}
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    running.transceivers = [
        transceiver_process(
            "transceiver0", running.links[0], http, running.public_text, running.keys, log_dir,
            env, agent="pipeline", auth="required",
        )
    ]  # fmt: skip
    try:
        for process in [*running.transceivers, running.relay]:
            process.start()
        await running.transceivers[0].ready(timeout_s=90)  # the pipeline loads its models
        await running.relay.ready()
        await running.keyed()
        yield running
    finally:
        await running.stop()
    assert "Traceback" not in (log_dir / "transceiver0.log").read_text()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def questions() -> dict[str, bytes]:
    """Spoken questions (piper, noise off) between silences, at the peer's 48 kHz, by topic."""
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    try:
        return {
            topic: silence(500) + await speak(tts, f"Tell me about {topic}.") + silence(1500)
            for topic in ("the moon", "water")
        }
    finally:
        await tts.aclose()


@pytest.fixture
def question(questions: dict[str, bytes]) -> bytes:
    return questions["the moon"]


def sdk(stack: Stack, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=api_key, base_url=stack.base_url(0) + "/v1", max_retries=0)


class Sideband(EventLog[AsyncSidebandConnection]):
    def check(self, event: dict[str, Any]) -> None:
        assert SIDEBAND_EVENT.validate_python(event).type == event["type"], event


async def created(stack: Stack, peer: RealtimeClient, session: dict[str, Any]) -> str:
    """A Live session made by the SDK from the peer's offer; its id, once it has started."""
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    transport = {"type": "webrtc", "sdp": peer.pc.localDescription.sdp}
    raw = await sdk(stack).live.with_raw_response.create(session=session, transport=transport)
    assert raw.status_code == 201, raw.text
    assert set(json.loads(raw.text)) == {"session", "transport"}, raw.text
    answer: LiveCreateResponse = raw.parse()
    assert answer.transport.type == "webrtc"
    assert set(candidate_addresses(answer.transport.sdp)) == set(stack.public_addresses)
    await peer.pc.setRemoteDescription(RTCSessionDescription(answer.transport.sdp, "answer"))
    started = await peer.wait_for("session.started", timeout_s=15)
    assert started["session"]["id"] == answer.session.id
    return answer.session.id


def checked(peer: RealtimeClient) -> None:
    for event in peer.events:
        assert SERVER_EVENT.validate_python(event).type == event["type"], event


async def test_client_live_create_answers_and_a_spoken_turn_goes_through_the_relay(
    stack: Stack, peer: RealtimeClient, question: bytes
) -> None:
    session_id = await created(stack, peer, {"model": "gpt-live-1", "instructions": "Be brief."})
    started = peer.events[0]
    assert started["type"] == "session.started" and started["session"]["model"] == "gpt-live-1"
    assert "format" not in started["session"]["audio"]  # WebRTC negotiated the media format
    async with sdk(stack).live.sideband.connect(session_id=session_id) as connection:
        side = Sideband(connection)
        peer.mic.say(question)
        heard = await peer.wait_for("session.input_transcript.delta", timeout_s=TURN_TIMEOUT_S)
        assert "moon" in re.findall(r"[a-z']+", heard["delta"].lower()), heard
        await peer.wait_for("session.usage.updated", timeout_s=TURN_TIMEOUT_S)
        said = "".join(
            e["delta"] for e in peer.events if e["type"].endswith("output_transcript.delta")
        )
        assert "moon" in said.lower(), said
        # the sideband, attached before the question, saw the same turn
        assert (await side.next("session.input_transcript.delta"))["delta"] == heard["delta"]
        await side.next("session.usage.updated")
        side_said = "".join(e["delta"] for e in side.of("session.output_transcript.delta"))
        assert side_said == said
    assert not [e for e in peer.events if e["type"] == "error"], peer.events
    peer.send({"type": "session.close"})
    await peer.wait_for("session.closed")
    checked(peer)


async def test_a_sideband_drives_the_session_and_is_closed_with_it(
    stack: Stack, peer: RealtimeClient
) -> None:
    session_id = await created(stack, peer, {"model": "gpt-live-1"})
    client = sdk(stack)
    async with client.live.sideband.connect(session_id=session_id) as connection:
        side = Sideband(connection)
        instructions = connection.session.instructions
        await instructions.append(content="Be kind.", delegation_id=None, event_id="i1")
        appended = await side.next("session.instructions.appended")
        assert appended["client_event_id"] == "i1"
        await peer.wait_for("session.instructions.appended")  # the client sees it too
        append = {"type": "session.input_audio.append", "audio": "AAAA", "event_id": "a"}
        peer.send(append)  # over WebRTC the audio is the media track
        refused = await peer.wait_for("error", lambda e: e["error"]["client_event_id"] == "a")
        assert refused["error"]["code"] == "unsupported_event"
        assert (await side.next("error"))["error"]["client_event_id"] == "a"  # it sees that too
        await connection.send_raw(json.dumps({"type": "session.explode", "event_id": "x"}))
        error = (await side.next("error"))["error"]
        assert (error["code"], error["client_event_id"]) == ("invalid_value", "x")
        await connection.session.close(event_id="bye")
        closed = await side.next("session.closed")
        assert (closed["reason"], closed["client_event_id"]) == ("close_requested", "bye")
        assert closed["session"]["id"] == session_id
        await peer.wait_for("session.closed")
        with pytest.raises(websockets.ConnectionClosedOK):  # the session ended: so does it
            await connection.recv_bytes()
    checked(peer)
    with pytest.raises(websockets.InvalidStatus) as gone:  # an ended session is not found
        async with client.live.sideband.connect(session_id=session_id):
            pass
    assert gone.value.response.status_code == 404
    assert json.loads(gone.value.response.body)["error"]["code"] == "session_not_found"


async def test_speech_while_muted_is_not_heard_and_after_the_unmute_it_is(
    stack: Stack, peer: RealtimeClient, questions: dict[str, bytes]
) -> None:
    await created(stack, peer, {"model": "gpt-live-1"})
    peer.send({"type": "session.input_audio.mute", "event_id": "m1"})
    assert (await peer.wait_for("session.input_audio.muted"))["client_event_id"] == "m1"
    peer.mic.say(questions["the moon"] + silence(1500))  # ends in 3 s of silence
    await eventually(lambda: not peer.mic.speaking, TURN_TIMEOUT_S, "the muted question sent")
    peer.send({"type": "session.input_audio.unmute", "event_id": "u1"})
    unmuted = await peer.wait_for("session.input_audio.unmuted")
    assert unmuted["client_event_id"] == "u1"
    peer.mic.say(questions["water"])
    # The track's audio reaches the engine in order: had the muted question been heard, its
    # transcript (and answer) would come before the one spoken after the unmute.
    heard = await peer.wait_for("session.input_transcript.delta", timeout_s=TURN_TIMEOUT_S)
    said = re.findall(r"[a-z']+", heard["delta"].lower())
    assert "water" in said and "moon" not in heard["delta"].lower()
    await peer.wait_for("session.usage.updated", timeout_s=TURN_TIMEOUT_S)
    kinds = [event["type"] for event in peer.events]
    assert kinds.count("session.input_transcript.delta") == 1, peer.events
    first_answer = kinds.index("session.output_transcript.delta")
    assert peer.index(unmuted) < peer.index(heard) < first_answer  # nothing answered before
    said = "".join(e["delta"] for e in peer.events if e["type"].endswith("output_transcript.delta"))
    assert "water" in said.lower(), said
    assert not [e for e in peer.events if e["type"] == "error"], peer.events
    checked(peer)


async def test_refusals_are_http_errors_before_anything_starts(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        minted = await http.post(
            stack.base_url(0) + "/v1/realtime/client_secrets",
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    assert minted.status_code == 200, minted.text
    with pytest.raises(websockets.InvalidStatus) as browser:  # an ek_ secret is no server's
        async with sdk(stack, minted.json()["value"]).live.sideband.connect(session_id="sess_x"):
            pass
    assert browser.value.response.status_code == 401
    client = sdk(stack)
    offer = {"type": "webrtc", "sdp": "v=0\r\n"}
    with pytest.raises(openai.BadRequestError) as unknown:
        await client.live.create(
            session={"model": "gpt-live-1"}, transport=offer, extra_body={"voice": "x"}
        )
    assert unknown.value.body["param"] == "voice" and unknown.value.code == "unknown_parameter"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as later:
        await client.live.create(
            session={"model": "gpt-live-1", "wake_policy": {"type": "speech"}}, transport=offer
        )
    assert later.value.code == "unsupported_parameter"
    with pytest.raises(openai.AuthenticationError):
        await sdk(stack, "wrong-key-" + "x" * 16).live.create(
            session={"model": "gpt-live-1"}, transport=offer
        )
