"""Route learning as OpenTelemetry spans: off unless the standard ``OTEL_*`` variables ask.

I/O layer (the SDK's exporter thread). With traces on, each relay worker gets a ``RouteTracer``
and ``Worker._miss_public`` hands it the verdict on every STUN binding request that reached the
ufrag check: a request from an address with no route yet, the miss path. Each becomes one
``voicerelay.relay.route`` span: the transceiver the ufrag names (``voicerelay.transceiver``)
and the verdict (``learned``, or the drop's reason: a bad ufrag or integrity, an unknown
transceiver). Requests refused before the check (rate-limited, not a request) make none, so a
flood of junk makes no spans. The hot path (a known address: one dictionary lookup) has no
check at all. With traces off (the default) the worker's ``route_tracer`` is None: nothing of
OpenTelemetry is imported, not even its API, and the miss path pays one ``is not None``.

When traces are on follows the transceiver's rules (``transceiver.realtime.call_tracing``;
restated here because the relay imports nothing of the transceiver): ``OTEL_TRACES_EXPORTER``
naming ``otlp``, or unset with an OTLP endpoint set; ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` keep them off. ``OTEL_SERVICE_NAME`` names the service
(``voicerelay-relay`` by default); spans go over OTLP/HTTP through the SDK's batch processor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from relay.routing import Action, ClientKey, Drop, Forward

log = logging.getLogger(__name__)
DEFAULT_SERVICE_NAME = "voicerelay-relay"
UNTRACED_DROPS = frozenset({"rate_limited", "unknown_address", "not_webrtc"})


def tracing_requested(env: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces (off by default)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if exporters:
        return "otlp" in {name.strip().lower() for name in exporters.split(",")}
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return any(env.get(name, "").strip() for name in endpoints)


class RouteTracer:
    """One worker's spans of route learning, and the SDK pipeline that exports them."""

    def __init__(self, provider: Any, worker_index: int) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("voicerelay.relay")
        self._worker = worker_index

    def verdict(self, data: bytes, source: ClientKey, action: Action) -> None:
        """The miss path's decision on ``data`` from ``source``: a span if it was a STUN
        request judged by its ufrag."""
        if not data or data[0] > 3:  # not STUN (RFC 7983): no route is learned from it
            return
        if isinstance(action, Drop) and action.reason in UNTRACED_DROPS:
            return
        attributes: dict[str, str | int] = {
            "voicerelay.relay.worker": self._worker,
            "client.address": source[0],
            "client.port": source[1],
        }
        if isinstance(action, Forward):
            attributes["voicerelay.transceiver"] = f"{action.link[0]}:{action.link[1]}"
            attributes["voicerelay.verdict"] = "learned"
        elif isinstance(action, Drop):
            attributes["voicerelay.verdict"] = action.reason
        else:
            attributes["voicerelay.verdict"] = type(action).__name__.lower()
        self._tracer.start_span("voicerelay.relay.route", attributes=attributes).end()

    def shutdown(self) -> None:
        """Export what is left (a spawned worker runs no ``atexit``)."""
        self._provider.shutdown()


def route_tracer(env: Mapping[str, str], worker_index: int) -> RouteTracer | None:
    """A worker's tracer when ``env`` asks for traces; None (and nothing imported) if not."""
    if not tracing_requested(env):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = env.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("relay worker %d: OpenTelemetry traces of route learning on (%s)",
             worker_index, service)  # fmt: skip
    return RouteTracer(provider, worker_index)
