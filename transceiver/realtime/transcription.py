"""Transcription sessions (``session.type: "transcription"``): the speech-to-text stage alone.

A transcription session is a ``RealtimeSession`` with this contract at its edge
(``RealtimeSession.use_contract``): the same engine, VAD and speech-to-text, with
``create_response`` off, so a user turn is heard, committed and transcribed and never answered.
The client gets what OpenAI sends for one: ``input_audio_buffer.speech_started/stopped``,
``.committed``, ``conversation.item.added/done`` (the user audio item),
``conversation.item.input_audio_transcription.delta`` (the speech-to-text's partial results, as
they grow), ``.completed`` with ``usage`` (``{"type": "duration", "seconds": …}``: the audio
transcribed) and ``.failed`` (the speech-to-text failed on that item) instead of an ``error``.

A session becomes one when it starts (OpenAI's rule: the type is fixed, a session.update of the
other type is refused): the WebSocket's ``intent=transcription``, or a client secret minted for
a transcription session (WebSocket or ``POST /v1/realtime/calls``). It is stored with this
contract's name (``stored``), so a resume over WebRTC that asks for a transcription session
(``transceiver.http.app``) speaks it again with the stored config; one that asks for a Realtime
session is refused, as is a Realtime session resumed as a transcription one. Its config is OpenAI's
``RealtimeTranscriptionSessionCreateRequest`` (``type``, ``audio.input``, ``include``):
``as_realtime`` reads it as the Realtime session fields it sets, validated by the same parser,
so errors name the same paths. Refused: ``idle_timeout_ms`` and ``create_response: true`` (they
answer, and nothing answers here) and ``transcription: null`` (it is what the session does).
``include`` of the logprobs: given in ``.delta`` and ``.completed`` when the speech-to-text
gives them (OpenAI's), refused naming it otherwise (``policy``); the diarizing model's speaker
segments are ``.segment`` events before ``.completed``.

Client events: audio appends, ``input_audio_buffer.commit``/``.clear`` (push-to-talk with
``turn_detection: null``), ``conversation.item.retrieve``/``.delete`` and ``session.update``
(transcription-shaped) work as in a Realtime session. Anything that makes or changes a
response or the conversation (``response.create``, ``response.cancel``,
``conversation.item.create``/``.truncate``, ``output_audio_buffer.clear``) is refused as an
event this session does not take: ``invalid_value`` on ``type``, naming those it does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeGuard

from pipeline import events as ev
from transceiver.realtime.client_events import (
    AudioAppend,
    BufferCommand,
    EventError,
    ItemDelete,
    ItemRetrieve,
    SessionConfig,
    event_id_of,
    event_object,
    new_id,
    parse_client_event,
)
from transceiver.realtime.event_errors import json_object, refuse_unknown
from transceiver.realtime.policy import session_update_from
from transceiver.realtime.server_events import error_event, server_event
from transceiver.realtime.session import RealtimeSession
from transceiver.realtime.session_fields import LOGPROBS, include_logprobs

TRANSCRIPTION = "transcription"  # the session type, and its stored contract's
SESSION_KEYS = frozenset({"type", "audio", "include"})
ACCEPTED_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.retrieve",
    "conversation.item.delete",
)
# OpenAI's words (its update of the other type is refused the same way, in ``client_events``)
MISMATCHED_UPDATE = (
    "Passing a realtime session update event to a transcription session is not allowed."
)
ANSWERING_KNOBS = ("create_response", "idle_timeout_ms")  # they answer the user
Event = dict[str, Any]
Sessions = Callable[[Mapping[str, Any] | None], RealtimeSession]


def is_transcription(session: Mapping[str, Any] | None) -> TypeGuard[Mapping[str, Any]]:
    """Whether a requested session config (a client secret's, a call's) is a transcription's."""
    return session is not None and session.get("type") == TRANSCRIPTION


def as_realtime(session: Mapping[str, Any]) -> dict[str, Any]:
    """The Realtime session fields a transcription ``session`` object sets (EventError naming
    the field when it is not one); its turn detection never answers."""
    if session.get("type") != TRANSCRIPTION:  # OpenAI's words: a session's type is fixed
        message = "Passing a realtime session update event to a transcription session is "
        raise EventError("invalid_value", message + "not allowed.", "session.type")
    refuse_unknown(session, SESSION_KEYS, "session.")
    include = include_logprobs(session.get("include", []), "session.include")
    audio = json_object(session.get("audio", {}), "session.audio")
    refuse_unknown(audio, frozenset({"input"}), "session.audio.")
    audio_in = dict(json_object(audio.get("input", {}), "session.audio.input"))
    if "transcription" in audio_in and audio_in["transcription"] is None:
        message = "a transcription session transcribes: audio.input.transcription cannot be null"
        raise EventError("invalid_value", message, "session.audio.input.transcription")
    detection = audio_in.get("turn_detection")
    if detection is not None:
        audio_in["turn_detection"] = _not_answering(detection)
    fields: dict[str, Any] = {"audio": {"input": audio_in}}
    if "include" in session:
        fields["include"] = [LOGPROBS] if include else []
    return fields


