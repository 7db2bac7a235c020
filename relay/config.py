"""The relay's configuration: one frozen dataclass from ``RELAY_*`` variables or CLI flags.

Policy layer. Every flag mirrors a variable (``--route-idle-s`` <-> ``RELAY_ROUTE_IDLE_S``);
a flag wins over the variable, the variable over the default. Bad values raise ConfigError
naming the variable and what was expected.

The route cache's Redis is the exception: it is read from the ``REDIS_*`` variables (and
``--redis-*`` flags) the transceivers read, through ``relay.wire.redis_config``, the one shape
both components share (URL or Sentinel). Its number parser (``_number``) keeps the relay's own
message shape (``RELAY_X: 'v' is not a number``).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from relay.timing import RelayTiming, RestartPauses
from relay.wire.redis_config import RedisConfig, RedisConfigError, redis_flags, with_flags
from relay.wire.ufrag import Keyring

Address = tuple[str, int]

_TIMING = RelayTiming()
_PAUSES = RestartPauses()


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class RelayConfig:
    public: tuple[Address, ...]
    internal_host: str
    internal_port: int
    workers: int
    # As configured: IP literals (normalised) and DNS names, looked up by each worker at run time
    # (relay.discovery, relay.transceivers); never resolved here.
    transceivers: tuple[Address, ...]
    keys: Keyring
    http: Address
    route_idle_s: float
    stun_rate: float
    hello: bool = True
    redis: RedisConfig | None = None  # the route cache; None: routes from STUN/HELLO only
    timing: RelayTiming = field(default_factory=RelayTiming)

    @property
    def stun_burst(self) -> float:
        return 2 * self.stun_rate


# variable suffix -> (default, help); None means required.
_FIELDS: dict[str, tuple[str | None, str]] = {
    "PUBLIC": ("0.0.0.0:3478", "comma list of public UDP addresses, e.g. 0.0.0.0:3478,[::]:3478"),
    "INTERNAL_HOST": ("127.0.0.1", "host the workers' link sockets bind"),
    "INTERNAL_PORT": ("0", "base link port: worker i binds base+i (0 = ephemeral)"),
    "WORKERS": (str(os.cpu_count() or 1), "worker processes"),
    "TRANSCEIVERS": (
        None,
        "comma list of transceiver link addresses host:port; a host may be a DNS name (a "
        "headless Service: one address per pod), looked up again every TRANSCEIVERS_REFRESH_S",
    ),
    "KEYS": (None, 'keyring "ID:HEX[,ID:HEX]" (32+ random bytes each), first = current'),
    "HTTP": ("127.0.0.1:9100", "host:port serving /metrics /livez /readyz"),
    "ROUTE_IDLE_S": ("30", "seconds before an idle route is forgotten"),
    "STUN_RATE": ("20", "unauthenticated STUN per source per second (burst 2x)"),
    "HELLO": (
        "on",
        "ask the transceivers for their routes while a worker is new: on/off (the keyed HELLO "
        "that admits this relay's link sockets is sent either way)",
    ),
    # Timings (relay.timing.RelayTiming); the defaults are the dataclass's own.
    "HELLO_INTERVAL_S": (str(_TIMING.hello_interval_s), "seconds between HELLOs to transceivers"),
    "ROUTES_REQUEST_S": (
        str(_TIMING.routes_request_s),
        "seconds after a worker starts during which every HELLO asks for ROUTES",
    ),
    "PUBLISH_INTERVAL_S": (str(_TIMING.publish_interval_s), "seconds between counter copies"),
    "EXPIRY_INTERVAL_S": (str(_TIMING.expiry_interval_s), "seconds between idle-route sweeps"),
    "CLOCK_INTERVAL_S": (str(_TIMING.clock_interval_s), "worker ticker period (route clock)"),
    "LOOKUP_RETRY_S": (str(_TIMING.lookup_retry_s), "one route-cache lookup per source per this"),
    "READY_TIMEOUT_S": (str(_TIMING.ready_timeout_s), "workers must be ready within this"),
    "STOP_TIMEOUT_S": (str(_TIMING.stop_timeout_s), "at exit, SIGKILL workers after this"),
    "WATCH_INTERVAL_S": (str(_TIMING.watch_interval_s), "poll of workers starting, stopping"),
    "RESPAWN_PAUSE_S": (str(_TIMING.respawn_pause_s), "poll of dead workers to replace"),
    "TRANSCEIVERS_REFRESH_S": (
        str(_TIMING.transceivers_refresh_s),
        "seconds between lookups of the RELAY_TRANSCEIVERS names",
    ),
    "TRANSCEIVERS_GRACE_S": (
        str(_TIMING.transceivers_grace_s),
        "seconds an address no lookup names any more stays a transceiver (and longer while a "
        "route points to it)",
    ),
    "RESTART_FIRST_S": (str(_PAUSES.first_s), "first pause before a crashed task restarts"),
    "RESTART_MAX_S": (str(_PAUSES.max_s), "longest pause before a crashed task restarts"),
    "RESTART_HEALTHY_AFTER_S": (str(_PAUSES.healthy_after_s), "a run this long resets it"),
}
_SWITCH = {"on": True, "off": False}
# The route cache, asked about unknown clients: the transceivers' REDIS_* variables (flags
# --redis-url etc.), the ones a reader needs. Lookups are dropped, never waited for: shorter
# timeouts than the transceiver's by default. RELAY_REDIS_URL and RELAY_REDIS_KEY_PREFIX, the
# names before, still work when the new ones are unset (deprecated).
REDIS_VARIABLES = (
    "REDIS_URL",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_SERVICE",
    "REDIS_PASSWORD",
    "REDIS_KEY_PREFIX",
    "REDIS_CONNECT_TIMEOUT_S",
    "REDIS_SOCKET_TIMEOUT_S",
)
REDIS_DEFAULTS = {"REDIS_CONNECT_TIMEOUT_S": "0.25", "REDIS_SOCKET_TIMEOUT_S": "0.25"}
_DEPRECATED = {"RELAY_REDIS_URL": "REDIS_URL", "RELAY_REDIS_KEY_PREFIX": "REDIS_KEY_PREFIX"}


def parse_address(text: str, name: str) -> Address:
    """``host:port`` or ``[v6]:port`` with an IP literal host."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{name}: {text!r} is not host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{name}: {host!r} is not an IP address") from None
    return str(ip), _port(port_text, name, text)


