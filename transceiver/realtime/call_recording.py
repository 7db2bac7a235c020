"""One session's call record, as it happens: engine events and turn records -> record writes.

Protocol layer (pure: clocks and the sink are injected). The live session
(``transceiver.realtime.session``) tells a :class:`CallRecorder` when its call began and ended,
each engine event, each finished turn (``pipeline.turns.TurnRecord``) and each config change;
the recorder hands ``transceiver.store.call_records`` writes to a sink (the process's
``CallRecordLog``, which never blocks). What a stored turn holds:

- ``user`` and ``assistant`` (what the caller said, what they heard), as the transcript policy
  keeps them (whole, redacted, or ``null``), and their lengths;
- ``latency_ms``: each stage's duration (``stt``: speech stopped to the final transcript;
  ``llm_first_token``: transcript to the model's first token; ``tts_first_audio``: first
  synthesis request to its first audio; ``voice_to_voice``: speech stopped to the first frame
  sent), the provider time and the pipeline's own overhead on that path, and ``vad_silence``
  (the silence window of the turn detection, as configured; kept for the readers of records
  written before ``end_of_turn``);
- ``end_of_turn``: ``null`` for a turn without speech, else what ended it: ``kind``
  (``server_vad``: the silence window; ``semantic_vad``: the end-of-turn model said the
  speaker was done; ``semantic_vad_timeout``: semantic_vad's silence window, the model having
  said not yet or not answered; ``commit``: the client committed the input, no turn
  detection), ``silence_ms`` (server_vad: its window; semantic_vad: the pause from the last
  voiced frame to the turn's end, as the frames arrived) and, when the model was asked,
  ``model_probability`` (its last answer's);
- ``timeline_ms``: each moment in ms after ``origin`` (the live page's waterfall):
  ``speech_stopped``, or for a turn without speech (typed, or a tool's continuation)
  ``response_created``, when the session started the response; ``voice_to_voice`` is then
  measured from there too;
- ``interrupted``: ``null`` or who cut the answer (``user``: a barge-in; ``client``: a
  ``response.cancel`` or ``output_audio_buffer.clear``), when (unix ms) and how much was played;
- ``tools``: each call that completed in the turn: name, side (server: a built-in; client: its
  output came from the client, timed from the request), duration and outcome;
- ``stages``: provider and model per stage; ``usage`` (audio seconds in and out, tokens,
  characters) and ``cost_usd`` (``total`` as the engine priced it, and per stage with
  ``pipeline.pricing``);
- ``detours``: each retry or fallback the turn's provider calls took (``pipeline.resilience``:
  stage, kind, from, to, reason, attempts, served), told by the engine (``on_detour``);
- ``heard`` (always the last field): ``null``, or when the client itself first heard the answer
  (``voicerelay.turn.heard``): its own ``after_speech_stopped_ms`` and
  ``after_output_started_ms`` as it sent them, and ``after_origin_ms`` on the timeline's axis
  (after speech stopped: the client's own; otherwise first frame out plus its playout delay).
  A report that comes after its turn was stored patches the stored turn (``HeardTime``).

Configuration versions: the settings that produce the answers (instructions, tools, tool
choice, model, voice, turn detection, transcription model, modalities, and the provider of each
stage) are hashed; the record stores each version once and notes where a new one begins.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from pipeline import events as ev
from pipeline.pricing import PriceTable, TurnUsage, estimate_cost_usd, load_prices
from pipeline.providers import Message
from pipeline.turns import DecisionTiming, TurnRecord
from transceiver.realtime.client_events import EventError, TurnHeard
from transceiver.store.call_records import (
    AppendTurn,
    BeginLeg,
    CallRecordPolicy,
    ConfigVersion,
    EndLeg,
    HeardTime,
    RecordWrite,
    config_hash,
    transcript,
)

Json = dict[str, Any]
MAX_TOOLS_PER_TURN = 16
MAX_DETOURS_PER_TURN = 8
RECENT = 8  # responses (and turns) a late report or detour may still name
MAX_TRANSCRIPT_CHARS = 4000  # per side; a record turn stays a few KiB at worst
# Calls' end reasons (``transceiver.webrtc.calls``) as a record says them.
END_REASONS = {
    "hangup": "hangup",
    "closed": "client_gone",
    "failed": "client_gone",
    "taken_over": "taken_over",
    "crashed": "error",
    "error": "error",
    "rejected": "error",
    "connect_timeout": "connect_timeout",
    "shutdown": "shutdown",
}
_TIMELINE = (
    "speech_started",
    "stt_final",
    "llm_first_token",
    "first_tts_request",
    "first_tts_audio",
    "llm_last_token",
    "response_done",
)
_CONFIG_FIELDS = ("model", "instructions", "tools", "tool_choice", "output_modalities")


class Detour(Protocol):
    """A retry or fallback of a provider call (``pipeline.resilience.Detour``)."""

    def to_json(self) -> dict[str, Any]: ...


class RecordSink(Protocol):
    def submit(self, write: RecordWrite) -> bool: ...


class RecordLog(RecordSink, Protocol):
    """The process's record writer (``transceiver.store.call_log.CallRecordLog``)."""

    @property
    def policy(self) -> CallRecordPolicy: ...


