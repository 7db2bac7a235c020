"""HTTP signaling and health: OpenAI's Realtime WebRTC call shape, /livez, /readyz, /metrics.

I/O layer (FastAPI). ``POST /v1/realtime/calls`` takes an SDP offer as ``application/sdp`` or
as OpenAI's ``multipart/form-data`` variant (field ``sdp``, optional ``session`` JSON) and answers
201 with the SDP answer and ``Location: /v1/realtime/calls/{call_id}``. Every error is JSON:
``{"error": {"type": ..., "code": ..., "message": ...}}``.
"""

from __future__ import annotations

import email.policy
import json
import logging
from collections.abc import Iterator
from email import message_from_bytes
from email.message import EmailMessage

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException as StarletteHTTPException

from transceiver.link import Link
from transceiver.sdp import SdpError, sanitise_offer
from transceiver.sessions import AdmissionError, OfferRejected, Sessions

logger = logging.getLogger(__name__)
MAX_OFFER_BYTES = 64 * 1024
CALLS_PATH = "/v1/realtime/calls"


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"type": kind, "code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


class LinkCollector(Collector):
    """The link's plain counters, read at scrape time (the hot path only bumps ints)."""

    def __init__(self, link: Link) -> None:
        self._link = link

    def collect(self) -> Iterator[Metric]:
        counters = CounterMetricFamily(
            "transceiver_link_events", "Link datagrams and drops by kind", labels=["kind"]
        )
        for kind, count in sorted(self._link.counters.items()):
            counters.add_metric([kind], count)
        yield counters
        yield GaugeMetricFamily(
            "transceiver_link_sessions", "Sessions on the link", value=self._link.session_count
        )


def create_app(sessions: Sessions, link: Link, registry: CollectorRegistry) -> FastAPI:
    app = FastAPI(title="voicerelay transceiver", docs_url=None, redoc_url=None)
    registry.register(LinkCollector(link))
    _add_error_handlers(app)

    @app.post(CALLS_PATH, status_code=201)
    async def create_call(request: Request) -> Response:
        offer = await read_offer(request, sessions)
        try:
            session, answer = await sessions.create(offer)
        except AdmissionError as exc:
            raise _unavailable(exc) from None
        except OfferRejected as exc:
            raise ApiError(400, "offer_rejected", str(exc)) from None
        location = f"{CALLS_PATH}/{session.call_id}"
        return Response(answer, 201, {"Location": location}, media_type="application/sdp")

    async def hangup(call_id: str) -> Response:
        if not await sessions.hangup(call_id):
            raise ApiError(404, "call_not_found", f"no live call {call_id!r}")
        return Response(status_code=204)

    app.add_api_route(CALLS_PATH + "/{call_id}", hangup, methods=["DELETE"])
    app.add_api_route(CALLS_PATH + "/{call_id}/hangup", hangup, methods=["POST"])

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/readyz")
    async def readyz() -> Response:
        reason = sessions.not_ready_reason
        if reason is not None:
            return error_response(503, reason, f"transceiver is {reason}")
        return JSONResponse({"status": "ready", "sessions": len(sessions)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _unavailable(exc: AdmissionError) -> ApiError:
    headers = {"Retry-After": str(exc.retry_after_s)}
    return ApiError(503, f"transceiver_{exc.reason}", str(exc), headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


async def read_offer(request: Request, sessions: Sessions) -> str:
    """The sanitised SDP offer of a calls request, or ApiError naming what is wrong."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in ("application/sdp", "multipart/form-data"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/sdp or multipart/form-data, not {content_type!r}",
        )
    try:
        sessions.admit()
    except AdmissionError as exc:
        raise _unavailable(exc) from None
    body = await _read_body(request)
    raw = body if media_type == "application/sdp" else offer_from_multipart(content_type, body)
    try:
        return sanitise_offer(_utf8(raw))
    except SdpError as exc:
        raise ApiError(400, exc.code, exc.message) from None


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_OFFER_BYTES:
        raise _too_large(int(declared))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_OFFER_BYTES:
            raise _too_large(len(body))
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty; send an SDP offer")
    return bytes(body)


def _too_large(size: int) -> ApiError:
    return ApiError(413, "offer_too_large", f"body of {size}+ bytes exceeds {MAX_OFFER_BYTES}")


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_encoding", f"SDP is not UTF-8 (byte {exc.start})") from None


def offer_from_multipart(content_type: str, body: bytes) -> bytes:
    """The ``sdp`` field of a multipart form; a ``session`` field must be a JSON object."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = message_from_bytes(head + body, policy=email.policy.HTTP)
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        raise ApiError(400, "invalid_multipart", "multipart body does not parse (boundary?)")
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = payload
    if "sdp" not in fields:
        raise ApiError(400, "missing_sdp", "multipart form has no 'sdp' field")
    if "session" in fields:
        _check_session_json(fields["session"])
    return fields["sdp"]


def _check_session_json(raw: bytes) -> None:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_session", f"'session' field is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_session", "'session' field must be a JSON object")
