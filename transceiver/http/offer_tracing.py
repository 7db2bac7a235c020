"""The signalling's span: one ``voicerelay.offer`` per SDP offer, when traces are on.

I/O layer (Starlette requests). ``traced_offer`` wraps an offer endpoint (``POST
/v1/realtime/calls``, ``POST /v1/live/sessions``): with ``OTEL_*`` asking for traces
(``transceiver.realtime.call_tracing``) the request runs inside a SERVER span that continues the
client's W3C ``traceparent`` header when it sends one. Under it, ``offer_step`` spans mark the
admission, a resume's claim of its stored session and the SDP answer; the leg's
``voicerelay.call`` span starts under it too, and once the answer is made the call's peer
connection reports its ICE and DTLS phases on that span. The span records the answer's status
code, the call and session ids, and a refusal's error code. With traces off the endpoint runs
unwrapped but for one check, and nothing of the SDK is loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request, Response
from opentelemetry import trace

from transceiver.http.errors import ApiError
from transceiver.realtime.call_tracing import leg_made_here, process_tracer
from transceiver.webrtc.calls import Calls

R = TypeVar("R", bound=Response)
Endpoint = Callable[..., Awaitable[R]]


def traced_offer(endpoint: str, calls: Calls) -> Callable[[Endpoint[R]], Endpoint[R]]:
    """Wrap an offer endpoint (its ``request`` argument by that name) in its span."""

    def wrap(handler: Endpoint[R]) -> Endpoint[R]:
        @functools.wraps(handler)
        async def traced(*args: Any, **kwargs: Any) -> R:
            tracer = process_tracer()
            if tracer is None:
                return await handler(*args, **kwargs)
            request: Request = kwargs["request"]
            with _offer_span(tracer, endpoint, request) as span:
                response = await _answered(span, handler(*args, **kwargs))
                _watch_the_call(span, calls)
                return response

        return traced

    return wrap


def _offer_span(tracer: trace.Tracer, endpoint: str, request: Request) -> Any:
    # Imported here: the API's W3C propagator, needed only while traces are on.
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(dict(request.headers))
    attributes = {"http.request.method": request.method, "url.path": request.url.path,
                  "voicerelay.endpoint": endpoint}  # fmt: skip
    return tracer.start_as_current_span(
        "voicerelay.offer",
        parent,
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


async def _answered(span: trace.Span, answer: Awaitable[R]) -> R:
    try:
        response = await answer
    except ApiError as error:
        span.set_attributes({"http.response.status_code": error.status, "error.type": error.code})
        if error.status >= 500:
            span.set_status(trace.StatusCode.ERROR, error.code)
        raise
    except Exception as error:
        span.record_exception(error)
        span.set_attributes({"http.response.status_code": 500, "error.type": type(error).__name__})
        span.set_status(trace.StatusCode.ERROR, type(error).__name__)
        raise
    span.set_attribute("http.response.status_code", response.status_code)
    return response


def _watch_the_call(span: trace.Span, calls: Calls) -> None:
    """Name the call on the offer's span and have its peer connection mark its phases."""
    leg = leg_made_here()
    call = None if leg is None or not leg.call_id else calls.get(leg.call_id)
    if leg is None or call is None:
        return
    span.set_attribute("voicerelay.call_id", leg.call_id)
    span.set_attribute("voicerelay.session_id", leg.session_id)
    leg.watch(call.pc)
