"""The Live contract of one session: what a ``RealtimeSession`` speaks through when its client
is a GPT-Live client (``RealtimeSession.use_contract``).

It holds the Live config and translator and handles the client's commands with the session's
own controls, so the engine, its tasks, the audio path and the crash handling stay the
session's:

- ``session.input_audio.append``: into the engine (``append_audio``); while muted (``.mute``,
  acknowledged by ``session.input_audio.muted``; ``.unmute`` -> ``.unmuted``) as silence of the
  same length, as Live does, so an utterance in progress ends.
- ``session.update``: the Responses backend's settings (model, instructions, function tools,
  tool choice) change through ``reconfigure``; ``session.updated`` carries the result.
- The delegation's ``model`` is the engine's language model's for this session
  (``pipeline.providers.answering_as``): an OpenAI-compatible backend (chat or Responses API)
  is sent that name with each request; the offline models answer to any name.
- ``session.instructions.append``: joins the language model's instructions for the rest of the
  session; ``session.instructions.appended``.
- ``response.item.create`` (Responses delegation): a function call's output or a user message
  into the conversation; ``response.create`` answers now (after a tool output: continues the
  delegation).
- ``session.close``: ``session.closed`` (``close_requested``, the final usage), then the socket
  is closed 1000; the session ends as a caller's hang-up.
- A second ``session.start`` is refused (``session_already_started``).

Over WebRTC (``POST /v1/live/sessions``, ``media="webrtc"``) the caller's audio is the media
track: ``session.input_audio.append`` is refused (as on Realtime calls); ``.mute`` and
``.unmute`` work on the track (``RealtimeSession.input_muted``: while muted its audio reaches the
engine as silence, so no speech is detected and an utterance in progress ends).

Stored (with Redis): ``stored`` is the contract's part of the session's stored config
(``transceiver.store.contracts``): ``{"type": "live", "session": ..., "instructions_appended":
[...]}``, written with every change (start, ``session.update``, instructions appended).
``restored`` reads it back, so a resume on another transceiver speaks Live with the same config.

A sideband (``transceiver.http.sideband``) sees these events as the session sends them
(``RealtimeSession.observers``), whatever the contract.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pipeline import events as ev
from pipeline.providers import Message, answering_as
from transceiver.live.client_events import (
    MAX_LIVE_EVENT_BYTES,
    AudioAppend,
    Command,
    InstructionsAppend,
    LiveClientEvent,
    LiveConfig,
    ResponseItemCreate,
    SessionStart,
    SessionUpdate,
    ToolOutput,
    parse_live_event,
)
from transceiver.live.translation import Event, LiveTranslator, live_error, live_event
from transceiver.realtime.client_events import EventError, event_id_of
from transceiver.realtime.policy import session_update_from
from transceiver.realtime.session import RealtimeSession

LIVE_CONTRACT = "live"  # the ``type`` of the stored contract part
SESSION_LIFETIME_S = 3600  # the expires_at reported; sessions are not cut off here
_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


class LiveContract:
    def __init__(
        self,
        session: RealtimeSession,
        config: LiveConfig,
        start_event_id: str | None,
        media: Literal["websocket", "webrtc"] = "websocket",
        appended: tuple[str, ...] = (),
    ):
        self.session = session
        self.media = media
        self.config = config
        self._start_event_id = start_event_id
        self._started_s = time.monotonic()
        self._epoch_s = int(time.time())
        self.translator = LiveTranslator(
            self._now_ms,
            delegated=config.delegation is not None,
            model=self._backend_model(),
            epoch_s=self._epoch_s,
        )
        self.closing = False
        self._appended: list[str] = list(appended)  # session.instructions.append, in order
        self._deployment_llm = session.engine.llm
        self._answer_as_delegated_model()
        session.engine.history.extend(Message(_ROLES[role], text) for role, text in config.input)

    @property
    def session_id(self) -> str:
        journal = self.session.journal
        return self.session.config.id if journal is None else journal.session_id

    @property
    def muted(self) -> bool:
        return self.session.input_muted

    def stored(self) -> dict[str, Any]:
        """What a resume needs to speak Live again (``transceiver.store.contracts``)."""
        body = {"type": LIVE_CONTRACT, "session": self.config.stored()}
        return body | {"instructions_appended": list(self._appended)}

    @property
    def done_engine_response_id(self) -> str:
        return self.translator.done_engine_response_id

    def _now_ms(self) -> int:
        return int((time.monotonic() - self._started_s) * 1000)

    def _backend_model(self) -> str:
        return self.config.model if self.config.delegation is None else self.config.delegation.model

    def _answer_as_delegated_model(self) -> None:
        """The engine's language model asks for the delegation's model (an OpenAI-compatible
        backend is sent its name; an offline model answers to any); without delegation the
        deployment's own answers (the Live ``model`` names the voice model, not this one)."""
        delegation, llm = self.config.delegation, self._deployment_llm
        self.session.engine.llm = llm if delegation is None else answering_as(llm, delegation.model)

    def resource(self) -> Event:
        resource = self.config.resource(self.session_id, self._epoch_s + SESSION_LIFETIME_S)
        resource["audio"]["output"]["voice"] = self.session.config.voice  # the one speaking
        if self.media == "webrtc":  # the media transport negotiated the format, not the config
            resource["audio"].pop("format", None)
        return resource

    # --- ClientContract -------------------------------------------------------------------

    def opened(self) -> list[Event]:
        return [live_event("session.started", self._start_event_id, session=self.resource())]

    def translate(self, event: ev.EngineEvent) -> list[Event]:
        return self.translator.translate(event)

    def audio_delta(self, engine_response_id: str, pcm: bytes) -> list[Event]:
        return self.translator.audio_delta(engine_response_id, pcm)

    def error(self, error: EventError, client_event_id: str | None, error_type: str) -> Event:
        return live_error(error, client_event_id, error_type)

    def _send(self, event: Event) -> None:
        self.session.send(event)

    def on_message(self, data: str | bytes) -> None:
        try:
            event = parse_live_event(data, MAX_LIVE_EVENT_BYTES)
        except EventError as error:
            self.session.metrics.client_event("invalid")
            self.session.send_error(error, event_id_of(data))
            return
        try:
            self._handle(event)
        except EventError as error:
            self.session.send_error(error, event.event_id)

    # --- the client's commands ------------------------------------------------------------

    def _handle(self, event: LiveClientEvent) -> None:
        if self.closing:
            raise EventError("session_closing", "the session is closing")
        if isinstance(event, AudioAppend):
            if self.media == "webrtc":
                message = "session.input_audio.append is for WebSockets: over WebRTC the audio "
                raise EventError("unsupported_event", message + "is the media track", "type")
            self.session.append_audio(bytes(len(event.pcm)) if self.muted else event.pcm)
        elif isinstance(event, Command):
            self._command(event)
        elif isinstance(event, SessionUpdate):
            self._update(event)
        elif isinstance(event, InstructionsAppend):
            self._append_instructions(event)
        elif isinstance(event, ResponseItemCreate):
            self._add_item(event)
        else:
            assert isinstance(event, SessionStart)
            raise EventError("session_already_started", "session.start comes once, first", "type")

    def _command(self, event: Command) -> None:
        if event.type == "session.input_audio.mute":
            self.session.input_muted = True
            self._send(live_event("session.input_audio.muted", event.event_id))
        elif event.type == "session.input_audio.unmute":
            self.session.input_muted = False
            self._send(live_event("session.input_audio.unmuted", event.event_id))
        elif event.type == "response.create":
            self._require_delegation()
            if self.session.engine.create_response() is None:
                raise EventError(
                    "conversation_already_has_active_response",
                    "a response is in progress; wait for its response.completed",
                )
        else:
            self.closing = True
            closed = {"reason": "close_requested", "session": self.resource()}
            usage = self.translator.usage()
            self._send(live_event("session.closed", event.event_id, **closed, usage=usage))
            self.session.caller_hung_up()
            self.session.hang_up("closed")

    def _update(self, event: SessionUpdate) -> None:
        config, previous = event.apply(self.config), self.config
        self.config = config  # first: the session stores it with the Realtime config
        self._answer_as_delegated_model()
        try:
            self._reconfigure(config, self._appended)
        except EventError:
            self.config = previous
            self._answer_as_delegated_model()
            raise
        self.translator.model = self._backend_model()
        self._send(live_event("session.updated", event.event_id, session=self.resource()))

    def _append_instructions(self, event: InstructionsAppend) -> None:
        self._appended.append(event.content)  # first: stored with the Realtime config
        try:
            self._reconfigure(self.config, self._appended)
        except EventError:
            self._appended.pop()
            raise
        now = self._now_ms()
        appended = live_event(
            "session.instructions.appended", event.event_id, start_ms=now, end_ms=now
        )
        self._send(appended)

    def _reconfigure(self, config: LiveConfig, appended: list[str]) -> None:
        """The session's Realtime config for ``config`` and the instructions appended since
        the start (EventError, nothing changed, when it may not be)."""
        requested = config.realtime()
        base = requested.get("instructions") or self.session.policy.base.instructions
        requested["instructions"] = "\n\n".join(part for part in (base, *appended) if part)
        self.session.reconfigure(session_update_from(requested).apply(self.session.config))

    def _add_item(self, event: ResponseItemCreate) -> None:
        self._require_delegation()
        item, engine = event.item, self.session.engine
        if isinstance(item, ToolOutput):
            if not engine.add_tool_output(item.call_id, item.output):
                raise EventError(
                    "invalid_value",
                    f"no function call {item.call_id!r} is waiting for its output",
                    "item.call_id",
                )
        else:
            engine.add_user_text(item.text)

    def _require_delegation(self) -> None:
        if self.config.delegation is None:
            raise EventError(
                "delegation_required",
                "this command needs Responses delegation (session.delegation.type 'responses')",
                "type",
            )
