"""Test support: an aiortc Realtime client (speech track + ``oai-events``) and a transceiver
running the voice pipeline behind ``LoopbackRelay``.

``RealtimeClient`` speaks PCM it is given (paced 20 ms frames, silence in between), records
every frame it hears, and keeps every server event; ``wait_for`` waits on a condition that is
notified per event, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from deploy.processes import (
    LoopbackRelay,
    Process,
    free_port,
    random_keys,
    text,
    transceiver_process,
)
from deploy.survival import Survival, contents, stored_until
from loadtest.tones import FRAME_SAMPLES, PacedTrack, first_channel_frames
from loadtest.voice_audio import recognised, silence_pcm, spoken_pcm
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from transceiver.store.keys import SessionState

RATE_HZ = 48_000
Event = dict[str, Any]


class SpeechTrack(PacedTrack):
    """A microphone: queued speech, else silence, one paced 20 ms frame at a time."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: deque[bytes] = deque()

    def say(self, pcm: bytes) -> None:
        step = 2 * FRAME_SAMPLES
        pcm += b"\0" * (-len(pcm) % step)
        self._pending.extend(pcm[i : i + step] for i in range(0, len(pcm), step))

    @property
    def speaking(self) -> bool:
        return bool(self._pending)

    def next_pcm(self) -> bytes:
        return self._pending.popleft() if self._pending else bytes(2 * FRAME_SAMPLES)


