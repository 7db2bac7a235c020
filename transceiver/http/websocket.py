"""OpenAI's Realtime WebSocket transport: ``wss://HOST/v1/realtime?model=…``.

I/O layer (Starlette WebSocket). The same Realtime session as a WebRTC call's data channel
(``transceiver.realtime.session.RealtimeSession`` in WebSocket mode, see ``use_websocket``), with
the events as JSON text frames and the audio inside them: ``input_audio_buffer.append``
``{audio: base64 PCM16 24 kHz mono}`` in, ``response.output_audio.delta`` out. No
``output_audio_buffer.*`` events (OpenAI sends those over WebRTC only).

The handshake, as OpenAI's and as the official SDKs make it:

- Auth: ``Authorization: Bearer <API key or ek_ secret>`` (the ``openai`` SDKs), or, for
  browsers that cannot set headers, the subprotocol ``openai-insecure-api-key.<key>`` next to
  ``realtime`` (the server then answers ``realtime``). Checked as for ``POST /v1/realtime/calls``;
  an ``ek_`` secret's session config is the session's start. Refused before the upgrade: ``401``.
- ``model`` is a hint (ignored, like the calls endpoint's). ``intent=transcription``, or an
  ``ek_`` secret minted for a transcription session, makes a transcription session
  (``transceiver.realtime.transcription``); a secret for a realtime session with that intent is
  refused with ``400``. With ``call_id`` the socket is not a new session but the
  sideband of a running call (``sideband``: joined, not admitted here).
- ``voicerelay_events=true`` asks for our extension events (``voicerelay.turn.metrics``); without
  it a WebSocket session sends OpenAI's events only, as server-side SDKs that check every event
  against their types (the Agents SDK's runner) expect. WebRTC calls keep them: the web client
  draws them.
- Capacity: a session holds one of the transceiver's call slots (``Calls.reserve``) for as long
  as it is open, so WebSocket sessions and calls share ``TRANSCEIVER_CAPACITY``; full or
  draining: ``503`` with ``Retry-After`` before the upgrade.

Every refusal before the upgrade is an HTTP response with the usual JSON error body. After it,
a bad event gets an ``error`` event and the session goes on: text frames over
``MAX_WEBSOCKET_EVENT_BYTES`` get ``event_too_large`` (frames over uvicorn's ``ws_max_size``,
16 MiB, close the socket with 1009), binary frames get ``invalid_event``.

Ending: the client's close ends the session; a normal close (1000) is its hang-up, so a stored
session (Redis) ends with it, any other leaves it stored as a lost WebRTC connection does. The
server closes with 1011 when the session failed (its crash logged and counted, as for calls),
1008 when the client reads its events too slowly (``MAX_QUEUED_EVENTS`` waiting), and 1000 when
another connection took the session over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from transceiver.background import report_crash
from transceiver.http.auth import Authenticator, AuthError
from transceiver.http.errors import error_response
from transceiver.http.rate_limiting import RateLimited, RateLimiting, metered
from transceiver.realtime.client_events import EventError
from transceiver.realtime.session import EVENTS_LABEL, RealtimeSession
from transceiver.realtime.transcription import (
    TRANSCRIPTION,
    is_transcription,
    transcription_session,
)
from transceiver.webrtc.calls import AdmissionError, Calls

logger = logging.getLogger(__name__)
REALTIME_PATH = "/v1/realtime"
SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL = "openai-insecure-api-key."
MAX_QUEUED_EVENTS = 8192  # server events waiting for a slow reader: about 80 s of audio deltas
NORMAL_CLOSE = 1000
# requested session config (an ek_ secret's, or None) -> a session in WebSocket mode; raises
# EventError when the config is not a valid session
WebSocketSessions = Callable[[Mapping[str, Any] | None], RealtimeSession]
# a socket whose query names a call_id -> that call's sideband, run to its end (``sideband``)
JoinCall = Callable[[WebSocket], Awaitable[None]]


class Refused(Exception):
    """The upgrade is refused with an HTTP error response."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


class HandlerCrashed(Exception):
    """Handling a client event raised something other than EventError: a bug (the cause)."""


