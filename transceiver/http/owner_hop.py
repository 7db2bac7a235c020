"""Forward a sideband WebSocket to the transceiver that runs its session; and a plain HTTP
request to the process that answers it (``forward_request``: a pod's follow-ups,
``worker_routing``).

I/O layer (Starlette WebSocket towards the client, ``websockets`` towards the owner). The design
and why (``sideband`` says when a hop is made):

- The session's owner is found in Redis (``transceiver.store.sideband_directory``: owner id and
  internal HTTP address, each transceiver's ``TRANSCEIVER_HTTP_ADVERTISE``). Proxying the
  WebSocket to it keeps one place where a session's events are made and its commands handled
  (the owner's ``sideband`` attach path, unchanged), keeps the order of events exactly as the
  session made them, and costs one extra hop inside the cluster. The alternative, Redis pub/sub
  of every event and command, would need a second delivery path with its own ordering, back
  pressure and loss rules, for every session whether or not a sideband ever attaches; a proxy
  costs nothing until a sideband lands on the wrong transceiver.
- The hop is opened before the client's upgrade is accepted: the owner's refusal (its 401, 404
  and their JSON body) is the client's, as if it had asked the owner itself; an owner that
  cannot be reached (dead, its record stale) is a ``404`` saying so (``sideband``).
- The hop carries the client's ``Authorization`` (the owner checks it again: a forwarded
  credential is never taken on trust) and a signed hop header (``hop_signature``) so the owner
  never forwards it again.
- Once both are open, frames are copied both ways one at a time (each send awaited before the
  next receive: the buffers are the WebSocket libraries' own, bounded by ``MAX_QUEUED_FRAMES``
  and ``MAX_FRAME_BYTES``; a slow sideband backs up into the owner, which closes it 1008 as it
  would a direct one). A close from either side is passed to the other with its code and
  reason. An owner that goes away without a close (killed, its host gone) closes the sideband
  with ``1014`` (bad gateway) and ``OWNER_GONE``: the client resumes the session elsewhere, and
  a sideband attaches again once it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import httpx
from fastapi import Request, Response, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from transceiver.http.errors import error_response
from transceiver.http.hop_signature import hop_headers

logger = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0
FORWARD_TIMEOUT_S = 10.0  # a follow-up's answer, by default (a hang-up ends its call at once)
MAX_FRAME_BYTES = 16 * 1024 * 1024  # uvicorn's ws_max_size: what a direct sideband may send
MAX_QUEUED_FRAMES = 16
MAX_FORWARD_CONNECTIONS = 32  # hang-ups forwarded at once; more wait for a connection
BAD_GATEWAY = 1014
OWNER_GONE = "the session's transceiver went away; resume the session, then attach again"
UNSENDABLE_CODES = frozenset({1005, 1006, 1015})  # reserved: never put in a close frame
Address = tuple[str, int]
HOP_BY_HOP = frozenset(
    {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "upgrade"}
)


async def forward_request(
    http: httpx.AsyncClient, request: Request, address: Address, hop: Mapping[str, str]
) -> Response | None:
    """``request`` as it came (method, path, query, headers with ``hop`` added, body), sent
    to ``address``; its answer as it is, or None when nothing answered."""
    host, port = address
    url = f"http://{host}:{port}{request.url.path}"
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    headers.update(hop)
    try:
        answer = await http.request(
            request.method, url, params=str(request.query_params),
            headers=headers, content=await request.body(),
        )  # fmt: skip
    except httpx.HTTPError:
        return None
    kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
    kept.pop("content-encoding", None)  # httpx has decoded the body
    return Response(answer.content, answer.status_code, kept)


class OwnerForwarder:
    """The one HTTP client a process forwards follow-ups to their owners with (a hang-up that
    landed on the wrong transceiver): its connections kept alive between hang-ups, at most
    ``MAX_FORWARD_CONNECTIONS``, every step bounded (``CONNECT_TIMEOUT_S``, then
    ``timeout_s``: ``TRANSCEIVER_FORWARD_TIMEOUT_S``). Its owner closes it at shutdown:
    ``transceiver.server``, or the app that made its own (``app.create_app``, at the end of its
    lifespan)."""

    def __init__(self, timeout_s: float = FORWARD_TIMEOUT_S) -> None:
        timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
        limits = httpx.Limits(max_connections=MAX_FORWARD_CONNECTIONS)
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)

    async def forward(
        self, request: Request, address: Address, hop: Mapping[str, str]
    ) -> Response | None:
        """``forward_request`` on the shared client."""
        return await forward_request(self._http, request, address, hop)

    @property
    def closed(self) -> bool:
        return self._http.is_closed

    async def aclose(self) -> None:
        await self._http.aclose()


class HopRefused(Exception):
    """The owner refused the hop: ``response`` (its status and error body) is the client's."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


