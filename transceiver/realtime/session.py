"""One Realtime session: the client's media and ``oai-events`` channel bridged to an engine.

I/O layer. A :class:`RealtimeSession` owns a ``ConversationEngine``, the outgoing
``AgentVoiceTrack`` and two tasks (input pump, engine-event forwarder), cancelled and awaited by
``aclose()``. A task that crashes (a bug here or in the engine, whose own task crashes reach the
forwarder through ``events()``) is logged with its traceback and counted in
``transceiver_task_crashes_total{task}``; the session cannot go on without it, so the client gets an
``error`` (type ``server_error``, code ``session_failed``) and the session is hung up as a failure
(``crashed``): it is not the caller's hang-up, so a stored session stays resumable. Client events
are parsed by ``transceiver.realtime.client_events``; each is handled at once (the engine's control
methods are synchronous) and a bad one gets an ``error`` event naming the problem while the session
goes on. Engine events become server events through ``EngineEventTranslator``; events produced
before the client opens its channel wait (bounded by its ``RealtimeLimits``).

Survival (with Redis, see ``persistence``): a ``SessionJournal`` stores what the conversation
commits; ``session.created`` carries a ``voicerelay`` field ``{"session_id", "resume_token"}``
(a voicerelay extension). A resumed session starts from the stored config and history and
sends ``session.created``, ``session.updated``, then the stored conversation as
``conversation.item.added``/``.done`` (ids ``h1``, ``h2``, ... as stored). A session taken over
by another connection (its fencing token refused here) gets an ``error`` with code
``session_taken_over`` and is hung up. ``hand_over`` (drain) lets a running turn
finish, stores everything, releases the session and tells the client
``{"type": "voicerelay.session.reconnect", "session_id": ..., "reason": "draining"}``.
Each session also keeps its call record (``call_recording``): told its call id and end reason
by ``Calls``, it hands its legs, turns and config versions to the process's record writer.

WebSocket (``use_websocket``): the same session with its audio in the events. Appended
base64 PCM16 at 24 kHz is resampled to the engine's input rate and feeds the same VAD; the
engine's frames go out as ``response.output_audio.delta`` as fast as they are made (the client
plays them, as with OpenAI), so ``response.done`` marks the end of generation; a client's
``conversation.item.truncate`` of an answer cuts the model's history to the words heard (over
WebRTC too: the item knows its audio's length).

Over WebRTC a response is done (``response.done``) when its generation ends and its audio plays
on (``output_audio_buffer.stopped`` after); meanwhile ``response.create`` starts the next one
(its audio follows), and a barge-in or ``output_audio_buffer.clear`` stops the audio and cuts
the answer the model sees to the words played.

Another contract (``use_contract``): the same session and engine speaking a different event
vocabulary at its edge (GPT-Live, ``transceiver.live``). A ``ClientContract`` then makes the
events sent on open, translates the engine's events and audio, handles the client's messages
(through the public controls here: ``reconfigure``, ``append_audio``, ``hang_up``) and shapes
errors (``send_error``); the Realtime translator and handlers stand aside. Its part of the
session is stored with the Realtime config (``stored``, ``transceiver.store.contracts``), and a
resumed session holds what was stored (``stored_contract``) for the contract to be rebuilt;
``input_muted`` feeds the media track's audio to the engine as silence.

Observers (``observers``, a sideband: ``transceiver.http.sideband``): every event sent to the
client is also given to each, as it is sent, whether or not the client's channel is open yet.
The channel itself gets consecutive transcript deltas of one text joined (``delta_coalescing``):
one is held for ``RealtimeLimits.delta_coalesce_ms`` (a task of the session lets it out), and
any other event, a hang-up or the close lets it out first; the observers still see each delta.

Responses a client creates (``response.create``): each with its own settings
(``responses``), in the conversation (the engine's) or out of band beside it
(``side_responses``: their events go to the client only, their audio only in WebSocket deltas).
The idle timeout (``idle``) commits the silence after an answer and answers it.

Size (over 400 lines): one class of short methods whose tasks, channel, client-event handlers
and journal all act on the same live state (engine, journal, channel, events waiting for it);
the rules themselves live apart (``client_events``, ``translation``, ``policy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any, Protocol

from aiortc.mediastreams import MediaStreamTrack

from pipeline import events as ev
from pipeline.engine import ConversationEngine
from pipeline.playout import PcmResampler
from pipeline.providers import REVISED_PARTIALS, ImagePart, Message, sees_images
from pipeline.turns import TurnRecord
from transceiver.background import report_crash
from transceiver.metrics import RealtimeMetrics
from transceiver.realtime.call_recording import end_reason, recorder_for
from transceiver.realtime.call_tracing import call_trace
from transceiver.realtime.client_events import (
    AUDIO_RATE_HZ,
    MAX_EVENT_BYTES,
    MAX_WEBSOCKET_EVENT_BYTES,
    AudioAppend,
    BufferCommand,
    ClientEvent,
    ConversationItemCreate,
    EventError,
    FunctionCall,
    FunctionCallOutput,
    ItemDelete,
    ItemRetrieve,
    ItemTruncate,
    ResponseCancel,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    TurnHeard,
    UserAudio,
    event_id_of,
    parse_client_event,
)
from transceiver.realtime.delta_coalescing import HeldDelta
from transceiver.realtime.idle import IdleTimeout
from transceiver.realtime.item_audio import ItemAudioBudget
from transceiver.realtime.item_edits import ItemEdits
from transceiver.realtime.limits import RealtimeLimits
from transceiver.realtime.policy import SessionPolicy, check_storable
from transceiver.realtime.responses import ItemReference, as_response_error, plan_response
from transceiver.realtime.server_events import error_event, server_event, stored_item_bodies
from transceiver.realtime.side_responses import SideResponses
from transceiver.realtime.translation import EngineEventTranslator, ResponseShape
from transceiver.store.contracts import split_contract, with_contract
from transceiver.store.journal import SessionJournal, item_to_message, message_to_item
from transceiver.store.keys import SessionState, encode_item
from transceiver.store.persistence import SessionPersistence
from transceiver.store.rate_limits import RateMeter
from transceiver.webrtc.audio import AgentVoiceTrack, pump_input

logger = logging.getLogger(__name__)
EVENTS_LABEL = "oai-events"
RATE_LIMITED = "rate_limit_exceeded"  # OpenAI's code for a limit reached
LONGEST_STORED_ITEM_ID = "h" + "9" * 19  # the journal names items h1, h2, ...
Event = dict[str, Any]
_TYPES: Mapping[type, str] = {
    SessionUpdate: "session.update",
    ConversationItemCreate: "conversation.item.create",
    ResponseCreate: "response.create",
    ResponseCancel: "response.cancel",
    ItemRetrieve: "conversation.item.retrieve",
    ItemTruncate: "conversation.item.truncate",
    ItemDelete: "conversation.item.delete",
    AudioAppend: "input_audio_buffer.append",
    TurnHeard: "voicerelay.turn.heard",
}


class ClientContract(Protocol):
    """The events a session speaks with its client when they are not Realtime's."""

    @property
    def done_engine_response_id(self) -> str: ...

    def opened(self) -> list[Event]:
        """What the client is sent first, when its channel opens."""
        ...

    def translate(self, event: ev.EngineEvent) -> list[Event]: ...

    def audio_delta(self, engine_response_id: str, pcm: bytes) -> list[Event]: ...

    def on_message(self, data: str | bytes) -> None:
        """One client message: parsed and handled, or answered with an error."""
        ...

    def error(self, error: EventError, client_event_id: str | None, error_type: str) -> Event: ...

    def stored(self) -> Mapping[str, Any]:
        """The contract's part of the stored session (``transceiver.store.contracts``): what
        a resume elsewhere needs to speak it again, with its ``type``."""
        ...