def _port(text: str, name: str, whole: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ConfigError(f"{name}: port in {whole!r} is not 0..65535")
    return int(text)


# A DNS name as RFC 1123 allows it (letters, digits, hyphens; dot-separated labels of at most
# 63), with a trailing dot for an absolute name; underscores too, as some resolvers serve them.
_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?"
)


def transceiver_address(text: str, name: str) -> Address:
    """``host:port`` where host is an IP literal or a DNS name (a headless Service's, say),
    kept as written: each relay worker looks names up at run time (``relay.discovery``)."""
    try:
        return parse_address(text, name)
    except ConfigError:
        host, sep, port_text = text.strip().rpartition(":")
        if not sep or not host or host.startswith("["):
            raise
    if _HOST_NAME.fullmatch(host) is None:
        raise ConfigError(f"{name}: {host!r} is neither an IP address nor a DNS name")
    return host.lower(), _port(port_text, name, text)


def _address_list(text: str, name: str, named: bool = False) -> tuple[Address, ...]:
    items = [p for p in text.split(",") if p.strip()]
    if named:
        addresses = tuple(transceiver_address(p, name) for p in items)
    else:
        addresses = tuple(parse_address(p, name) for p in items)
    if not addresses:
        raise ConfigError(f"{name}: expected at least one host:port")
    return addresses


def _number(text: str, name: str, low: float, kind: type[int] | type[float]) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a number") from None
    if value < low:
        raise ConfigError(f"{name}: {value} is below {low}")
    return value


def _family(host: str) -> int:
    return ipaddress.ip_address(host).version


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _build(values: Mapping[str, str]) -> RelayConfig:
    public = _address_list(values["PUBLIC"], "RELAY_PUBLIC")
    if any(port == 0 for _, port in public):
        raise ConfigError(
            "RELAY_PUBLIC: every public address needs a fixed port (workers share it)"
        )
    internal_host = parse_address(values["INTERNAL_HOST"] + ":0", "RELAY_INTERNAL_HOST")[0]
    transceivers = _address_list(values["TRANSCEIVERS"], "RELAY_TRANSCEIVERS", named=True)
    for host, port in transceivers:
        family = _family(host) if _is_ip(host) else _family(internal_host)  # names: looked up so
        if family != _family(internal_host) or port == 0:
            raise ConfigError(
                f"RELAY_TRANSCEIVERS: {host}:{port} is not reachable from a link socket on "
                f"RELAY_INTERNAL_HOST {internal_host} (same IP family and a nonzero port needed)"
            )
    try:
        keys = Keyring.parse(values["KEYS"])
    except ValueError as error:
        raise ConfigError(f"RELAY_KEYS: {error}") from None
    workers = int(_number(values["WORKERS"], "RELAY_WORKERS", 1, int))
    internal_port = int(_number(values["INTERNAL_PORT"], "RELAY_INTERNAL_PORT", 0, int))
    if internal_port and internal_port + workers - 1 > 65535:
        raise ConfigError(f"RELAY_INTERNAL_PORT: {internal_port} + {workers} workers passes 65535")
    return RelayConfig(
        public=public,
        internal_host=internal_host,
        internal_port=internal_port,
        workers=workers,
        transceivers=transceivers,
        keys=keys,
        http=parse_address(values["HTTP"], "RELAY_HTTP"),
        route_idle_s=_number(values["ROUTE_IDLE_S"], "RELAY_ROUTE_IDLE_S", 0.1, float),
        stun_rate=_number(values["STUN_RATE"], "RELAY_STUN_RATE", 0.1, float),
        hello=_switch(values["HELLO"], "RELAY_HELLO"),
        timing=_timing(values),
    )


