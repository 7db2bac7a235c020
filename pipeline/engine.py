"""The conversation engine: PCM frames in; events and paced 20 ms output frames out.

I/O layer; knows nothing of WebRTC. Per user turn::

    push_audio -> TurnDetector -> SpeechToText (streams while the user speaks)
               -> LanguageModel (streamed; tool calls run through the ToolRegistry, results
                  fed back, at most ``max_tool_rounds``) -> SpeechChunker
               -> TextToSpeech (starts on the first chunk while the model still writes)
               -> playout, one frame per ``frame_ms`` of real time

``push_silence``: silence the caller's sender left out (a codec's discontinuous transmission),
heard exactly as zero frames pushed.

Push-to-talk (``turn_detection`` off): no VAD runs; the input is kept (the newest
``MAX_UNCOMMITTED_INPUT_S`` of it, through the noise filter when there is one) until
``commit_input()`` makes it a user turn (``InputCommitted``, then its transcription). A
response waits for the transcriptions of the turns committed before it started, so it answers
the words just spoken.

Semantic end of turn (``semantic_vad``): at the pause the end-of-turn model is asked about, the
stretch of speech so far is transcribed to its end while the model decides, and the turn ends
only once those words are in, so the final transcript is there when the turn is decided. With
``answer_early`` the answer starts on those words too (as they come in with
``answer_before_verdict``, else once the model has said "complete" or the pause is a
decision's), held (no event out, nothing in the history) until the turn ends: then it is
released; if the user goes on, it is thrown away unheard (counted in the turn's
``early_answers_discarded``, its providers' time in ``early_answers_wasted_ms``), and so are
the words before the pause: the whole utterance is transcribed again, as one stretch (within
its first ``pipeline.stretches.MAX_REHEARD_S``; past it, the stretches' words are joined).

Barge-in: ``SpeechStarted`` while a response is active stops playout at once (no frame is
emitted after it) and cancels the response's LLM, TTS and playout tasks; the history keeps only
the assistant text that was heard (``PlayoutLedger``), like OpenAI's Realtime API.

Generation end vs playout end (paced playout): a response is done (``ResponseDone``,
``TurnCompleted``, its words in the history) once its audio is all made; it then plays on
(``OutputStopped`` when it has played) while another response may start, whose audio follows
it. A barge-in (or ``clear_output``) during that playout stops it (``OutputCleared``) and cuts
the answer in the history to the words played, as OpenAI truncates an answer over WebRTC.

Detours: with ``on_detour`` set, a turn's provider calls go through ``resilience.reporting``
views, so each retry or fallback a call took reaches ``on_detour`` with the turn's number.

Task ownership: every task is in ``self._tasks`` (one transcription per utterance, one response
task per answer, whose stages live in a TaskGroup); ``aclose()`` cancels and awaits them all.
A provider's failure or a turn's error is reported as an ``EngineError`` event and the engine
goes on; a task that crashes anyway (a bug outside those handlers) cannot be answered here, so
``events()`` raises ``EngineTaskCrashed`` (caused by the error) to its consumer, who owns the
conversation and ends it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, TypeVar

from pipeline import events as ev
from pipeline.config import EngineConfig
from pipeline.end_of_turn import Decision, end_of_turn_asker
from pipeline.noise_reduction import NoiseSuppressor
from pipeline.providers import (
    LanguageModel,
    Message,
    ProviderError,
    SpeechToText,
    TextToSpeech,
    warm_with,
    with_options,
)
from pipeline.resilience import Detour, reporting
from pipeline.response import SpokenResponse, model_messages
from pipeline.silero_vad import vad_classifier
from pipeline.stretches import Heard, HeardStretches, complete_with_words
from pipeline.tools import ToolRegistry
from pipeline.turns import CostEstimator, DecisionTiming, TurnRecorder, free_of_charge
from pipeline.vad import (
    AskEndOfTurn,
    SpeechStarted,
    SpeechStopped,
    TurnCommitted,
    TurnDetector,
    VadEvent,
    Verdict,
)

log = logging.getLogger(__name__)
_CLOSED = object()
MAX_UNCOMMITTED_INPUT_S = 480  # push-to-talk input kept until a commit (OpenAI: 15 MiB)
MIN_COMMIT_MS = 100  # OpenAI's least committable input
MAX_SILENCE_MS = 60_000  # push_silence's longest silence at once
P = TypeVar("P")


class EngineTaskCrashed(RuntimeError):
    """One of the engine's own tasks raised; the error is the ``__cause__``."""


