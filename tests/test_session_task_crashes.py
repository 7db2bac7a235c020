"""A session's own tasks that crash are seen and end the session as our failure.

In-process and real: a ``Link`` behind a ``LoopbackRelay``, ``Calls`` answering an aiortc
client's offer, a ``RealtimeSession`` over a ``ConversationEngine`` with the offline agent and
espeak, and (when a redis-server is installed) real session persistence. A crash is caused by
a dependency that raises a bug once the call is up: the engine's ``push_audio`` (the audio
input pump) or its cost estimator (a response task inside the engine, which reaches the
session's engine-event forwarder). Each crash must be logged with its traceback, counted in
``transceiver_task_crashes_total{task}``, told to the client as a ``server_error`` and end the
session as ``crashed``; a stored session stays resumable (not the caller's hang-up).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCSessionDescription
from prometheus_client import CollectorRegistry

from deploy.processes import LoopbackRelay, random_keys
from deploy.redis_server import RedisServer, redis_server_binary
from deploy.waiting import eventually
from loadtest.realtime_client import RealtimeClient
from pipeline.config import EngineConfig
from pipeline.engine import ConversationEngine, EngineTaskCrashed
from pipeline.espeak_tts import EspeakTextToSpeech
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.providers import ProviderError
from pipeline.response import SpokenResponse
from relay.wire.redis_config import RedisConfig
from relay.wire.ufrag import Keyring
from transceiver.metrics import RealtimeMetrics, TaskCrashCollector
from transceiver.realtime.policy import SessionPolicy
from transceiver.realtime.session import RealtimeSession
from transceiver.store.persistence import SessionPersistence, open_persistence
from transceiver.store.survival import SurvivalPolicy
from transceiver.webrtc import ice
from transceiver.webrtc.calls import CallLimits, Calls
from transceiver.webrtc.link import Link

TIMEOUT_S = 15.0
CONFIG = EngineConfig(input_sample_rate_hz=16000, output_sample_rate_hz=24000)


class Bug(TypeError):
    """What a programming error in our code looks like."""


class FaultyEngine(ConversationEngine):
    """The offline engine; ``push_audio`` raises once ``audio_bug`` is set, and the task that
    runs a response fails outside the engine's own turn handling once ``response_bug`` is."""

    audio_bug = False
    response_bug = False

    def push_audio(self, pcm: bytes) -> None:
        if self.audio_bug:
            raise Bug("push_audio called with the wrong arguments")
        super().push_audio(pcm)

    async def _respond(self, response: SpokenResponse) -> None:
        if self.response_bug:
            raise Bug("_respond called with the wrong arguments")
        await super()._respond(response)


class FailingModel:
    """A language model whose provider is down."""

    name = "down"

    async def generate(self, *_: object) -> AsyncIterator[Any]:
        raise ProviderError("down", "the model provider is down (503)", retryable=True)
        yield  # an async generator


@dataclass
class Stack:
    sessions: Calls
    registry: CollectorRegistry
    agents: list[RealtimeSession]
    engines: list[FaultyEngine]
    persistence: SessionPersistence | None


def crashes(registry: CollectorRegistry, task: str) -> float:
    return registry.get_sample_value("transceiver_task_crashes_total", {"task": task}) or 0.0


def ended(registry: CollectorRegistry, reason: str) -> float:
    sample = registry.get_sample_value("transceiver_sessions_ended_total", {"reason": reason})
    return sample or 0.0


@pytest.fixture
def redis_config(tmp_path: Path) -> Iterator[RedisConfig | None]:
    if redis_server_binary() is None:
        yield None  # the crash is still seen; only the resumable check needs Redis
        return
    server = RedisServer(tmp_path, "redis").start()
    try:
        yield RedisConfig(url=server.url, key_prefix=f"c{uuid.uuid4().hex[:10]}")
    finally:
        server.stop()


@pytest.fixture
async def stack(redis_config: RedisConfig | None) -> AsyncIterator[Stack]:
    ice.install()
    keys = random_keys()
    keyring = Keyring.parse(keys)
    registry = CollectorRegistry()
    registry.register(TaskCrashCollector())
    metrics = RealtimeMetrics(registry)
    tts = EspeakTextToSpeech()
    await tts.start()
    async with AsyncExitStack() as closing:
        closing.push_async_callback(tts.aclose)
        opened = open_persistence(redis_config, SurvivalPolicy())
        persistence = await closing.enter_async_context(opened)
        link = Link(("127.0.0.1", 0), keyring)
        relay = LoopbackRelay(await link.start(), keys)
        closing.push_async_callback(link.aclose)
        closing.callback(relay.close)
        public = await relay.start()
        relay.hello()
        built = Stack(
            Calls(
                ice.RelayedIce(link, keyring, (public,)),
                CallLimits(capacity=4, connect_timeout_s=TIMEOUT_S),
                registry,
                lambda requested: new_session(built, requested, tts, metrics),
            ),
            registry, [], [], persistence,
        )  # fmt: skip
        closing.push_async_callback(built.sessions.aclose)
        yield built


