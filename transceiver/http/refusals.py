"""Endpoints of OpenAI's Realtime API this server does not serve, refused by name.

I/O layer (FastAPI). Each answers ``404`` with OpenAI's error body and a code and message that
say why, instead of a bare "Not Found" (the SDK raises ``NotFoundError`` and does not retry):

- SIP call control, ``POST /v1/realtime/calls/{call_id}/accept``, ``/reject`` and ``/refer``
  (``client.realtime.calls.accept``/``reject``/``refer``): OpenAI's for a call that came in
  over SIP (its ``realtime.call.incoming`` webhook). Calls here come over WebRTC, and sessions
  over WebSocket: none waits to be accepted, rejected or referred. ``sip_unavailable``.

(Realtime translation sessions are served: ``translation_websocket``.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from transceiver.http.errors import error_response

SIP_ACTIONS = ("accept", "reject", "refer")
SIP_MESSAGE = (
    "{action} is for calls that came in over SIP; this server takes Realtime calls over "
    "WebRTC and sessions over WebSocket, and has no SIP calls to {action}"
)


def add_refusals(app: FastAPI, calls_path: str) -> None:
    for action in SIP_ACTIONS:
        app.add_api_route(
            f"{calls_path}/{{call_id}}/{action}", _sip_refusal(action), methods=["POST"]
        )


def _sip_refusal(action: str) -> Callable[[str], Awaitable[JSONResponse]]:
    async def refuse(call_id: str) -> JSONResponse:
        message = SIP_MESSAGE.format(action=action)
        return error_response(404, "sip_unavailable", message, param="call_id")

    refuse.__name__ = f"sip_{action}"
    return refuse
