"""HTTP signaling and health: OpenAI's Realtime WebRTC call shape, /livez, /readyz, /metrics.

I/O layer (FastAPI). ``POST /v1/realtime/calls`` takes an SDP offer as ``application/sdp`` or
as OpenAI's ``multipart/form-data`` variant (field ``sdp``, optional ``session`` JSON) and answers
201 with the SDP answer and ``Location: /v1/realtime/calls/{call_id}``.
``GET /v1/realtime`` upgraded to a WebSocket is OpenAI's WebSocket transport (``websocket``);
with ``?call_id=`` it is the sideband of a running call (``sideband``, which also serves Live's
``/v1/live/sessions/{id}/attach`` and forwards a sideband to the transceiver running its
session, found in ``sideband_directory``).
``GET /v1/live/sessions`` upgraded to a WebSocket is GPT-Live's primary WebSocket
(``live_websocket``: the same sessions speaking the Live contract, ``transceiver.live``; its
sideband attaches at ``/v1/live/sessions/{id}/attach``). ``POST /v1/live/sessions`` is a Live
session over WebRTC (``live_calls``: a call, made and run as the Realtime ones below).
``POST /v1/realtime/client_secrets`` mints a short-lived ``ek_`` secret (see ``auth``).
``GET /v1/calls`` and ``GET /v1/calls/{id}`` read call records (``calls_api``). The web
client (``transceiver/http/static``) is served at ``/`` and ``/static/``. Realtime translation
sessions (``/v1/realtime/translations``, its client secrets) are ``translation_websocket``'s;
SIP call control is refused by name (``refusals``). Every error is JSON:
``{"error": {"type": ..., "code": ..., "message": ..., "param": ...}}``.

Session survival (when Redis is configured): the 201 answer carries ``X-Voicerelay-Session``
(the session id) and ``X-Voicerelay-Resume-Token`` (its resume credential; also in
``session.created`` as ``voicerelay.session_id``/``voicerelay.resume_token``). To resume after a
lost connection, POST a new offer to any transceiver naming the session, as the query parameter
``?session_id=...`` or the ``X-Voicerelay-Session`` header, with ``X-Voicerelay-Resume-Token``
(independent of ``Authorization``, which is checked as for any call). Missing token: 401;
wrong token or unknown session: 403; Redis unreachable, or no room here: 503 — the stored
session is untouched in each case (capacity is reserved before the session is claimed). A
session whose caller hung up (``DELETE``) is ended: its resume answers 410 ``session_ended``.
On success the stored config (not the request's) and conversation continue.

In a pod of worker processes (``routing``, ``worker_routing``): ``/readyz`` and ``/metrics``
answer for the whole pod, and an offer this worker has no room for is offered to the others. A
hang-up for a call that runs on another worker of the pod, or on another transceiver, is
forwarded to it as a sideband is (``owner_routing``: the directory names its owner, else the
call id its worker; a signed hop, never forwarded again; a hop header that does not verify is
``403 invalid_hop``), and the owner's answer is the caller's (a worker of the pod that does not
answer: ``503 worker_unavailable``). A hang-up naming an earlier call of a session resumed since
ends the call that runs the session now, as a sideband naming that call reaches it (while the
earlier call lingers to tell its client the session was taken over, a hang-up naming it ends
that call alone: its client's own late hang-up; in a pod, the worker the call id names is asked
first, wherever the hang-up lands, and only its 404 leads on to the session's new call). A
session resumes through its own contract's endpoint only (a GPT-Live session at ``POST
/v1/live/sessions``, a Realtime one here): the other answers 409 ``session_contract_mismatch``.
A transcription session resumes here too, by a request that asks for one (an ``ek_`` secret
minted for a transcription session, or its own ``session.type``): it speaks transcription again
with its stored config; a Realtime session asked for as a transcription one, or the other way
round, is 409 ``session_contract_mismatch``. ``/readyz`` says ``"redis": "ok"|"degraded"``
and stays 200 while Redis is away (calls work without it, see ``persistence``); it turns 503
``task_failing`` when an owned loop keeps crashing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from transceiver.cpu_cost import CpuMeter
from transceiver.http import client_secrets
from transceiver.http.auth import Authenticator, AuthError
from transceiver.http.calls_api import add_call_records
from transceiver.http.errors import ApiError, add_error_handlers, error_response, unavailable
from transceiver.http.hop_signature import HopKeys, hop_header_of, hop_headers
from transceiver.http.live_calls import add_live_calls
from transceiver.http.live_websocket import add_live_websocket
from transceiver.http.offer_tracing import traced_offer
from transceiver.http.offers import json_object, read_offer
from transceiver.http.owner_hop import OwnerForwarder
from transceiver.http.owner_routing import (
    HANGUP,
    WITHIN_POD,
    Address,
    Hop,
    OwnerRouting,
    not_found,
)
from transceiver.http.rate_limiting import (
    EXPOSED_HEADERS,
    RateLimitCollector,
    RateLimiting,
    add_rate_limit_errors,
    metered,
)
from transceiver.http.refusals import add_refusals
from transceiver.http.sideband import Sidebands
from transceiver.http.translation_websocket import (
    add_translation_secrets,
    add_translation_websocket,
)
from transceiver.http.websocket import Refused, WebSocketSessions, add_realtime_websocket
from transceiver.http.worker_routing import WorkerRouting
from transceiver.live.contract import LIVE_CONTRACT
from transceiver.metrics import CapacityCollector, CapacityReadings
from transceiver.realtime.call_tracing import offer_step
from transceiver.realtime.client_events import (
    EventError,
    SessionConfig,
    SessionUpdate,
    new_id,
    parse_client_event,
)
from transceiver.realtime.session import RealtimeSession
from transceiver.realtime.transcription import (
    TRANSCRIPTION,
    as_realtime,
    is_transcription,
    transcribing,
)
from transceiver.realtime.transcription import session_json as transcription_json
from transceiver.store.contracts import REALTIME
from transceiver.store.journal import RESUME_TOKEN_HEADER, SESSION_HEADER
from transceiver.store.persistence import ResumeRefused, SessionPersistence
from transceiver.store.rate_limits import RateLimitPolicy
from transceiver.store.sideband_directory import SidebandDirectory
from transceiver.webrtc.calls import AdmissionError, CallAgent, Calls, OfferRejected
from transceiver.webrtc.link import Link

CALLS_PATH = "/v1/realtime/calls"
SECRETS_PATH = "/v1/realtime/client_secrets"
STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_SECRET_REQUEST_BYTES = 64 * 1024
SPILLED = frozenset({"full", "overloaded"})  # refusals another worker of a pod may not share
T = TypeVar("T")
# (session id, resume credential, client contract) -> the stored session's agent, claimed
# here; ResumeRefused (also when the session was stored with another contract)
Resume = Callable[[str, str | None, str], Awaitable[CallAgent]]
# a requested session config -> the session it starts, as session.created reports it (EventError)
SessionDescriber = Callable[[Mapping[str, Any] | None], Mapping[str, Any]]


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
        yield from self._trust()

    def _trust(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "transceiver_link_refused",
            "Link datagrams refused as not from a keyed relay, by reason (unkeyed_source: data "
            "from an address without a verified HELLO; hello_*: a HELLO that did not verify)",
            labels=["reason"],
        )
        for reason, count in sorted(self._link.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily(
            "transceiver_link_keyed_relays",
            "Relay link addresses whose HELLO verified (data is taken from these only)",
            value=len(self._link.keyed.sources),
        )


def create_app(
    calls: Calls,
    link: Link,
    registry: CollectorRegistry,
    auth: Authenticator,
    persistence: SessionPersistence | None = None,
    resume: Resume | None = None,
    websocket_sessions: WebSocketSessions | None = None,
    sideband_directory: SidebandDirectory | None = None,
    routing: WorkerRouting | None = None,
    rate_limits: RateLimiting | None = None,
    describe: SessionDescriber | None = None,
    forwarder: OwnerForwarder | None = None,
) -> FastAPI:
    """``forwarder``: the client hang-ups for calls running elsewhere go on with, its caller's
    to close. Without one the app makes its own (``app.state.forwarder``) and closes it when
    its lifespan ends: served with the lifespan off (as ``transceiver.server`` serves it),
    pass one and close it."""
    owned: OwnerForwarder | None = None
    if forwarder is None:
        forwarder = owned = OwnerForwarder()
    app = FastAPI(
        title="voicerelay transceiver", docs_url=None, redoc_url=None, lifespan=_closing(owned)
    )
    app.state.forwarder = forwarder
    registry.register(LinkCollector(link))
    limits = rate_limits or RateLimiting(RateLimitPolicy(), None)  # transceiver.http.rate_limiting
    registry.register(RateLimitCollector(limits))
    add_error_handlers(app)
    add_rate_limit_errors(app)
    _add_cors(app)
    _add_web_client(app)
    _add_client_secrets(app, auth, limits, describe or _requested_only)
    secret_keys = auth.config.secret_keys  # shared by the transceivers: hops are signed with it
    hops = None if secret_keys is None else HopKeys(secret_keys)
    seat = None if routing is None else routing.seat  # a pod's worker: sidebands go on to siblings
    sidebands = Sidebands(calls, auth, sideband_directory, hops, seat)
    add_realtime_websocket(app, calls, auth, websocket_sessions, sidebands.attach_realtime, limits)
    add_live_websocket(app, calls, auth, websocket_sessions, sidebands, limits)
    add_translation_websocket(app, calls, auth, websocket_sessions, limits)
    add_translation_secrets(app, auth, limits, _ttl_s)
    add_live_calls(
        app,
        calls,
        sidebands.live,
        lambda request: _authorised_call(auth, request),
        lambda request: _resumed_agent(request, resume, LIVE_CONTRACT),
        websocket_sessions is not None,
        limits,
    )

    @app.post(CALLS_PATH, status_code=201)
    @traced_offer("realtime", calls)
    async def create_call(request: Request) -> Response:
        if routing is not None and calls.not_ready_reason in SPILLED:
            spilled = await routing.spill(request)  # another worker of the pod has room
            if spilled is not None:
                return spilled
        granted = await _authorised_call(auth, request)
        admission = await limits.admit_connection(request, request.headers.get("authorization"))
        offer, asked = await read_offer(request, calls)
        requested = merged_session(granted, asked)
        if requested is not None:
            _session_update(requested)  # 400 naming the field, as a session.update would get
        try:
            with calls.reserve() as slot:  # before a resumed session is claimed
                agent, requested = await _call_agent(calls, request, resume, requested)
                with offer_step("voicerelay.answer"):
                    call, answer = await calls.create(slot, offer, requested, agent)
        except AdmissionError as exc:
            raise unavailable(exc) from None
        except OfferRejected as exc:
            raise ApiError(400, "offer_rejected", str(exc)) from None
        sidebands.call_began(call)
        metered(call.agent, limits.meter(admission.subject))
        headers = {"Location": f"{CALLS_PATH}/{call.call_id}", **admission.headers}
        resume_headers = getattr(call.agent, "resume_headers", None)
        if callable(resume_headers):
            headers.update(resume_headers())
        return Response(answer, 201, headers, media_type="application/sdp")

    async def hangup(call_id: str, request: Request) -> Response:
        await _authorised_call(auth, request)
        try:
            came = _hop_stage(sidebands.owners, call_id, request)
            asked = await _hang_up_at_its_worker(forwarder, sidebands, call_id, request, came)
            if asked is not None and asked[1].status_code != 404:
                return asked[1]  # ended there, refused there, or that worker does not answer
            if await sidebands.hang_up_here(call_id):
                return Response(status_code=204)
            owners = sidebands.owners
            return await _hang_up_at_owner(owners, forwarder, call_id, request, came, asked)
        except Refused as refused:  # a hop that does not verify, no owner, no directory
            return refused.response

    app.add_api_route(CALLS_PATH + "/{call_id}", hangup, methods=["DELETE"])
    app.add_api_route(CALLS_PATH + "/{call_id}/hangup", hangup, methods=["POST"])
    add_refusals(app, CALLS_PATH)  # SIP call control, by name
    _add_health(app, calls, registry, persistence, routing)
    records = None if persistence is None else persistence.records
    store = None if records is None else records.store
    add_call_records(app, lambda request: _authorise(auth.check_api_key, request), store)
    return app


def _closing(
    owned: OwnerForwarder | None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: at its end, the forwarder it made is closed."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owned is not None:
                await owned.aclose()

    return lifespan


def _hop_stage(owners: OwnerRouting, call_id: str, request: Request) -> str | None:
    """The stage of a hang-up forwarded by another transceiver (None: the client's own)."""
    headers = request.headers
    return owners.stage_of(hop_header_of(headers), HANGUP, call_id, headers.get("authorization"))


async def _hang_up_at_its_worker(
    forwarder: OwnerForwarder,
    sidebands: Sidebands,
    call_id: str,
    request: Request,
    came: str | None,
) -> tuple[Address, Response] | None:
    """A hang-up for a call another worker of the pod began, as that worker answers it when
    the call still runs there: one whose session was taken over lingers there to tell its
    client, and its client's late hang-up ends it alone, wherever it lands (the directory and
    this worker's calls lead to the session's new call). Only its 404 (the call gone) leads on;
    when it does not answer, 503 ``worker_unavailable`` naming it, and no call here is ended
    (the resumed call is not the one the id names while that call may linger). None: the id
    names no other worker of the pod, or the request may go no further."""
    hop = sidebands.owners.named_hop(HANGUP, call_id, request.headers.get("authorization"), came)
    if hop is None:
        return None
    answer = await forwarder.forward(request, hop.address, hop_headers(hop.header))
    return hop.address, answer or _worker_unavailable(hop, call_id)


async def _hang_up_at_owner(
    owners: OwnerRouting,
    forwarder: OwnerForwarder,
    call_id: str,
    request: Request,
    came: str | None,
    asked: tuple[Address, Response] | None = None,
) -> Response:
    """A hang-up for a call not running here, as its owner answers it (``owner_routing``: a
    worker of this pod or another transceiver); Refused (404) when no owner answers. An owner
    already ``asked`` (the worker the call id names, which answered 404) is not asked again:
    its answer stands."""
    hop = await owners.hop(HANGUP, call_id, request.headers.get("authorization"), came)
    if asked is not None and asked[0] == hop.address:
        return asked[1]
    answer = await forwarder.forward(request, hop.address, hop_headers(hop.header))
    if answer is None and hop.stage == WITHIN_POD:  # restarting: it answers again soon
        return _worker_unavailable(hop, call_id)
    if answer is None:
        raise not_found(HANGUP, call_id, "ran on a transceiver that does not answer")
    return answer


def _worker_unavailable(hop: Hop, call_id: str) -> Response:
    """503 for a hang-up whose worker of this pod does not answer (restarting, or stuck)."""
    worker = "the call's worker" if hop.worker is None else f"worker {hop.worker}"
    message = f"{worker} of this transceiver (call {call_id!r}) does not answer; try again"
    return error_response(503, "worker_unavailable", message, {"Retry-After": "1"})


async def _resumed_agent(
    request: Request, resume: Resume | None, contract: str
) -> CallAgent | None:
    """The resumed session's agent when the request names a session, else None. A session
    is resumed only through its own contract's endpoint (Realtime or GPT-Live): 409 otherwise."""
    session_id = request.query_params.get("session_id") or request.headers.get(SESSION_HEADER)
    if not session_id:
        return None
    if resume is None:
        raise ApiError(404, "resume_unavailable", "this transceiver does not resume sessions")
    try:
        with offer_step("voicerelay.resume", {"voicerelay.session_id": session_id}):
            return await resume(session_id, request.headers.get(RESUME_TOKEN_HEADER), contract)
    except ResumeRefused as exc:
        headers = {"WWW-Authenticate": "X-Voicerelay-Resume-Token"} if exc.status == 401 else None
        raise ApiError(exc.status, exc.code, exc.message, headers, "session_id") from None


def _add_health(
    app: FastAPI,
    calls: Calls,
    registry: CollectorRegistry,
    persistence: SessionPersistence | None,
    routing: WorkerRouting | None = None,
) -> None:
    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        if routing is not None and not routing.is_hop(request):
            return await routing.ask_pod(request)  # the pod's readiness: any worker's room
        reason = calls.not_ready_reason
        if reason is None and persistence is not None:
            reason = persistence.not_ready_reason()
        if reason is not None:
            message = calls.not_ready_message or f"transceiver is {reason}"
            return error_response(503, reason, message)
        body: dict[str, Any] = {"status": "ready", "sessions": len(calls)}
        if persistence is not None:
            body["redis"] = persistence.status()
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if routing is not None and not routing.is_hop(request):
            return await routing.ask_pod(request)  # every worker's, folded
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def capacity_collector(
    calls: Calls, meter: CpuMeter | None = None, overloaded: Callable[[], bool] | None = None
) -> CapacityCollector:
    """The calls' capacity, draining, measured CPU and load (``python -m transceiver``
    registers it with the process's meter and the pipeline pool's saturation)."""
    readings = CapacityReadings(
        lambda: len(calls),
        lambda: calls.capacity,
        lambda: calls.draining,
        meter,
        overloaded or (lambda: False),
    )
    return CapacityCollector(readings)


_capacity_collector = capacity_collector  # its older name


def _add_cors(app: FastAPI) -> None:
    """Browsers on other origins may call us: credentials are bearer keys, never cookies."""
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["*"],
        expose_headers=["Location", SESSION_HEADER, RESUME_TOKEN_HEADER, *EXPOSED_HEADERS],
    )


