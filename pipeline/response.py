"""One spoken answer: language model (with its tool loop) -> chunker -> TTS -> paced playout.

I/O layer. A :class:`SpokenResponse` runs three stages as tasks of one TaskGroup, joined by
queues, so TTS starts on the first chunk while the model still writes and playout starts on
the first audio while TTS still speaks. Cancelling ``run()`` cancels all three (the provider
iterators are closed in ``finally``). ``stop()`` is the barge-in: no frame is emitted after it,
even before the cancellation has reached the tasks.

Per response (``EngineConfig``): ``model_options`` go to the model (``providers.with_options``)
and, without parallel tool calls, only the first call of a model turn that makes several is
made (logged; the others never reach the conversation); ``voice`` is handed to the TTS;
``speak=False`` answers in text only (the TTS and playout stages see no text, no frame is
made); ``max_output_tokens`` stops
reading the model after that many tokens, counted as the stream's text deltas and tool calls
(a chat-completions stream sends one token per delta), closing the stream (the generation
stops upstream) and marking the response ``limited``.

Generation and playout end apart (paced playout, ``realtime_playout``): once the model has
written and the TTS has spoken everything, ``on_generated`` is called while the audio still
plays (OpenAI's ``response.done`` before ``output_audio_buffer.stopped``), once its first frame
has played unless earlier audio still plays; ``play_after`` holds this response's first frame
until the earlier responses' audio has played.

An answer started before its turn has ended (at a pause, while the end-of-turn model decides)
is ``held`` (:class:`HeldEvents`): it writes and speaks its first chunk, but its events wait,
and it speaks on, plays and ends only once released (the user was done); if the user goes on
it is cancelled unheard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any, TypeVar

from pipeline import events as ev
from pipeline.chunker import SpeechChunker
from pipeline.config import EngineConfig
from pipeline.playout import FrameSlicer, LeadTrimmer, PcmResampler, PlayoutLedger
from pipeline.providers import (
    LanguageModel,
    Message,
    TextDelta,
    TextToSpeech,
    ToolCall,
    Usage,
    generate_with,
    synthesize_with,
)
from pipeline.tools import ToolRegistry
from pipeline.turns import TurnRecorder

T = TypeVar("T")
log = logging.getLogger(__name__)


class HeldEvents:
    """An early answer's events, kept until ``release`` names its response; from then on they
    pass straight through. Never released: none of them goes out."""

    def __init__(self, emit: Callable[[ev.EngineEvent], None]) -> None:
        self._emit = emit
        self._events: list[ev.EngineEvent] = []
        self.released = asyncio.Event()

    def __call__(self, event: ev.EngineEvent) -> None:
        if self.released.is_set():
            self._emit(event)
        else:
            self._events.append(event)

    def release(self, response_id: str) -> None:
        """Send the events kept so far, as ``response_id``'s."""
        self.released.set()
        events, self._events = self._events, []
        for event in events:
            if hasattr(event, "response_id"):  # (it was made before it had its id)
                named: Any = event
                event = replace(named, response_id=response_id)
            self._emit(event)