class RecordingHost(Protocol):
    """What a session's persistence offers a recorder (``SessionPersistence``)."""

    @property
    def owner_id(self) -> str: ...

    @property
    def records(self) -> RecordLog | None: ...


class CallTrace(Protocol):
    """A leg's trace (``call_tracing``: OpenTelemetry spans), fed what the recorder sees."""

    def begin(self, session_id: str, call_id: str, transceiver: str) -> str:
        """The call span starts; its trace id (hex; empty: not traced)."""
        ...

    def tool(
        self, name: str, call_id: str, side: str, started_s: float, ended_s: float, ok: bool
    ) -> None: ...

    def turn(
        self, record: TurnRecord, origin_s: float | None, first_out_s: float | None
    ) -> None: ...

    def end(self, reason: str) -> None: ...


class Untraced:
    """The trace of a process that traces nothing (no ``OTEL_*`` asks for it)."""

    def begin(self, session_id: str, call_id: str, transceiver: str) -> str:
        return ""

    def tool(
        self, name: str, call_id: str, side: str, started_s: float, ended_s: float, ok: bool
    ) -> None:
        pass

    def turn(self, record: TurnRecord, origin_s: float | None, first_out_s: float | None) -> None:
        pass

    def end(self, reason: str) -> None:
        pass


class Discard:
    """The sink of a session that keeps no record (no Redis)."""

    def submit(self, write: RecordWrite) -> bool:
        return True


def recorder_for(
    host: RecordingHost | None,
    session_id: str,
    clock: Callable[[], float],
    wall: Callable[[], float],
    traced: CallTrace | None = None,
) -> CallRecorder:
    """The session's recorder: writing to the process's record log, or discarding (and
    feeding the leg's trace, if it has one)."""
    records = None if host is None else host.records
    trace = Untraced() if traced is None else traced
    if host is None or records is None:
        policy = CallRecordPolicy()
        return CallRecorder(Discard(), session_id, "", policy, clock, wall, trace=trace)
    return CallRecorder(
        records, session_id, host.owner_id, records.policy, clock, wall, process_prices(), trace
    )


@lru_cache(maxsize=1)
def process_prices() -> PriceTable:
    """The price table the engine prices turns with (``PIPELINE_PRICES`` over the defaults)."""
    return load_prices(os.environ)


def recorded_config(session: Mapping[str, Any], stages: Mapping[str, str]) -> Json:
    """What a config version holds: the answer-shaping part of session.updated, and the
    provider (and so the model) of each stage."""
    audio = session.get("audio", {})
    config = {name: session.get(name) for name in _CONFIG_FIELDS}
    config["voice"] = audio.get("output", {}).get("voice")
    config["turn_detection"] = audio.get("input", {}).get("turn_detection")
    config["transcription"] = audio.get("input", {}).get("transcription")
    config["stages"] = dict(stages)
    return config


def end_reason(reason: str | None, handed_over: bool, fallback: str = "client_gone") -> str:
    """The record's end reason for a call's (``None``: not told, e.g. a WebSocket session)."""
    said = fallback if reason is None else END_REASONS.get(reason, reason)
    if handed_over and said in ("client_gone", "shutdown"):
        return "drain_hand_over"  # its client was told to move, and did (or the drain ended)
    return said


def split_provider(name: str) -> tuple[str, str | None]:
    """``openai-llm/gpt-4o-mini`` -> (``openai-llm``, ``gpt-4o-mini``); offline: no model."""
    provider, _, model = name.partition("/")
    return provider, model or None


@dataclass
class _Written:
    """A stored turn a late ``voicerelay.turn.heard`` may still name."""

    call_id: str
    turn: int
    origin: str
    first_out_ms: float | None
    heard: bool


def _no_client_ids(engine_response_id: str) -> str | None:
    return None


@dataclass
class _Tool:
    name: str
    call_id: str
    side: str
    started_s: float