def _add_web_client(app: FastAPI) -> None:
    """The web client: ``/`` is its page, ``/static/...`` its scripts and styles."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _add_client_secrets(
    app: FastAPI, auth: Authenticator, limits: RateLimiting, describe: SessionDescriber
) -> None:
    """``POST /v1/realtime/client_secrets``: the secret, and the session it starts as the
    agents report it (the deployment's defaults under the request's fields)."""

    @app.post(SECRETS_PATH)
    async def create_client_secret(request: Request) -> JSONResponse:
        _authorise(auth.check_api_key, request)
        authorization = request.headers.get("authorization")
        admission = await limits.admit_connection(request, authorization, session=False)
        ttl_s, session = secret_request(await _json_body(request))
        try:
            secret = await auth.mint(ttl_s, session)  # a large session kept in Redis
        except client_secrets.ClientSecretError as exc:
            raise ApiError(400, exc.reason, str(exc)) from None
        except AuthError as exc:  # the session store is unreachable
            raise ApiError(exc.status, exc.code, exc.message) from None
        try:
            reported = describe(session)
        except EventError as exc:
            raise ApiError(400, exc.code, exc.message, None, exc.param) from None
        body = {"value": secret.value, "expires_at": secret.expires_at}
        return JSONResponse({**body, "session": reported}, 200, admission.headers)


def _requested_only(session: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The session a request asks for over the session defaults (a transceiver whose calls run
    the echo agent has no Realtime session of its own to report)."""
    effective = _session_update(session or {}).apply(SessionConfig(id=new_id("sess")))
    return transcription_json(effective) if is_transcription(session) else effective.to_json()


