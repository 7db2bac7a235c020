"""Redis configuration for the session store and the route cache: one frozen dataclass.

Policy layer (pure: no sockets, no redis import). Loaded from ``REDIS_*`` variables, or the
flags that mirror them (``--redis-url`` <-> ``REDIS_URL``, see ``redis_flags``; a flag wins);
every value is validated with a message naming the variable. Either ``REDIS_URL`` (a plain
server) or ``REDIS_SENTINELS`` + ``REDIS_SENTINEL_SERVICE`` (Sentinel-managed primary); neither
means the deployment runs without Redis (``RedisConfig.from_env`` returns ``None``).

Why it lives in the wire contract: relays and transceivers share one Redis, the route cache
(``route_record``) that transceivers write and relays read, so where that Redis is, its key
prefix and how long to wait for it must be said one way to both; the relay may import nothing
of ours outside ``relay/``. The relay reads what it needs of it (URL or Sentinel, prefix,
timeouts) with shorter timeout defaults of its own (``relay.config``); the TTLs and ``WAIT``
are the transceiver's.

| variable | default | meaning |
| --- | --- | --- |
| REDIS_URL | | ``redis://[:password@]host:port/db`` |
| REDIS_SENTINELS | | ``host:port,host:port,...`` (host names allowed) |
| REDIS_SENTINEL_SERVICE | | the monitored service name (``sentinel monitor NAME ...``) |
| REDIS_PASSWORD | | password of the Sentinel-managed primary (URL mode: put it in the URL) |
| REDIS_KEY_PREFIX | voicerelay | namespace of every key; no ``{``, ``}`` or ``:`` |
| REDIS_SESSION_TTL_S | 3600 | a session's keys expire after this long without activity |
| REDIS_MAX_ITEMS | 500 | conversation items kept per session; the oldest are trimmed |
| REDIS_WAIT_REPLICAS | 0 | writes wait for this many replica acknowledgements (WAIT) |
| REDIS_WAIT_TIMEOUT_MS | 200 | how long WAIT may block before the write is reported unreplicated |
| REDIS_CONNECT_TIMEOUT_S | 0.5 | TCP connect timeout: a down server fails fast |
| REDIS_SOCKET_TIMEOUT_S | 1.0 | reply timeout (WAIT's own timeout is added to it) |
| REDIS_ROUTE_TTL_S | 60 | route cache entries expire after this long unless refreshed |
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

N = TypeVar("N", int, float)
HostPort = tuple[str, int]
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_DEFAULTS: dict[str, str] = {
    "REDIS_KEY_PREFIX": "voicerelay",
    "REDIS_SESSION_TTL_S": "3600",
    "REDIS_MAX_ITEMS": "500",
    "REDIS_WAIT_REPLICAS": "0",
    "REDIS_WAIT_TIMEOUT_MS": "200",
    "REDIS_CONNECT_TIMEOUT_S": "0.5",
    "REDIS_SOCKET_TIMEOUT_S": "1.0",
    "REDIS_ROUTE_TTL_S": "60",
}


class RedisConfigError(ValueError):
    """A ``REDIS_*`` setting that does not validate; the message names the variable."""


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None
    sentinels: tuple[HostPort, ...] = ()
    sentinel_service: str | None = None
    password: str | None = None
    key_prefix: str = "voicerelay"
    session_ttl_s: float = 3600.0
    max_items: int = 500
    wait_replicas: int = 0
    wait_timeout_ms: int = 200
    connect_timeout_s: float = 0.5
    socket_timeout_s: float = 1.0
    route_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        if (self.url is None) == (not self.sentinels):
            raise RedisConfigError("set exactly one of REDIS_URL and REDIS_SENTINELS")
        if self.sentinels and not self.sentinel_service:
            raise RedisConfigError("REDIS_SENTINELS needs REDIS_SENTINEL_SERVICE")
        if not _PREFIX_RE.fullmatch(self.key_prefix):
            raise RedisConfigError(
                f"REDIS_KEY_PREFIX={self.key_prefix!r}: use 1-64 of A-Z a-z 0-9 _ . -"
            )
        if self.wait_replicas > 0 and self.wait_timeout_ms < 1:
            # WAIT with timeout 0 blocks forever: never what a voice session wants.
            raise RedisConfigError("REDIS_WAIT_TIMEOUT_MS must be at least 1 with replicas")

    @property
    def reply_timeout_s(self) -> float:
        """Socket read timeout: a WAIT may legitimately block for its own timeout first."""
        return self.socket_timeout_s + self.wait_timeout_ms / 1000

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, defaults: Mapping[str, str] | None = None
    ) -> RedisConfig | None:
        """The configuration, or ``None`` when neither REDIS_URL nor REDIS_SENTINELS is set.
        ``defaults``: a component's own defaults for some variables (the relay's timeouts)."""
        env = {**_DEFAULTS, **(defaults or {}), **(os.environ if environ is None else environ)}
        url, sentinels = env.get("REDIS_URL", "").strip(), env.get("REDIS_SENTINELS", "").strip()
        if not url and not sentinels:
            return None
        return cls(
            url=url or None,
            sentinels=parse_sentinels(sentinels) if sentinels else (),
            sentinel_service=env.get("REDIS_SENTINEL_SERVICE", "").strip() or None,
            password=env.get("REDIS_PASSWORD") or None,
            key_prefix=env["REDIS_KEY_PREFIX"].strip(),
            session_ttl_s=_number(env, "REDIS_SESSION_TTL_S", float, 1.0),
            max_items=_number(env, "REDIS_MAX_ITEMS", int, 1),
            wait_replicas=_number(env, "REDIS_WAIT_REPLICAS", int, 0),
            wait_timeout_ms=_number(env, "REDIS_WAIT_TIMEOUT_MS", int, 0),
            connect_timeout_s=_number(env, "REDIS_CONNECT_TIMEOUT_S", float, 0.01),
            socket_timeout_s=_number(env, "REDIS_SOCKET_TIMEOUT_S", float, 0.01),
            route_ttl_s=_number(env, "REDIS_ROUTE_TTL_S", float, 1.0),
        )


# Variables a flag mirrors, with what they mean (the table above has the defaults).
_FLAGS: dict[str, str] = {
    "REDIS_URL": "redis://[:password@]host:port/db of a plain server",
    "REDIS_SENTINELS": "host:port,... of the Sentinels (instead of REDIS_URL)",
    "REDIS_SENTINEL_SERVICE": "the Sentinel-monitored service name",
    "REDIS_PASSWORD": "password of the Sentinel-managed primary",
    "REDIS_KEY_PREFIX": "namespace of every key",
    "REDIS_SESSION_TTL_S": "a session's keys expire after this long idle",
    "REDIS_MAX_ITEMS": "conversation items kept per session",
    "REDIS_WAIT_REPLICAS": "writes wait for this many replica acknowledgements",
    "REDIS_WAIT_TIMEOUT_MS": "how long WAIT may block",
    "REDIS_CONNECT_TIMEOUT_S": "TCP connect timeout",
    "REDIS_SOCKET_TIMEOUT_S": "reply timeout",
    "REDIS_ROUTE_TTL_S": "route cache entries expire after this long unless refreshed",
}


def redis_flags(names: tuple[str, ...] = tuple(_FLAGS)) -> argparse.ArgumentParser:
    """A parent parser of ``--redis-*`` flags mirroring the ``names`` variables."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("Redis (flags mirror REDIS_* variables)")
    for name in names:
        flag = "--" + name.lower().replace("_", "-")
        group.add_argument(flag, dest=name, help=f"{_FLAGS[name]} [{name}]")
    return parser


