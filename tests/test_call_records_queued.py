"""An answer queued behind another one, and cleared before the media track sent any of it,
still has its first frame out in the call record.

Real: a ``RealtimeSession`` over a ``ConversationEngine`` with the offline agent and espeak,
its voice attached as a WebRTC call's is, whose sender has not taken a frame yet (a loaded
transceiver's is late). Two typed questions: the second answer is all made while the first
still plays, so its turn completes before its first frame goes out (its ``TurnRecord`` has
no ``first_frame_out``); the client hears it start (``output_audio_buffer.started``) and
clears it. The record is written when it is cleared, with no frame of it sent: its first
frame out is when the engine played it, as the client was told.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiortc.mediastreams import AudioStreamTrack
from prometheus_client import CollectorRegistry

from pipeline.config import EngineConfig
from pipeline.engine import ConversationEngine
from pipeline.espeak_tts import EspeakTextToSpeech
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from transceiver.metrics import RealtimeMetrics
from transceiver.realtime.policy import SessionPolicy
from transceiver.realtime.session import RealtimeSession
from transceiver.store.call_records import AppendTurn, RecordWrite

TIMEOUT_S = 30.0


class Writes:
    """The recorder's writes, as the process's record log would take them."""

    def __init__(self) -> None:
        self.turns: list[dict[str, Any]] = []

    def submit(self, write: RecordWrite) -> bool:
        if isinstance(write, AppendTurn):
            self.turns.append(dict(write.turn))
        return True


class Seen:
    """The session's server events, as sent."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.changed.set()

    async def first(self, kind: str, after: int = 0, **fields: Any) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                for event in self.events[after:]:
                    if event["type"] == kind and fields.items() <= event.items():
                        return event
                self.changed.clear()
                await self.changed.wait()


def ask(session: RealtimeSession, text: str) -> None:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    session.on_message(json.dumps({"type": "conversation.item.create", "item": item}))
    session.on_message(json.dumps({"type": "response.create"}))


async def test_a_queued_answer_cleared_before_it_was_sent_keeps_its_first_frame_out() -> None:
    config = EngineConfig(input_sample_rate_hz=16000, output_sample_rate_hz=24000)
    tts = EspeakTextToSpeech()
    await tts.start()
    agent = LocalRuleBasedAgent(load_knowledge())
    engine = ConversationEngine(
        config, PocketsphinxSpeechToText(), agent, tts, classify=lambda _: False
    )  # the microphone's silence is never speech
    policy = SessionPolicy(config, voices=tts.voices)
    metrics = RealtimeMetrics(CollectorRegistry())
    session = RealtimeSession(engine, policy, policy.initial(None), metrics)
    writes, seen = Writes(), Seen()
    session.recorder.sink = writes
    session.observers.add(seen)
    microphone = AudioStreamTrack()  # the caller's: silence
    assert session.attach_audio(microphone) is not None  # the voice nobody takes frames from
    session.call_began("rtc_queued")
    await session.start()
    try:  # the first answer spoken slowly (~3 s): the second is all made while it plays
        update = {"type": "realtime", "audio": {"output": {"speed": 0.5}}}
        session.on_message(json.dumps({"type": "session.update", "session": update}))
        ask(session, "What time is it?")
        first = (await seen.first("response.done"))["response"]["id"]
        mark = len(seen.events)
        ask(session, "Tell me about coffee.")
        second = (await seen.first("response.done", mark))["response"]["id"]
        assert second != first
        assert not any(e["type"] == "output_audio_buffer.started" and e["response_id"] == second
                       for e in seen.events)  # all made, none of it played yet  # fmt: skip
        await seen.first("output_audio_buffer.started", mark, response_id=second)
        session.on_message(json.dumps({"type": "output_audio_buffer.clear"}))
        await seen.first("output_audio_buffer.cleared", mark, response_id=second)
    finally:
        await session.aclose()
        microphone.stop()
        await tts.aclose()
    assert [e for e in seen.events if e["type"] == "error"] == []
    assert session.voice.first_frame_sent_s == {}  # the sender never took a frame
    coffee = next(t for t in writes.turns if t["user"] == "Tell me about coffee.")
    assert coffee["origin"] == "response_created" and coffee["interrupted"] is not None, coffee
    timeline = coffee["timeline_ms"]
    assert timeline["first_frame_out"] is not None, coffee
    assert timeline["first_frame_out"] >= timeline["response_done"], timeline  # queued
    assert coffee["latency_ms"]["voice_to_voice"] == timeline["first_frame_out"]