def _authorise(check: Callable[[str | None], T], request: Request) -> T:
    try:
        return check(request.headers.get("authorization"))
    except AuthError as exc:
        raise _refused(exc) from None


async def _authorised_call(auth: Authenticator, request: Request) -> Mapping[str, Any] | None:
    """The session config of the call's ``ek_`` secret (None: none); ApiError when refused."""
    try:
        return await auth.check_call(request.headers.get("authorization"))
    except AuthError as exc:
        raise _refused(exc) from None


def _refused(exc: AuthError) -> ApiError:
    headers = {"WWW-Authenticate": 'Bearer realm="voicerelay"'} if exc.status == 401 else {}
    return ApiError(exc.status, exc.code, exc.message, headers)


async def _json_body(request: Request) -> Mapping[str, Any]:
    """The request's JSON object; an empty body is ``{}`` (every field is optional)."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_SECRET_REQUEST_BYTES:
            raise ApiError(413, "body_too_large", f"body exceeds {MAX_SECRET_REQUEST_BYTES} bytes")
    if not raw.strip():
        return {}
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in ("", "application/json"):
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    return json_object(bytes(raw), "invalid_json", "body")


def secret_request(body: Mapping[str, Any]) -> tuple[int, Mapping[str, Any] | None]:
    """``(ttl_s, session)`` of a client_secrets body, as OpenAI's GA API shapes it."""
    unknown = sorted(set(body) - {"expires_after", "session"})
    if unknown:
        raise ApiError(
            400, "unknown_parameter", f"unknown parameter {unknown[0]!r}", None, unknown[0]
        )
    session = body.get("session")
    if session is not None:
        if not isinstance(session, dict):
            raise ApiError(400, "invalid_type", "session must be an object", None, "session")
        _session_update(session)
    return _ttl_s(body.get("expires_after")), session


