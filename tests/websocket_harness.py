"""Test support for the WebSocket tests that drive a real transceiver process with the official
``openai`` SDK (Realtime's ``test_realtime_websocket.py``, GPT-Live's ``test_live_websocket.py``).

``transceiver_process_with(...)`` runs one transceiver process (``--agent pipeline``, auth
required) whose language model and speech are the fake OpenAI server and whose speech-to-text is
pocketsphinx, and yields its HTTP base URL; it must stop cleanly, with no traceback in its log.
``spoken_question()`` is a question spoken by piper between silences, ``heard_words()`` what
pocketsphinx recognises in an answer's audio; ``EventLog`` keeps every
event a connection receives, with waits on a type (never on a time).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import openai
from openai.resources.realtime.realtime import AsyncRealtimeConnection

from deploy.processes import Process, free_port, random_keys, text, transceiver_process
from loadtest.voice_audio import recognised, silence_pcm, spoken_pcm
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText

EVENT_TIMEOUT_S = 30.0
RATE_HZ = 24_000  # the PCM16 of the events, both ways


@contextmanager
def transceiver_process_with(
    fake_openai_url: str,
    api_key: str,
    capacity: int,
    log_dir: Path,
    more_env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """The transceiver's HTTP base URL while it runs (``more_env``: added to its environment)."""
    link = ("127.0.0.1", free_port())
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_openai_url + "/v1",
        "PIPELINE_STT": "pocketsphinx",
        "PIPELINE_LLM": "openai",
        "PIPELINE_TTS": "openai",
        "TRANSCEIVER_API_KEY": api_key,
        "TRANSCEIVER_SECRET_KEYS": random_keys(),
        "TRANSCEIVER_CAPACITY": str(capacity),
        **(more_env or {}),
    }
    process: Process = transceiver_process(
        "transceiver", link, http, "127.0.0.1:3478", random_keys(), log_dir, env,
        agent="pipeline", auth="required",
    )  # fmt: skip
    process.start()
    try:
        process.wait_ready(timeout_s=60)
        yield f"http://{text(http)}"
    finally:
        returncode = asyncio.run(process.stop())
    assert returncode == 0, process.log_tail()
    assert "Traceback" not in (log_dir / "transceiver.log").read_text(), process.log_tail()


def spoken_question(question: str = "Tell me about the moon.") -> bytes:
    """A spoken question (piper, noise off) between silences, PCM16 at ``RATE_HZ``."""

    async def speak() -> bytes:
        tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
        await tts.start()
        try:
            words = await spoken_pcm(tts, question, RATE_HZ)
        finally:
            await tts.aclose()
        return silence_pcm(0.5, RATE_HZ) + words + silence_pcm(1.5, RATE_HZ)

    return asyncio.run(speak())


LISTENERS_QUIET = bytes(2 * RATE_HZ * 300 // 1000)  # 300 ms of silence before an answer


async def heard_words(pcm: bytes) -> list[str]:
    """The words pocketsphinx recognises in an answer's audio (PCM16 at ``RATE_HZ``), heard
    after a quiet moment as a listener hears it: the answer's first chunk comes without its
    quiet lead-in, and pocketsphinx, given no silence before the first word, mishears it
    ("The weather" as "whether")."""
    stt = PocketsphinxSpeechToText()
    await stt.start()
    try:
        finals = await recognised(stt, LISTENERS_QUIET + pcm, RATE_HZ)
    finally:
        await stt.aclose()
    return " ".join(finals).split()


async def ask_in_text(connection: AsyncRealtimeConnection, text: str) -> None:
    """A typed turn over the SDK's connection: the user's message, then ``response.create``."""
    await connection.conversation.item.create(
        item={
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        }
    )
    await connection.response.create()


def openai_client(base_url: str, api_key: str) -> openai.AsyncOpenAI:
    """The SDK, unchanged but for its base URL (and no retries)."""
    return openai.AsyncOpenAI(api_key=api_key, base_url=base_url + "/v1", max_retries=0)


class Connection(Protocol):
    async def recv_bytes(self) -> bytes: ...

    async def send_raw(self, data: bytes | str) -> None: ...


C = TypeVar("C", bound=Connection)


class EventLog(Generic[C]):
    """Every event the connection receives, kept, with waits on a type (never on a time)."""

    def __init__(self, connection: C) -> None:
        self.connection = connection
        self.seen: list[dict[str, Any]] = []

    def check(self, event: dict[str, Any]) -> None:
        """Each event as it is received, before it is kept (nothing to check here)."""

    async def next(self, kind: str, timeout_s: float = EVENT_TIMEOUT_S) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                event = json.loads(await self.connection.recv_bytes())
                self.check(event)
                self.seen.append(event)
                if event["type"] == kind:
                    return event

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["type"] == kind]

    def types(self) -> list[str]:
        return [e["type"] for e in self.seen]


async def error_for(events: EventLog[Any], data: str | bytes) -> dict[str, Any]:
    """The ``error`` of the error event that ``data``, sent as it is, gets."""
    await events.connection.send_raw(data)
    error: dict[str, Any] = (await events.next("error"))["error"]
    return error
