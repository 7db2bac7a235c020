"""The sideband: a trusted server joins a running session over a WebSocket, for both contracts.

I/O layer (Starlette WebSocket). Two endpoints, one attach path:

- Realtime: ``wss://HOST/v1/realtime?call_id=rtc_…`` (``client.realtime.connect(call_id=...)``
  of the official SDKs), OpenAI's server-side control of a WebRTC call: the ``call_id`` is the
  one in the call's ``Location`` header. ``model`` may be given (a hint, ignored); any other
  query parameter is ``400 unknown_parameter``. The call's Realtime session must be running
  here or on another transceiver (below); a Realtime WebSocket session has no call id and is
  not joined (as with OpenAI), nor is a GPT-Live call (its own sideband, next).
- GPT-Live: ``wss://HOST/v1/live/sessions/{session_id}/attach``
  (``client.live.sideband.connect(session_id=...)``), a running Live session (WebRTC or primary
  WebSocket); ``graceful_close`` is taken, any other query parameter refused.

Either way: only the API key may attach (``Authorization: Bearer``; for Realtime also the
browser's key subprotocol), never an ``ek_`` secret, which is a browser's (``401``). No
greeting: from the upgrade on, the sideband gets every event the session sends its client
(``RealtimeSession.observers``: the same events, in the same order, in the session's contract;
over WebRTC that excludes the audio, which is the media track) and each of its frames is the
session's as if its client had sent it (``RealtimeSession.on_message``: ``session.update``,
``conversation.item.create`` with a ``function_call_output``, ``response.create``, the Live
commands...; a bad one's ``error`` goes to the client and every sideband alike, as the session
sends it). The sideband leaving leaves the session running; the session ending closes the
sideband (1000, ``session ended``); a sideband reading too slowly is closed 1008.

Across transceivers: with Redis, a session's owner is found through the
``SidebandDirectory`` (``transceiver.store.sideband_directory``): a call's record names its
stored session, the session's lease its owner, the owner's record its address. A sideband that
lands on a transceiver that does not run its session is forwarded to the one that does
(``owner_hop``: why a proxy and not pub/sub, and how closes and failures pass), carrying a
hop header signed with a key the transceivers share (``hop_signature``); the owner checks the
forwarded credential again and never forwards a hop on. A hop header that does not verify is
``403 invalid_hop``. No session here, no owner found: ``404`` (Realtime ``call_not_found``,
Live ``session_not_found``); Redis unreachable for the lookup: ``503 store_unavailable``.
Without Redis, or without ``TRANSCEIVER_SECRET_KEYS`` to sign hops with, a sideband never
leaves the transceiver (or pod) it lands on. Within a pod its hops are signed with the pod's own
key (``owner_routing``): a session's worker is found in the directory (with Redis), else a
Realtime call's is named by its id.

In a pod of workers (``transceiver.workers``: they share the public port and the advertised
address, each has a private loopback port) a sideband may reach a worker that does not run its
session: the owner's record names the session's worker (without one, a Realtime call's id
names its own), and the sideband goes on to that worker's private port, a hop of the stage
``WITHIN_POD``.
A sideband for an earlier call of a session since resumed reaches the session's owner (the lease
moved) and attaches to the call that runs it there, even on a sibling worker of the call's own
(the directory goes before the worker a call id names); the earlier call, while it lingers to
tell its client the session was taken over, is not where it stops, nor is a hang-up naming it.
The stage is part of what the hop header signs: a hop between transceivers may go on once within
the pod it reached; a hop within a pod never goes further (404), so no sideband loops. Where the
owner is and how a hop is signed and checked is ``owner_routing``'s, which a hang-up that lands
on the wrong transceiver takes too (``app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import ClientConnection

from transceiver.background import report_crash
from transceiver.http.auth import Authenticator, AuthError
from transceiver.http.errors import error_response
from transceiver.http.hop_signature import HopKeys, hop_header_of
from transceiver.http.owner_hop import HopRefused, OwnerUnreachable, open_hop, relay_frames
from transceiver.http.owner_routing import LIVE, REALTIME, Kind, OwnerRouting, not_found
from transceiver.http.websocket import (
    NORMAL_CLOSE,
    SUBPROTOCOL,
    EventSocket,
    HandlerCrashed,
    Refused,
    authorization_of,
    refusals,
)
from transceiver.live.sessions import LiveSessions
from transceiver.realtime.client_events import EventError
from transceiver.realtime.session import RealtimeSession
from transceiver.store.errors import StoreUnavailableError
from transceiver.store.sideband_directory import SidebandDirectory
from transceiver.webrtc.calls import Call, Calls
from transceiver.workers.seats import Seat

logger = logging.getLogger(__name__)
SLOW_READER_CLOSE = 1008
TAKEN_OVER = "taken_over"  # a session's hang-up reason when a resume elsewhere took it over


def moved(call: Call) -> bool:
    """Whether the call's session was taken over by a resume elsewhere: the call lingers until
    its client has been told (``RealtimeLimits.lost_notice_s``), but its session runs on."""
    return getattr(call.agent, "hangup_reason", None) == TAKEN_OVER


@dataclass(frozen=True)
class Target:
    """A session running here, and the event set when it ends."""

    session: RealtimeSession
    ended: asyncio.Event


class Sidebands:
    """Where a sideband finds its session: here, or through the directory on its owner."""

    def __init__(
        self,
        calls: Calls,
        auth: Authenticator,
        directory: SidebandDirectory | None = None,
        hops: HopKeys | None = None,
        seat: Seat | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``seat``: this worker's place in a pod of workers (``transceiver.workers``)."""
        self._calls, self._auth, self._directory = calls, auth, directory
        self.owners = OwnerRouting(directory, hops, seat, clock)
        self.live = LiveSessions()
        self._by_session: dict[str, Call] = {}  # stored session id -> its call here

    def call_began(self, call: Call) -> None:
        """A Realtime call was answered here: record which stored session it runs (with
        Redis), so its call id, and any earlier call's of the same session, lead here."""
        target = self._realtime(call.call_id)
        journal = None if target is None else target.session.journal
        if self._directory is None or journal is None:
            return
        for session_id, running in list(self._by_session.items()):
            if running.ended.is_set():
                del self._by_session[session_id]
        self._by_session[journal.session_id] = call
        self._directory.alias(call.call_id, journal.session_id)

    async def attach_realtime(self, websocket: WebSocket) -> None:
        await self._attach(websocket, REALTIME, websocket.query_params.get("call_id", ""))

    async def attach_live(self, websocket: WebSocket, session_id: str) -> None:
        await self._attach(websocket, LIVE, session_id)

    def _local(self, kind: Kind, target_id: str) -> Target | None:
        if kind is REALTIME:
            return self._realtime(target_id)
        running = self.live.get(target_id)
        return None if running is None else Target(running.contract.session, running.ended)

    def _realtime(self, call_id: str) -> Target | None:
        call = self._calls.get(call_id)
        if call is None or call.ended.is_set() or moved(call):
            return None
        if not isinstance(call.agent, RealtimeSession):
            return None
        if call.agent.contract is not None:  # a GPT-Live call: its own sideband
            return None
        return Target(call.agent, call.ended)

    async def _resumed(self, call_id: str) -> Target | None:
        call = await self.resumed_call(call_id)
        return None if call is None else self._realtime(call.call_id)

    async def hang_up_here(self, call_id: str) -> bool:
        """Hang up the call ``call_id`` names, if it runs here (one whose session was taken
        over and that lingers to tell its client included: its own client's late hang-up ends
        it, not the session that moved on); else the call here that runs the session it ran
        (resumed here since). False: neither runs here (the owner may be a sibling worker or
        another transceiver)."""
        if await self._calls.hangup(call_id):
            return True
        running = await self.resumed_call(call_id)
        return running is not None and await self._calls.hangup(running.call_id)

    async def resumed_call(self, call_id: str) -> Call | None:
        """The call here that runs the session an earlier call ``call_id`` ran (the session
        was resumed here; a sideband or a hang-up names the earlier call), or None."""
        if self._directory is None:
            return None
        try:
            session_id = await self._directory.session_of(call_id)
        except StoreUnavailableError:
            return None
        call = None if session_id is None else self._by_session.get(session_id)
        return None if call is None or call.ended.is_set() or moved(call) else call

    async def _attach(self, websocket: WebSocket, kind: Kind, target_id: str) -> None:
        upstream: ClientConnection | None = None
        async with refusals(websocket):
            authorization, stage = self._admitted(websocket, kind, target_id)
            target = self._local(kind, target_id)
            if target is None and kind is REALTIME:
                target = await self._resumed(target_id)
            if target is not None:
                subprotocols = websocket.scope.get("subprotocols", [])
                await websocket.accept(SUBPROTOCOL if SUBPROTOCOL in subprotocols else None)
                await observe(websocket, target)
                return
            upstream = await self._forward(websocket, kind, target_id, authorization, stage)
        if upstream is not None:
            await relay_frames(websocket, upstream)

    def _admitted(
        self, websocket: WebSocket, kind: Kind, target_id: str
    ) -> tuple[str | None, str | None]:
        """The credential (checked: the API key) and the stage of a verified hop (None: the
        client's own request)."""
        unknown = sorted(set(websocket.query_params) - kind.query)
        if unknown:
            message = f"unknown query parameter {unknown[0]!r}"
            raise Refused(error_response(400, "unknown_parameter", message, param=unknown[0]))
        headers = websocket.headers
        authorization = headers.get("authorization")
        if kind is REALTIME:  # or the key a browser put in a subprotocol
            authorization = authorization_of(websocket)
        try:
            self._auth.check_api_key(authorization)
        except AuthError as exc:
            challenge = {"WWW-Authenticate": 'Bearer realm="voicerelay"'}
            raise Refused(error_response(401, exc.code, exc.message, challenge)) from None
        stage = self.owners.stage_of(hop_header_of(headers), kind, target_id, authorization)
        return authorization, stage

    async def _forward(
        self,
        websocket: WebSocket,
        kind: Kind,
        target_id: str,
        authorization: str | None,
        came: str | None,
    ) -> ClientConnection:
        """The sideband's hop towards the session (``owner_routing``), open; Refused (404) if
        there is none."""
        hop = await self.owners.hop(kind, target_id, authorization, came)
        path = websocket.url.path + (f"?{websocket.url.query}" if websocket.url.query else "")
        wanted = [p for p in websocket.scope.get("subprotocols", []) if p == SUBPROTOCOL]
        try:
            return await open_hop(hop.address, path, authorization, hop.header, wanted)
        except HopRefused as refused:
            raise Refused(refused.response) from None
        except OwnerUnreachable:
            why = "ran on a transceiver that does not answer"
            raise not_found(kind, target_id, why) from None