class EventSocket:
    """What a ``RealtimeSession`` sends on and hears from, as its data channel: ``send`` queues
    (it never blocks the session); ``pump`` writes the queue to the WebSocket."""

    label = EVENTS_LABEL

    def __init__(self, max_queued: int = MAX_QUEUED_EVENTS) -> None:
        self.readyState = "open"
        self.overflowed = asyncio.Event()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._max_queued = max_queued
        self._on_message: Callable[[str | bytes], None] | None = None

    def on(self, event: str, handler: Callable[..., None]) -> None:
        if event == "message":
            self._on_message = handler

    def send(self, text: str) -> None:
        if self.readyState != "open":
            return
        if self._queue.qsize() >= self._max_queued:
            self.readyState = "closing"  # nothing more is queued; the socket is closed
            self.overflowed.set()
            return
        self._queue.put_nowait(text)

    def deliver(self, data: str | bytes) -> None:
        if self._on_message is not None:
            self._on_message(data)

    async def pump(self, websocket: WebSocket) -> None:
        """Until cancelled or the socket fails: every queued event, in order."""
        while True:
            await websocket.send_text(await self._queue.get())

    async def flush(self, websocket: WebSocket) -> None:
        """What is queued now (an error event before a close), without waiting for more."""
        for _ in range(self._queue.qsize()):
            await websocket.send_text(self._queue.get_nowait())


def add_realtime_websocket(
    app: FastAPI,
    calls: Calls,
    auth: Authenticator,
    sessions: WebSocketSessions | None,
    join_call: JoinCall,
    limits: RateLimiting,
) -> None:
    @app.websocket(REALTIME_PATH)
    async def realtime(websocket: WebSocket) -> None:
        if "call_id" in websocket.query_params:
            await join_call(websocket)
            return
        async with refusals(websocket):
            granted = await admitted(websocket, auth, sessions)
            subject = await rate_limited(websocket, limits)
            with calls.reserve():  # held while the session is open: it counts as a call
                session = _session(sessions, granted, websocket.query_params.get("intent", ""))
                session.translator.extension_events = _wants_extensions(websocket)
                metered(session, limits.meter(subject))
                await run_session(websocket, session)


@contextlib.asynccontextmanager
async def refusals(websocket: WebSocket) -> AsyncIterator[None]:
    """A refusal in the block answered as the HTTP JSON error it is (``refuse``): ``Refused``'s
    response, or 503 with ``Retry-After`` for an ``AdmissionError`` (full or draining). The
    GPT-Live socket (``live_websocket``) refuses through it too."""
    try:
        yield
    except AdmissionError as exc:
        retry = {"Retry-After": str(exc.retry_after_s)}
        full = error_response(503, f"transceiver_{exc.reason}", str(exc), retry)
        await refuse(websocket, full)
    except Refused as refused:
        await refuse(websocket, refused.response)


async def admitted(
    websocket: WebSocket, auth: Authenticator, sessions: WebSocketSessions | None
) -> Mapping[str, Any] | None:
    """The ek_ secret's session config (or None); Refused when the upgrade may not go on."""
    query = websocket.query_params
    if query.get("intent", "") not in ("", "conversation", "realtime", TRANSCRIPTION):
        message = f"intent {query.get('intent')!r} is not supported: realtime or transcription"
        raise Refused(error_response(400, "invalid_value", message, param="intent"))
    try:
        granted = await auth.check_call(authorization_of(websocket))
    except AuthError as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="voicerelay"'} if exc.status == 401 else {}
        raise Refused(error_response(exc.status, exc.code, exc.message, headers)) from None
    if sessions is None:
        message = "this transceiver runs no Realtime sessions (it runs the echo agent)"
        raise Refused(error_response(404, "realtime_unavailable", message))
    return granted


async def rate_limited(websocket: WebSocket, limits: RateLimiting) -> str:
    """Take the handshake from its key's and address's limits: the key's subject, or Refused
    with the 429 (before the upgrade)."""
    try:
        admission = await limits.admit_connection(websocket, authorization_of(websocket))
    except RateLimited as exc:
        raise Refused(exc.response()) from None
    return admission.subject


def _wants_extensions(websocket: WebSocket) -> bool:
    return websocket.query_params.get("voicerelay_events", "").lower() in ("1", "true", "yes")