def new_session(
    stack: Stack,
    requested: Mapping[str, Any] | None,
    tts: EspeakTextToSpeech,
    metrics: RealtimeMetrics,
) -> RealtimeSession:
    engine = FaultyEngine(
        CONFIG,
        PocketsphinxSpeechToText(),  # never started: no speech is ever detected
        LocalRuleBasedAgent(load_knowledge()),
        tts,
        classify=lambda _: False,
    )
    policy = SessionPolicy(CONFIG, voices=tts.voices)  # the voices of the TTS it speaks with
    session = RealtimeSession(engine, policy, policy.initial(requested), metrics, stack.persistence)
    stack.engines.append(engine)
    stack.agents.append(session)
    return session


@pytest.fixture
async def client() -> AsyncIterator[RealtimeClient]:
    peer = RealtimeClient()
    yield peer
    await peer.close()


async def call(stack: Stack, client: RealtimeClient) -> dict[str, Any]:
    """Answer the client's offer in-process; the ``session.created`` event."""
    await client.pc.setLocalDescription(await client.pc.createOffer())
    with stack.sessions.reserve() as reservation:
        _, answer = await stack.sessions.create(reservation, client.pc.localDescription.sdp)
    await client.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return await client.wait_for("session.created", timeout_s=TIMEOUT_S)


def crash_logged(caplog: pytest.LogCaptureFixture, task: str) -> logging.LogRecord:
    for record in caplog.records:
        if record.name == "transceiver.realtime.session" and record.getMessage().startswith(task):
            assert record.levelno == logging.ERROR
            assert record.exc_info is not None and record.exc_info[1] is not None
            assert "Traceback" in caplog.text and "Bug: " in caplog.text
            return record
    raise AssertionError(f"no crash of {task} logged:\n{caplog.text}")


async def assert_failed_and_hung_up(
    stack: Stack, client: RealtimeClient, caplog: pytest.LogCaptureFixture, task: str
) -> logging.LogRecord:
    error = await client.wait_for("error", timeout_s=TIMEOUT_S)
    assert error["error"]["type"] == "server_error"
    assert error["error"]["code"] == "session_failed"
    assert "internal error" in error["error"]["message"]
    await eventually(lambda: len(stack.sessions) == 0, TIMEOUT_S, "the session to be hung up")
    assert crashes(stack.registry, task) == 1
    assert ended(stack.registry, "crashed") == 1
    assert ended(stack.registry, "hangup") == 0
    await eventually(
        lambda: client.pc.connectionState in ("closed", "failed"), TIMEOUT_S, "the client closed"
    )
    return crash_logged(caplog, task)


async def test_a_crashed_audio_input_pump_ends_the_session_resumably(
    stack: Stack, client: RealtimeClient, caplog: pytest.LogCaptureFixture
) -> None:
    created = await call(stack, client)
    (engine,) = stack.engines
    engine.audio_bug = True  # the next microphone frame meets the bug
    record = await assert_failed_and_hung_up(stack, client, caplog, "session audio input")
    assert record.exc_info is not None and isinstance(record.exc_info[1], Bug)
    persistence = stack.persistence
    if persistence is None:
        return
    error = await client.wait_for("error")
    assert "resume it" in error["error"]["message"]
    await eventually(lambda: persistence.queue.pending == 0, TIMEOUT_S, "the stored writes")
    stored = created["voicerelay"]  # not the caller's hang-up: the session can be resumed
    journal, _ = await persistence.resume(stored["session_id"], stored["resume_token"])
    await journal.release()
    journal.close()


async def test_a_crashed_engine_task_reaches_the_forwarder_and_ends_the_session(
    stack: Stack, client: RealtimeClient, caplog: pytest.LogCaptureFixture
) -> None:
    await call(stack, client)
    stack.engines[-1].response_bug = True  # a bug outside the engine's turn handling
    client.send({"type": "response.create"})
    record = await assert_failed_and_hung_up(stack, client, caplog, "session engine events")
    assert record.exc_info is not None and isinstance(record.exc_info[1], EngineTaskCrashed)
    assert isinstance(record.exc_info[1].__cause__, Bug)
    assert "The above exception was the direct cause" in caplog.text


async def test_a_failed_turn_is_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    tts = EspeakTextToSpeech()
    engine = ConversationEngine(
        CONFIG, PocketsphinxSpeechToText(), FailingModel(), tts, classify=lambda _: False
    )
    policy = SessionPolicy(CONFIG, voices=tts.voices)
    session = RealtimeSession(engine, policy, policy.initial(None), RealtimeMetrics(registry))
    caplog.set_level(logging.INFO)
    await session.start()
    try:
        session.on_message('{"type": "response.create"}')
        await eventually(
            lambda: any(e["type"] == "response.done" for e in session._pending),
            TIMEOUT_S,
            "the failed response to end",
        )
    finally:
        await session.aclose()
    mentions = [r for r in caplog.records if "provider is down" in r.getMessage()]
    assert [r.name for r in mentions] == ["pipeline.engine"], caplog.text
    assert mentions[0].exc_info is not None and isinstance(mentions[0].exc_info[1], ProviderError)
    assert registry.get_sample_value("transceiver_provider_errors_total", {"retryable": "true"})