def _ttl_s(expires_after: Any) -> int:
    if expires_after is None:
        return client_secrets.DEFAULT_TTL_S
    param = "expires_after"
    if not isinstance(expires_after, dict):
        raise ApiError(400, "invalid_type", "expires_after must be an object", None, param)
    anchor = expires_after.get("anchor", "created_at")
    if anchor != "created_at":
        raise ApiError(400, "invalid_value", "anchor must be 'created_at'", None, param + ".anchor")
    seconds = expires_after.get("seconds", client_secrets.DEFAULT_TTL_S)
    low, high = client_secrets.MIN_TTL_S, client_secrets.MAX_TTL_S
    if type(seconds) is not int or not low <= seconds <= high:
        message = f"seconds must be an integer in {low}..{high}, not {seconds!r}"
        raise ApiError(400, "invalid_value", message, None, param + ".seconds")
    return seconds


def _session_update(session: Mapping[str, Any]) -> SessionUpdate:
    """A session config validated exactly as a data-channel ``session.update`` is."""
    kind = session.get("type", "realtime")
    if kind not in ("realtime", TRANSCRIPTION):
        message = f"session.type must be 'realtime' or 'transcription', not {kind!r}"
        raise ApiError(400, "invalid_value", message, None, "session.type")
    try:
        if kind == TRANSCRIPTION:  # read as the Realtime fields it sets
            session = as_realtime(session)
        update = parse_client_event(json.dumps({"type": "session.update", "session": session}))
    except EventError as exc:
        raise ApiError(400, exc.code, exc.message, None, exc.param) from None
    assert isinstance(update, SessionUpdate)
    return update


