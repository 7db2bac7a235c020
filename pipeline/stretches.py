"""A user turn heard in stretches, and the answer started early on them (``semantic_vad``).

I/O layer, part of ``pipeline.engine.ConversationEngine`` (its base class): at the pause the
end-of-turn model is asked about, the stretch of speech so far is transcribed to its end while
the model decides (``_on_pause``), and the turn ends only once those words are in. With
``answer_early`` the answer starts on those words too (``_answer_early``; when,
``_may_answer_early`` says), held: the turn's
end releases it (``_adopt_early``). Speech coming back drops it unheard (``_discard_early``),
and the stretch's words with it (``_go_on``): the next stretch is the whole utterance so far,
transcribed again from its start, so the turn's transcript is always one transcription of all
its audio. Words joined from stretches cut at a gap inside a sentence were each a fragment's
guess ("Tell me about. The mood." for "Tell me about the moon."). The cost: the utterance's
start is heard twice (a streaming recogniser hears it again while the user goes on; Moonshine,
which decodes a stretch at once, in its final pass, whose time grows with the audio's length).
So that cost is bounded: once the utterance is past ``MAX_REHEARD_S``, the words before each
pause stand and the next stretch is the speech since it, its words joined to theirs (as all
stretches' were before), and only that speech is kept.

``HeardStretches`` declares what of the engine it uses; the engine defines them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline import events as ev
from pipeline.config import EngineConfig
from pipeline.end_of_turn import Decision
from pipeline.providers import (
    AudioChunk,
    LanguageModel,
    Message,
    SpeakerSegment,
    SpeechToText,
    TextToSpeech,
    TokenLogprob,
    Transcript,
    transcribe_with,
)
from pipeline.response import HeldEvents, SpokenResponse, timed
from pipeline.turns import TurnRecorder
from pipeline.vad import TurnDetector, Verdict

P = TypeVar("P")
MAX_REHEARD_S = 30.0  # the longest utterance transcribed again whole when the user goes on


@dataclass(eq=False)
class Heard:
    """A user turn's speech to text: stretches of speech, each transcribed to its end at the
    pause the end-of-turn model is asked about; each stretch after the first is the whole
    utterance again (the module docstring), so the last one's words are the turn's (past
    ``MAX_REHEARD_S``, the speech since the pause, its words joined to those before)."""

    recorder: TurnRecorder
    pcm: list[bytes] = field(default_factory=list)  # the utterance so far, prefix included
    paused_at: int = 0  # len(pcm) at the last pause: pcm[paused_at:] is the speech since it
    joining: bool = False  # past MAX_REHEARD_S: stretches' words are joined, none heard again
    texts: list[str] = field(default_factory=list)  # the stretch's final words
    logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs, when asked for
    segments: list[SpeakerSegment] = field(default_factory=list)  # theirs, when asked for
    audio: asyncio.Queue[AudioChunk | None] | None = None  # the open stretch's; None: paused
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # a transcription a stretch
    pending: int = 0  # stretches with no final words yet
    ended: bool = False  # the turn ended (speech stopped, or committed)
    failed: bool = False  # a stretch's transcription failed: the turn gets no answer
    finished: bool = False  # its final transcript is out
    answer_early: bool = False  # answer the words before this pause while the model decides
    early: SpokenResponse | None = None  # that answer, held
    early_task: asyncio.Task[None] | None = None

    @property
    def words(self) -> str:
        return " ".join(self.texts)


class HeardStretches:
    """The engine's stretch transcription and early answer (module docstring)."""

    # the engine's, used here
    config: EngineConfig
    stt: SpeechToText
    llm: LanguageModel
    tts: TextToSpeech
    history: list[Message]
    early_answers_discarded: int
    early_answers_wasted_ms: float
    _speaking: bool  # the last frame was the voice (a voiced frame in a pause is its tail)
    _detector: TurnDetector | None
    _asked: list[tuple[float, Verdict]]  # the pause's questions to the model (raw verdicts)
    _recorder: TurnRecorder | None
    _heard: Heard | None
    _response: SpokenResponse | None
    _response_task: asyncio.Task[None] | None
    _playing: dict[asyncio.Task[None], SpokenResponse]
    _responses: Iterator[int]
    _spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]
    _commit: Callable[[asyncio.Task[None]], None]
    _emit: Callable[[ev.EngineEvent], None]
    _now: Callable[[], float]
    _report: Callable[..., None]
    _reporting: Callable[[P, int], P]
    _after_transcript: Callable[[Heard], None]
    _read_ahead: Callable[[str], None]
    _respond: Callable[[SpokenResponse], Coroutine[Any, Any, None]]
    _response_for: Callable[..., SpokenResponse]

    def _open_stretch(self, heard: Heard) -> None:
        """A transcription of the utterance so far (one chunk), fed each frame from now on."""
        audio: asyncio.Queue[AudioChunk | None] = asyncio.Queue()
        heard.pcm = [b"".join(heard.pcm)]
        audio.put_nowait(AudioChunk(heard.pcm[0], self.config.input_sample_rate_hz))
        heard.audio = audio
        heard.pending += 1
        name = f"transcription {heard.recorder.turn}"
        heard.tasks.append(self._spawn(self._transcribe(heard, audio), name))

    def _end_heard(self, heard: Heard) -> None:
        """The turn ended: its open stretch is transcribed to its end (responses started from
        now on wait for it); words already in make the final transcript at once."""
        heard.ended = True
        if heard.audio is not None:
            heard.audio.put_nowait(None)
        heard.audio = None
        for task in heard.tasks:
            if not task.done():
                self._commit(task)
        self._heard_all(heard)

    async def _transcribe(self, heard: Heard, audio: asyncio.Queue[AudioChunk | None]) -> None:
        async def utterance() -> AsyncIterator[AudioChunk]:
            while (chunk := await audio.get()) is not None:
                yield chunk

        recorder, final = heard.recorder, False
        try:
            stt = self._reporting(self.stt, recorder.turn)
            words = transcribe_with(stt, utterance(), self.config.transcription)
            transcripts = timed(words, recorder, self._now)
            async with aclosing(transcripts):
                async for transcript in transcripts:
                    final = final or transcript.final
                    self._on_transcript(heard, transcript)
        except Exception as error:
            heard.failed = True
            self._report(error, recorder.turn)
        finally:
            if asyncio.current_task() in heard.tasks:  # (not a stretch _go_on voided)
                heard.pending -= not final
        self._heard_all(heard)

    def _on_transcript(self, heard: Heard, transcript: Transcript) -> None:
        """A stretch's words: partial ones as the turn's words so far; final ones join them
        (and so do their logprobs and speaker segments)."""
        turn, text = heard.recorder.turn, transcript.text.strip()
        if not transcript.final:
            words = " ".join([*heard.texts, text]).strip()
            logprobs = (*heard.logprobs, *transcript.logprobs)
            segments = (*heard.segments, *transcript.segments)
            self._emit(ev.InputTranscript(turn, words, False, logprobs, segments))
            self._read_ahead(words)
            return
        heard.pending -= 1
        heard.recorder.mark("stt_final", self._now(), overwrite=True)
        if text:
            heard.texts.append(text)
        heard.logprobs.extend(transcript.logprobs)
        heard.segments.extend(transcript.segments)
        if heard.ended:
            self._heard_all(heard)
        elif self._may_answer_early(heard):
            self._answer_early(heard)

    def _heard_all(self, heard: Heard) -> None:
        """Once the turn has ended and every stretch is transcribed: the final transcript."""
        if heard.finished or heard.failed or not heard.ended or heard.pending:
            return
        heard.finished = True
        logprobs, segments = tuple(heard.logprobs), tuple(heard.segments)
        self._emit(ev.InputTranscript(heard.recorder.turn, heard.words, True, logprobs, segments))
        self._after_transcript(heard)

    def _listen(self, heard: Heard, frame: bytes) -> None:
        """The frame joins the utterance and goes to the open stretch; after a pause, speech
        opens the next one, the whole utterance again."""
        heard.pcm.append(frame)
        if heard.audio is not None:
            heard.audio.put_nowait(AudioChunk(frame, self.config.input_sample_rate_hz))
        elif self._speaking:  # the user went on after the pause
            self._go_on(heard)

    def _go_on(self, heard: Heard) -> None:
        """The words before the pause, and the early answer on them, are void: a fragment's
        words are not the sentence's (the module docstring). Its transcription is stopped
        (a final one already in is dropped) and the whole utterance's begins. Its count of
        pending words goes with it here: one cancelled before it ever ran never settles it.
        Past ``MAX_REHEARD_S`` the words stand and the speech since the pause is a stretch."""
        self._discard_early(heard)
        rate_hz = self.config.input_sample_rate_hz
        heard.joining = heard.joining or sum(map(len, heard.pcm)) > 2 * rate_hz * MAX_REHEARD_S
        if heard.joining:
            heard.pcm = heard.pcm[heard.paused_at :]
            self._open_stretch(heard)
            return
        for task in heard.tasks:
            task.cancel()
        heard.tasks, heard.pending = [], 0
        heard.texts, heard.logprobs, heard.segments = [], [], []
        self._open_stretch(heard)

    def _on_pause(self, heard: Heard) -> None:
        if heard.audio is None:
            return
        heard.audio.put_nowait(None)  # the stretch is transcribed to its end
        heard.audio, heard.paused_at = None, len(heard.pcm)
        config, response = self.config, self._response
        heard.answer_early = (
            config.answer_early
            and config.create_response
            and (response is None or response.stop_requested)
        )

    def _watch_verdict(self, verdict: Verdict, heard: Heard) -> None:
        """The model's verdict reaches the event loop as soon as it is in: a "complete" starts
        the early answer then, not on the next frame."""
        if not isinstance(verdict, Decision):
            return  # (a verdict that is no Decision answers on the next frame's poll)
        loop = asyncio.get_running_loop()

        def arrived() -> None:
            try:
                loop.call_soon_threadsafe(self._verdict_in, heard)
            except RuntimeError:  # the loop is closed: the call is over, nothing to answer
                return

        verdict.when_done(arrived)

    def _verdict_in(self, heard: Heard) -> None:
        if heard is self._heard and not heard.ended and self._may_answer_early(heard):
            self._answer_early(heard)

    def _may_answer_early(self, heard: Heard) -> bool:
        """The words before the pause are in, and either the pause is as long as a decision's
        or the model, asked ahead (``VadConfig.ask_pause_ms``), already said the user is done:
        then the turn ends where the pause reaches the decision's, and the answer and its first
        chunk's speech are made meanwhile. With ``answer_before_verdict`` the answer starts on
        the words alone, while the model decides: its first chunk is ready sooner when the turn
        ends, and a breath the user goes on after throws it away (its providers' time counted,
        ``early_answers_wasted_ms``). Without it, a breath the model heard as "not yet" starts
        no answer, whose synthesis would take the cores from the calls' media for nothing."""
        if not heard.answer_early or heard.pending or heard.early is not None:
            return False
        pause_ms = 0 if self._detector is None else self._detector.pause_ms
        if pause_ms <= 0:
            return False
        return (
            self.config.answer_before_verdict
            or pause_ms >= self.config.vad.decision_pause_ms
            or any(verdict() for _, verdict in self._asked)
        )

    def _answer_early(self, heard: Heard) -> None:
        turn = heard.recorder.turn
        recorder = TurnRecorder(turn, self.stt.name, self.llm.name, self.tts.name)
        history = [*self.history, Message("user", heard.words)]
        held = HeldEvents(self._emit)
        response = self._response_for(recorder, self.config, None, history, held)
        heard.early = response
        heard.early_task = self._spawn(self._respond(response), f"early answer {turn}")

    def _adopt_early(self, heard: Heard) -> bool:
        """The turn ended on the words the early answer took: it becomes the turn's answer."""
        response, task = heard.early, heard.early_task
        said = len(self.history)
        if (
            response is None
            or task is None
            or task.done()
            or response.history[:said] != self.history
        ):
            self._discard_early(heard)  # (the conversation changed meanwhile)
            return False
        heard.early = heard.early_task = None
        response.recorder.absorb(heard.recorder)
        if self._recorder is heard.recorder:
            self._recorder = response.recorder
        self.history.extend(response.history[said:])  # the user's words, tool calls so far
        response.history = self.history
        response.response_id = f"resp_{next(self._responses)}"
        response.play_after = tuple(self._playing)
        self._response, self._response_task = response, task
        assert response.held is not None
        response.held.release(response.response_id)
        return True

    def _discard_early(self, heard: Heard) -> None:
        response, task = heard.early, heard.early_task
        heard.early = heard.early_task = None
        heard.answer_early = False
        if response is None or task is None:
            return
        response.stop()
        task.cancel()
        heard.recorder.early_answers_discarded += 1
        self.early_answers_discarded += 1
        task.add_done_callback(lambda _: self._count_wasted(heard.recorder, response.recorder))

    def _count_wasted(self, turn: TurnRecorder, thrown: TurnRecorder) -> None:
        """A thrown-away answer has stopped: its providers' time (the model's, the first
        chunk's speech) is the turn's, and the engine's, waste."""
        wasted_ms = thrown.busy_ms()
        turn.early_answers_wasted_ms += wasted_ms
        self.early_answers_wasted_ms += wasted_ms


def complete_with_words(verdict: Verdict, heard: Heard) -> bool | None:
    """The model's verdict, "complete" only once the words before the pause are in."""
    said = verdict()
    if not said:
        return said
    return True if heard.pending == 0 or heard.failed else None