def authorization_of(websocket: WebSocket) -> str | None:
    """The Authorization header, else the key a browser put in a subprotocol."""
    header = websocket.headers.get("authorization")
    if header is not None:
        return header
    for protocol in _subprotocols(websocket):
        if protocol.startswith(KEY_SUBPROTOCOL):
            return "Bearer " + protocol.removeprefix(KEY_SUBPROTOCOL)
    return None


def _subprotocols(websocket: WebSocket) -> list[str]:
    return [str(p) for p in websocket.scope.get("subprotocols", [])]


def _session(
    sessions: WebSocketSessions | None, granted: Mapping[str, Any] | None, intent: str
) -> RealtimeSession:
    """A Realtime session, or a transcription session (the intent's or the secret's)."""
    assert sessions is not None
    try:
        if intent == TRANSCRIPTION and granted is not None and not is_transcription(granted):
            message = "the client secret is for a realtime session, not a transcription session"
            raise EventError("invalid_value", message, "intent")
        if intent == TRANSCRIPTION or is_transcription(granted):
            return transcription_session(sessions, granted)
        return sessions(granted)
    except EventError as exc:
        raise Refused(error_response(400, exc.code, exc.message, param=exc.param)) from None


async def refuse(websocket: WebSocket, response: JSONResponse) -> None:
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # a server without the denial extension: close before accepting
        await websocket.close(1008)


async def run_session(websocket: WebSocket, session: RealtimeSession) -> None:
    """Accept (unless accepted already), run the session until either side ends it, close
    both. The GPT-Live socket (``live_websocket``) runs its sessions here too."""
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in _subprotocols(websocket) else None
    face = EventSocket()
    tasks: list[asyncio.Task[Any]] = []
    try:
        if websocket.application_state == WebSocketState.CONNECTING:
            await websocket.accept(subprotocol)
        await session.start()
        session.attach_channel(face)
        tasks = [
            asyncio.create_task(_read(websocket, face, session), name="websocket reader"),
            asyncio.create_task(face.pump(websocket), name="websocket writer"),
            asyncio.create_task(session.hangup_requested.wait(), name="websocket hang-up"),
            asyncio.create_task(face.overflowed.wait(), name="websocket overflow"),
        ]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await _close(websocket, face, session, done, tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        face.readyState = "closed"
        await session.aclose()


async def _read(websocket: WebSocket, face: EventSocket, session: RealtimeSession) -> int:
    """Every frame to the session until the client closes; the close code."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return int(message.get("code") or NORMAL_CLOSE)
        if (text := message.get("text")) is not None:
            try:
                face.deliver(text)
            except Exception as exc:
                raise HandlerCrashed("handling a client event failed") from exc
        else:
            error = EventError("invalid_event", "binary frames are not events: send JSON text")
            session.send_error(error)


async def _close(
    websocket: WebSocket,
    face: EventSocket,
    session: RealtimeSession,
    done: set[asyncio.Task[Any]],
    tasks: list[asyncio.Task[Any]],
) -> None:
    reader, writer, _, overflow = tasks
    if reader in done and not reader.cancelled() and reader.exception() is None:
        if reader.result() == NORMAL_CLOSE:
            session.caller_hung_up()
        return  # the client left: nothing to close
    code, reason = NORMAL_CLOSE, session.hangup_reason or ""
    for task in (reader, writer):
        if task in done and (error := task.exception()) is not None:
            if not isinstance(error, HandlerCrashed):
                return  # the socket went away under a receive or a send
            report_crash("websocket session", error, logger, "its WebSocket session ends")
            failed = EventError("session_failed", "the server failed on an internal error")
            session.send_error(failed, error_type="server_error")
            code, reason = 1011, "session failed"
    if session.hangup_reason == "crashed":
        code = 1011
    if overflow in done:
        code, reason = 1008, "events were not read fast enough"
        logger.warning("a WebSocket client read too slowly: %d events waiting", MAX_QUEUED_EVENTS)
    if websocket.application_state != WebSocketState.CONNECTED:
        return
    with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
        if code != 1008:
            await face.flush(websocket)  # the error event that says why, first
        await websocket.close(code, reason)