class RealtimeClient:
    def __init__(self, audio: bool = True) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = SpeechTrack()
        if audio:
            self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("oai-events")
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)
        self.events: list[Event] = []
        self.heard: list[bytes] = []  # 48 kHz mono frames, in arrival order
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self._notifier: set[asyncio.Task[None]] = set()

    def _on_message(self, data: str | bytes) -> None:
        self.events.append(json.loads(data))
        task = asyncio.get_running_loop().create_task(self._notify())
        self._notifier.add(task)
        task.add_done_callback(self._notifier.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        async for samples in first_channel_frames(track):
            self.heard.append(samples.astype(np.int16).tobytes())

    async def connect(self, http: httpx.AsyncClient, base_url: str) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await http.post(
            base_url + "/v1/realtime/calls",
            content=self.pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        )
        assert response.status_code == 201, response.text
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
        await self.wait_for("session.created", timeout_s=15)

    def send(self, event: Event | str) -> None:
        self.channel.send(event if isinstance(event, str) else json.dumps(event))

    async def wait_for(
        self,
        kind: str,
        match: Callable[[Event], bool] = lambda _: True,
        *,
        after: int = 0,
        timeout_s: float = 30.0,
    ) -> Event:
        """The first event of ``kind`` at index >= ``after`` that matches; fails at the deadline."""

        def found() -> Event | None:
            hits = (e for e in self.events[after:] if e["type"] == kind and match(e))
            return next(hits, None)

        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        event = found()
        assert event is not None
        return event

    def index(self, event: Event) -> int:
        return next(i for i, e in enumerate(self.events) if e is event)

    def types(self, after: int = 0) -> list[str]:
        return [e["type"] for e in self.events[after:]]

    async def close(self) -> None:
        await self.pc.close()
        tasks = [t for t in (self._reader, *self._notifier) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def connected(base_url: str) -> AsyncIterator[RealtimeClient]:
    """A ``RealtimeClient`` on a new call to the transceiver at ``base_url``; closed at exit."""
    peer = RealtimeClient()
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            await peer.connect(http, base_url)
        yield peer
    finally:
        await peer.close()


async def error_for(client: RealtimeClient, event: Event | str) -> dict[str, str]:
    """Send ``event``; the ``error`` object of the next ``error`` event."""
    start = len(client.events)
    client.send(event)
    return (await client.wait_for("error", after=start))["error"]  # type: ignore[no-any-return]


def user_text(text: str) -> Event:
    """A ``conversation.item.create`` of a user message saying ``text``."""
    content = [{"type": "input_text", "text": text}]
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": content}}  # fmt: skip


@dataclass
class PipelineTransceiver:
    process: Process
    relay: LoopbackRelay
    base_url: str


@asynccontextmanager
async def pipeline_transceiver(
    log_dir: Path, more_env: Mapping[str, str] | None = None
) -> AsyncIterator[PipelineTransceiver]:
    """``python -m transceiver --agent pipeline`` (offline providers) behind a LoopbackRelay;
    ``more_env``: its other variables."""
    link = ("127.0.0.1", free_port())
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    keys = random_keys()
    relay = LoopbackRelay(link, keys)
    public = await relay.start()
    env = {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}  # offline providers whatever the host
    env |= {"PIPELINE_PIPER_NOISE_SCALE": "0", "PIPELINE_PIPER_NOISE_W_SCALE": "0"}
    env |= more_env or {}
    process = transceiver_process(
        "transceiver", link, http, text(public), keys, log_dir, env, agent="pipeline"
    )
    try:
        await process.start().ready(timeout_s=90)
        yield PipelineTransceiver(process, relay, f"http://{text(http)}")
    finally:
        await process.stop()
        relay.close()


async def speak(tts: PiperTextToSpeech, words: str, rate_hz: int = RATE_HZ) -> bytes:
    return await spoken_pcm(tts, words, rate_hz)


def silence(ms: int, rate_hz: int = RATE_HZ) -> bytes:
    return silence_pcm(ms / 1000, rate_hz)


async def hear(stt: PocketsphinxSpeechToText, pcm: bytes, rate_hz: int = RATE_HZ) -> list[str]:
    finals = await recognised(stt, pcm, rate_hz)
    return finals[0].split() if finals else []


# --- Realtime turns and resume, over a RealtimeClient ---

SESSION_HEADER = "X-Voicerelay-Session"
TOKEN_HEADER = "X-Voicerelay-Resume-Token"


async def call(
    client: RealtimeClient,
    http: httpx.AsyncClient,
    base_url: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> httpx.Response:
    """POST the client's offer; on 201 apply the answer and wait for session.created."""
    if client.pc.localDescription is None:
        await client.pc.setLocalDescription(await client.pc.createOffer())
    response = await http.post(
        base_url + "/v1/realtime/calls",
        content=client.pc.localDescription.sdp,
        headers={"Content-Type": "application/sdp", **(headers or {})},
        params=params,
    )
    if response.status_code == 201:
        answer = RTCSessionDescription(sdp=response.text, type="answer")
        await client.pc.setRemoteDescription(answer)
        await client.wait_for("session.created", timeout_s=15)
    return response


async def opened(client: RealtimeClient, http: httpx.AsyncClient, base_url: str) -> tuple[str, str]:
    """A new call from ``client``: its session id and resume token."""
    created = await call(client, http, base_url)
    assert created.status_code == 201, created.text
    return created.headers[SESSION_HEADER], created.headers[TOKEN_HEADER]


async def resume(
    client: RealtimeClient, http: httpx.AsyncClient, base_url: str, session_id: str, token: str
) -> httpx.Response:
    return await call(client, http, base_url, {TOKEN_HEADER: token}, {"session_id": session_id})


def acknowledged(client: RealtimeClient, after: int = 0) -> list[tuple[str, str]]:
    """(role, text) of every message the server told the client is done (from event index
    ``after``), in that order."""
    told = []
    for event in client.events[after:]:
        item = event.get("item", {})
        if event["type"] == "conversation.item.done" and item["type"] == "message":
            part = item["content"][0]
            told.append((item["role"], part.get("text", part.get("transcript", ""))))
    return told


async def ask(client: RealtimeClient, words: str) -> str:
    """A text turn; the answer's transcript as heard."""
    start = len(client.events)
    content = [{"type": "input_text", "text": words}]
    item = {"type": "message", "role": "user", "content": content}
    client.send({"type": "conversation.item.create", "item": item})
    client.send({"type": "response.create"})
    done = await client.wait_for("response.done", after=start, timeout_s=60)
    output = done["response"]["output"]
    return " ".join(part["transcript"] for i in output for part in i.get("content", ()))


async def answered_and_stored(
    survival: Survival, client: RealtimeClient, session_id: str, words: str
) -> tuple[str, SessionState]:
    """A text turn (see ``ask``) and the stored session once its answer is stored."""
    answer = await ask(client, words)
    state = await stored_until(
        survival, session_id, lambda st: ("assistant", answer) in contents(st)
    )
    return answer, state


def audible(client: RealtimeClient) -> bool:
    return any(np.frombuffer(frame, dtype=np.int16).any() for frame in client.heard)
