"""Rate limits shared by every transceiver: token buckets in Redis.

A limit of ``limit`` per ``window_s`` is a bucket holding at most ``limit`` units that refills
continuously at ``limit / window_s`` units a second; a request takes its cost from it, or is
refused while the bucket holds less. A token bucket rather than a fixed window: it has no
burst of twice the limit at a window's edge, and its state is what OpenAI's headers report
(``x-ratelimit-reset-*`` is the time until the bucket is full again, ``retry-after`` the time
until the cost is there), so the answers need no approximation. A sliding-window log would be
exact too but stores one entry per request; the bucket is two numbers.

Each bucket is one hash in Redis (``level`` at ``at_ms``), updated by one Lua script
(``scripts.TAKE_BUCKETS``) on Redis's clock (``TIME``), so transceivers with skewed clocks
still share one bucket exactly. Several buckets are taken together or not at all (a refused
offer costs neither its key nor its address anything). Tokens are spent after a response,
when its usage is known: the bucket may go below zero, and ``response.create`` is refused
until it refills above zero.

Protocol and policy layer (pure): the limits as data (``RateLimitPolicy``, loaded by
``transceiver.config``), the arithmetic (``refilled``, ``taken``), which the script mirrors, and
the keys. ``rate_limit_store.RedisRateLimits`` runs the script.

Keys (one hash slot, ``{ratelimit}``, for the multi-key script under Redis Cluster):
``P:ratelimit:{ratelimit}:<limit name>:<subject>``.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Any, Protocol

LIMIT_NAMES = ("requests", "sessions", "tokens")


@dataclass(frozen=True)
class RateLimit:
    """``limit`` units per ``window_s``; a limit of 0 is off."""

    name: str  # requests (per key), sessions (per client address), tokens (per key)
    limit: int
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.name not in LIMIT_NAMES:
            raise ValueError(f"rate limit name {self.name!r} is not one of {LIMIT_NAMES}")
        if self.limit < 0 or self.window_s <= 0:
            raise ValueError(f"rate limit {self.name}: needs limit >= 0, window > 0: {self}")

    @property
    def window_ms(self) -> int:
        return max(1, round(self.window_s * 1000))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class RateLimitPolicy:
    """The limits as settings (``TRANSCEIVER_RATE_LIMIT_*``): per API key, requests (offers,
    client secrets, WebSocket handshakes) and tokens (responses); per client address, sessions
    (offers and handshakes). ``trusted_proxies``: peers whose ``X-Forwarded-For`` names the
    client (nobody else's is believed)."""

    requests_per_window: int = 0
    sessions_per_window: int = 0
    tokens_per_window: int = 0
    window_s: float = 60.0
    trusted_proxies: tuple[Network, ...] = ()

    @property
    def requests(self) -> RateLimit:
        return RateLimit("requests", self.requests_per_window, self.window_s)

    @property
    def sessions(self) -> RateLimit:
        return RateLimit("sessions", self.sessions_per_window, self.window_s)

    @property
    def tokens(self) -> RateLimit:
        return RateLimit("tokens", self.tokens_per_window, self.window_s)

    @property
    def enabled(self) -> bool:
        return any(limit.limit > 0 for limit in (self.requests, self.sessions, self.tokens))


@dataclass(frozen=True)
class BucketState:
    """One bucket after a take or a spend, as the client is told it."""

    limit: RateLimit
    allowed: bool
    remaining: int  # whole units left (0 when in debt)
    reset_ms: int  # until the bucket is full again
    retry_after_ms: int  # until the cost asked for is there (0 when allowed)


class RateMeter(Protocol):
    """What a session asks of its API key's limits (``transceiver.http.rate_limiting``)."""

    def refusal(self) -> str | None:
        """Why a response may not start now, or None."""
        ...

    async def spent(self, tokens: int) -> list[dict[str, Any]]:
        """Record a response's tokens: the ``rate_limits.updated`` list ([]: nothing to say)."""
        ...


def refilled(level: float, elapsed_ms: float, limit: int, window_ms: int) -> float:
    """The bucket's level ``elapsed_ms`` after it held ``level``: refilled, at most full."""
    return min(float(limit), level + max(0.0, elapsed_ms) * limit / window_ms)


def taken(level: float, cost: int, limit: RateLimit, spend: bool = False) -> BucketState:
    """The bucket at ``level`` (already refilled) after asking for ``cost``: taken when there
    is enough, or always when ``spend`` (tokens used, which may leave it below zero)."""
    allowed = spend or level >= cost
    after = level - cost if allowed else level
    window_ms = limit.window_ms
    retry_ms = 0 if allowed else math.ceil((cost - level) * window_ms / limit.limit)
    reset_ms = math.ceil((limit.limit - after) * window_ms / limit.limit)
    return BucketState(limit, allowed, max(0, math.floor(after)), reset_ms, retry_ms)


def bucket_key(prefix: str, name: str, subject: str) -> str:
    if not subject or any(c.isspace() for c in subject):
        raise ValueError(f"rate limit subject {subject!r} is empty or has whitespace")
    return f"{prefix}:ratelimit:{{ratelimit}}:{name}:{subject}"