async def _call_agent(
    calls: Calls, request: Request, resume: Resume | None, requested: Mapping[str, Any] | None
) -> tuple[CallAgent | None, Mapping[str, Any] | None]:
    """A call's agent unless it is a new Realtime session (None), and the config left for one.
    A resumed session is asked for in the contract the request speaks: a transcription's (its
    ``ek_`` secret's or its own ``session.type``), else Realtime's; the other is 409."""
    transcription = is_transcription(requested)
    agent = await _resumed_agent(request, resume, TRANSCRIPTION if transcription else REALTIME)
    if agent is not None and transcription:
        return _transcribing(agent), None  # its stored config, not the request's
    if agent is None and is_transcription(requested):
        return await _transcription_agent(calls, requested), None
    return agent, requested


def _transcribing(agent: CallAgent) -> CallAgent:
    """A resumed transcription session's agent, speaking transcription again."""
    assert isinstance(agent, RealtimeSession), agent  # only the pipeline's sessions are stored
    transcribing(agent)
    return agent


async def _transcription_agent(calls: Calls, requested: Mapping[str, Any]) -> CallAgent:
    """A new call's agent speaking as a transcription session (ApiError when it cannot)."""
    try:
        fields = as_realtime(requested)
    except EventError as exc:
        raise ApiError(400, exc.code, exc.message, None, exc.param) from None
    agent = calls.new_agent(fields)
    if not isinstance(agent, RealtimeSession):
        await agent.aclose()
        message = "this transceiver runs no transcription sessions (it runs the echo agent)"
        raise ApiError(404, "transcription_unavailable", message)
    transcribing(agent)
    return agent


def merged_session(
    granted: Mapping[str, Any] | None, asked: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """The session config of a call: the ek_ secret's, then the call's own fields over it."""
    if granted is None or asked is None:
        return asked if granted is None else granted
    return {**granted, **asked}
