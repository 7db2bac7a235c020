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
WebSocket). Only the API key may attach (an ``ek_`` secret is a browser's: 401), and only to a
session running on this transceiver (else 404 ``session_not_found`` before the upgrade; a
session on another transceiver is not reached yet). No ``session.start``: from the upgrade on,
the sideband gets every event the session makes for its client (``LiveContract.observers``)
and its commands are the session's (``session.update``, ``session.instructions.append``,
``response.item.create``, ``response.create``, ``session.close``...: their errors go to the
session's client and the sideband alike). The sideband leaving leaves the session running; the
session ending closes the sideband (1000). ``graceful_close`` is taken (the close is always the
WebSocket's closing handshake).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect

from transceiver.background import report_crash
from transceiver.http.auth import Authenticator, AuthError
from transceiver.http.errors import error_response
from transceiver.http.websocket import (
    NORMAL_CLOSE,
    EventSocket,
    HandlerCrashed,
    Refused,
    WebSocketSessions,
    admitted,
    refusals,
    run_session,
)
from transceiver.live.client_events import (
    MAX_LIVE_EVENT_BYTES,
    SessionStart,
    event_id_of,
    parse_live_event,
)
from transceiver.live.contract import LiveContract
from transceiver.live.sessions import LiveSessions, RunningLive
from transceiver.live.translation import live_error
from transceiver.realtime.client_events import EventError
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
    live: LiveSessions,
) -> None:
    @app.websocket(LIVE_PATH)
    async def primary(websocket: WebSocket) -> None:
        async with refusals(websocket):
            granted = admitted(websocket, auth, sessions)
            assert sessions is not None
            with calls.reserve():  # held while the socket is open: it counts as a call
                await websocket.accept()
                session = await _start(websocket, sessions, granted)
                if session is None:
                    return
                assert isinstance(session.contract, LiveContract)
                ended = asyncio.Event()
                live.add(session.contract, ended)
                try:
                    await run_session(websocket, session)
                finally:
                    ended.set()

    @app.websocket(LIVE_PATH + "/{session_id}/attach")
    async def sideband(websocket: WebSocket, session_id: str) -> None:
        async with refusals(websocket):
            running = _attachable(websocket, auth, live, session_id)
            await websocket.accept()
            await _observe(websocket, running)


def _attachable(
    websocket: WebSocket, auth: Authenticator, live: LiveSessions, session_id: str
) -> RunningLive:
    """The running session a sideband may attach to; Refused (401, 404) if none."""
    unknown = sorted(set(websocket.query_params) - {"graceful_close"})
    if unknown:
        message = f"unknown query parameter {unknown[0]!r}"
        raise Refused(error_response(400, "unknown_parameter", message, param=unknown[0]))
    try:
        auth.check_api_key(websocket.headers.get("authorization"))
    except AuthError as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="voicerelay"'}
        raise Refused(error_response(401, exc.code, exc.message, headers)) from None
    running = live.get(session_id)
    if running is None:
        message = f"no Live session {session_id!r} is running on this transceiver"
        raise Refused(error_response(404, "session_not_found", message, param="session_id"))
    return running


async def _observe(websocket: WebSocket, running: RunningLive) -> None:
    """The session's events to the sideband, its commands to the session, until either ends."""
    contract, face = running.contract, EventSocket()

    def observe(event: dict[str, Any]) -> None:
        face.send(json.dumps(event))

    contract.observers.add(observe)
    tasks = [
        asyncio.create_task(_commands(websocket, contract), name="sideband reader"),
        asyncio.create_task(face.pump(websocket), name="sideband writer"),
        asyncio.create_task(running.ended.wait(), name="sideband session end"),
        asyncio.create_task(face.overflowed.wait(), name="sideband overflow"),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        reader, writer, ended, overflow = tasks
        if reader in done and reader.exception() is None:
            return  # the sideband left; the session goes on
        for task in (reader, writer):
            if task in done and (error := task.exception()) is not None:
                if not isinstance(error, HandlerCrashed):
                    return  # the socket went away under a receive or a send
                report_crash("live sideband", error, logger, "the sideband is closed")
        code = 1008 if overflow in done else NORMAL_CLOSE
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
            if overflow not in done:
                await face.flush(websocket)  # what the session said last (session.closed)
            reason = "events were not read fast enough" if code == 1008 else "session ended"
            await websocket.close(code, reason)
    finally:
        contract.observers.discard(observe)
        face.readyState = "closed"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _commands(websocket: WebSocket, contract: LiveContract) -> None:
    """Every frame the sideband sends, to the session as its client's, until it leaves."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text")
        if data is None:
            error = EventError("invalid_event", "binary frames are not events: send JSON text")
            contract.session.send_error(error)
            continue
        try:
            contract.on_message(data)
        except Exception as exc:
            raise HandlerCrashed("handling a sideband event failed") from exc


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