@dataclass
class CallRecorder:
    sink: RecordSink
    session_id: str
    transceiver: str
    policy: CallRecordPolicy
    clock: Callable[[], float]  # the loop's clock (turn records use it)
    wall: Callable[[], float]  # unix seconds
    prices: PriceTable | None = None
    trace: CallTrace = field(default_factory=Untraced)
    call_id: str = ""
    _config_hash: str = ""
    _vad_silence_ms: float | None = None
    _turn_detection: str | None = None  # its type; None: the client commits
    _seq: int = 0
    _begun: bool = False
    _ended: bool = False
    _open_tools: dict[str, _Tool] = field(default_factory=dict)
    _done_tools: list[Json] = field(default_factory=list)
    _cleared: dict[str, tuple[int, float]] = field(default_factory=dict)  # response -> cut
    _client_cancelled: set[str] = field(default_factory=set)
    _history_seen: int = 0  # history messages already looked at for a text turn's words
    _responses: dict[str, float] = field(default_factory=dict)  # engine response -> started
    # engine response -> its first frame played (a turn done before it is recorded without)
    _output_started: dict[str, float] = field(default_factory=dict)
    # The client's id of an engine response, while the session's translator knows it.
    client_response_id: Callable[[str], str | None] = _no_client_ids
    _detours: dict[int, list[Json]] = field(default_factory=dict)  # engine turn -> its detours
    _heard: dict[str, TurnHeard] = field(default_factory=dict)  # engine response -> report
    _written: dict[str, _Written] = field(default_factory=dict)  # client response -> its turn

    def began(self, call_id: str) -> None:
        """The call (connection) id, from ``Calls`` when it answers the offer."""
        self.call_id = call_id

    def start(
        self, session: Mapping[str, Any], stages: Mapping[str, str], history_length: int = 0
    ) -> None:
        """The call was answered: its leg begins, with the config it starts with (and, when
        resumed, the history it restored: no turn of this leg said that)."""
        if self._begun:
            return
        self._begun = True
        self._history_seen = history_length
        self.call_id = self.call_id or f"ws_{self.session_id}"
        trace_id = self.trace.begin(self.session_id, self.call_id, self.transceiver)
        write = BeginLeg(self.session_id, self.call_id, self.transceiver, self._now_ms(), trace_id)
        self._submit(write)
        self.configured(session, stages)

    def configured(self, session: Mapping[str, Any], stages: Mapping[str, str]) -> None:
        """The config now (after a session.update): a new version if it changed."""
        detection = session.get("audio", {}).get("input", {}).get("turn_detection") or {}
        silence = detection.get("silence_duration_ms")
        self._vad_silence_ms = float(silence) if isinstance(silence, int | float) else None
        kind = detection.get("type")
        self._turn_detection = kind if isinstance(kind, str) else None
        if not self._begun:
            return
        config = recorded_config(session, stages)
        digest = config_hash(config)
        if digest != self._config_hash:
            self._config_hash = digest
            write = ConfigVersion(self.session_id, self.call_id, digest, config, self._now_ms())
            self._submit(write)

    def observe(self, event: ev.EngineEvent) -> None:
        now = self.clock()
        if isinstance(event, ev.ToolCallStarted | ev.ClientToolCallRequested):
            side = "server" if isinstance(event, ev.ToolCallStarted) else "client"
            call = event.call
            if len(self._open_tools) < 4 * MAX_TOOLS_PER_TURN:
                self._open_tools[call.call_id] = _Tool(call.name, call.call_id, side, now)
        elif isinstance(event, ev.ToolCallCompleted):
            self._tool_done(event.result.call.call_id, event.result.ok)
        elif isinstance(event, ev.ResponseStarted):
            self._responses[event.response_id] = now
            _keep_newest(self._responses, RECENT)
        elif isinstance(event, ev.OutputStarted):
            self._output_started[event.response_id] = now
            _keep_newest(self._output_started, RECENT)
        elif isinstance(event, ev.OutputCleared):
            self._cleared[event.response_id] = (event.audio_end_ms, self.wall())
            while len(self._cleared) > 8:
                self._cleared.pop(next(iter(self._cleared)))

    def detour(self, turn: int, detour: Detour) -> None:
        """A provider call of engine turn ``turn`` was retried or passed on to its fallback."""
        taken = self._detours.setdefault(turn, [])
        if len(taken) < MAX_DETOURS_PER_TURN:
            taken.append(detour.to_json())
        _keep_newest(self._detours, RECENT)

    def heard(self, report: TurnHeard) -> None:
        """The client's own heard time of a response; EventError when it names no recent
        response of this call, or one whose time was reported already."""
        name = report.response_id
        written = self._written.get(name)
        if written is not None:
            if written.heard:
                raise _reported_already(name)
            written.heard = True
            entry = _heard_entry(report, written.origin, written.first_out_ms)
            self._submit(HeardTime(self.session_id, written.call_id, written.turn, entry))
            return
        engine_id = next((e for e in self._responses if self.client_response_id(e) == name), None)
        if engine_id is None:
            message = f"no recent response {name!r} in this call"
            raise EventError("invalid_value", message, "response_id")
        if engine_id in self._heard:
            raise _reported_already(name)
        self._heard[engine_id] = report
        _keep_newest(self._heard, RECENT)

    def client_cancelled(self, engine_response_id: str) -> None:
        self._client_cancelled.add(engine_response_id)

    def tool_output(self, call_id: str) -> None:
        """A client tool's output arrived (its duration ends here)."""
        self._tool_done(call_id, True)

    def _end_of_turn(self, record: TurnRecord) -> Json | None:
        """What ended a spoken turn (module docstring); None without speech."""
        if record.speech_stopped_s is None:
            return None
        if self._turn_detection is None:
            return {"kind": "commit", "silence_ms": None}
        if self._turn_detection != "semantic_vad":
            return {"kind": self._turn_detection, "silence_ms": self._vad_silence_ms}
        decision = record.decision or DecisionTiming()
        probability = None if decision.probability is None else round(decision.probability, 3)
        kind = "semantic_vad" if decision.complete else "semantic_vad_timeout"
        silence_ms = _since_ms(record.last_voiced_s, record.speech_stopped_s)
        return {"kind": kind, "silence_ms": silence_ms, "model_probability": probability}

    def _tool_done(self, call_id: str, ok: bool) -> None:
        tool = self._open_tools.pop(call_id, None)
        if tool is None or len(self._done_tools) >= MAX_TOOLS_PER_TURN:
            return
        now = self.clock()
        self.trace.tool(tool.name, tool.call_id, tool.side, tool.started_s, now, ok)
        ms = round((now - tool.started_s) * 1000, 1)
        self._done_tools.append(
            {"name": tool.name, "call_id": tool.call_id, "side": tool.side, "ms": ms, "ok": ok}
        )

    def turn(
        self,
        record: TurnRecord,
        engine_response_id: str,
        first_frame_sent_s: float | None,
        history: Sequence[Message] = (),
    ) -> None:
        """A finished turn (``TurnCompleted``) becomes the record's next turn."""
        if not self._begun or self._ended:
            return
        origin, origin_name = record.speech_stopped_s, "speech_stopped"
        if origin is None:
            origin, origin_name = self._responses.get(engine_response_id), "response_created"
        played_s = self._output_started.pop(engine_response_id, None)
        first_out = next(
            (s for s in (first_frame_sent_s, record.first_frame_out_s, played_s) if s is not None),
            None,
        )  # sent by the track, else played by the engine (before, or after, the turn completed)

        def since(at_s: float | None) -> float | None:
            return None if origin is None or at_s is None else round((at_s - origin) * 1000, 1)

        voice_to_voice = since(first_out)
        self.trace.turn(record, origin, first_out)
        said = record.transcript or _user_text(history[self._history_seen :])
        self._history_seen = len(history)
        tools, self._done_tools = self._done_tools, []
        entry: Json = {
            "call_id": self.call_id,
            "turn": record.turn,
            "at": self._now_ms(),
            "user": _text(said, self.policy.transcripts),
            "assistant": _text(record.heard_text, self.policy.transcripts),
            "user_chars": len(said),
            "assistant_chars": len(record.heard_text),
            "latency_ms": {
                "vad_silence": self._vad_silence_ms,
                "stt": _round(record.stt_ms),
                "llm_first_token": _round(record.llm_first_token_ms),
                "tts_first_audio": _round(record.tts_first_audio_ms),
                "voice_to_voice": voice_to_voice,
                "provider": _round(record.provider_ms),
                "overhead": _round(record.overhead_ms),
            },
            "end_of_turn": self._end_of_turn(record),
            "origin": origin_name,
            "timeline_ms": {
                **{name: since(getattr(record, name + "_s")) for name in _TIMELINE},
                "first_frame_out": voice_to_voice,
            },
            "interrupted": self._interruption(record, engine_response_id),
            "tools": tools,
            "stages": {
                stage: dict(zip(("provider", "model"), split_provider(name), strict=True))
                for stage, name in _stages(record).items()
            },
            "usage": {
                "audio_in_s": round(record.input_audio_s, 3),
                "audio_out_s": round(record.output_audio_s, 3),
                "input_tokens": record.llm_input_tokens,
                "output_tokens": record.llm_output_tokens,
                "tts_chars": record.tts_chars,
            },
            "cost_usd": self._cost(record),
            "detours": self._detours.pop(record.turn, []),
            "heard": self._heard_now(engine_response_id, record.turn, origin_name, voice_to_voice),
        }
        self._seq += 1
        write = AppendTurn(
            self.session_id, self.call_id, self._seq, entry, voice_to_voice,
            record.cost_usd, entry["interrupted"] is not None, len(tools),
        )  # fmt: skip
        self._submit(write)

    def _heard_now(
        self, engine_response_id: str, turn: int, origin: str, first_out_ms: float | None
    ) -> Json | None:
        """The turn's heard entry if its report came first; the turn kept for a later one."""
        report = self._heard.pop(engine_response_id, None)
        name = self.client_response_id(engine_response_id)
        if name is not None:
            written = _Written(self.call_id, turn, origin, first_out_ms, report is not None)
            self._written[name] = written
            _keep_newest(self._written, RECENT)
        return None if report is None else _heard_entry(report, origin, first_out_ms)

    def _interruption(self, record: TurnRecord, engine_response_id: str) -> Json | None:
        if not record.interrupted:
            return None
        played_ms, at_s = self._cleared.pop(engine_response_id, (None, self.wall()))
        if played_ms is None:
            played_ms = round(record.output_audio_s * 1000)
        by = "client" if engine_response_id in self._client_cancelled else "user"
        self._client_cancelled.discard(engine_response_id)
        return {"by": by, "at": round(at_s * 1000), "played_ms": played_ms}

    def _cost(self, record: TurnRecord) -> Json:
        cost: Json = {"total": round(record.cost_usd, 8)}
        if self.prices is None:
            return cost
        stages = {stage: split_provider(name) for stage, name in _stages(record).items()}

        def model(stage: str) -> str | None:
            provider, name = stages[stage]
            return name if provider.startswith("openai") else None

        usages = {
            "stt": TurnUsage(stt_model=model("stt"), audio_in_s=record.input_audio_s),
            "llm": TurnUsage(
                llm_model=model("llm"),
                input_tokens=record.llm_input_tokens,
                output_tokens=record.llm_output_tokens,
            ),
            "tts": TurnUsage(tts_model=model("tts"), characters=record.tts_chars),
        }
        for stage, usage in usages.items():
            cost[stage] = round(estimate_cost_usd(usage, self.prices), 8)
        return cost

    def end(self, reason: str) -> None:
        """The leg ended (the record's end reason, see ``end_reason``)."""
        if not self._begun or self._ended:
            return
        self._ended = True
        self.trace.end(reason)
        self._submit(EndLeg(self.session_id, self.call_id, reason, self._now_ms()))

    def _submit(self, write: RecordWrite) -> None:
        self.sink.submit(write)  # a full queue drops and counts it; the call goes on

    def _now_ms(self) -> int:
        return round(self.wall() * 1000)