class SpokenResponse:
    def __init__(
        self,
        response_id: str,
        recorder: TurnRecorder,
        config: EngineConfig,
        providers: tuple[LanguageModel, TextToSpeech, ToolRegistry],
        history: list[Message],
        emit: Callable[[ev.EngineEvent], None],
        clock: Callable[[], float],
    ) -> None:
        self.response_id = response_id
        self.recorder = recorder
        self.config = config
        self.llm, self.tts, self.tools = providers
        self.history = history  # the conversation: tool calls and results are appended
        self._emit = self.emit = emit
        self.held = emit if isinstance(emit, HeldEvents) else None  # an early answer
        self._now = clock
        self.ledger = PlayoutLedger()
        self.frames_out = 0
        self.next_frame_at_s: float | None = None
        self.stop_requested = False
        self.text = ""  # everything the model wrote
        self.tokens = 0  # text deltas and tool calls read from the model
        self.limited = False  # stopped at max_output_tokens
        self.on_generated: Callable[[], None] | None = None  # paced playout: audio all made
        self.play_after: tuple[asyncio.Task[None], ...] = ()  # earlier responses still playing
        self.finished = False  # the engine has ended it (ResponseDone)
        self._first_frame = asyncio.Event()

    @property
    def played_ms(self) -> int:
        return self.frames_out * self.config.frame_ms

    def heard_text(self) -> str:
        """What the client got: the words played so far, or all the text of a text answer."""
        if not self.config.speak:
            return self.text.strip()
        return self.ledger.heard_text(self.played_ms)

    def generated_text(self) -> str:
        """What the response made: all its spoken words (or all the text of a text answer)."""
        if not self.config.speak:
            return self.text.strip()
        return self.ledger.heard_text(self.ledger.total_ms)

    def stop(self) -> None:
        self.stop_requested = True

    async def run(self) -> None:
        chunks: asyncio.Queue[str | None] = asyncio.Queue()
        audio: asyncio.Queue[bytes | None] = asyncio.Queue()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._generate(chunks))
            group.create_task(self._speak(chunks, audio))
            group.create_task(self._play(audio))
        await self._released()

    async def _released(self) -> None:
        """An early answer plays, and ends, only once its turn has (``HeldEvents.release``)."""
        if self.held is not None:
            await self.held.released.wait()

    async def _generate(self, chunks: asyncio.Queue[str | None]) -> None:
        chunker = SpeechChunker(self.config.chunker)
        messages = model_messages(self.config, self.history)
        for round_index in range(self.config.max_tool_rounds + 1):
            calls = await self._generate_round(messages, chunker, chunks, round_index)
            if not calls or self.limited or not await self._run_tools(calls, messages):
                break
        for chunk in chunker.flush():
            chunks.put_nowait(chunk)
        chunks.put_nowait(None)

    async def _generate_round(
        self,
        messages: list[Message],
        chunker: SpeechChunker,
        chunks: asyncio.Queue[str | None],
        round_index: int,
    ) -> list[ToolCall]:
        recorder, calls = self.recorder, []
        offer_tools = round_index < self.config.max_tool_rounds
        specs = self.tools.specs() if offer_tools else []
        # The choice holds for the first round: a forced call is made once, then the model
        # answers from its result.
        choice = self.config.tool_choice if round_index == 0 else "auto"
        limit = self.config.max_output_tokens
        stream = timed(generate_with(self.llm, messages, specs, choice), recorder, self._now)
        counted = self.tokens
        async with aclosing(stream):
            async for event in stream:
                if isinstance(event, Usage):
                    recorder.llm_input_tokens += event.input_tokens
                    recorder.llm_output_tokens += event.output_tokens
                    continue
                if limit is not None and self.tokens >= limit:
                    self.limited = True
                    recorder.llm_output_tokens += self.tokens - counted  # no usage comes now
                    break
                self.tokens += 1
                if isinstance(event, TextDelta):
                    self._on_text(event.text, chunker, chunks)
                elif isinstance(event, ToolCall):
                    calls.append(event)
        return self._one_call_unless_parallel(calls)

    def _one_call_unless_parallel(self, calls: list[ToolCall]) -> list[ToolCall]:
        """Without parallel calls (``parallel_tool_calls: false``), only a turn's first call is
        made (and kept in the conversation), whatever the model returned."""
        if self.config.model_options.parallel_tool_calls or len(calls) < 2:
            return calls
        dropped = calls[1:]
        self.recorder.tool_calls_dropped += len(dropped)
        named = ", ".join(f"{call.name} ({call.call_id})" for call in dropped)
        log.warning(
            "%s: parallel_tool_calls is false: made %s (%s); not made: %s",
            self.response_id, calls[0].name, calls[0].call_id, named,
        )  # fmt: skip
        return calls[:1]

    def _on_text(
        self,
        text: str,
        chunker: SpeechChunker,
        chunks: asyncio.Queue[str | None],
    ) -> None:
        now = self._now()
        self.recorder.mark("llm_first_token", now)
        self.recorder.mark("llm_last_token", now, overwrite=True)
        self.text += text
        self._emit(ev.ResponseTextDelta(self.response_id, text))
        if not self.config.speak:
            return
        for chunk in chunker.push(text):
            chunks.put_nowait(chunk)

    async def _run_tools(self, calls: list[ToolCall], messages: list[Message]) -> bool:
        """Run the calls, results into the history; False when the client now holds the turn."""
        asked = Message("assistant", "", tool_calls=tuple(calls))
        messages.append(asked)
        self.history.append(asked)
        deferred = [call for call in calls if self._deferred(call)]
        for call in deferred:  # the client answers later: add_tool_output + create_response
            self.recorder.tool_calls += 1
            self._emit(ev.ClientToolCallRequested(self.response_id, call))
        for call in calls:
            if call in deferred:
                continue
            self.recorder.tool_calls += 1
            self._emit(ev.ToolCallStarted(self.response_id, call))
            started_s = self._now()
            result = await self.tools.execute(call)
            self.recorder.provider_busy(started_s, self._now())
            self._emit(ev.ToolCallCompleted(self.response_id, result))
            answer = Message("tool", result.output, tool_call_id=call.call_id)
            messages.append(answer)
            self.history.append(answer)
        return not deferred

    def _deferred(self, call: ToolCall) -> bool:
        return self.tools.is_client_side(call.name)

    async def _speak(
        self,
        chunks: asyncio.Queue[str | None],
        audio: asyncio.Queue[bytes | None],
    ) -> None:
        while (text := await chunks.get()) is not None:
            if self.ledger.total_ms:  # held, an early answer speaks its first chunk only
                await self._released()  # (leaving the cores to the turn's decision)
            self.recorder.mark("first_tts_request", self._now())
            self.recorder.tts_chars += len(text)
            self.ledger.begin(text)
            await self._speak_chunk(text, audio)
        audio.put_nowait(None)
        generated = self.on_generated if self.config.realtime_playout else None
        if generated is None:
            return
        await self._released()
        if self.ledger.total_ms and all(task.done() for task in self.play_after):
            await self._first_frame.wait()  # its audio starts before its response is done
        if not self.stop_requested:
            generated()

    async def _speak_chunk(self, text: str, audio: asyncio.Queue[bytes | None]) -> None:
        """The chunk's speech, resampled; the answer's first chunk without its quiet lead-in
        (``LeadTrimmer``), so that its first frame out is voice."""
        out_rate_hz = self.config.output_sample_rate_hz
        resampler: PcmResampler | None = None
        lead = None if self.ledger.total_ms else LeadTrimmer(out_rate_hz)
        speech = synthesize_with(self.tts, text, self.config.voice, self.config.speed)
        stream = timed(speech, self.recorder, self._now)
        async with aclosing(stream):
            async for chunk in stream:
                self.recorder.mark("first_tts_audio", self._now())
                resampler = resampler or PcmResampler(chunk.sample_rate_hz, out_rate_hz)
                pcm = resampler.push(chunk.pcm)
                self._queue_audio(pcm if lead is None else lead.push(pcm), audio)
        tail = b"" if resampler is None else resampler.flush()
        self._queue_audio(tail if lead is None else lead.push(tail) + lead.flush(), audio)

    def _queue_audio(self, pcm: bytes, audio: asyncio.Queue[bytes | None]) -> None:
        if pcm:
            self.ledger.add_audio(len(pcm) * 500 / self.config.output_sample_rate_hz)
            audio.put_nowait(pcm)

    async def _play(self, audio: asyncio.Queue[bytes | None]) -> None:
        frame_bytes = self.config.output_sample_rate_hz * self.config.frame_ms // 500
        slicer = FrameSlicer(frame_bytes)
        await self._released()
        if self.play_after:  # one output buffer: this audio follows what is still playing
            await asyncio.wait(self.play_after)
        while (pcm := await audio.get()) is not None:
            for frame in slicer.push(pcm):
                await self._play_frame(frame)
        for frame in slicer.flush():
            await self._play_frame(frame)
        if self.frames_out:
            self._emit(ev.OutputStopped(self.response_id))

    async def _play_frame(self, frame: bytes) -> None:
        if self.config.realtime_playout:
            await self._pace()
        if self.stop_requested:
            return
        if not self.frames_out:
            self.recorder.mark("first_frame_out", self._now())
            self._emit(ev.OutputStarted(self.response_id))
            self._first_frame.set()
        self.frames_out += 1
        self._emit(ev.OutputAudio(self.response_id, frame, self.config.output_sample_rate_hz))

    async def _pace(self) -> None:
        """Hold each frame until its slot: one frame per frame_ms of the loop clock."""
        frame_s, now = self.config.frame_ms / 1000, self._now()
        due_s = self.next_frame_at_s
        if due_s is None or due_s < now - frame_s:  # first frame, or an underrun: restart
            due_s = now
        elif due_s > now:
            await asyncio.sleep(due_s - now)
        self.next_frame_at_s = due_s + frame_s


async def timed(
    source: AsyncIterator[T], recorder: TurnRecorder, clock: Callable[[], float]
) -> AsyncGenerator[T, None]:
    """Pass items through, recording the time spent waiting on the provider."""
    try:
        while True:
            started_s = clock()
            try:
                item = await anext(source)
            except StopAsyncIteration:
                return
            finally:
                recorder.provider_busy(started_s, clock())
            yield item
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()


def model_messages(config: EngineConfig, history: list[Message]) -> list[Message]:
    """What the model is given for ``history``: the context window's view of it (truncation),
    the session's instructions first."""
    messages = config.context.view(history)
    if config.instructions:
        messages.insert(0, Message("system", config.instructions))
    return messages