class RealtimeSession:
    def __init__(
        self,
        engine: ConversationEngine,
        policy: SessionPolicy,
        config: SessionConfig,
        metrics: RealtimeMetrics,
        persistence: SessionPersistence | None = None,
        resumed: tuple[SessionJournal, SessionState] | None = None,
        limits: RealtimeLimits | None = None,
        item_audio: ItemAudioBudget | None = None,
    ) -> None:
        """``item_audio``: the process's bound on the items' audio, in bytes (its own, none,
        without one)."""
        self.engine = engine
        self.policy = policy
        self.limits = limits or RealtimeLimits()
        self.config = config
        self.metrics = metrics
        self.voice = AgentVoiceTrack(engine.config.output_sample_rate_hz, engine.config.frame_ms)
        self.translator = EngineEventTranslator(self.voice.first_frame_sent_s.get)
        self.translator.audio.max_audio_s = self.limits.item_audio_s
        self.translator.settled_partials = REVISED_PARTIALS in policy.stt_details
        self.translator.audio.budget = item_audio or ItemAudioBudget()
        self._remote: MediaStreamTrack | None = None
        self._channel: Any = None
        self._pending: list[Event] = []
        self._deltas = HeldDelta()  # a transcript delta joining the next ones (its window)
        self._delta_timer = False  # a task lets it out when its window ends
        self._tasks: set[asyncio.Task[None]] = set()
        self._persistence = persistence
        self.journal: SessionJournal | None = None
        self.resumed = resumed is not None
        # Set when this session must end here (taken over elsewhere, or one of its tasks
        # crashed); ``Calls`` hangs up and records ``hangup_reason``.
        self.hangup_requested = asyncio.Event()
        self.hangup_reason: str | None = None
        self._closing = False
        self._answered = False  # start() ran: the call was answered
        self._hung_up = False  # the caller hung up: the stored session ends with the call
        self._restored: tuple[Event, ...] = ()
        self.max_event_bytes = MAX_EVENT_BYTES
        self._pcm_in: PcmResampler | None = None  # WebSocket: appended audio -> the engine
        self._pcm_out: PcmResampler | None = None  # WebSocket: the engine's frames -> deltas
        self._odd_byte = b""  # an appended chunk's odd last byte, until the next one
        # The call record (``call_recording``; discarded without Redis) and why the call ended.
        # Its OpenTelemetry trace (``call_tracing``) is built from what the recorder sees.
        traced = call_trace(_loop_time, time.time)
        self.recorder = recorder_for(persistence, config.id, _loop_time, time.time, traced)
        self.recorder.client_response_id = self.translator.response_id
        engine.on_detour = self.recorder.detour  # each turn's retries and fallbacks
        engine.refuse_response = self._rate_limited  # a spent key's responses fail at once
        self._call_end: str | None = None
        self._handed_over = False
        self.contract: ClientContract | None = None  # None: the Realtime events
        self.observers: set[Callable[[Event], None]] = set()  # sidebands: each event as sent
        self.stored_contract: Mapping[str, Any] | None = None  # resumed: its contract's part
        self.input_muted = False  # the media track's audio reaches the engine as silence
        self.spoke = False  # assistant audio went out: the voice is fixed (OpenAI's rule)
        self.idle = IdleTimeout(self._idle_turn, self._quiet, lambda: engine.input_position_ms)
        self.side = SideResponses(engine, self._side_event)  # out-of-band responses
        # Done responses whose audio still plays: their turn, once it completed (WebRTC).
        self._unplayed: dict[str, _Unplayed | None] = {}
        self._side_pcm: dict[str, PcmResampler] = {}  # WebSocket: their audio -> deltas
        self.rate_meter: RateMeter | None = None  # its API key's limits (http.rate_limiting)
        self.edits = ItemEdits(engine, self.translator, self.send, self._history_changed)
        if resumed is not None:
            journal, state = resumed
            self._hold(journal)
            engine.history.extend(item_to_message(item) for item in state.items)
            self._restored = state.items
            self.stored_contract = split_contract(state.config)[1]
            self.spoke = any(m.role == "assistant" and m.content for m in engine.history)
        self._apply(config)

    def resume_headers(self) -> dict[str, str]:
        """The calls response's session id and resume credential headers (with Redis)."""
        return {} if self.journal is None else self.journal.headers()

    # --- wiring ---------------------------------------------------------------------------

    def attach_audio(self, track: MediaStreamTrack) -> MediaStreamTrack | None:
        """The client's microphone; the agent's voice goes back (one pair per session)."""
        if self._remote is not None:
            return None
        self._remote = track
        return self.voice

    @property
    def hearing_rate_hz(self) -> int:
        """The rate the engine hears the caller at: a call's answer asks the caller's encoder
        for no wider a band (``transceiver.webrtc.calls.HearsAt``)."""
        return self.engine.config.input_sample_rate_hz

    def attach_channel(self, channel: Any) -> None:
        if channel.label != EVENTS_LABEL or self._channel is not None:
            return
        self._channel = channel
        channel.on("message", self.on_message)
        if channel.readyState == "open":
            self._opened()
        else:
            channel.on("open", self._opened)

    def use_websocket(self) -> None:
        """This session's audio rides in its events (WebSocket), not on a media track."""
        config = self.engine.config
        self._pcm_in = PcmResampler(AUDIO_RATE_HZ, config.input_sample_rate_hz)
        self._pcm_out = PcmResampler(config.output_sample_rate_hz, AUDIO_RATE_HZ)
        self.translator.media_track = False
        self.max_event_bytes = MAX_WEBSOCKET_EVENT_BYTES
        self.idle.audio_after_done = True

    def use_contract(self, contract: ClientContract) -> None:
        """Speak ``contract``'s events with the client instead of Realtime's."""
        self.contract = contract

    async def start(self) -> None:
        if self._persistence is not None and self.journal is None:
            self._hold(await self._persistence.create(self.config.id, self.stored_config()))
        await self.engine.start()
        self.recorder.start(self.config.to_json(), self._stages(), len(self.engine.history))
        self._spawn(self._forward_engine_events(), "session engine events")
        if self._remote is not None:
            rate_hz = self.engine.config.input_sample_rate_hz
            pump = pump_input(self._remote, self._track_audio, rate_hz, self._track_silence)
            self._spawn(pump, "session audio input")
        self._answered = True

    def _track_audio(self, pcm: bytes) -> None:
        self.engine.push_audio(bytes(len(pcm)) if self.input_muted else pcm)

    def _track_silence(self, duration_ms: int) -> bool:
        """The caller's silence it did not send (Opus DTX, the lean media path)."""
        return self.engine.push_silence(duration_ms)

    def stored_config(self) -> dict[str, Any]:
        """What the session store keeps as this session's config: the Realtime session, and
        its contract's part when another contract is at its edge."""
        contract = None if self.contract is None else self.contract.stored()
        return with_contract(self.config.to_json(), contract)

    def caller_hung_up(self) -> None:
        self._hung_up = True

    def call_began(self, call_id: str) -> None:
        self.recorder.began(call_id)

    def call_ended(self, reason: str) -> None:
        self._call_end = reason

    async def aclose(self) -> None:
        self._flush_deltas()
        self._closing = True  # a task that fails while cancelled spawns no hang-up
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.idle.cancel()
        await self.side.aclose()
        await self.edits.aclose()
        await self.engine.aclose()
        self.voice.stop()
        if self.journal is not None:
            self.journal.history(self.engine.history)
            await self._close_journal(self.journal)
        self._record_unplayed()
        self.translator.audio.release()  # its bytes back to the process's bound
        told = self._call_end or ("hangup" if self._hung_up else self.hangup_reason)
        self.recorder.end(end_reason(told, self._handed_over))

    async def _close_journal(self, journal: SessionJournal) -> None:
        """Hung up: the stored session ends. Never answered (a resume whose offer failed): the
        claim is handed back. Otherwise it stays resumable (see ``persistence``)."""
        if self._hung_up:
            journal.end()
            return
        if not self._answered:
            await journal.release()
        journal.close()

    async def hand_over(self, timeout_s: float) -> None:
        """Drain: let a running turn finish, store it, release, tell the client to move."""
        self._handed_over = True
        with contextlib.suppress(TimeoutError):
            await self.engine.wait_idle(timeout_s)
        if self.journal is not None:
            self.journal.history(self.engine.history)
            await self.journal.flush(timeout_s)
            await self.journal.release()
        session_id = self.config.id if self.journal is None else self.journal.session_id
        reconnect = {"session_id": session_id, "reason": "draining"}
        if self.translator.extension_events:  # a WebSocket that did not ask: closed, no notice
            self.send(server_event("voicerelay.session.reconnect", **reconnect))

    def _hold(self, journal: SessionJournal) -> None:
        self.journal = journal
        journal.on_lost = self._lost

    def _lost(self, why: str) -> None:
        """Another transceiver owns the session now: say so, then hang up this connection."""
        message = f"this session continues on another connection; this one is closed: {why}"
        self.send_error(EventError("session_taken_over", message))
        self.hang_up("taken_over")

    def hang_up(self, reason: str) -> None:
        """End this session here, once the events sent so far have had time to leave."""
        if self._closing or self.hangup_reason is not None:
            return  # already ending: the first reason stands
        self.hangup_reason = reason
        self._flush_deltas()
        self._spawn(self._hang_up_soon(), "session hang-up")

    async def _hang_up_soon(self) -> None:
        await asyncio.sleep(self.limits.lost_notice_s)  # let the error event leave before the close
        self.hangup_requested.set()

    def spawn(self, work: Coroutine[Any, Any, None], task_name: str) -> None:
        """A contract's own work (``session.close`` of a translation session), owned here:
        cancelled and awaited by ``aclose``, its crash ending the session as a failure."""
        self._spawn(work, task_name)

    def _spawn(self, work: Coroutine[Any, Any, None], task_name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=task_name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A task that ended by raising: seen, counted, and the session ends as a failure."""
        self._tasks.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        session_id = self.config.id if self.journal is None else self.journal.session_id
        report_crash(task.get_name(), error, logger, f"session {session_id} ends")
        if self._closing:
            return
        message = "the server failed on an internal error and closed this session"
        if self.journal is not None:
            message += "; resume it with its session_id and resume_token"
        self.send_error(EventError("session_failed", message), error_type="server_error")
        self.hang_up("crashed")

    # --- server -> client -----------------------------------------------------------------

    def _opened(self) -> None:
        pending, self._pending = self._pending, []
        greeting = self._greeting() if self.contract is None else self.contract.opened()
        for event in greeting:
            self.send(event)
        for event in pending:  # the observers saw these when they were sent
            self._to_channel(event)

    def _greeting(self) -> list[Event]:
        extension = {} if self.journal is None else {"voicerelay": self.journal.extension()}
        events = [server_event("session.created", session=self.config.to_json(), **extension)]
        if self.resumed:
            events.append(server_event("session.updated", session=self.config.to_json()))
            for stored in self._restored:  # the conversation so far, as the store has it
                for body in stored_item_bodies(stored):
                    events += self.translator.added(body)
            self._restored = ()
        return events

    def send(self, event: Event) -> None:
        """To the client, and to each of the ``observers`` (a sideband) at once."""
        for observe in list(self.observers):
            observe(event)
        self._to_channel(event)

    def _to_channel(self, event: Event) -> None:
        channel = self._channel
        if channel is None or channel.readyState == "connecting":
            if len(self._pending) < self.limits.max_pending_events:
                self._pending.append(event)
            return
        if channel.readyState != "open":
            return
        if self.limits.delta_coalesce_ms == 0 or self._closing:  # closing: nothing is held
            self._send_now(channel, event)
            return
        for ready in self._deltas.add(event):
            self._send_now(channel, ready)
        if self._deltas.holding and not self._delta_timer:
            self._delta_timer = True
            self._spawn(self._deltas_due(), "session delta flush")

    def _send_now(self, channel: Any, event: Event) -> None:
        channel.send(json.dumps(event))
        self.metrics.server_event(event["type"])

    async def _deltas_due(self) -> None:
        """The held delta goes out at the end of its window (``delta_coalescing``)."""
        try:
            await asyncio.sleep(self.limits.delta_coalesce_ms / 1000)
        finally:
            self._delta_timer = False
        self._flush_deltas()

    def _flush_deltas(self) -> None:
        """The held delta, if any, to the channel now (its window ends, or the session does)."""
        held = self._deltas.take()
        channel = self._channel
        if held and channel is not None and channel.readyState == "open":
            self._send_now(channel, held[0])

    def send_error(
        self,
        error: EventError,
        client_event_id: str | None = None,
        *,
        error_type: str = "invalid_request_error",
    ) -> None:
        """An ``error`` event in the client's contract; ``server_error`` when the fault is ours."""
        if self.contract is None:
            self.send(error_event(error, client_event_id, error_type=error_type))
        else:
            self.send(self.contract.error(error, client_event_id, error_type))

    async def _forward_engine_events(self) -> None:
        edge = self.contract or self.translator
        async with aclosing(self.engine.events()) as events:
            async for event in events:
                if isinstance(event, ev.OutputAudio):
                    self._output_audio(edge, event)
                    continue
                if isinstance(event, ev.ResponseDone):
                    self._last_audio(edge, event)
                self._observe(event)
                self._journal(event)
                for server in edge.translate(event):
                    self.send(server)
                    self._rate_limits_after(server)

    def _output_audio(
        self, edge: ClientContract | EngineEventTranslator, event: ev.OutputAudio
    ) -> None:
        """An answer's frame: to the client (WebSocket deltas, or the media track), and kept
        with its item for ``conversation.item.retrieve``."""
        if self._pcm_out is not None:
            pcm = self._pcm_out.push(event.pcm)
            for delta in edge.audio_delta(event.response_id, pcm):
                self.send(delta)
            self.translator.output_audio(event.response_id, pcm, AUDIO_RATE_HZ)
            return
        if self._remote is not None:  # else the client has no audio to hear it on
            self.voice.play(event.response_id, event.pcm)
        self.translator.output_audio(event.response_id, event.pcm, event.sample_rate_hz)

    def _last_audio(
        self, edge: ClientContract | EngineEventTranslator, event: ev.ResponseDone
    ) -> None:
        """WebSocket: an answer's last samples, which the resampler holds (about 33 ms from
        piper's 22.05 kHz), go out before its response is done (a cancelled one's are dropped),
        rather than opening the next answer's audio."""
        if self._pcm_out is None:
            return
        pcm = self._pcm_out.flush()
        self._pcm_out = PcmResampler(self.engine.config.output_sample_rate_hz, AUDIO_RATE_HZ)
        if pcm and event.status != "cancelled":
            for delta in edge.audio_delta(event.response_id, pcm):
                self.send(delta)
            self.translator.output_audio(event.response_id, pcm, AUDIO_RATE_HZ)

    def _rate_limits_after(self, event: Event) -> None:
        """After each ``response.done``: its tokens spent, then ``rate_limits.updated``."""
        if self.rate_meter is None or event.get("type") != "response.done":
            return
        usage = event["response"].get("usage") or {}
        tokens = int(usage.get("total_tokens") or 0)
        self._spawn(self._rate_limits_updated(self.rate_meter, tokens), "session rate limits")

    def _rate_limited(self) -> ev.ResponseRefusal | None:
        """Why a response may not run: its key's tokens are spent (OpenAI ends it with
        ``response.done`` ``failed``, the error's type ``tokens``, code ``rate_limit_exceeded``)."""
        refused = None if self.rate_meter is None else self.rate_meter.refusal()
        return None if refused is None else ev.ResponseRefusal("tokens", RATE_LIMITED, refused)

    async def _rate_limits_updated(self, meter: RateMeter, tokens: int) -> None:
        rate_limits = await meter.spent(tokens)
        if rate_limits:
            self.send(server_event("rate_limits.updated", rate_limits=rate_limits))

    def _observe(self, event: ev.EngineEvent) -> None:
        self.recorder.observe(event)
        self.idle.observe(event)
        if isinstance(event, ev.OutputStarted):
            self.spoke = True
        elif isinstance(event, ev.OutputCleared):
            self.voice.clear()
            self._record_played(event)
        elif isinstance(event, ev.OutputStopped):
            self._record_played(event)
        elif isinstance(event, ev.ResponseDone) and event.playing:
            self._unplayed[event.response_id] = None
        elif isinstance(event, ev.TurnCompleted):
            done = (self.contract or self.translator).done_engine_response_id
            self.metrics.turn(event.record, self.voice.first_frame_sent_s.get(done))
            sent_s = self.voice.first_frame_sent_s.get(done)
            if done in self._unplayed:  # recorded once its audio has played or been cut
                self._unplayed[done] = (event.record, sent_s, tuple(self.engine.history))
            else:
                self.recorder.turn(event.record, done, sent_s, self.engine.history)
        elif isinstance(event, ev.EngineError):  # the engine logged it, with its traceback
            self.metrics.provider_error(event.retryable)

    def _record_played(self, event: ev.OutputStopped | ev.OutputCleared) -> None:
        """A turn done before its audio played goes into the call record now: cut short
        (interrupted, the words played) when its audio was cleared."""
        pending = self._unplayed.pop(event.response_id, None)
        if pending is None:
            return
        record, sent_s, history = pending  # the history as it was when the turn completed
        sent_s = self.voice.first_frame_sent_s.get(event.response_id) or sent_s  # (queued audio)
        if isinstance(event, ev.OutputCleared):
            played_s = event.audio_end_ms / 1000
            record = replace(
                record, interrupted=True, heard_text=event.heard_text, output_audio_s=played_s
            )
        self.recorder.turn(record, event.response_id, sent_s, history)

    def _record_unplayed(self) -> None:
        """Turns whose audio was still playing at the end, into the call record as they are."""
        for engine_id, pending in self._unplayed.items():
            if pending is not None:
                record, sent_s, history = pending
                self.recorder.turn(record, engine_id, sent_s, history)
        self._unplayed.clear()

    def _journal(self, event: ev.EngineEvent) -> None:
        if self.journal is None:
            return
        self.journal.history(self.engine.history)
        if isinstance(event, ev.TurnCompleted):
            self.journal.turn(event.record.turn)

    # --- client -> server -----------------------------------------------------------------

    def on_message(self, data: str | bytes) -> None:
        if self.contract is not None:
            self.contract.on_message(data)
            return
        try:
            event = parse_client_event(data, self.max_event_bytes)
        except EventError as error:
            self.metrics.client_event("invalid")
            self.send_error(error, event_id_of(data))
            return
        kind = event.type if isinstance(event, BufferCommand) else _TYPES[type(event)]
        self.metrics.client_event(kind)
        try:
            self._handle(event)
        except EventError as error:
            self.send_error(error, event.event_id)

    def handle(self, event: ClientEvent) -> None:
        """One parsed Realtime client event (EventError when it may not be): for a contract
        that takes some of Realtime's events as they are (``transcription``)."""
        self._handle(event)

    def _handle(self, event: ClientEvent) -> None:
        if isinstance(event, SessionUpdate):
            config = event.apply(self.config)
            self.policy.check_voice(config)
            if self.spoke and config.voice != self.config.voice:  # OpenAI's code and words
                message = "Cannot update a conversation's voice if assistant audio is present."
                raise EventError("cannot_update_voice", message)
            self.reconfigure(config)
            self.send(server_event("session.updated", session=self.config.to_json()))
        elif isinstance(event, ConversationItemCreate):
            self._create_item(event)
        elif isinstance(event, ResponseCreate):
            self._create_response(event)
        elif isinstance(event, ResponseCancel):
            self._cancel(event.response_id)
        elif isinstance(event, BufferCommand):
            self._buffer_command(event.type)
        elif isinstance(event, AudioAppend):
            self.append_audio(event.pcm)
        elif isinstance(event, TurnHeard):
            self.recorder.heard(event)  # the client's own heard time, into the call record
        else:
            self._item_command(event)

    def reconfigure(self, config: SessionConfig) -> None:
        """The session from now on (EventError, nothing changed, when it may not be)."""
        check_storable(config)
        self.policy.check_transcription(config)
        self._apply(config)
        if self.journal is not None:
            self.journal.config(self.stored_config())
        self.recorder.configured(self.config.to_json(), self._stages())

    def _stages(self) -> dict[str, str]:
        engine = self.engine
        return {"stt": engine.stt.name, "llm": engine.llm.name, "tts": engine.tts.name}

    def _apply(self, config: SessionConfig) -> None:
        tools = self.policy.tools(config)  # may raise EventError: nothing changed yet
        self.engine.reconfigure(self.policy.engine_config(config))
        self.engine.tools = tools
        self.translator.transcription = config.transcription is not None
        detection = config.turn_detection
        self.idle.configure(None if detection is None else detection.idle_timeout_ms)
        self.translator.shape = ResponseShape(True, None, config.voice, config.max_output_tokens)
        self.config = config

    def _quiet(self) -> bool:
        engine = self.engine
        idle = engine.active_response_id is None and not engine.output_playing
        return idle and not engine.user_speaking

    def _idle_turn(self, audio_start_ms: int, audio_end_ms: int) -> None:
        """The idle timeout ran out: the silence is committed and answered (OpenAI's rule)."""
        for event in self.translator.timed_out(audio_start_ms, audio_end_ms):
            self.send(event)
        self.engine.create_response()

    def _create_item(self, event: ConversationItemCreate) -> None:
        _check_storable(event)
        self.edits.create(event)  # what the model sees next (``item_edits``)
        if isinstance(event.item, FunctionCallOutput):
            self.recorder.tool_output(event.item.call_id)

    def _history_changed(self) -> None:
        if self.journal is not None:
            self.journal.history(self.engine.history)

    def _create_response(self, event: ResponseCreate) -> None:
        """A response with its own settings (``responses``): in the conversation, or beside it
        (out of band) on the conversation's context or its own ``input``. One in the
        conversation waits for the created audio items' words."""
        plan = plan_response(event.response)
        if self.edits.hearing and not plan.out_of_band:
            self._spawn(self._create_when_heard(event), "response after item audio")
            return
        config = replace(self.config, **plan.changes)
        try:
            self.policy.check_voice(config)
            tools = self.policy.tools(config)
        except EventError as error:
            raise as_response_error(error) from None
        engine_config = self.policy.engine_config(config)
        if plan.out_of_band:
            context = self.engine.history if plan.input is None else self._context(plan.input)
            self._check_seen(context)
            response_id: str | None = self.side.start(engine_config, tools, context)
        else:
            response_id = self.engine.create_response(config=engine_config, tools=tools)
        if response_id is None:
            active = self.translator.response_id(self.engine.active_response_id or "")
            message = f"Conversation already has an active response in progress: {active}."
            raise EventError("conversation_already_has_active_response", message)
        shape = (not plan.out_of_band, plan.metadata, config.voice, config.max_output_tokens)
        self.translator.shape_response(response_id, ResponseShape(*shape, _items_of(plan.input)))

    async def _create_when_heard(self, event: ResponseCreate) -> None:
        await self.edits.heard()
        try:
            self._create_response(event)
        except EventError as error:
            self.send_error(error, event.event_id)

    def _context(self, entries: tuple[Message | ItemReference, ...]) -> list[Message]:
        """An out-of-band response's ``input``, its references read from the session's items."""
        return [e if isinstance(e, Message) else self._referenced(e) for e in entries]

    def _referenced(self, reference: ItemReference) -> Message:
        item = self.translator.items.get(reference.id)
        if item is None or item.get("type") != "message" or not item.get("content"):
            message = f"no message item {reference.id!r} in this session"
            raise EventError("invalid_value", message, reference.path)
        part = item["content"][0]
        text = part.get("text") or part.get("transcript") or ""
        images = tuple(
            ImagePart(image["image_url"], image.get("detail", "auto"))
            for image in item["content"]
            if image.get("type") == "input_image"
        )
        return Message(item["role"], str(text), images=images)

    def _check_seen(self, context: Sequence[Message]) -> None:
        """An out-of-band response's images only for a model that sees them."""
        if any(m.images for m in context) and not sees_images(self.engine.llm):
            message = f"the language model here ({self.engine.llm.name}) takes no images"
            raise EventError("invalid_value", message, "response.input")

    def _side_event(self, event: ev.EngineEvent) -> None:
        """An out-of-band response's event: to the client only (no journal, record or voice);
        its audio goes out in deltas over WebSocket, and is not played into a call."""
        if isinstance(event, ev.OutputAudio):
            if self._pcm_out is not None:
                out = self.engine.config.output_sample_rate_hz
                resampler = self._side_pcm.setdefault(
                    event.response_id, PcmResampler(out, AUDIO_RATE_HZ)
                )
                pcm = resampler.push(event.pcm)
                for delta in self.translator.audio_delta(event.response_id, pcm):
                    self.send(delta)
            return
        if isinstance(event, ev.ResponseDone):
            self._side_pcm.pop(event.response_id, None)
        for server in self.translator.translate(event):
            self.send(server)

    def _cancel(self, response_id: str | None) -> None:
        if response_id is not None and self._cancel_side(response_id):
            return
        active = self.engine.active_response_id
        if active is None:
            raise EventError("response_cancel_not_active", "there is no active response")
        if response_id is not None and response_id != self.translator.response_id(active):
            raise EventError(
                "invalid_value", f"response {response_id!r} is not active", "response_id"
            )
        self.translator.cancelled_by_client(active)
        self.recorder.client_cancelled(active)
        self.engine.cancel_response()

    def _cancel_side(self, response_id: str) -> bool:
        """Cancel the out-of-band response ``response_id`` names; False when none does."""
        for engine_id in self.side.running():
            if self.translator.response_id(engine_id) == response_id:
                self.translator.cancelled_by_client(engine_id)
                return self.side.cancel(engine_id)
        return False

    def _item_command(self, event: ItemRetrieve | ItemTruncate | ItemDelete) -> None:
        """On the items this session still knows; delete and truncate change what the model is
        sent next (``item_edits``)."""
        item = self.translator.items.get(event.item_id)
        if item is None:
            raise EventError("item_not_found", f"no item {event.item_id!r}", "item_id")
        if isinstance(event, ItemRetrieve):
            self._retrieve(event, item)
        elif isinstance(event, ItemDelete):
            self.edits.delete(event.item_id)
            self.send(server_event("conversation.item.deleted", item_id=event.item_id))
        else:
            self.edits.truncate(event.item_id, event.audio_end_ms)
            truncated = {"content_index": event.content_index, "audio_end_ms": event.audio_end_ms}
            self.send(
                server_event("conversation.item.truncated", item_id=event.item_id, **truncated)
            )

    def _retrieve(self, event: ItemRetrieve, item: Event) -> None:
        """The item with its audio (``translation``); an event with audio larger than this
        connection carries (``max_event_bytes``; over WebRTC the data channel's 256 KiB
        message, about 4 s of audio) gets an ``error`` and the item goes without it."""
        retrieved = server_event(
            "conversation.item.retrieved",
            item=self.translator.retrieved(event.item_id, _at_audio_rate) or item,
        )
        dropped = self.translator.audio.dropped_reason(event.item_id)
        if dropped is not None:
            message = f"item {event.item_id!r}'s audio was dropped by {dropped}"
            message += ": the item is retrieved without it"
            self.send_error(EventError("item_audio_dropped", message, "item_id"), event.event_id)
        size_bytes = len(json.dumps(retrieved))
        if size_bytes > self.max_event_bytes:
            message = (
                f"item {event.item_id!r} with its audio is a {size_bytes}-byte event, over the "
                f"{self.max_event_bytes} bytes this connection carries: retrieved without it"
            )
            self.send_error(EventError("item_audio_too_large", message, "item_id"), event.event_id)
            retrieved = server_event("conversation.item.retrieved", item=item)
        self.send(retrieved)

    def append_audio(self, pcm: bytes) -> None:
        """The client's PCM16 at ``AUDIO_RATE_HZ`` into the engine (WebSocket sessions)."""
        if self._pcm_in is None:
            raise EventError(
                "invalid_value",
                "input_audio_buffer.append is for WebSocket sessions; over WebRTC the audio "
                "goes on the media track",
                "type",
            )
        pcm = self._odd_byte + pcm
        self._odd_byte = pcm[len(pcm) & ~1 :]
        if len(pcm) > 1:
            self.engine.push_audio(self._pcm_in.push(pcm[: len(pcm) & ~1]))

    def _buffer_command(self, kind: str) -> None:
        if kind == "input_audio_buffer.clear":
            self.engine.clear_input()
            self.send(server_event("input_audio_buffer.cleared"))
        elif kind == "input_audio_buffer.commit":
            self._commit()
        else:
            self._clear_output()

    def _commit(self) -> None:
        """Push-to-talk: the input since the last commit; with VAD: the utterance it is in."""
        engine = self.engine
        if self.config.turn_detection is None:
            heard_ms = engine.uncommitted_ms
            if not engine.commit_input():  # OpenAI's code and words
                message = (
                    "Error committing input audio buffer: buffer too small. Expected at least "
                    f"100ms of audio, but buffer only has {heard_ms:.2f}ms of audio."
                )
                raise EventError("input_audio_buffer_commit_empty", message)
            return
        if not engine.user_speaking:
            raise EventError(
                "input_audio_buffer_commit_empty", "no speech is in the input audio buffer"
            )
        engine.finish_input()

    def _clear_output(self) -> None:
        """Every answer's audio stops (the active response is cancelled): ``cleared`` names
        each response whose audio had started, or none when nothing was playing."""
        active, playing = self.engine.active_response_id, self.engine.output_playing
        if active is not None:
            self.translator.cancelled_by_client(active)
            self.recorder.client_cancelled(active)
        for engine_id in self._unplayed:  # their audio is cut by the client
            self.recorder.client_cancelled(engine_id)
        self.engine.clear_output()
        self.voice.clear()
        if active is None and not playing:
            self.send(server_event("output_audio_buffer.cleared", response_id=None))


_Unplayed = tuple[TurnRecord, float | None, tuple[Message, ...]]  # turn, first frame sent, history


def _check_storable(event: ConversationItemCreate) -> None:
    """Refuse an item larger than the session store keeps, when it arrives (not once the
    journal finds it unstorable); the same limit holds with or without Redis."""
    item = event.item
    if isinstance(item, FunctionCallOutput):
        message, param = Message("tool", item.output, tool_call_id=item.call_id), "item.output"
    elif isinstance(item, FunctionCall):
        message, param = Message("assistant", item.arguments), "item.arguments"
    elif isinstance(item, UserAudio):
        return  # its words are checked by the journal once heard
    else:
        message, param = Message("user", item.text), "item.content"
    try:
        encode_item(message_to_item(LONGEST_STORED_ITEM_ID, message))
    except ValueError as exc:
        raise EventError("item_too_large", str(exc), param) from None


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


def _items_of(entries: tuple[Message | ItemReference, ...] | None) -> tuple[str, ...] | None:
    """The session items a response's own ``input`` refers to (None: it has none, its input is
    the conversation)."""
    if entries is None:
        return None
    return tuple(e.id for e in entries if isinstance(e, ItemReference))


def _at_audio_rate(pcm: bytes, sample_rate_hz: int) -> bytes:
    """PCM16 mono at ``sample_rate_hz``, resampled to the session's ``AUDIO_RATE_HZ``."""
    resampler = PcmResampler(sample_rate_hz, AUDIO_RATE_HZ)
    return resampler.push(pcm) + resampler.flush()