def _stages(record: TurnRecord) -> dict[str, str]:
    return {"stt": record.stt_provider, "llm": record.llm_provider, "tts": record.tts_provider}


def _text(text: str, mode: str) -> str | None:
    kept = transcript(text, mode)
    return None if kept is None else kept[:MAX_TRANSCRIPT_CHARS]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _since_ms(start_s: float | None, end_s: float | None) -> float | None:
    return None if start_s is None or end_s is None else round((end_s - start_s) * 1000, 1)


def _user_text(new_messages: Sequence[Message]) -> str:
    """What the caller typed since the last turn (a text turn has no transcript)."""
    return " ".join(m.content for m in new_messages if m.role == "user")


def _heard_entry(report: TurnHeard, origin: str, first_out_ms: float | None) -> Json:
    """A turn's ``heard``: the client's times, and where it falls on the turn's timeline."""
    stopped, started = report.after_speech_stopped_ms, report.after_output_started_ms
    at_ms: float | None = None
    if origin == "speech_stopped" and stopped is not None:
        at_ms = stopped
    elif started is not None and first_out_ms is not None:
        at_ms = first_out_ms + started
    return {
        "after_origin_ms": _round(at_ms),
        "after_speech_stopped_ms": _round(stopped),
        "after_output_started_ms": _round(started),
    }


def _reported_already(response_id: str) -> EventError:
    message = f"{response_id!r}: its heard time was reported already"
    return EventError("invalid_value", message, "response_id")


def _keep_newest(entries: dict[Any, Any], count: int) -> None:
    while len(entries) > count:
        entries.pop(next(iter(entries)))
