"""A ``ConversationEngine`` fed a call's input piece by piece, as the tests of its input path
feed it, and the speech marks of the events it gave meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pipeline import events as ev
from pipeline.engine import ConversationEngine

P = TypeVar("P")
YIELD_EVERY = 50  # pieces pushed between two chances for the engine's tasks to run


async def events_while_fed(
    engine: ConversationEngine,
    pieces: Iterable[P],
    push: Callable[[P], None],
    idle_timeout_s: float,
    *,
    finish: bool = False,
) -> list[ev.EngineEvent]:
    """Every event of the started ``engine`` while ``push`` gives it each of ``pieces``, then
    (after ``finish_input`` when ``finish``) until it is idle; the engine is closed after."""
    seen: list[ev.EngineEvent] = []

    async def collect() -> None:
        async for event in engine.events():
            seen.append(event)

    collecting = asyncio.create_task(collect())
    try:
        for index, piece in enumerate(pieces):
            push(piece)
            if index % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        if finish:
            engine.finish_input()
        await engine.wait_idle(timeout_s=idle_timeout_s)
    finally:
        await engine.aclose()
        await asyncio.wait_for(collecting, timeout=10)
    return seen


def speech_marks(events: Iterable[ev.EngineEvent], transcripts: bool) -> list[tuple[Any, ...]]:
    """Speech started (its audio position), stopped (its position and utterance) and, when
    ``transcripts``, the input's transcripts (their text), in order."""
    marks: list[tuple[Any, ...]] = []
    for event in events:
        if isinstance(event, ev.SpeechStartedEvent):
            marks.append(("started", event.audio_start_ms))
        elif isinstance(event, ev.SpeechStoppedEvent):
            marks.append(("stopped", event.audio_end_ms, event.pcm))
        elif transcripts and isinstance(event, ev.InputTranscript):
            marks.append(("transcript", event.text))
    return marks
