"""Spoken turns from a caller in Opus DTX, on the lean media path, end to end.

Real sockets and a real transceiver process: ``python -m transceiver --agent pipeline
--media-path lean`` (offline providers: pocketsphinx hears, piper speaks) behind a loopback
relay, and the load tester's lean call (``loadtest.voice_calls.VoiceCall``), which sends its
silence as Opus DTX when the answer asks (``usedtx=1``): after 200 ms of silence a packet
every 400 ms. Two questions must be heard and answered; the transceiver must have fed the
engine silence in the caller's gaps, counted none of it as loss, and heard the caller's
timeline in real time: the audio between the first question's end and the second's start
(``speech_stopped`` -> ``speech_started``, in the engine's input) is about the time the
client let pass between them, not the few packets it sent (a ratio to the client's own
clock, never a duration asserted).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from lean_stack import lean_stack

from deploy.processes import LoopbackRelay, metric_values
from loadtest.lean_client import LeanClientMedia
from loadtest.voice_calls import Metronome, VoiceCall, spoken_questions

pytestmark = pytest.mark.slow
EVENTS = "transceiver_lean_media_events_total"
# the shortest answers: the clock's (~1.5 s, "It is ten past three.") and water's (4.9 s)
QUESTIONS = ("What time is it?", "Tell me about water.")


def speech_marks(call: VoiceCall) -> list[dict[str, Any]]:
    """The session's speech_started / speech_stopped events, as they come."""
    marks: list[dict[str, Any]] = []

    def on_message(data: str | bytes) -> None:
        event = json.loads(data)
        if event.get("type", "").startswith("input_audio_buffer.speech_"):
            marks.append(event)

    call.channel.on("message", on_message)
    return marks


async def test_a_caller_in_dtx_is_heard_in_real_time_and_answered(tmp_path: Path) -> None:
    questions = await spoken_questions(QUESTIONS)
    metronome, lean = Metronome(), LeanClientMedia()
    async with lean_stack(tmp_path, LoopbackRelay) as stack, httpx.AsyncClient(timeout=30) as http:
        call = VoiceCall(metronome, questions, lean=lean)
        marks = speech_marks(call)
        try:
            await call.connect(http, stack.base_url)
            assert call.track.dtx  # the answer asked for it
            first = await call.turn(questions.questions[0])
            first_end_s = call.log.speech_end_s
            assert first_end_s is not None
            await asyncio.sleep(1.0)  # a silence of the caller's, in DTX
            second_start_s = asyncio.get_running_loop().time()
            second = await call.turn(questions.questions[1])
            events = metric_values((await http.get(stack.base_url + "/metrics")).text, EVENTS)
        finally:
            await call.close()
            lean.close()
            metronome.close()
    assert "time" in re.findall(r"[a-z']+", first.heard.lower()), first
    assert "water" in re.findall(r"[a-z']+", second.heard.lower()), second
    assert first.answer and second.answer
    print(f"the transceiver's lean media: {events}; speech marks: {marks}")
    assert events["silence_fed"] > 0, events
    for kind in ("lost", "concealed_plc", "lost_in_silence", "decode_errors"):
        assert events.get(kind, 0) == 0, (kind, events)
    stopped = [m["audio_end_ms"] for m in marks if m["type"].endswith("speech_stopped")]
    started = [m["audio_start_ms"] for m in marks if m["type"].endswith("speech_started")]
    assert len(stopped) == len(started) == 2, marks
    heard_gap_s = (started[1] - stopped[0]) / 1000
    client_gap_s = second_start_s - first_end_s
    print(f"between the questions: {heard_gap_s:.2f} s heard, {client_gap_s:.2f} s passed")
    assert 0.6 * client_gap_s < heard_gap_s < 1.2 * client_gap_s, (heard_gap_s, client_gap_s)
