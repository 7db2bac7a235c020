"""Rate limits at the HTTP face: OpenAI-shaped ``429`` answers and each session's token meter.

I/O layer. The limits (``transceiver.store.rate_limits.RateLimitPolicy``) are shared by every
transceiver through Redis (``rate_limit_store``). ``RateLimiting.admit`` is called by each
request that costs something, after its auth:

- offers (``POST /v1/realtime/calls``, ``POST /v1/live/sessions``) and WebSocket handshakes
  (``/v1/realtime``, ``/v1/live/sessions``): a request of the API key, a session of the client
  address, taken together or not at all;
- client secret minting: a request of the API key.

A refusal is ``RateLimited``: a ``429`` with OpenAI's body (``{"error": {"message", "type":
"requests"|"tokens", "code": "rate_limit_exceeded", "param": null}}``; a client address's
sessions are reported as ``requests``) and headers (``retry-after``, ``retry-after-ms``,
``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*``, ``x-ratelimit-reset-*`` in OpenAI's
duration format, ``6m0s``/``1.5s``/``12ms``); a WebSocket gets it before the upgrade. Admitted
requests carry the same ``x-ratelimit-*`` headers. Inside a session, ``TokenMeter`` (one per
session, for its API key) refuses every response while the key's tokens are spent (a
``response.create``'s, a server-VAD turn's, an out-of-band one's: OpenAI's ``response.done``
``failed``, ``status_details.error`` ``{"type": "tokens", "code": "rate_limit_exceeded"}``, the
model never asked) and turns each response's usage into the ``rate_limits.updated`` event's
list.

Redis down: fail open. A voice call refused because the limiter's store is away would be an
outage of the service for a protection against abuse; the limits are about fairness and cost,
which a short outage does not endanger. Each request let through that way is counted
(``transceiver_rate_limit_unavailable_total``) and the first of a run is logged as a warning.

The client address is the TCP peer (uvicorn's proxy-header rewriting is off), or, only when
that peer is in ``trusted_proxies``, the nearest untrusted address of ``X-Forwarded-For``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import HTTPConnection

from transceiver.http import client_secrets
from transceiver.realtime.session import RealtimeSession
from transceiver.store.errors import StoreError
from transceiver.store.rate_limit_store import RedisRateLimits
from transceiver.store.rate_limits import (
    BucketState,
    Network,
    RateLimit,
    RateLimitPolicy,
    refilled,
)

logger = logging.getLogger(__name__)
ANONYMOUS = "anonymous"
EXPOSED_HEADERS = ("retry-after", "retry-after-ms") + tuple(
    f"x-ratelimit-{part}-{name}"
    for part in ("limit", "remaining", "reset")
    for name in ("requests", "sessions", "tokens")
)  # to browsers on other origins (CORS)


class RateLimited(Exception):
    """A request over a limit; ``response()`` is the ``429`` OpenAI would send."""

    def __init__(self, states: Sequence[BucketState]) -> None:
        refused = next(s for s in states if not s.allowed)
        super().__init__(_message(refused))
        self.refused = refused
        self.states = tuple(states)

    def response(self) -> JSONResponse:
        kind = "tokens" if self.refused.limit.name == "tokens" else "requests"
        error = {"message": str(self), "type": kind, "code": "rate_limit_exceeded", "param": None}
        return JSONResponse({"error": error}, 429, refusal_headers(self.states))


def _message(state: BucketState) -> str:
    limit = state.limit
    per = f"{limit.name} per {duration(limit.window_ms)}"
    return (
        f"Rate limit reached on {per}: limit {limit.limit}. "
        f"Please try again in {duration(state.retry_after_ms)}."
    )


def duration(ms: int) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format: ``12ms``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms_left = divmod(ms, 60_000)
    seconds = f"{ms_left / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def limit_headers(states: Sequence[BucketState]) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{name}`` for each bucket asked."""
    headers: dict[str, str] = {}
    for state in states:
        name = state.limit.name
        headers[f"x-ratelimit-limit-{name}"] = str(state.limit.limit)
        headers[f"x-ratelimit-remaining-{name}"] = str(state.remaining)
        headers[f"x-ratelimit-reset-{name}"] = duration(state.reset_ms)
    return headers


