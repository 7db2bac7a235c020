"""OpenTelemetry traces of calls: off unless the standard ``OTEL_*`` variables ask for them.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names ``otlp``, or when it is unset and an OTLP
endpoint is (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``);
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off. Spans go over OTLP/HTTP
(protobuf) through the SDK's batch processor, which reads the rest of the standard settings
itself (``OTEL_EXPORTER_OTLP_*`` headers, timeout, ``OTEL_BSP_*`` batching,
``OTEL_RESOURCE_ATTRIBUTES``); ``OTEL_SERVICE_NAME`` names the service
(``voicerelay-transceiver`` by default). When off, nothing of the SDK is imported and no
exporter thread starts.

One trace per leg of a call (a connection serving a session): its ``voicerelay.call`` span runs
from the answer to the hang-up. A leg answered over WebRTC signalling is a child of the offer's
``voicerelay.offer`` span (``transceiver.http.offer_tracing``), which continues the client's
W3C ``traceparent`` when the offer carries one; its connection phases are events on the call
span (``voicerelay.ice.connected``, ``voicerelay.dtls.connected``, or ``.failed``). A session
over WebSocket has no offer: its call span is the trace's root.

Spans of a turn are not threaded through the engine: when a turn ends, its
``pipeline.turns.TurnRecord`` (each stage's moment on the loop clock) becomes a
``voicerelay.turn`` span under the call, with explicit start and end times, and under it
``voicerelay.stt``, the LLM's ``chat <model>`` (GenAI semantic conventions: ``gen_ai.*``),
``voicerelay.tts`` and each tool call's ``execute_tool <name>``. Transcripts stay out of spans
(the call record keeps them, under its own redaction policy).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context

from pipeline.turns import TurnRecord
from transceiver.realtime.call_recording import CallTrace, Untraced, split_provider

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "voicerelay-transceiver"
MAX_TOOLS_PER_TURN = 16
_Attributes = dict[str, str | int | float | bool]


def tracing_requested(env: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces (off by default)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER")
    if exporters is not None and exporters.strip():
        names = {name.strip().lower() for name in exporters.split(",")}
        unsupported = names - {"otlp", "none"}
        if unsupported:
            log.warning("OTEL_TRACES_EXPORTER: only otlp is supported, not %s", unsupported)
        return "otlp" in names
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return any(env.get(name, "").strip() for name in endpoints)


@lru_cache(maxsize=1)
def process_tracer() -> trace.Tracer | None:
    """The process's tracer, set up on first use from ``os.environ``; None: tracing is off."""
    return start_tracing(os.environ)


def start_tracing(env: Mapping[str, str]) -> trace.Tracer | None:
    if not tracing_requested(env):
        return None
    # Imported here: a process that traces nothing never loads the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            log.warning(
                "%s=%s: traces go over http/protobuf, the only one supported", name, protocol
            )
    service = env.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # flushed at exit
    log.info("OpenTelemetry traces on: service %s", service)
    return provider.get_tracer("voicerelay.transceiver")


def call_trace(clock: Callable[[], float], wall: Callable[[], float]) -> CallTrace:
    """A new leg's trace (``clock``: the loop clock turn records use; ``wall``: unix s), under
    the span current where it is made (an offer's, or none)."""
    tracer = process_tracer()
    if tracer is None:
        return Untraced()
    leg = LegTrace(tracer, clock, wall, otel_context.get_current())
    _LEG.set(leg)  # the offer that made it watches its connection (``leg_made_here``)
    return leg


def leg_made_here() -> LegTrace | None:
    """The leg trace made last in this context (an offer's handler), if any."""
    return _LEG.get()