class OwnerUnreachable(Exception):
    """The owner named by the directory does not answer (dead, or its record is stale)."""


async def open_hop(
    address: Address, path: str, authorization: str | None, hop: str, subprotocols: list[str]
) -> ClientConnection:
    """A WebSocket to ``path`` (with its query) at the owner's ``address``; HopRefused,
    OwnerUnreachable."""
    host, port = address
    url = f"ws://[{host}]:{port}{path}" if ":" in host else f"ws://{host}:{port}{path}"
    headers = hop_headers(hop) | ({} if authorization is None else {"Authorization": authorization})
    try:
        return await connect(
            url, additional_headers=headers, subprotocols=subprotocols or None,  # type: ignore[arg-type]
            proxy=None, open_timeout=CONNECT_TIMEOUT_S, max_size=MAX_FRAME_BYTES,
            max_queue=MAX_QUEUED_FRAMES, compression=None, ping_interval=None,
        )  # fmt: skip
    except InvalidStatus as refused:
        raise HopRefused(_passed_on(refused)) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        logger.info("sideband hop to %s:%d failed: %s", host, port, exc)
        raise OwnerUnreachable(f"{type(exc).__name__}: {exc}") from None


def _passed_on(refused: InvalidStatus) -> JSONResponse:
    """The owner's refusal as the client's: its status and JSON error body."""
    response = refused.response
    try:
        body = json.loads(response.body or b"")
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        message = f"the session's transceiver refused with HTTP {response.status_code}"
        return error_response(502, "owner_refused", message)
    headers = {k: v for k, v in response.headers.items() if k.lower() in ("www-authenticate",)}
    return JSONResponse(body, status_code=response.status_code, headers=headers)


async def relay_frames(websocket: WebSocket, upstream: ClientConnection) -> None:
    """Accept the client (with the owner's subprotocol), copy frames both ways until either
    side closes, pass the close on."""
    await websocket.accept(upstream.subprotocol)
    tasks = [
        asyncio.create_task(_from_client(websocket, upstream), name="sideband hop reader"),
        asyncio.create_task(_from_owner(websocket, upstream), name="sideband hop writer"),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if tasks[1] in done:
            await _close_client(websocket, upstream)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await upstream.close()


async def _from_client(websocket: WebSocket, upstream: ClientConnection) -> None:
    """Client frames to the owner; the client's close, with its code, to the owner."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            code = int(message.get("code") or 1000)
            code = 1000 if code in UNSENDABLE_CODES else code
            with contextlib.suppress(ConnectionClosed):
                await upstream.close(code, str(message.get("reason") or ""))
            return
        with contextlib.suppress(ConnectionClosed):  # the other task sees the owner's close
            await upstream.send(_payload(message))


def _payload(message: Mapping[str, Any]) -> str | bytes:
    text = message.get("text")
    return text if text is not None else bytes(message.get("bytes") or b"")


async def _from_owner(websocket: WebSocket, upstream: ClientConnection) -> None:
    """Owner frames to the client, until the owner closes or goes away."""
    with contextlib.suppress(ConnectionClosed):
        async for frame in upstream:
            if isinstance(frame, str):
                await websocket.send_text(frame)
            else:
                await websocket.send_bytes(frame)


async def _close_client(websocket: WebSocket, upstream: ClientConnection) -> None:
    code, reason = upstream.close_code, upstream.close_reason or ""
    if code is None or code in UNSENDABLE_CODES:
        code, reason = BAD_GATEWAY, OWNER_GONE
        logger.info("a forwarded sideband's owner went away: %s", upstream.remote_address)
    if websocket.application_state != WebSocketState.CONNECTED:
        return
    with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
        await websocket.close(code, reason)