@dataclass(frozen=True)
class _Crash:
    task_name: str
    error: BaseException


class ConversationEngine(HeardStretches):
    def __init__(
        self,
        config: EngineConfig,
        stt: SpeechToText,
        llm: LanguageModel,
        tts: TextToSpeech,
        tools: ToolRegistry | None = None,
        *,
        clock: Callable[[], float] | None = None,
        classify: Callable[[bytes], bool] | None = None,
        estimate_cost: CostEstimator = free_of_charge,
        end_of_turn: Callable[[bool, int], AskEndOfTurn | None] = end_of_turn_asker,
    ) -> None:
        self.config = config
        self.stt, self.llm, self.tts = stt, llm, tts
        self.tools = tools or ToolRegistry()
        self.history: list[Message] = []
        self._clock = clock
        self._classify = classify
        self._end_of_turn = end_of_turn  # (semantic, rate_hz) -> what a pause asks, or None
        self._estimate_cost = estimate_cost
        self._detector: TurnDetector | None = None
        self._suppressor = _suppressor_for(config)
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._pending_input = bytearray()
        self._heard: Heard | None = None  # the open turn's
        self._voiced = False  # the last frame the detector heard was speech
        self._silence_run = False  # push_silence heard since the last push_audio
        self._zero_frame = b""  # a frame of digital silence, for push_silence
        self._last_voiced_s = 0.0  # when that frame came
        self._speaking = False  # ... and it was the voice, not its fading tail
        self._asked: list[tuple[float, Verdict]] = []  # the pause's questions, and when
        self.early_answers_discarded = 0
        self.early_answers_wasted_ms = 0.0  # their providers' time (the thrown answers')
        self._recorder: TurnRecorder | None = None
        self._response: SpokenResponse | None = None
        self._response_task: asyncio.Task[None] | None = None
        self._playing: dict[asyncio.Task[None], SpokenResponse] = {}  # done, audio still playing
        self._answers: dict[SpokenResponse, Message] = {}  # a playing answer's history message
        self._committed: set[asyncio.Task[None]] = set()  # transcriptions of committed turns
        self._uncommitted = bytearray()  # push-to-talk input since the last commit
        self._overflowed = False  # push-to-talk input over its bound: its start was dropped
        self._turns = itertools.count(1)
        self._responses = itertools.count(1)
        self.on_detour: Callable[[int, Detour], None] | None = None  # (turn, retry or fallback)
        # Asked as each response starts: a refusal ends it failed before the model is asked
        # (the consumer's policy, e.g. its API key's rate limit); None lets it run.
        self.refuse_response: Callable[[], ev.ResponseRefusal | None] | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> ConversationEngine:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        self._clock = self._clock or asyncio.get_running_loop().time
        rate_hz = self.config.input_sample_rate_hz
        classify = self._noting(self._classify or vad_classifier(self.config.vad, rate_hz))
        ask = self._asking(self._end_of_turn(self.config.vad.semantic, rate_hz))
        self._detector = TurnDetector(self.config.vad, rate_hz, classify, self._clock, ask)
        self._idle.set()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._events.put_nowait(_CLOSED)

    async def events(self) -> AsyncGenerator[ev.EngineEvent, None]:
        """Every event in order, until ``aclose()``. One consumer. Raises EngineTaskCrashed
        when one of the engine's tasks crashed (after the events it emitted before)."""
        while (event := await self._events.get()) is not _CLOSED:
            if isinstance(event, _Crash):
                raise EngineTaskCrashed(f"engine task {event.task_name} crashed") from event.error
            yield event

    async def wait_idle(self, timeout_s: float) -> None:
        """Until no transcription or response is running."""
        async with asyncio.timeout(timeout_s):
            await self._idle.wait()

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    @property
    def active_response_id(self) -> str | None:
        return None if self._response is None else self._response.response_id

    @property
    def output_playing(self) -> bool:
        """A done response's audio is still playing (or waiting to)."""
        return bool(self._playing)

    @property
    def input_position_ms(self) -> int:
        """The input heard by the turn detector so far (its audio offsets count from here)."""
        return 0 if self._detector is None else self._detector.position_ms

    @property
    def words_pending(self) -> bool:
        """The words before the user's pause are still being transcribed (semantic_vad: the
        turn cannot end there before they are in)."""
        heard = self._heard
        return heard is not None and heard.audio is None and heard.pending > 0

    @property
    def user_speaking(self) -> bool:
        return self._detector is not None and self._detector.in_speech

    # --- control (what a Realtime client may ask between turns) ---------------------------

    def reconfigure(self, config: EngineConfig) -> None:
        """New knobs (VAD, instructions, policies); a running response keeps its own. Turning
        turn detection off commits an utterance the VAD is in; turning it on drops the
        uncommitted push-to-talk input."""
        if self.config.turn_detection and not config.turn_detection:
            self.finish_input()
        if config.turn_detection:
            self._uncommitted.clear()
        if config.noise_reduction != self.config.noise_reduction:
            self._suppressor = _suppressor_for(config)
        if self._detector is not None and config.vad != self.config.vad:
            rate_hz = config.input_sample_rate_hz
            ask = self._asking(self._end_of_turn(config.vad.semantic, rate_hz))
            classify = self._noting(vad_classifier(config.vad, rate_hz))
            self._detector.reconfigure(config.vad, classify, ask)
        self.config = config

    def add_user_text(self, text: str) -> None:
        self.history.append(Message("user", text))

    def add_tool_output(self, call_id: str, output: str) -> bool:
        """A deferred client call's result, into the history; False for an unknown call."""
        asked = {call.call_id for m in self.history for call in m.tool_calls}
        answered = {m.tool_call_id for m in self.history if m.role == "tool"}
        if call_id not in asked or call_id in answered:
            return False
        self.history.append(Message("tool", output, tool_call_id=call_id))
        return True

    def create_response(
        self,
        instructions: str | None = None,
        *,
        config: EngineConfig | None = None,
        tools: ToolRegistry | None = None,
    ) -> str | None:
        """Answer the conversation as it stands now (with this response's own ``config`` and
        ``tools``, if given); None while a response is active."""
        if self._response is not None:
            return None
        recorder = TurnRecorder(next(self._turns), self.stt.name, self.llm.name, self.tts.name)
        config = config or self.config
        if instructions is not None:
            config = replace(config, instructions=instructions)
        return self._start_response(recorder, config, tools)

    def cancel_response(self) -> str | None:
        """Stop the active response and its audio; its id, or None if there is none. The audio
        of responses already done plays on (``clear_output`` stops it)."""
        response = self._response
        self._stop_active()
        return None if response is None else response.response_id

    def clear_output(self) -> None:
        """Stop every answer's audio, as a barge-in does: the active response is cancelled."""
        self._barge_in()

    def clear_input(self) -> None:
        """Drop buffered input and the utterance in progress (it gets no transcript)."""
        self._pending_input.clear()
        self._uncommitted.clear()
        if self._detector is not None:
            self._detector.reset()
        if (heard := self._heard) is not None:
            self._discard_early(heard)
            for task in heard.tasks:
                task.cancel()
        self._heard, self._recorder = None, None

    # --- input ----------------------------------------------------------------------------

    def push_audio(self, pcm: bytes) -> None:
        """16-bit mono PCM at ``input_sample_rate_hz``, any length; never blocks. Push-to-talk
        input is kept as it comes, or with a noise filter a frame at a time, filtered."""
        if self._detector is None:
            raise RuntimeError("ConversationEngine.push_audio before start()")
        self._silence_run = False
        if not self.config.turn_detection and self._suppressor is None:
            self._keep_uncommitted(pcm)
            return
        frame_bytes = self.config.input_sample_rate_hz * self.config.frame_ms // 500
        if len(pcm) == frame_bytes and not self._pending_input and type(pcm) is bytes:
            # one whole frame, nothing before it: the lean path's every packet, taken as it is
            # (not copied into the pending input and out again)
            self._take_frame(pcm)
            return
        self._pending_input += pcm
        while len(self._pending_input) >= frame_bytes:
            frame = bytes(self._pending_input[:frame_bytes])
            del self._pending_input[:frame_bytes]
            self._take_frame(frame)

    def push_silence(self, duration_ms: int) -> bool:
        """``duration_ms`` of digital silence the caller did not send (Opus DTX: a silent
        sender sends a packet every 400 ms), heard exactly as ``push_audio`` of as many zero
        bytes: each frame through the noise filter, the classifier, the turn detector (the
        onset window and prefix padding, the pause that ends a turn, the end-of-turn model's
        questions) and an open utterance's audio and transcription, without a packet,
        decoding or buffering. The classifier still hears the zeros: webrtcvad's filters
        ring on after sound, so it may call the first zero frames speech, and frames it did
        not hear change its answers on later speech (recorded speech with a silence cut out
        of webrtcvad's hearing: different answers on the speech after it in 4 to 8 % of
        tries, even after 30 frames of zeros); at ~1.5 us a frame (16 kHz) it is what is left
        of the frame's cost. False, and nothing heard, while the last frame was speech and no
        silence has come since: a gap mid-word is an outage, not a pause (fed as silence, it
        would end the turn early)."""
        if self._detector is None:
            raise RuntimeError("ConversationEngine.push_silence before start()")
        if not 0 <= duration_ms <= MAX_SILENCE_MS:
            raise ValueError(f"silence must be 0 to {MAX_SILENCE_MS} ms, not {duration_ms}")
        if self._voiced and not self._silence_run:
            return False
        frame_ms = self.config.frame_ms
        frames, odd_ms = divmod(duration_ms, frame_ms)
        if odd_ms or self._pending_input:  # not whole frames of their own: as pushed audio
            self.push_audio(bytes(duration_ms * self.config.input_sample_rate_hz // 500))
        else:
            frame_bytes = self.config.input_sample_rate_hz * frame_ms // 500
            if len(self._zero_frame) != frame_bytes:
                self._zero_frame = bytes(frame_bytes)
            for _ in range(frames):
                self._take_frame(self._zero_frame)
        self._silence_run = True
        return True

    def _take_frame(self, frame: bytes) -> None:
        if self.config.turn_detection:
            self._on_frame(frame)
        else:
            self._keep_uncommitted(self._filtered(frame))

    def _filtered(self, frame: bytes) -> bytes:
        """The frame as the noise filter leaves it (as it is without one): what the VAD, the
        speech-to-text and the turn's audio get."""
        return frame if self._suppressor is None else self._suppressor.process(frame)

    def _keep_uncommitted(self, pcm: bytes) -> None:
        self._uncommitted += pcm
        limit = 2 * self.config.input_sample_rate_hz * MAX_UNCOMMITTED_INPUT_S
        if len(self._uncommitted) > limit:
            del self._uncommitted[: len(self._uncommitted) - limit]
            if not self._overflowed:  # said once per commit
                self._overflowed = True
                message = f"uncommitted input over {MAX_UNCOMMITTED_INPUT_S} s: its start dropped"
                self._emit(ev.EngineError(message, retryable=False))

    @property
    def uncommitted_ms(self) -> int:
        return len(self._uncommitted) * 500 // self.config.input_sample_rate_hz

    def commit_input(self) -> bool:
        """Push-to-talk: the input since the last commit becomes a user turn (its transcription
        starts); False (nothing done) when there is less than ``MIN_COMMIT_MS`` of it."""
        if self._pending_input and not self.config.turn_detection:  # under a frame: as it is
            self._keep_uncommitted(bytes(self._pending_input))
            self._pending_input.clear()
        if self.config.turn_detection or self.uncommitted_ms < MIN_COMMIT_MS:
            return False
        pcm, audio_ms = bytes(self._uncommitted), self.uncommitted_ms
        self._uncommitted.clear()
        self._overflowed = False
        turn = next(self._turns)
        recorder = TurnRecorder(turn, self.stt.name, self.llm.name, self.tts.name)
        recorder.mark("speech_stopped", self._now())  # the commit ends the user's speech
        recorder.input_audio_s = audio_ms / 1000
        self._recorder = recorder
        self._emit(ev.InputCommitted(audio_ms, turn, pcm, self.config.input_sample_rate_hz))
        heard = Heard(recorder, [pcm])
        self._open_stretch(heard)
        self._end_heard(heard)
        return True

    def _commit(self, transcription: asyncio.Task[None]) -> None:
        """A turn's input ended: responses started from now on wait for its transcription."""
        self._committed.add(transcription)
        transcription.add_done_callback(self._committed.discard)

    def finish_input(self) -> None:
        """End of the input stream: an utterance still open is committed."""
        if self._detector is not None:
            for event in self._detector.flush():
                self._on_vad(event)

    def _on_frame(self, frame: bytes) -> None:
        assert self._detector is not None
        frame = self._filtered(frame)
        heard = self._heard
        events = self._detector.push(frame)
        if self._voiced:
            self._last_voiced_s = self._now()
        # the voice itself, not its fading tail (VadConfig.voice_end_db): a pause is over
        self._speaking = self._voiced and self._detector.pause_ms == 0
        if self._speaking:
            self._asked = []
        elif heard is not None and self._may_answer_early(heard):
            self._answer_early(heard)
        if heard is not None and not (events and any(isinstance(e, SpeechStarted) for e in events)):
            self._listen(heard, frame)
        for event in events:
            self._on_vad(event)

    def _noting(self, classify: Callable[[bytes], bool]) -> Callable[[bytes], bool]:
        """The detector's classifier, its last answer kept (speech after a pause). While the
        noise filter settles, it hears no speech (webrtcvad still hears the frames and learns
        the noise: at a stream's start, noise alone would otherwise start a short turn)."""

        def voiced(frame: bytes) -> bool:
            suppressor = self._suppressor
            settled = suppressor is None or suppressor.settled or self.user_speaking
            self._voiced = classify(frame) and settled
            return self._voiced

        return voiced

    def _asking(self, ask: AskEndOfTurn | None) -> AskEndOfTurn | None:
        """The end-of-turn question, asked at a pause: the stretch before it is transcribed
        (and answered early) meanwhile, and "complete" holds back until its words are in."""
        if ask is None:
            return None

        def asked(pcm: bytes) -> Verdict:
            verdict, heard = ask(pcm), self._heard
            self._asked.append((self._now(), verdict))
            if heard is None:
                return verdict
            self._on_pause(heard)
            self._watch_verdict(verdict, heard)
            return partial(complete_with_words, verdict, heard)

        return asked

    def _on_vad(self, event: VadEvent) -> None:
        if isinstance(event, SpeechStarted):
            turn = next(self._turns)
            self._emit(ev.SpeechStartedEvent(event.at_s, event.audio_start_ms, turn))
            if self.config.interrupt_response:
                self._barge_in()
            self._begin_turn(event, turn)
        elif isinstance(event, SpeechStopped) and self._recorder is not None:
            self._recorder.mark("speech_stopped", event.at_s)
            self._note_decision(self._recorder)
            heard, self._heard = self._heard, None
            turn = self._recorder.turn
            end_ms, rate_hz = event.audio_end_ms, self.config.input_sample_rate_hz
            self._emit(ev.SpeechStoppedEvent(event.at_s, end_ms, turn, event.pcm, rate_hz))
            if heard is not None:
                self._end_heard(heard)
        elif isinstance(event, TurnCommitted) and self._recorder is not None:
            self._recorder.input_audio_s = event.duration_ms / 1000

    def _note_decision(self, recorder: TurnRecorder) -> None:
        """How the turn's end was decided: its last voiced frame, the questions its last
        pause asked the end-of-turn model, and the model's time for the last of them."""
        recorder.mark("last_voiced", self._last_voiced_s)
        if not self._asked:
            return
        recorder.mark("turn_asked", self._asked[0][0])
        last = self._asked[-1][1]
        scored = last.scored if isinstance(last, Decision) else None
        timing = DecisionTiming(asked=len(self._asked))
        if scored is not None:
            timing = DecisionTiming(
                scored.queued_ms, scored.features_ms, scored.model_ms, timing.asked,
                scored.probability, scored.complete, scored.cpu_ms,
            )  # fmt: skip
        recorder.decision = timing

    def _begin_turn(self, event: SpeechStarted, turn: int) -> None:
        recorder = TurnRecorder(turn, self.stt.name, self.llm.name, self.tts.name)
        recorder.mark("speech_started", event.at_s)
        self._recorder = recorder
        self._heard = Heard(recorder, [event.prefix_pcm])
        self._open_stretch(self._heard)

    def _barge_in(self) -> None:
        for task, response in list(self._playing.items()):
            self._cut_playout(response)
            task.cancel()
        self._stop_active()

    def _stop_active(self) -> None:
        response, task = self._response, self._response_task
        if response is None or task is None:
            return
        response.stop()  # from now on the player emits nothing
        if response.frames_out:
            heard = response.heard_text()
            self._emit(ev.OutputCleared(response.response_id, response.played_ms, heard))
        task.cancel()

    def _cut_playout(self, response: SpokenResponse) -> None:
        """A done response's audio stops: its answer in the history keeps the words played."""
        response.stop()
        heard = response.heard_text()
        answer = self._answers.pop(response, None)
        if answer is not None and heard != answer.content:
            at = next((i for i, m in enumerate(self.history) if m is answer), None)
            if at is not None and heard:
                self.history[at] = replace(answer, content=heard)
            elif at is not None:
                del self.history[at]
        if response.frames_out or answer is not None:  # (an answer queued behind another)
            self._emit(ev.OutputCleared(response.response_id, response.played_ms, heard))

    def _after_transcript(self, heard: Heard) -> None:
        recorder, final = heard.recorder, heard.words
        if not final:
            self._discard_early(heard)
            return  # nothing recognisable was said: no answer
        recorder.transcript = final
        if self.user_speaking or not self.config.create_response:
            self._discard_early(heard)
            self.history.append(Message("user", final))
            return  # the user went on (the next turn answers both), or the client decides
        if self._response is not None and not self._response.stop_requested:
            self._discard_early(heard)
            self.history.append(Message("user", final))
        elif not self._adopt_early(heard):
            self.history.append(Message("user", final))
            self._start_response(recorder, self.config)

    def _read_ahead(self, words: str) -> None:
        """The user's words so far, from a partial transcript: a model with a prompt cache may
        read them, but the last (a re-guess most often changes it), before the turn ends
        (``warm_with``), while the user is heard speaking and no response of this call runs.
        Not in a pause: the turn's answer may start any moment then, and would wait for the
        read (llama.cpp does not cut a prompt's reading short)."""
        head = words.rsplit(maxsplit=1)[0] if len(words.split()) > 1 else ""
        if not head or not self._voiced or not self.config.create_response:
            return
        if self._response is not None or not getattr(self.llm, "warm", None):
            return  # (a model with nothing to warm: no request is built for it)
        messages = model_messages(self.config, [*self.history, Message("user", head)])
        specs = self.tools.specs() if self.config.max_tool_rounds else []
        warm_with(self.llm, messages, specs)

    def _start_response(
        self, recorder: TurnRecorder, config: EngineConfig, tools: ToolRegistry | None = None
    ) -> str:
        response = self._response_for(recorder, config, tools, self.history, self._emit)
        response.response_id = f"resp_{next(self._responses)}"
        response.play_after = tuple(self._playing)
        self._response = response
        self._response_task = self._spawn(self._respond(response), response.response_id)
        return response.response_id

    def _response_for(
        self,
        recorder: TurnRecorder,
        config: EngineConfig,
        tools: ToolRegistry | None,
        history: list[Message],
        emit: Callable[[ev.EngineEvent], None],
    ) -> SpokenResponse:
        providers = (
            with_options(self._reporting(self.llm, recorder.turn), config.model_options),
            self._reporting(self.tts, recorder.turn),
            self.tools if tools is None else tools,
        )
        response = SpokenResponse(
            "resp_early", recorder, config, providers, history, emit, self._now
        )
        if config.realtime_playout:
            response.on_generated = partial(self._generated, response)
        return response

    # --- response -------------------------------------------------------------------------

    async def _respond(self, response: SpokenResponse) -> None:
        turn, audio = response.recorder.turn, response.config.speak
        response.emit(ev.ResponseStarted(response.response_id, turn, audio))
        status: Literal["completed", "cancelled", "failed", "incomplete"] = "cancelled"
        refused = self.refusal()
        try:
            if refused is not None:
                status = "failed"
                return  # the model is not asked
            if self._committed:  # the words just committed are part of what this answers
                await asyncio.wait(list(self._committed))
            await response.run()
            status = "incomplete" if response.limited else "completed"
        except Exception as error:
            status = "failed"
            if _released(response):  # (an early answer's failure: it is not used)
                self._report(error)
        finally:
            self._end_response(response, status, refused)

    def refusal(self) -> ev.ResponseRefusal | None:
        """Why a response may not run now (``refuse_response``), or None."""
        return None if self.refuse_response is None else self.refuse_response()

    def _end_response(
        self,
        response: SpokenResponse,
        status: Literal["completed", "cancelled", "failed", "incomplete"],
        refused: ev.ResponseRefusal | None = None,
    ) -> None:
        if not _released(response):
            return  # an early answer thrown away (or failed unheard): nothing of it is said
        if response.finished:  # at its generation's end: its playout ended now
            self._playing = {t: r for t, r in self._playing.items() if r is not response}
            self._answers.pop(response, None)
        else:
            self._finish_response(response, status, refused=refused)

    def _generated(self, response: SpokenResponse) -> None:
        """Its audio is all made: the response is done, and plays on."""
        task = self._response_task if self._response is response else None
        limited = response.limited  # at its max_output_tokens
        self._finish_response(response, "incomplete" if limited else "completed", generated=True)
        if task is not None:
            self._playing[task] = response

    def _finish_response(
        self,
        response: SpokenResponse,
        status: Literal["completed", "cancelled", "failed", "incomplete"],
        *,
        generated: bool = False,
        refused: ev.ResponseRefusal | None = None,
    ) -> None:
        """``generated``: done at the end of its generation, its audio still to play;
        ``refused``: failed before it ran, and why."""
        response.finished = True
        recorder = response.recorder
        heard = response.generated_text() if generated else response.heard_text()
        audio_ms = response.ledger.total_ms if generated else float(response.played_ms)
        recorder.heard_text, recorder.output_audio_s = heard, audio_ms / 1000
        if heard:
            self.history.append(answer := Message("assistant", heard))
            if generated:
                self._answers[response] = answer
        recorder.mark("response_done", self._now())
        playing = generated and audio_ms > 0  # an OutputStopped or OutputCleared follows
        done = ev.ResponseDone(response.response_id, status, heard, audio_ms, playing, refused)
        self._emit(done)
        interrupted = status == "cancelled"  # (incomplete: cut by its own token limit)
        record = recorder.finish(interrupted=interrupted, estimate_cost=self._estimate_cost)
        self._emit(ev.TurnCompleted(record))
        if self._response is response:
            self._response, self._response_task = None, None

    # --- plumbing -------------------------------------------------------------------------

    def _reporting(self, provider: P, turn: int) -> P:
        """``provider``, telling ``on_detour`` of the retries and fallbacks of ``turn``'s calls."""
        if self.on_detour is None:
            return provider
        return reporting(provider, partial(self.on_detour, turn))

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._events.put_nowait(_Crash(task.get_name(), error))
        if not self._tasks:
            self._idle.set()

    def _report(self, error: BaseException, transcribing: int | None = None) -> None:
        """Log the turn's error with its traceback (a provider's failure as a warning, anything
        else as the bug it is) and tell the session (``transcribing``: the turn whose
        transcription failed)."""
        while isinstance(error, BaseExceptionGroup) and error.exceptions:
            error = error.exceptions[0]
        if isinstance(error, ProviderError):
            log.warning("turn failed: %s", error, exc_info=error)
        else:
            log.error("turn failed on a bug: %s: %s", type(error).__name__, error, exc_info=error)
        retryable = isinstance(error, ProviderError) and error.retryable
        self._emit(ev.EngineError(f"{type(error).__name__}: {error}", retryable, transcribing))

    def _emit(self, event: ev.EngineEvent) -> None:
        self._events.put_nowait(event)

    def _now(self) -> float:
        assert self._clock is not None
        return self._clock()


def _suppressor_for(config: EngineConfig) -> NoiseSuppressor | None:
    if config.noise_reduction is None:
        return None
    rate_hz, frame_ms = config.input_sample_rate_hz, config.frame_ms
    return NoiseSuppressor(config.noise_reduction, rate_hz, frame_ms)


def _released(response: SpokenResponse) -> bool:
    """Not an early answer still held (or thrown away)."""
    return response.held is None or response.held.released.is_set()
