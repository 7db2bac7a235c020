"""Realtime translation sessions (``client.realtime.translations``): speech in, speech and text
out in another language.

A translation session is a ``RealtimeSession`` with this contract at its edge
(``RealtimeSession.use_contract``), as a transcription session is: the same engine, its VAD
cutting the speech into utterances (answering none itself, cutting nothing off) and the
speech-to-text hearing each. Every utterance heard is queued, and translated in turn, one at
a time, by a response of the engine whose instruction (``translation_fields``:
``utterance_instruction``) names the target language and the utterance's words, so speech that
ends while another utterance is translated waits its turn instead of being lost or answered
with the next one; the TTS speaks each translation. Its fields are OpenAI's translation
session's (``translation_fields``).

Client events (the SDK's ``RealtimeTranslationClientEvent``): ``session.update``,
``session.input_audio_buffer.append`` (base64 PCM16 at 24 kHz, as a Realtime WebSocket
session's appends) and ``session.close``: the utterance still open is ended, the server waits
for it and every utterance queued to be translated and sent (at most ``FLUSH_TIMEOUT_S``), then
``session.closed`` and the socket closes (1000); audio appended after it is refused. Any other
type is ``invalid_value`` on ``type``, naming those taken.

Server events (``RealtimeTranslationServerEvent``): ``session.created`` first,
``session.updated``, ``session.input_transcript.delta`` (each utterance's final transcript,
only with ``audio.input.transcription`` set), ``session.output_transcript.delta`` (the model's
text as it streams), ``session.output_audio.delta`` (PCM16 at 24 kHz, mono, as made),
``session.closed`` and ``error``. Deltas are append-only: a later utterance's first delta
starts with the space that separates it from the one before. A failed transcription or
translation is an ``error`` (``server_error``) and the session goes on. ``elapsed_ms``: where
the utterance's speech stopped in the input (in 200 ms steps), on its input transcript delta and
on its translation's deltas.

Only a language model that can follow the instruction translates: the offline rule-based agent
cannot, and such a session is refused by name (``check_translates``).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import events as ev
from pipeline.engine import ConversationEngine
from pipeline.local_agent import LocalRuleBasedAgent
from transceiver.realtime.client_events import (
    AUDIO_RATE_HZ,
    EventError,
    SessionConfig,
    audio_bytes,
    event_id_of,
    event_object,
    new_id,
)
from transceiver.realtime.event_errors import refuse_unknown
from transceiver.realtime.policy import session_update_from
from transceiver.realtime.server_events import error_event, server_event
from transceiver.realtime.session import RealtimeSession
from transceiver.realtime.translation_fields import (
    TRANSLATION,
    TranscriptStream,
    TranslationConfig,
    TranslationUpdate,
    as_realtime,
    created,
    session_json,
    updated,
    utterance_instruction,
)
from transceiver.store.rate_limits import RateMeter

FRAME_MS = 200  # OpenAI's translation frame: elapsed_ms advances in these steps
FLUSH_TIMEOUT_S = 30.0  # session.close waits this long for the last translation to be sent
ACCEPTED_EVENTS = ("session.update", "session.input_audio_buffer.append", "session.close")
CLOSE_EVENT_KEYS = frozenset({"type", "event_id"})  # each client event's fields
UPDATE_EVENT_KEYS = CLOSE_EVENT_KEYS | {"session"}
APPEND_EVENT_KEYS = CLOSE_EVENT_KEYS | {"audio"}
NOT_TRANSLATING = frozenset({LocalRuleBasedAgent.name})  # language models that cannot translate
Event = dict[str, Any]
Sessions = Callable[[Mapping[str, Any] | None], RealtimeSession]


def translation_session(
    sessions: Sessions, requested: Mapping[str, Any] | None, model: str
) -> RealtimeSession:
    """A new translation session made by ``sessions`` (the Realtime session factory):
    ``requested`` is a client secret's session (None: the defaults), ``model`` the one the
    connection names when the secret names none. EventError when the config is not valid."""
    asked = {"model": model, **(requested or {})}
    asked_model, update = created(asked)
    config = update.apply(TranslationConfig(model=asked_model))
    session = sessions(as_realtime(config, update))
    session.use_contract(TranslationContract(session, config))
    return session


def described(requested: Any) -> tuple[dict[str, Any], Event]:
    """A client secret's translation ``session`` as the secret carries it (typed
    ``translation``, its model named) and the session it starts as reported; EventError."""
    model, update = created(requested)
    config = update.apply(TranslationConfig(model=model))
    realtime = session_update_from(as_realtime(config, update)).apply(SessionConfig(new_id("sess")))
    noise = realtime.to_json()["audio"]["input"]["noise_reduction"]
    reported = session_json(config, realtime.id, noise, int(time.time()))
    return {**requested, "type": TRANSLATION, "model": model}, reported


def check_translates(session: RealtimeSession) -> None:
    """EventError (``translation_unavailable``) when the session's language model cannot
    translate."""
    name = session.engine.llm.name
    if name in NOT_TRANSLATING:
        message = (
            f"the language model here ({name}) cannot translate: translation sessions need an "
            "OpenAI-compatible model (PIPELINE_LLM=openai) or the local model (PIPELINE_LLM=local)"
        )
        raise EventError("translation_unavailable", message)


class TranslationContract:
    """What a translation session says to its client (``ClientContract``)."""

    def __init__(self, session: RealtimeSession, config: TranslationConfig) -> None:
        self.session = session
        self.config = config
        self.created_s = int(time.time())
        self.closing = False
        self._input = TranscriptStream()
        self._output = TranscriptStream()
        self._done_id = ""
        self._waiting: asyncio.Queue[_Utterance] = asyncio.Queue()  # heard, in order
        self._ends_ms: dict[int, int] = {}  # turn -> where its speech stopped in the input
        self._spoken: list[int] = []  # turns whose speech stopped, in order, not yet queued
        self._words: dict[int, str] = {}  # of them, those heard (transcribed), out of order
        self._elapsed_ms: dict[str, int] = {}  # the output's alignment (``elapsed_ms``)
        self._translating: str | None = None  # the engine's response translating one now
        self._translated = asyncio.Event()  # set when that response is done
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "session.update": self._update,
            "session.input_audio_buffer.append": self._append,
            "session.close": self._close,
        }

    @property
    def done_engine_response_id(self) -> str:
        return self._done_id

    def stored(self) -> Mapping[str, Any]:
        config = self.config
        return {"type": TRANSLATION, "model": config.model, "language": config.language}

    def session_json(self) -> Event:
        realtime = self.session.config.to_json()["audio"]["input"]
        noise = realtime["noise_reduction"]
        return session_json(self.config, self.session.config.id, noise, self.created_s)

    def opened(self) -> list[Event]:
        self.session.spawn(self._interpret(), "translation session interpreter")
        return [server_event("session.created", session=self.session_json())]

    def audio_delta(self, engine_response_id: str, pcm: bytes) -> list[Event]:
        if not pcm:
            return []
        delta = base64.b64encode(pcm).decode("ascii")
        fields = {"format": "pcm16", "sample_rate": AUDIO_RATE_HZ, "channels": 1}
        fields |= self._elapsed_ms
        return [server_event("session.output_audio.delta", delta=delta, **fields)]

    def error(self, error: EventError, client_event_id: str | None, error_type: str) -> Event:
        return error_event(error, client_event_id, error_type=error_type)

    # --- engine -> client -----------------------------------------------------------------

    def translate(self, event: ev.EngineEvent) -> list[Event]:
        if isinstance(event, ev.InputTranscript) and event.final:
            return self._heard(event.turn, event.text.strip())
        if isinstance(event, ev.SpeechStoppedEvent):
            self._spoken.append(event.turn)
            self._ends_ms[event.turn] = event.audio_end_ms
        if isinstance(event, ev.ResponseTextDelta) and event.text:
            delta = self._output.piece(event.response_id, event.text)
            elapsed = self._elapsed_ms
            return [server_event("session.output_transcript.delta", delta=delta, **elapsed)]
        if isinstance(event, ev.ResponseDone):
            self._done_id = event.response_id
            if event.response_id == self._translating:
                self._translated.set()
            return self._failed(event)
        if isinstance(event, ev.TurnCompleted):
            self._spend(event.record.llm_input_tokens + event.record.llm_output_tokens)
        if isinstance(event, ev.EngineError):
            failed = EventError("translation_failed", event.message)
            heard = [] if event.turn is None else self._heard(event.turn, "")  # not heard
            return [error_event(failed, error_type="server_error"), *heard]
        return []

    def _heard(self, turn: int, words: str) -> list[Event]:
        """An utterance's words ("": none), and every utterance now heard in the order they
        were spoken (their speech-to-text may finish out of order) queued for translation:
        their input transcript deltas."""
        if turn not in self._spoken:
            self._spoken.append(turn)  # its end was not seen (it cannot be, with server VAD)
        self._words[turn] = words
        deltas: list[Event] = []
        while self._spoken and self._spoken[0] in self._words:
            turn = self._spoken.pop(0)
            deltas += self._queue(turn, self._words.pop(turn))
        return deltas

    def _queue(self, turn: int, words: str) -> list[Event]:
        elapsed = _alignment(self._ends_ms.pop(turn, None))
        if not words:
            return []
        self._waiting.put_nowait(_Utterance(words, elapsed))
        if self.config.transcription_model is None:
            return []
        delta = self._input.piece(str(turn), words)
        return [server_event("session.input_transcript.delta", delta=delta, **elapsed)]

    def _spend(self, tokens: int) -> None:
        """A translation's tokens, taken from its key's limit (a translation session's events
        have no ``rate_limits.updated``); a spent key's next translation fails."""
        meter = self.session.rate_meter
        if meter is not None and tokens > 0:
            self.session.spawn(_spent(meter, tokens), "translation session tokens")

    def _failed(self, event: ev.ResponseDone) -> list[Event]:
        if event.status != "failed":
            return []
        why = event.refused.message if event.refused is not None else "the language model failed"
        failed = EventError("translation_failed", f"an utterance was not translated: {why}")
        return [error_event(failed, error_type="server_error")]

    # --- client -> server -----------------------------------------------------------------

    def on_message(self, data: str | bytes) -> None:
        session = self.session
        try:
            raw = event_object(data, session.max_event_bytes)
            kind = raw.get("type")
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise EventError("invalid_value", _not_taken(kind), "type")
        except EventError as error:
            session.metrics.client_event("invalid")
            session.send_error(error, event_id_of(data))
            return
        session.metrics.client_event(str(kind))
        try:
            handler(raw)
        except EventError as error:
            session.send_error(error, event_id_of(data))

    def _update(self, raw: Mapping[str, Any]) -> None:
        """Applied whole or not at all: the translation's fields and the Realtime session's."""
        refuse_unknown(raw, UPDATE_EVENT_KEYS, "")
        update: TranslationUpdate = updated(raw.get("session"))
        config = update.apply(self.config)
        fields = as_realtime(config, update)
        self.session.reconfigure(session_update_from(fields).apply(self.session.config))
        self.config = config
        self.session.send(server_event("session.updated", session=self.session_json()))

    def _append(self, raw: Mapping[str, Any]) -> None:
        refuse_unknown(raw, APPEND_EVENT_KEYS, "")
        audio = raw.get("audio")
        if not isinstance(audio, str):
            raise EventError("invalid_type", "audio must be a base64 string", "audio")
        pcm = audio_bytes(audio)
        if self.closing:
            message = "the session is closing (session.close was sent): no more audio is taken"
            raise EventError("invalid_value", message, "type")
        self.session.append_audio(pcm)

    def _close(self, raw: Mapping[str, Any]) -> None:
        refuse_unknown(raw, CLOSE_EVENT_KEYS, "")
        if not self.closing:
            self.closing = True
            self.session.spawn(self._flush_and_close(), "translation session close")

    async def _interpret(self) -> None:
        """Every utterance heard, in order, one at a time: each is the engine's response to
        an instruction that names its words (its turn detection answers nothing itself)."""
        while True:
            utterance = await self._waiting.get()
            try:
                await self._translate(utterance)
            finally:
                self._waiting.task_done()

    async def _translate(self, utterance: _Utterance) -> None:
        told = utterance_instruction(self.config, utterance.words)
        self._elapsed_ms = utterance.elapsed_ms
        self._translated.clear()
        self._translating = self.session.engine.create_response(told)
        if self._translating is None:  # only this loop starts responses: a bug
            raise RuntimeError("a translation found another response running")
        await self._translated.wait()

    async def _flush_and_close(self) -> None:
        """The utterance still open ends; once it and every one before are translated and
        sent, ``session.closed`` and the hang-up (the socket closes 1000)."""
        engine = self.session.engine
        engine.finish_input()
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                await self._heard_all(engine)
                await self._waiting.join()
        except TimeoutError:
            message = f"translating took over {FLUSH_TIMEOUT_S:.0f} s: closed without the rest"
            self.session.send_error(EventError("close_timeout", message), error_type="server_error")
        self.session.send(server_event("session.closed"))
        self.session.caller_hung_up()
        self.session.hang_up("closed")

    @staticmethod
    async def _heard_all(engine: ConversationEngine) -> None:
        """Until the engine is idle and the events it made have been handled here: its
        transcriptions were queued before it went idle, and its forwarder drains a non-empty
        queue without waiting, so one pass of the loop and they are in ``_waiting``."""
        await engine.wait_idle(FLUSH_TIMEOUT_S)
        await asyncio.sleep(0)


async def _spent(meter: RateMeter, tokens: int) -> None:
    await meter.spent(tokens)


@dataclass(frozen=True)
class _Utterance:
    words: str
    elapsed_ms: dict[str, int]  # ``{"elapsed_ms": …}`` of its deltas, or nothing


def _alignment(end_ms: int | None) -> dict[str, int]:
    """The ``elapsed_ms`` of an utterance's deltas and its translation's: where its speech
    stopped in the input, in the 200 ms steps of OpenAI's translation frames."""
    if end_ms is None:
        return {}
    return {"elapsed_ms": end_ms - end_ms % FRAME_MS}


def _not_taken(kind: Any) -> str:
    supported = ", ".join(repr(name) for name in ACCEPTED_EVENTS)
    return f"Invalid value: {kind!r}. A translation session takes: {supported}."
