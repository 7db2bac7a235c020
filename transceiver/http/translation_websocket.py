"""OpenAI's Realtime translation WebSocket: ``wss://HOST/v1/realtime/translations?model=…``.

I/O layer (Starlette WebSocket). The SDK's ``client.realtime.translations.connect()`` (and its
``TranslationSession``) opens it with ``Authorization: Bearer``; the handshake is the Realtime
WebSocket's (``websocket``: auth, an ``ek_`` secret's session, rate limits, a call slot held
while open, every refusal an HTTP JSON error before the upgrade) and the session runs there too
(``websocket.run_session``), with the translation contract at its edge
(``transceiver.realtime.translation_session``).

Refused before the upgrade, by name: a transceiver whose language model cannot translate (the
offline rule-based agent) or that runs no sessions (the echo agent), ``404``
``translation_unavailable``; an ``ek_`` secret minted for a Realtime or transcription session,
``400`` ``invalid_value`` on ``client_secret``; bad fields in the secret's session, ``400``
naming them.

``POST /v1/realtime/translations/client_secrets`` (``translations.client_secrets.create``)
mints an ``ek_`` secret carrying a translation session (``{"type": "translation", ...}``) as the
Realtime endpoint mints one (``auth.mint``), and reports the session it starts as OpenAI's
``RealtimeTranslationClientSecretCreateResponse``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse

from transceiver.http import client_secrets
from transceiver.http.auth import Authenticator, AuthError
from transceiver.http.errors import ApiError, error_response
from transceiver.http.rate_limiting import RateLimiting, metered
from transceiver.http.websocket import (
    Refused,
    WebSocketSessions,
    admitted,
    rate_limited,
    refusals,
    run_session,
)
from transceiver.realtime.client_events import EventError
from transceiver.realtime.session import RealtimeSession
from transceiver.realtime.translation_fields import DEFAULT_MODEL, TRANSLATION
from transceiver.realtime.translation_session import (
    check_translates,
    described,
    translation_session,
)
from transceiver.webrtc.calls import Calls

TRANSLATIONS_PATH = "/v1/realtime/translations"
UNAVAILABLE = "translation_unavailable"
# an ``expires_after`` object -> the secret's lifetime in s (``app.secret_request``'s rule);
# raises ApiError
SecretLifetime = Callable[[Any], int]


def add_translation_websocket(
    app: FastAPI,
    calls: Calls,
    auth: Authenticator,
    sessions: WebSocketSessions | None,
    limits: RateLimiting,
) -> None:
    @app.websocket(TRANSLATIONS_PATH)
    async def translations(websocket: WebSocket) -> None:
        async with refusals(websocket):
            granted = await admitted(websocket, auth, sessions)
            subject = await rate_limited(websocket, limits)
            with calls.reserve():  # held while the session is open: it counts as a call
                model = websocket.query_params.get("model") or DEFAULT_MODEL
                session = _session(sessions, granted, model)
                metered(session, limits.meter(subject))
                await run_session(websocket, session)


def _session(
    sessions: WebSocketSessions | None, granted: Mapping[str, Any] | None, model: str
) -> RealtimeSession:
    assert sessions is not None  # ``admitted`` refused a transceiver without sessions
    if granted is not None and granted.get("type") != TRANSLATION:
        message = "the client secret is for a Realtime session, not a translation session"
        raise Refused(error_response(400, "invalid_value", message, param="client_secret"))
    try:
        session = translation_session(sessions, granted, model)
        check_translates(session)
    except EventError as exc:
        status = 404 if exc.code == UNAVAILABLE else 400
        raise Refused(error_response(status, exc.code, exc.message, param=exc.param)) from None
    return session


def add_translation_secrets(
    app: FastAPI, auth: Authenticator, limits: RateLimiting, lifetime_s: SecretLifetime
) -> None:
    @app.post(TRANSLATIONS_PATH + "/client_secrets")
    async def create_translation_secret(request: Request) -> JSONResponse:
        authorization = request.headers.get("authorization")
        try:
            auth.check_api_key(authorization)
        except AuthError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        admission = await limits.admit_connection(request, authorization, session=False)
        ttl_s, session, reported = _secret_request(await request.json(), lifetime_s)
        try:
            secret = await auth.mint(ttl_s, session)
        except client_secrets.ClientSecretError as exc:
            raise ApiError(400, exc.reason, str(exc)) from None
        except AuthError as exc:  # the session store is unreachable
            raise ApiError(exc.status, exc.code, exc.message) from None
        body = {"value": secret.value, "expires_at": secret.expires_at, "session": reported}
        return JSONResponse(body, 200, admission.headers)


def _secret_request(
    body: Any, lifetime_s: SecretLifetime
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """The secret's lifetime, the session it carries (typed ``translation``) and the session
    as reported; ApiError naming what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_type", "the body must be a JSON object")
    unknown = sorted(set(body) - {"expires_after", "session"})
    if unknown:
        message = f"Unknown parameter: '{unknown[0]}'."
        raise ApiError(400, "unknown_parameter", message, None, unknown[0])
    if "session" not in body:
        raise ApiError(400, "missing_required_parameter", "session is required", None, "session")
    try:
        session, reported = described(body["session"])
    except EventError as exc:
        raise ApiError(400, exc.code, exc.message, None, exc.param) from None
    return lifetime_s(body.get("expires_after")), session, reported
