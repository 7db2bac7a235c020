"""A calls request's body: the SDP offer, as ``application/sdp`` or OpenAI's
``multipart/form-data`` variant (field ``sdp``, optional ``session`` JSON), read within
``MAX_OFFER_BYTES`` and sanitised; every fault is an ``ApiError`` naming it.

I/O layer (Starlette requests).
"""

from __future__ import annotations

import email.policy
from collections.abc import Mapping
from email import message_from_bytes
from email.message import EmailMessage
from typing import Any

from fastapi import Request

from pipeline.untrusted_json import JsonInputError, decode
from transceiver.http.errors import ApiError, unavailable
from transceiver.realtime.call_tracing import offer_step
from transceiver.webrtc.calls import AdmissionError, Calls
from transceiver.webrtc.sdp import SdpError, sanitise_offer

MAX_OFFER_BYTES = 64 * 1024


async def read_offer(request: Request, calls: Calls) -> tuple[str, Mapping[str, Any] | None]:
    """The sanitised SDP offer of a calls request and the session config sent with it (the
    multipart ``session`` field), or ApiError naming what is wrong."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in ("application/sdp", "multipart/form-data"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/sdp or multipart/form-data, not {content_type!r}",
        )
    admit(calls)
    body = await _read_body(request)
    raw, session = (
        (body, None)
        if media_type == "application/sdp"
        else offer_from_multipart(content_type, body)
    )
    try:
        return sanitise_offer(_utf8(raw)), session
    except SdpError as exc:
        raise ApiError(400, exc.code, exc.message) from None


def admit(calls: Calls) -> None:
    """Room for one more call, or ApiError 503 (its span, ``voicerelay.admission``, says which
    when traces are on)."""
    with offer_step("voicerelay.admission") as span:
        try:
            calls.admit()
        except AdmissionError as exc:
            if span is not None:
                span.set_attribute("voicerelay.verdict", exc.reason)
            raise unavailable(exc) from None
        if span is not None:
            span.set_attribute("voicerelay.verdict", "admitted")


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


def offer_from_multipart(content_type: str, body: bytes) -> tuple[bytes, Mapping[str, Any] | None]:
    """The ``sdp`` field of a multipart form and its ``session`` field (a JSON object)."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    try:
        message = message_from_bytes(head + body, policy=email.policy.HTTP)
    except RecursionError:  # the parser recurses into each nested multipart part
        raise ApiError(400, "invalid_multipart", "multipart parts nested too deeply") from None
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
    session = None
    if "session" in fields:
        session = json_object(fields["session"], "invalid_session", "'session' field")
    return fields["sdp"], session


def json_object(raw: bytes, code: str, what: str) -> Mapping[str, Any]:
    """``raw`` as a JSON object; else a 400 with ``code`` naming ``what`` was wrong."""
    try:
        value = decode(raw)
    except JsonInputError as exc:
        raise ApiError(400, code, f"{what} is not JSON we accept: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, code, f"{what} must be a JSON object")
    return value