def _seconds(values: Mapping[str, str], suffix: str, low: float = 0.01) -> float:
    return _number(values[suffix], f"RELAY_{suffix}", low, float)


def _timing(values: Mapping[str, str]) -> RelayTiming:
    first_s = _seconds(values, "RESTART_FIRST_S")
    pauses = RestartPauses(
        first_s=first_s,
        max_s=_seconds(values, "RESTART_MAX_S", first_s),
        healthy_after_s=_seconds(values, "RESTART_HEALTHY_AFTER_S"),
    )
    return RelayTiming(
        hello_interval_s=_seconds(values, "HELLO_INTERVAL_S"),
        routes_request_s=_seconds(values, "ROUTES_REQUEST_S"),
        publish_interval_s=_seconds(values, "PUBLISH_INTERVAL_S"),
        expiry_interval_s=_seconds(values, "EXPIRY_INTERVAL_S"),
        clock_interval_s=_seconds(values, "CLOCK_INTERVAL_S"),
        lookup_retry_s=_seconds(values, "LOOKUP_RETRY_S"),
        ready_timeout_s=_seconds(values, "READY_TIMEOUT_S", 0.1),
        stop_timeout_s=_seconds(values, "STOP_TIMEOUT_S"),
        watch_interval_s=_seconds(values, "WATCH_INTERVAL_S"),
        respawn_pause_s=_seconds(values, "RESPAWN_PAUSE_S"),
        transceivers_refresh_s=_seconds(values, "TRANSCEIVERS_REFRESH_S"),
        transceivers_grace_s=_seconds(values, "TRANSCEIVERS_GRACE_S"),
        restarts=pauses,
    )


def _switch(text: str, name: str) -> bool:
    value = _SWITCH.get(text.strip().lower())
    if value is None:
        raise ConfigError(f"{name}: {text!r} is not on or off")
    return value


def _redis(flags: argparse.Namespace, environ: Mapping[str, str]) -> RedisConfig | None:
    """The route cache's Redis from ``REDIS_*`` (or the deprecated ``RELAY_REDIS_*``) and flags."""
    env = {new: environ[old] for old, new in _DEPRECATED.items() if old in environ}
    env |= {name: environ[name] for name in REDIS_VARIABLES if name in environ}
    try:
        config = RedisConfig.from_env(with_flags(flags, env), REDIS_DEFAULTS)
    except RedisConfigError as error:
        raise ConfigError(str(error)) from None
    url = config.url if config is not None else None
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"REDIS_URL: {url!r} is not a redis://, rediss:// or unix:// URL")
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m relay",
        description="voicerelay UDP relay (flags mirror RELAY_* vars)",
        parents=[redis_flags(REDIS_VARIABLES)],
    )
    for suffix, (default, text) in _FIELDS.items():
        flag = "--" + suffix.lower().replace("_", "-")
        shown = "required" if default is None else f"default {default}"
        parser.add_argument(flag, dest=suffix, help=f"{text} [RELAY_{suffix}; {shown}]")
    return parser


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> RelayConfig:
    """Flags over ``RELAY_*`` variables over defaults; raises ConfigError on a bad value."""
    namespace = _parser().parse_args(list(argv))
    flags = vars(namespace)
    values: dict[str, str] = {}
    for suffix, (default, _) in _FIELDS.items():
        value = flags[suffix] if flags[suffix] is not None else environ.get(f"RELAY_{suffix}")
        value = default if value is None else value
        if value is None:
            flag = "--" + suffix.lower().replace("_", "-")
            raise ConfigError(f"RELAY_{suffix} (or {flag}) is required")
        values[suffix] = value
    return replace(_build(values), redis=_redis(namespace, environ))
