"""GPT-Live over WebRTC: ``POST /v1/live/sessions``, as ``client.live.create(...)`` of the
official SDKs sends it.

I/O layer (FastAPI). The body is JSON, ``{session, transport: {type: "webrtc", sdp}}``, checked
as strictly as a ``session.start`` (``transceiver.live.client_events.parse_webrtc_create``: an
unknown field is a 400 naming it). The answer is 201 with ``{session: {id}, transport: {type:
"webrtc", sdp}}`` (``LiveCreateResponse``). Everything else is a Realtime call's
(``app``'s ``POST /v1/realtime/calls``): the same auth (API key or ``ek_`` secret, whose session
config is the start), the same ``Calls`` (capacity, relayed ICE through the relay's one public
port, connect timeout, drain and hand-over), the same session with the Live contract on it
(``LiveContract``, ``media="webrtc"``) and its events on the ``oai-events`` data channel.

Resume (with Redis): the answer carries ``X-Voicerelay-Session`` and
``X-Voicerelay-Resume-Token`` as a call's does; a new offer naming the session
(``?session_id=`` or the header) with the token continues it on any transceiver, after its
transceiver died or handed it over (drain). The Live config is stored with the session
(``LiveContract.stored``): a resume continues with the stored config, instructions appended and
conversation, and ``session.started`` reports them; the request's ``session`` is checked as
strictly as ever but does not change the session (``session.update`` does). Naming a Realtime
session here is refused (409 ``session_contract_mismatch``), as is a stored Live config that no
longer parses (409 ``invalid_stored_session``).

Each session is put in ``LiveSessions`` for as long as its call runs (a sideband finds it there).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from transceiver.http.errors import ApiError, unavailable
from transceiver.http.offer_tracing import traced_offer
from transceiver.http.offers import MAX_OFFER_BYTES, admit, json_object
from transceiver.http.rate_limiting import RateLimiting, metered
from transceiver.live.client_events import LiveConfig, parse_stored, parse_webrtc_create
from transceiver.live.contract import LiveContract
from transceiver.live.sessions import LiveSessions
from transceiver.realtime.call_tracing import offer_step
from transceiver.realtime.client_events import EventError
from transceiver.realtime.session import RealtimeSession
from transceiver.webrtc.calls import AdmissionError, CallAgent, Calls, OfferRejected
from transceiver.webrtc.sdp import SdpError, sanitise_offer

LIVE_PATH = "/v1/live/sessions"
MAX_CREATE_BYTES = 4 * MAX_OFFER_BYTES  # the offer and the session config (instructions, input)
# request -> the ek_ secret's session config (or None); ApiError 401 when refused
Authorise = Callable[[Request], Awaitable[Mapping[str, Any] | None]]
# request -> the resumed session's agent when the request names one, else None; ApiError
Resumed = Callable[[Request], Awaitable[CallAgent | None]]


def add_live_calls(
    app: FastAPI,
    calls: Calls,
    live: LiveSessions,
    authorise: Authorise,
    resumed: Resumed,
    runs_sessions: bool,
    limits: RateLimiting,
) -> None:
    @app.post(LIVE_PATH, status_code=201)
    @traced_offer("live", calls)
    async def create_live_session(request: Request) -> JSONResponse:
        granted = await authorise(request)
        admission = await limits.admit_connection(request, request.headers.get("authorization"))
        if not runs_sessions:
            message = "this transceiver runs no Live sessions (it runs the echo agent)"
            raise ApiError(404, "live_unavailable", message)
        admit(calls)  # refused before the body is read, as a Realtime call is
        config, raw_offer = _parsed(await _body(request))
        try:
            offer = sanitise_offer(raw_offer)
        except SdpError as exc:
            raise ApiError(400, exc.code, exc.message, None, "transport.sdp") from None
        requested = {**(granted or {}), **config.realtime()}
        try:
            with calls.reserve() as slot:  # before a resumed session is claimed
                agent = await resumed(request)
                if agent is None:
                    agent = calls.new_agent(requested)
                try:
                    contract = _live_contract(agent, config)
                except BaseException:
                    await agent.aclose()
                    raise
                with offer_step("voicerelay.answer"):
                    call, answer = await calls.create(slot, offer, None, agent)
        except AdmissionError as exc:
            raise unavailable(exc) from None
        except OfferRejected as exc:
            raise ApiError(400, "offer_rejected", str(exc)) from None
        live.add(contract, call.ended)
        metered(contract.session, limits.meter(admission.subject))
        headers = {**contract.session.resume_headers(), **admission.headers}
        body = {"session": {"id": contract.session_id}, "transport": {"type": "webrtc"}}
        body["transport"]["sdp"] = answer
        return JSONResponse(body, 201, headers)


def _live_contract(agent: CallAgent, requested: LiveConfig) -> LiveContract:
    """The Live contract on a new session (``requested``) or a resumed one (its stored part)."""
    if not isinstance(agent, RealtimeSession):  # the factory makes sessions when runs_sessions
        raise TypeError(f"a Live call needs a RealtimeSession, not {type(agent).__name__}")
    appended: tuple[str, ...] = ()
    config = requested
    if agent.stored_contract is not None:
        try:
            config, appended = parse_stored(agent.stored_contract)
        except EventError as exc:
            message = f"the stored Live session does not parse: {exc.message}"
            raise ApiError(409, "invalid_stored_session", message, None, "session_id") from None
    contract = LiveContract(agent, config, None, media="webrtc", appended=appended)
    agent.use_contract(contract)
    return contract


def _parsed(body: Mapping[str, Any]) -> tuple[LiveConfig, str]:
    try:
        return parse_webrtc_create(body)
    except EventError as exc:
        raise ApiError(400, exc.code, exc.message, None, exc.param) from None


async def _body(request: Request) -> Mapping[str, Any]:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_CREATE_BYTES:
        raise _too_large(int(declared))
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_CREATE_BYTES:
            raise _too_large(len(raw))
    return json_object(bytes(raw), "invalid_json", "body")


def _too_large(size: int) -> ApiError:
    return ApiError(413, "body_too_large", f"body of {size}+ bytes exceeds {MAX_CREATE_BYTES}")