def refusal_headers(states: Sequence[BucketState]) -> dict[str, str]:
    wait_ms = max(s.retry_after_ms for s in states)
    retry = {"retry-after": str(max(1, -(-wait_ms // 1000))), "retry-after-ms": str(wait_ms)}
    return {**limit_headers(states), **retry}


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the nearest
    address of ``X-Forwarded-For`` (read from the right) that is not a trusted proxy."""
    if peer is None:
        return "unknown"
    if not forwarded_for or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",")]
    for hop in reversed(hops):
        if not _is_address(hop):
            return peer  # a hop we cannot read: believe nothing past it
        if not _trusted(hop, trusted):
            return hop
    return hops[0]


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def key_subject(token: str | None, api_key: str | None) -> str:
    """Whose requests these are: an ``ek_`` secret counts as the API key that minted it (the
    server has one); another bearer is its hash; no bearer is ``anonymous`` (auth off)."""
    if token is not None and token.startswith(client_secrets.PREFIX):
        token = api_key
    if not token:
        return ANONYMOUS
    return "key-" + hashlib.sha256(token.encode()).hexdigest()[:24]


def metered(agent: object, meter: TokenMeter | None) -> None:
    """Give a call's Realtime session (not the echo agent) its key's meter."""
    if meter is not None and isinstance(agent, RealtimeSession):
        agent.rate_meter = meter


@dataclass(frozen=True)
class Admission:
    subject: str  # whose key: the session's token meter counts for it
    headers: dict[str, str]  # x-ratelimit-* of the buckets taken from


def add_rate_limit_errors(app: FastAPI) -> None:
    """A ``RateLimited`` raised by a route is its 429."""

    @app.exception_handler(RateLimited)
    async def rate_limited(_: Request, exc: RateLimited) -> JSONResponse:
        return exc.response()


class RateLimitCollector(Collector):
    def __init__(self, limiting: RateLimiting) -> None:
        self._limiting = limiting

    def collect(self) -> Iterator[Metric]:
        refusals = CounterMetricFamily(
            "transceiver_rate_limit_refusals",
            "Requests and responses refused by a rate limit (429 or error event), by limit",
            labels=["limit"],
        )
        for name, count in sorted(self._limiting.refusals.items()):
            refusals.add_metric([name], count)
        yield refusals
        yield CounterMetricFamily(
            "transceiver_rate_limit_unavailable",
            "Rate-limit checks let through because Redis was unreachable (failing open)",
            value=self._limiting.unavailable,
        )


class RateLimiting:
    """The limits of one transceiver process: ``admit`` requests, ``meter`` sessions."""

    def __init__(
        self, policy: RateLimitPolicy, store: RedisRateLimits | None, api_key: str | None = None
    ) -> None:
        self.policy = policy
        self._store = store
        self._api_key = api_key  # whose requests an ek_ secret's are
        self.refusals: dict[str, int] = {}
        self.unavailable = 0
        self._failing = False
        if policy.enabled and store is None:
            logger.warning("rate limits are set but Redis is not: they are not enforced")

    async def admit_connection(
        self, connection: HTTPConnection, authorization: str | None, *, session: bool = True
    ) -> Admission:
        """``admit`` for a request or a WebSocket handshake bearing ``authorization``."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else None
        subject = key_subject(bearer, self._api_key)
        peer = None if connection.client is None else connection.client.host
        forwarded = connection.headers.get("x-forwarded-for")
        address = client_address(peer, forwarded, self.policy.trusted_proxies)
        return Admission(subject, await self.admit(subject, address, session=session))

    async def admit(
        self, subject: str, address: str | None = None, *, session: bool = True
    ) -> dict[str, str]:
        """Take a request of ``subject`` (and, for a ``session``, one of ``address``): the
        ``x-ratelimit-*`` headers, or ``RateLimited``."""
        asks: list[tuple[RateLimit, str]] = []
        if self.policy.requests.limit > 0:
            asks.append((self.policy.requests, subject))
        if session and address is not None and self.policy.sessions.limit > 0:
            asks.append((self.policy.sessions, address))
        states = await self._take(asks)
        refused = [s for s in states if not s.allowed]
        if refused:
            self.refused(refused[0].limit.name)
            raise RateLimited(states)
        return limit_headers(states)

    def refused(self, name: str) -> None:
        self.refusals[name] = self.refusals.get(name, 0) + 1

    async def _take(self, asks: Sequence[tuple[RateLimit, str]]) -> list[BucketState]:
        if not asks or self._store is None:
            return []
        try:
            states = await self._store.take(asks)
        except StoreError as exc:
            self.failed_open(exc)
            return []
        self._failing = False
        return states

    def failed_open(self, exc: Exception) -> None:
        self.unavailable += 1
        if not self._failing:
            logger.warning("rate limits not enforced while Redis is unreachable: %s", exc)
        self._failing = True

    def meter(self, subject: str) -> TokenMeter | None:
        """The meter of a session of ``subject``; None when no per-key limit is on."""
        policy = self.policy
        if self._store is None or (policy.tokens.limit <= 0 and policy.requests.limit <= 0):
            return None
        return TokenMeter(self, self._store, subject)


class TokenMeter:
    """One session's view of its key's buckets: the token level Redis last reported, refilled
    on this process's clock between reports (``response.create`` is checked without a round
    trip; the next report corrects it from the shared bucket)."""

    def __init__(self, limiting: RateLimiting, store: RedisRateLimits, subject: str) -> None:
        self._limiting = limiting
        self._store = store
        self._subject = subject
        self._tokens = limiting.policy.tokens
        self._level: float = self._tokens.limit
        self._at_s = time.monotonic()

    def refusal(self) -> str | None:
        """Why a response may not start now (the key's tokens are spent), or None."""
        limit = self._tokens
        if limit.limit <= 0:
            return None
        elapsed_ms = (time.monotonic() - self._at_s) * 1000
        level = refilled(self._level, elapsed_ms, limit.limit, limit.window_ms)
        if level > 0:
            return None
        self._limiting.refused("tokens")
        wait_ms = math.ceil((1 - level) * limit.window_ms / limit.limit)
        return (
            f"Rate limit reached on tokens per {duration(limit.window_ms)}: limit "
            f"{limit.limit}. Please try again in {duration(wait_ms)}."
        )

    async def spent(self, tokens: int) -> list[dict[str, Any]]:
        """Record a response's tokens; the ``rate_limits.updated`` list ([] if Redis is away):
        the key's requests (read) and tokens (after this spend), those that are limited."""
        policy = self._limiting.policy
        uses = [(policy.requests, self._subject, 0), (self._tokens, self._subject, max(0, tokens))]
        uses = [use for use in uses if use[0].limit > 0]
        try:
            states = await self._store.spend(uses)
        except StoreError as exc:
            self._limiting.failed_open(exc)
            return []
        for state in states:
            if state.limit.name == "tokens":
                self._level = state.limit.limit * (1 - state.reset_ms / state.limit.window_ms)
                self._at_s = time.monotonic()
        return [_rate_limit(state) for state in states]


def _rate_limit(state: BucketState) -> dict[str, Any]:
    """One entry of ``rate_limits.updated`` (``openai.types.realtime.RateLimit``)."""
    return {
        "name": state.limit.name,
        "limit": state.limit.limit,
        "remaining": state.remaining,
        "reset_seconds": round(state.reset_ms / 1000, 3),
    }