def _not_answering(detection: Any) -> dict[str, Any]:
    path = "session.audio.input.turn_detection"
    knobs = dict(json_object(detection, path))
    for knob in ANSWERING_KNOBS:
        if knobs.get(knob) not in (None, False):
            message = f"{knob} answers the user: a transcription session makes no responses"
            raise EventError("invalid_value", message, f"{path}.{knob}")
        knobs.pop(knob, None)
    return {"type": "server_vad", **knobs, "create_response": False, "interrupt_response": False}


def session_json(config: SessionConfig) -> Event:
    """The session as OpenAI reports a transcription session
    (``RealtimeTranscriptionSessionCreateResponse``)."""
    audio_in = config.to_json()["audio"]["input"]
    detection = audio_in["turn_detection"]
    if detection is not None:
        for knob in (*ANSWERING_KNOBS, "interrupt_response"):
            detection.pop(knob, None)
    return {
        "type": TRANSCRIPTION,
        "object": "realtime.transcription_session",
        "id": config.id,
        "include": [LOGPROBS] if config.include_logprobs else [],
        "expires_at": None,  # a session here never expires
        "audio": {"input": audio_in},
    }


def requested_config(session: Mapping[str, Any]) -> SessionConfig:
    """The config a transcription ``session`` object asks for, as a new session would start
    with it before the deployment's defaults (a client secret reports it); EventError."""
    update = session_update_from(as_realtime(session))
    return update.apply(SessionConfig(new_id("sess")))


def transcription_session(
    sessions: Sessions, requested: Mapping[str, Any] | None
) -> RealtimeSession:
    """A new transcription session (``requested``: its config, None for the defaults) made by
    ``sessions``, the Realtime session factory; EventError when the config is not valid."""
    fields = as_realtime(requested or {"type": TRANSCRIPTION})
    session = sessions(fields)
    transcribing(session)
    return session


def transcribing(session: RealtimeSession) -> None:
    """``session`` (new or resumed, not started) is a transcription session from now on: its
    turn detection (the deployment's, the one asked for, the stored one) answers nothing. The
    contract comes first, so a resumed session's config is stored with it again."""
    session.use_contract(TranscriptionContract(session))
    detection = session.config.turn_detection
    if detection is not None and (detection.create_response or detection.interrupt_response):
        quiet = replace(detection, create_response=False, interrupt_response=False)
        session.reconfigure(replace(session.config, turn_detection=quiet))


class TranscriptionContract:
    """What a transcription session says to its client (``ClientContract``)."""

    def __init__(self, session: RealtimeSession) -> None:
        self.session = session
        self.translator = session.translator

    @property
    def done_engine_response_id(self) -> str:
        return self.translator.done_engine_response_id

    def stored(self) -> Mapping[str, Any]:
        return {"type": TRANSCRIPTION}

    def opened(self) -> list[Event]:
        """``session.created``; with Redis, its id and resume token as a Realtime session's
        (``voicerelay``), to resume it elsewhere."""
        journal = self.session.journal
        extension = {} if journal is None else {"voicerelay": journal.extension()}
        session = session_json(self.session.config)
        return [server_event("session.created", session=session, **extension)]

    def audio_delta(self, engine_response_id: str, pcm: bytes) -> list[Event]:
        return []  # no responses, no audio out

    def error(self, error: EventError, client_event_id: str | None, error_type: str) -> Event:
        return error_event(error, client_event_id, error_type=error_type)

    # --- engine -> client -----------------------------------------------------------------

    def translate(self, event: ev.EngineEvent) -> list[Event]:
        """The Realtime translator's events: ``.completed`` has its ``usage`` and a failed
        transcription is ``.failed`` there too."""
        return self.translator.translate(event)

    # --- client -> server -----------------------------------------------------------------

    def on_message(self, data: str | bytes) -> None:
        session = self.session
        try:
            raw = event_object(data, session.max_event_bytes)
            kind = str(raw.get("type"))
            event = (
                None
                if kind == "session.update"
                else parse_client_event(data, session.max_event_bytes)
            )
        except EventError as error:
            session.metrics.client_event("invalid")
            session.send_error(error, event_id_of(data))
            return
        session.metrics.client_event(kind)
        try:
            if event is None:
                self._update(raw)
            elif _taken(event):
                session.handle(event)
            else:
                raise EventError("invalid_value", _not_taken(kind), "type")
        except EventError as error:
            session.send_error(error, event_id_of(data))

    def _update(self, raw: Mapping[str, Any]) -> None:
        """A transcription-shaped session.update, applied whole or not at all."""
        refuse_unknown(raw, frozenset({"type", "event_id", "session"}), "")
        requested = json_object(raw.get("session"), "session")
        update = session_update_from(as_realtime(requested))
        self.session.reconfigure(update.apply(self.session.config))
        updated = session_json(self.session.config)
        self.session.send(server_event("session.updated", session=updated))


def _taken(event: object) -> bool:
    if isinstance(event, BufferCommand):
        return event.type != "output_audio_buffer.clear"
    return isinstance(event, AudioAppend | ItemRetrieve | ItemDelete)


def _not_taken(kind: Any) -> str:
    """OpenAI's words for an event type outside those a session takes."""
    supported = ", ".join(repr(name) for name in ACCEPTED_EVENTS)
    return f"Invalid value: {kind!r}. A transcription session takes: {supported}."
