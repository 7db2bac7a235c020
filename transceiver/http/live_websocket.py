"""GPT-Live's primary WebSocket: ``wss://HOST/v1/live/sessions``, as ``client.live.connect()``
of the official SDKs opens it.

I/O layer (Starlette WebSocket). The handshake is the Realtime socket's (``websocket``): auth as
the SDK sends it (``Authorization: Bearer`` with an API key or an ``ek_`` secret; the browser
subprotocol too), refusals before the upgrade as HTTP JSON errors (401; 503 with
``Retry-After`` when full or draining: the socket holds one of the transceiver's call slots
from the upgrade on). The first message must be ``session.start`` (within
``START_TIMEOUT_S``); it makes a Realtime session in WebSocket mode for the same engine and
puts the Live contract on it (``transceiver.live.contract.LiveContract``), whose
``session.started`` is the first event sent. A first message that is not a valid
``session.start`` (an unknown field in it, say) is answered by the Live ``error`` event and the
socket is closed 1008 without a session. From then on the session runs, ends and fails as a
Realtime WebSocket session does (``websocket.run_session``).

The sideband: ``wss://HOST/v1/live/sessions/{session_id}/attach`` (``client.live.sideband
.connect(session_id=...)``), a trusted server joining a running Live session (WebRTC or
WebSocket), here or on another transceiver: ``transceiver.http.sideband``, the attach path the
Realtime sideband shares. Each Live session is put in ``Sidebands.live`` for as long as it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect

from transceiver.http.auth import Authenticator
from transceiver.http.rate_limiting import RateLimiting, metered
from transceiver.http.sideband import Sidebands
from transceiver.http.websocket import (
    WebSocketSessions,
    admitted,
    rate_limited,
    refusals,
    run_session,
)
from transceiver.live.client_events import (
    MAX_LIVE_EVENT_BYTES,
    SessionStart,
    parse_live_event,
)
from transceiver.live.contract import LiveContract
from transceiver.live.translation import live_error
from transceiver.realtime.client_events import EventError, event_id_of
from transceiver.realtime.session import RealtimeSession
from transceiver.webrtc.calls import Calls

logger = logging.getLogger(__name__)
LIVE_PATH = "/v1/live/sessions"
START_TIMEOUT_S = 10.0
POLICY_CLOSE = 1008


def add_live_websocket(
    app: FastAPI,
    calls: Calls,
    auth: Authenticator,
    sessions: WebSocketSessions | None,
    sidebands: Sidebands,
    limits: RateLimiting,
) -> None:
    live = sidebands.live

    @app.websocket(LIVE_PATH)
    async def primary(websocket: WebSocket) -> None:
        async with refusals(websocket):
            granted = await admitted(websocket, auth, sessions)
            subject = await rate_limited(websocket, limits)
            assert sessions is not None
            with calls.reserve():  # held while the socket is open: it counts as a call
                await websocket.accept()
                session = await _start(websocket, sessions, granted)
                if session is None:
                    return
                assert isinstance(session.contract, LiveContract)
                metered(session, limits.meter(subject))
                ended = asyncio.Event()
                live.add(session.contract, ended)
                try:
                    await run_session(websocket, session)
                finally:
                    ended.set()

    @app.websocket(LIVE_PATH + "/{session_id}/attach")
    async def sideband(websocket: WebSocket, session_id: str) -> None:
        await sidebands.attach_live(websocket, session_id)


async def _start(
    websocket: WebSocket, sessions: WebSocketSessions, granted: Mapping[str, Any] | None
) -> RealtimeSession | None:
    """The session the first message starts; None (the socket answered and closed) if not."""
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            message = await websocket.receive()
    except TimeoutError:
        late = EventError("session_start_timeout", f"no session.start in {START_TIMEOUT_S} s")
        await _no_session(websocket, late, None)
        return None
    if message["type"] == "websocket.disconnect":
        return None
    data = message.get("text")
    if data is None:
        error = EventError("invalid_event", "binary frames are not events: send JSON text")
        await _no_session(websocket, error, None)
        return None
    try:
        start = parse_live_event(data, MAX_LIVE_EVENT_BYTES)
        if not isinstance(start, SessionStart):
            raise EventError("session_not_started", "the first event must be session.start", "type")
        session = sessions({**(granted or {}), **start.config.realtime()})
    except EventError as error:
        await _no_session(websocket, error, event_id_of(data))
        return None
    session.use_contract(LiveContract(session, start.config, start.event_id))
    return session


async def _no_session(websocket: WebSocket, error: EventError, event_id: str | None) -> None:
    with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
        await websocket.send_json(live_error(error, event_id))
        await websocket.close(POLICY_CLOSE, "no session started")