@contextlib.contextmanager
def offer_step(name: str, attributes: _Attributes | None = None) -> Iterator[trace.Span | None]:
    """A child span of the current one while the block runs (admission, a resume's claim, the
    SDP answer); nothing at all when no recording span is current (traces off). The step does
    not become the current span: a leg's call span made during the answer is the offer's."""
    tracer = process_tracer()
    if tracer is None or not trace.get_current_span().is_recording():
        yield None
        return
    span = tracer.start_span(name, attributes=attributes)
    try:
        yield span
    except BaseException as error:
        span.record_exception(error)
        span.set_status(trace.StatusCode.ERROR, type(error).__name__)
        raise
    finally:
        span.end()


@dataclass(frozen=True)
class _Tool:
    name: str
    call_id: str
    side: str
    started_s: float
    ended_s: float
    ok: bool


class LegTrace:
    """The spans of one leg, built from what its call recorder sees."""

    def __init__(
        self,
        tracer: trace.Tracer,
        clock: Callable[[], float],
        wall: Callable[[], float],
        parent: Context | None = None,
    ) -> None:
        self._tracer = tracer
        self._clock = clock
        self._wall = wall
        self._parent = parent  # the offer's span, or the empty context: a root
        self.call_id = ""
        self.session_id = ""
        self._phases: set[str] = set()
        self._call: trace.Span | None = None
        self._context: Context | None = None
        self._tools: list[_Tool] = []
        self._offset_s = 0.0  # unix - loop clock, taken once: every span of the leg agrees

    def _ns(self, at_s: float) -> int:
        """A loop-clock moment as unix nanoseconds."""
        return int((at_s + self._offset_s) * 1e9)

    def begin(self, session_id: str, call_id: str, transceiver: str) -> str:
        if self._call is not None:
            return _trace_id(self._call)
        attributes = {"voicerelay.session_id": session_id, "voicerelay.call_id": call_id}
        if transceiver:
            attributes["voicerelay.transceiver"] = transceiver
        now_s = self._clock()
        self._offset_s = self._wall() - now_s
        self.call_id, self.session_id = call_id, session_id
        self._call = self._tracer.start_span(
            "voicerelay.call",
            self._parent,
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
            start_time=self._ns(now_s),
        )
        self._context = trace.set_span_in_context(self._call)
        trace_id = _trace_id(self._call)
        log.info("call %s (session %s): trace %s", call_id, session_id, trace_id)
        return trace_id

    def watch(self, pc: Any) -> None:
        """Mark the peer connection's phases on the call span: ICE connected, DTLS up (aiortc's
        connection state turns ``connected`` once every DTLS transport is), or failed."""
        pc.on("iceconnectionstatechange", lambda: self._phase("ice", pc.iceConnectionState))
        pc.on("connectionstatechange", lambda: self._phase("dtls", pc.connectionState))

    def _phase(self, layer: str, state: str) -> None:
        outcome = {"completed": "connected", "connected": "connected", "failed": "failed"}
        name = f"voicerelay.{layer}.{outcome[state]}" if state in outcome else ""
        if self._call is None or not name or name in self._phases:
            return
        self._phases.add(name)
        self._call.add_event(name, timestamp=self._ns(self._clock()))
        if outcome[state] == "failed":
            log.warning("call %s: %s (trace %s)", self.call_id, name, _trace_id(self._call))

    def tool(
        self, name: str, call_id: str, side: str, started_s: float, ended_s: float, ok: bool
    ) -> None:
        if len(self._tools) < MAX_TOOLS_PER_TURN:
            self._tools.append(_Tool(name, call_id, side, started_s, ended_s, ok))

    def turn(self, record: TurnRecord, origin_s: float | None, first_out_s: float | None) -> None:
        tools, self._tools = self._tools, []
        if self._context is None:
            return
        now_s = self._clock()
        children: list[tuple[str, float, float, _Attributes, bool]] = []
        stt = _stage(record.stt_provider)
        if record.speech_stopped_s is not None and record.stt_final_s is not None:
            stt["voicerelay.input_audio_s"] = record.input_audio_s
            children.append(
                ("voicerelay.stt", record.speech_stopped_s, record.stt_final_s, stt, True)
            )
        llm_start = record.stt_final_s if record.stt_final_s is not None else origin_s
        llm_end = _first(record.llm_last_token_s, record.response_done_s, record.llm_first_token_s)
        if record.llm_provider and llm_start is not None and llm_end is not None:
            provider, model = split_provider(record.llm_provider)
            system = "openai" if provider.startswith("openai") else provider
            llm: _Attributes = {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": system,
                "gen_ai.system": system,
                "gen_ai.request.model": model or provider,
                "gen_ai.usage.input_tokens": record.llm_input_tokens,
                "gen_ai.usage.output_tokens": record.llm_output_tokens,
            }
            if record.llm_first_token_ms is not None:
                llm["voicerelay.llm.first_token_ms"] = round(record.llm_first_token_ms, 1)
            children.append((f"chat {model or provider}", llm_start, llm_end, llm, True))
        tts_end = _first(record.response_done_s, record.first_tts_audio_s)
        if record.first_tts_request_s is not None and tts_end is not None:
            tts = {**_stage(record.tts_provider), "voicerelay.tts.chars": record.tts_chars}
            if record.tts_first_audio_ms is not None:
                tts["voicerelay.tts.first_audio_ms"] = round(record.tts_first_audio_ms, 1)
            children.append(("voicerelay.tts", record.first_tts_request_s, tts_end, tts, True))
        for tool in tools:
            attributes: _Attributes = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": tool.name,
                "gen_ai.tool.call.id": tool.call_id,
                "voicerelay.tool.side": tool.side,
            }
            name = f"execute_tool {tool.name}"
            children.append((name, tool.started_s, tool.ended_s, attributes, tool.ok))
        first = _first(record.speech_started_s, record.speech_stopped_s, origin_s)
        first = now_s if first is None else first
        start_s = min([first, *(child[1] for child in children)])
        last = [record.response_done_s, first_out_s, *(child[2] for child in children)]
        end_s = max([at for at in last if at is not None], default=now_s)
        turn_attributes: _Attributes = {
            "voicerelay.turn": record.turn,
            "voicerelay.interrupted": record.interrupted,
            "voicerelay.tool_calls": record.tool_calls,
            "voicerelay.cost_usd": record.cost_usd,
            "voicerelay.output_audio_s": record.output_audio_s,
        }
        if origin_s is not None and first_out_s is not None:
            turn_attributes["voicerelay.voice_to_voice_ms"] = round(
                (first_out_s - origin_s) * 1000, 1
            )
        if record.overhead_ms is not None:
            turn_attributes["voicerelay.overhead_ms"] = round(record.overhead_ms, 1)
        turn = self._tracer.start_span(
            "voicerelay.turn",
            self._context,
            attributes=turn_attributes,
            start_time=self._ns(start_s),
        )
        inside = trace.set_span_in_context(turn)
        for name, began_s, ended_s, attributes, ok in children:
            span = self._tracer.start_span(
                name, inside, attributes=attributes, start_time=self._ns(began_s)
            )
            if not ok:
                span.set_status(trace.StatusCode.ERROR)
            span.end(end_time=self._ns(max(began_s, ended_s)))
        turn.end(end_time=self._ns(end_s))

    def end(self, reason: str) -> None:
        call, self._call, self._context = self._call, None, None
        if call is None:
            return
        call.set_attribute("voicerelay.end_reason", reason)
        if reason in ("error", "connect_timeout"):
            call.set_status(trace.StatusCode.ERROR, reason)
        call.end(end_time=self._ns(self._clock()))


_LEG: ContextVar[LegTrace | None] = ContextVar("voicerelay_leg_trace", default=None)


def _trace_id(span: trace.Span) -> str:
    return trace.format_trace_id(span.get_span_context().trace_id)


def _stage(name: str) -> _Attributes:
    provider, model = split_provider(name)
    attributes: _Attributes = {"voicerelay.provider": provider}
    if model:
        attributes["voicerelay.model"] = model
    return attributes


def _first(*moments: float | None) -> float | None:
    return next((at for at in moments if at is not None), None)