async def observe(websocket: WebSocket, target: Target) -> None:
    """The session's events to the sideband, its frames to the session, until either ends."""
    session, face = target.session, EventSocket()

    def observed(event: dict[str, Any]) -> None:
        face.send(json.dumps(event))

    session.observers.add(observed)
    tasks = [
        asyncio.create_task(_commands(websocket, session), name="sideband reader"),
        asyncio.create_task(face.pump(websocket), name="sideband writer"),
        asyncio.create_task(target.ended.wait(), name="sideband session end"),
        asyncio.create_task(face.overflowed.wait(), name="sideband overflow"),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await _ended(websocket, face, done, tasks)
    finally:
        session.observers.discard(observed)
        face.readyState = "closed"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _ended(
    websocket: WebSocket,
    face: EventSocket,
    done: set[asyncio.Task[Any]],
    tasks: list[asyncio.Task[Any]],
) -> None:
    """Close the sideband as what ended says: nothing when it left, else 1000 or 1008."""
    reader, writer, _, overflow = tasks
    if reader in done and reader.exception() is None:
        return  # the sideband left; the session goes on
    for task in (reader, writer):
        if task in done and (error := task.exception()) is not None:
            if not isinstance(error, HandlerCrashed):
                return  # the socket went away under a receive or a send
            report_crash("sideband", error, logger, "the sideband is closed")
    slow = overflow in done
    with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
        if not slow:
            await face.flush(websocket)  # what the session said last (session.closed)
        reason = "events were not read fast enough" if slow else "session ended"
        await websocket.close(SLOW_READER_CLOSE if slow else NORMAL_CLOSE, reason)


async def _commands(websocket: WebSocket, session: RealtimeSession) -> None:
    """Every frame the sideband sends, to the session as its client's, until it leaves."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text")
        if data is None:
            error = EventError("invalid_event", "binary frames are not events: send JSON text")
            session.send_error(error)
            continue
        try:
            session.on_message(data)
        except Exception as exc:
            raise HandlerCrashed("handling a sideband event failed") from exc