def with_flags(flags: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables with every flag that was given laid over them."""
    given = {k: v for k, v in vars(flags).items() if k in _FLAGS and v is not None}
    return {**environ, **given}


def parse_sentinels(text: str) -> tuple[HostPort, ...]:
    """``host:port,host:port``; ``[v6]:port`` for IPv6 literals."""
    result = []
    for part in (p.strip() for p in text.split(",")):
        host, sep, port = part.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise RedisConfigError(f"REDIS_SENTINELS: {part!r} is not host:port")
        result.append((host, int(port)))
    return tuple(result)


def _number(env: Mapping[str, str], name: str, kind: type[N], minimum: N) -> N:
    return parse_number(env[name].strip(), name, kind, minimum, RedisConfigError)


def parse_number(text: str, name: str, kind: type[N], minimum: N, error: type[ValueError]) -> N:
    """``text`` as a ``kind`` of at least ``minimum``, or ``error`` naming the variable ``name``.

    The transceiver's own settings (``transceiver.config``) are read with it too: one message
    shape for every number a transceiver is configured with."""
    try:
        value = kind(text)
    except ValueError:
        raise error(f"{name}={text!r} is not a {kind.__name__}") from None
    if value < minimum:
        raise error(f"{name}={text} is below {minimum}")
    return value
