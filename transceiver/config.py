"""Transceiver configuration: one frozen dataclass, loaded from ``TRANSCEIVER_*`` variables.

Policy layer. CLI flags mirror the variables one for one (``--link`` <-> ``TRANSCEIVER_LINK``);
a flag wins over its variable. Every value is validated at start with a message naming it.
The survival timings and bounds (leases, Redis health, queues, restarts) load into a
``SurvivalPolicy`` (``transceiver.store.survival``) under ``survival``; the link's (worker
choice, forgetting, relay trust, ICE rechecks) into a ``LinkPolicy``
(``transceiver.webrtc.link_policy``) under ``link_policy``; a Realtime session's (error notice
before a hang-up, events kept for a channel not yet open, the items' audio kept for
retrieve, the window transcript deltas are joined in) into a ``RealtimeLimits``
(``transceiver.realtime.limits``) under ``realtime``. What calls leave behind: a
``CallRecordPolicy`` (``transceiver.store.call_records``, retention and bounds) under
``survival.records``, and the ``call.ended`` webhook's ``WebhookPolicy``
(``transceiver.webhook_signing``; its secret from ``TRANSCEIVER_WEBHOOK_SECRET`` only) under
``webhook``. Rate limits and the trusted proxies into a ``RateLimitPolicy``
(``transceiver.store.rate_limits``) under ``rate_limits``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from relay.wire.redis_config import parse_number
from relay.wire.ufrag import Keyring
from transceiver.realtime.limits import RealtimeLimits
from transceiver.restarts import RestartPolicy
from transceiver.store.call_records import TRANSCRIPT_MODES, CallRecordPolicy
from transceiver.store.rate_limits import Network, RateLimitPolicy
from transceiver.store.survival import SurvivalPolicy
from transceiver.webhook_signing import WebhookPolicy
from transceiver.webrtc.link_policy import LinkPolicy

Address = tuple[str, int]
N = TypeVar("N", int, float)
ENV_PREFIX = "TRANSCEIVER_"
AGENTS = ("pipeline", "echo")
MEDIA_PATHS = ("aiortc", "lean")  # transceiver.webrtc.calls.MEDIA_PATHS (tests hold them equal)

# name -> (default, help). Names are the flag without "--" and the variable without the prefix.
_SETTINGS: dict[str, tuple[str | None, str]] = {
    "link": ("127.0.0.1:7000", "the one UDP link socket relays forward to (host:port)"),
    "public": ("127.0.0.1:3478", "relay public address(es), the only answer candidates"),
    "keys": (None, "ufrag keyring ID:HEX[,ID:HEX], first is current (shared with the relay)"),
    "http": ("127.0.0.1:8080", "HTTP signaling and metrics listener (host:port)"),
    "http_advertise": (
        None,
        "host:port other transceivers reach this one's HTTP at, to forward a sideband to the "
        "sessions it runs (transceiver.http.sideband); default: --http unless it is a wildcard",
    ),
    "capacity": ("100", "most concurrent sessions; beyond it POST answers 503"),
    "workers": (
        "1",
        "worker processes in this pod, each with its own calls and link socket (worker i binds "
        "the link port + i; list each in the relay's RELAY_TRANSCEIVERS); auto: the cores this "
        "process may use (affinity, cgroup quota). Capacity and CPU budget are per worker",
    ),
    "cpu_budget_cores": (
        "0.85",
        "refuse a call (503 transceiver_overloaded) when the measured CPU per call times one "
        "call more would exceed this many cores (0: off)",
    ),
    "cpu_window_s": ("10", "CPU per call is measured over this window"),
    "connect_timeout_s": ("10", "close a session that has not connected within this time"),
    "drain_timeout_s": ("30", "on SIGTERM, let sessions end for up to this long"),
    "agent": (
        "pipeline",
        "what each session runs: pipeline (the voice agent; PIPELINE_* variables configure it) "
        "or echo (plays the caller's audio back, diagnostics)",
    ),
    "media_path": (
        "lean",
        "what carries a call's audio once DTLS is up: lean (transceiver.webrtc.lean_media: one "
        "shared 20 ms tick, inline Opus with FEC/PLC, minimal RTCP) or aiortc (its RTP tasks, "
        "codec threads and jitter buffer)",
    ),
    "caller_dtx": (
        "1",
        "1: on the lean media path the answer asks the caller for Opus DTX (usedtx=1: a "
        "silent caller sends a packet every 400 ms, not 50 a second) and the engine is fed "
        "that silence; 0: every 20 ms, as on the aiortc path",
    ),
    "lease_s": ("6", "a session's Redis lease; a killed owner's sessions lapse after it"),
    "health_interval_s": ("1", "seconds between Redis pings and catch-up passes"),
    "max_pending_writes": ("200", "session writes queued while Redis is away, in all"),
    "max_pending_routes": ("10000", "route changes kept between two publishing wake-ups"),
    "route_flush_timeout_s": ("1", "at exit, withdrawing published routes may take this long"),
    "session_image_bytes": ("2097152", "a stored session's images, together; oldest dropped"),
    "restart_first_s": ("0.5", "first pause before a crashed background loop restarts"),
    "restart_max_s": ("30", "longest pause before a crashed background loop restarts"),
    "restart_healthy_after_s": ("60", "a loop run this long resets its pause and crash streak"),
    "restart_failing_after": ("3", "crashes in a row that make a loop failing (/readyz)"),
    "link_heard_window_s": ("3", "answer through a session's own relay worker if heard this late"),
    "link_worker_forget_s": ("30", "forget a relay worker not heard for this long"),
    "link_transaction_ttl_s": ("40", "a sent STUN request's id routes its answer this long"),
    "link_max_transactions": ("65536", "STUN transactions the link remembers, in all"),
    "link_max_clients_per_session": ("16", "client addresses one session may learn"),
    "link_housekeeping_interval_s": ("1", "seconds between the link's forgetting passes"),
    "link_keyed_ttl_s": ("30", "stop hearing a relay whose last good HELLO is this old"),
    "link_max_rechecks": ("16", "ICE checks resent early, per connection (0: none)"),
    "link_io_batch": ("64", "datagrams the link moves per system call (1: one each)"),
    "link_read_interval_s": ("0.002", "busy link: read it this often, not per datagram (0: each)"),
    "link_max_queued_datagrams": ("4096", "datagrams waiting for a full send buffer, at most"),
    "realtime_lost_notice_s": ("0.25", "an ending session lets its error event leave this long"),
    "realtime_max_pending_events": ("512", "server events kept until the client opens its channel"),
    "realtime_item_audio_s": ("60", "seconds of the items' audio kept for retrieve, in all"),
    "realtime_item_audio_bytes": (
        "67108864",
        "bytes of items' audio kept for retrieve across the process's sessions (0: no bound)",
    ),
    "realtime_delta_coalesce_ms": (
        "50",
        "transcript deltas joined on the data channel for at most this long (0: each alone)",
    ),
    "call_record_ttl_s": ("604800", "a call record expires this long after its last write"),
    "call_record_max_turns": ("500", "turns kept per call record; the oldest are trimmed"),
    "call_record_transcripts": (
        "full",
        "transcripts in call records: full, redacted (numbers, e-mail addresses masked) or off",
    ),
    "call_record_max_pending": ("1000", "call-record writes waiting for Redis; more are dropped"),
    "webhook_url": (
        None,
        "POST a signed call.ended event here as each call ends (empty: none; the HMAC secret "
        "comes from TRANSCEIVER_WEBHOOK_SECRET only)",
    ),
    "webhook_max_attempts": ("8", "tries per call.ended event, then it is given up (counted)"),
    "webhook_retry_first_s": ("1", "pause after a failed webhook attempt; doubles each time"),
    "webhook_retry_max_s": ("60", "longest pause between webhook attempts"),
    "webhook_timeout_s": ("10", "one webhook attempt may take this long"),
    "webhook_max_pending": ("1000", "call.ended events in the outbox in Redis; more are dropped"),
    "webhook_claim_timeout_s": (
        "60",
        "a webhook attempt not acknowledged by then is made again, by any transceiver",
    ),
    "webhook_poll_s": ("2", "how often a transceiver looks for webhooks others left"),
    "loop_lag_warn_ms": ("100", "warn, with what blocked it, of an event-loop tick this late"),
    "gc_freeze": (
        "1",
        "1: what start-up built is kept out of the garbage collector's full collections "
        "(gc.freeze); 0: every full collection walks it",
    ),
    "rate_limit_requests": (
        "0",
        "requests per window per API key: offers, client secrets, WebSocket handshakes (0: off)",
    ),
    "rate_limit_sessions": ("0", "sessions begun per window per client address (0: off)"),
    "rate_limit_tokens": ("0", "model tokens per window per API key (0: off)"),
    "rate_limit_window_s": ("60", "the window the rate limits count over (a refilling bucket)"),
    "trusted_proxies": (
        "",
        "CIDRs of proxies whose X-Forwarded-For names the client address (empty: none)",
    ),
    "forward_timeout_s": (
        "10",
        "a hang-up forwarded to its call's owner (a worker of this pod or another transceiver) "
        "waits this long for the answer",
    ),
}
ENV_WEBHOOK_SECRET = ENV_PREFIX + "WEBHOOK_SECRET"


DEFAULT_MEDIA_PATH = "lean"  # a call's audio once DTLS is up: "lean" or "aiortc" (README)


class ConfigError(ValueError):
    """A setting that does not validate; the message names the variable."""


@dataclass(frozen=True)
class TransceiverConfig:
    link: Address
    public: tuple[Address, ...]
    keyring: Keyring
    http: Address
    capacity: int
    connect_timeout_s: float
    drain_timeout_s: float
    agent: str
    media_path: str = DEFAULT_MEDIA_PATH
    caller_dtx: bool = True  # lean path only (transceiver.webrtc.sdp.opus_fmtp)
    survival: SurvivalPolicy = field(default_factory=SurvivalPolicy)
    link_policy: LinkPolicy = field(default_factory=LinkPolicy)
    realtime: RealtimeLimits = field(default_factory=RealtimeLimits)
    webhook: WebhookPolicy | None = None
    loop_lag_warn_s: float = 0.1
    gc_freeze: bool = True
    http_advertise: Address | None = None  # None: sidebands are not forwarded here
    workers: int = 1  # 0: the cores this process may use (transceiver.workers)
    cpu_budget_cores: float = 0.85
    cpu_window_s: float = 10.0
    rate_limits: RateLimitPolicy = field(default_factory=RateLimitPolicy)
    forward_timeout_s: float = 10.0

    @classmethod
    def load(
        cls,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        parents: Sequence[argparse.ArgumentParser] = (),
    ) -> TransceiverConfig:
        """Merge environment and flags, then validate. ``parents``: flags parsed elsewhere
        (auth), listed by ``--help`` too."""
        environ = os.environ if environ is None else environ
        values = {
            name: environ.get(ENV_PREFIX + name.upper(), d) for name, (d, _) in _SETTINGS.items()
        }
        flags = vars(_parser(parents).parse_args(argv))
        values.update({k: v for k, v in flags.items() if k in _SETTINGS and v is not None})
        values["webhook_secret"] = environ.get(ENV_WEBHOOK_SECRET)  # never a flag (ps shows those)
        return cls.from_values(values)

    @classmethod
    def from_values(cls, values: Mapping[str, str | None]) -> TransceiverConfig:
        return cls(
            link=parse_address(_required(values, "link"), "link"),
            public=parse_addresses(_required(values, "public"), "public"),
            keyring=_keyring(_required(values, "keys")),
            http=parse_address(_required(values, "http"), "http"),
            capacity=_number(values, "capacity", int, minimum=1),
            connect_timeout_s=_number(values, "connect_timeout_s", float, minimum=0.1),
            drain_timeout_s=_number(values, "drain_timeout_s", float, minimum=0.0),
            agent=_agent(_required(values, "agent")),
            media_path=_media_path(values.get("media_path") or DEFAULT_MEDIA_PATH),
            caller_dtx=_switch(values, "caller_dtx"),
            survival=_survival(values),
            link_policy=_link_policy(values),
            realtime=_realtime(values),
            webhook=_webhook(values),
            loop_lag_warn_s=_number(values, "loop_lag_warn_ms", float, minimum=1.0) / 1000,
            gc_freeze=_switch(values, "gc_freeze"),
            http_advertise=_http_advertise(values),
            workers=_workers(values.get("workers") or "1"),
            cpu_budget_cores=_number(values, "cpu_budget_cores", float, minimum=0.0),
            cpu_window_s=_number(values, "cpu_window_s", float, minimum=1.0),
            rate_limits=_rate_limits(values),
            forward_timeout_s=_number(values, "forward_timeout_s", float, minimum=0.1),
        )


def _rate_limits(values: Mapping[str, str | None]) -> RateLimitPolicy:
    def number(name: str) -> int:
        return _number(values, "rate_limit_" + name, int, minimum=0)

    return RateLimitPolicy(
        requests_per_window=number("requests"),
        sessions_per_window=number("sessions"),
        tokens_per_window=number("tokens"),
        window_s=_number(values, "rate_limit_window_s", float, minimum=0.1),
        trusted_proxies=_networks(values.get("trusted_proxies") or ""),
    )


def _networks(text: str) -> tuple[Network, ...]:
    """A comma list of CIDRs (a bare address is its /32 or /128)."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}TRUSTED_PROXIES: {part!r} is not a CIDR") from None
    return tuple(networks)


def _http_advertise(values: Mapping[str, str | None]) -> Address | None:
    """The address given, else the HTTP listener's unless it listens on every address (a
    wildcard names no one host: forwarding to this transceiver then needs the setting)."""
    text = (values.get("http_advertise") or "").strip()
    if text:
        address = parse_address(text, "http_advertise")
    else:
        address = parse_address(_required(values, "http"), "http")
    if ipaddress.ip_address(address[0]).is_unspecified or address[1] == 0:
        if text:
            raise ConfigError(f"{ENV_PREFIX}HTTP_ADVERTISE={text!r} names no one host and port")
        return None
    return address


def _survival(values: Mapping[str, str | None]) -> SurvivalPolicy:
    restarts = _restarts(values)
    return SurvivalPolicy(
        lease_s=_number(values, "lease_s", float, minimum=0.3),
        health_interval_s=_number(values, "health_interval_s", float, minimum=0.01),
        max_pending_writes=_number(values, "max_pending_writes", int, minimum=1),
        max_pending_routes=_number(values, "max_pending_routes", int, minimum=1),
        route_flush_timeout_s=_number(values, "route_flush_timeout_s", float, minimum=0.01),
        session_image_bytes=_number(values, "session_image_bytes", int, minimum=0),
        restarts=restarts,
        records=_records(values),
    )


def _records(values: Mapping[str, str | None]) -> CallRecordPolicy:
    transcripts = _required(values, "call_record_transcripts").lower()
    if transcripts not in TRANSCRIPT_MODES:
        raise ConfigError(
            f"{ENV_PREFIX}CALL_RECORD_TRANSCRIPTS={transcripts!r} is not one of "
            + ", ".join(TRANSCRIPT_MODES)
        )
    return CallRecordPolicy(
        ttl_s=_number(values, "call_record_ttl_s", float, minimum=1.0),
        max_turns=_number(values, "call_record_max_turns", int, minimum=1),
        transcripts=transcripts,
        max_pending=_number(values, "call_record_max_pending", int, minimum=1),
    )


def _webhook(values: Mapping[str, str | None]) -> WebhookPolicy | None:
    url = (values.get("webhook_url") or "").strip()
    if not url:
        return None
    secret = (values.get("webhook_secret") or "").strip()
    if not secret:
        raise ConfigError(f"{ENV_PREFIX}WEBHOOK_URL is set but {ENV_WEBHOOK_SECRET} is not")

    def number(name: str, kind: type[N], minimum: N) -> N:
        return _number(values, "webhook_" + name, kind, minimum)

    try:
        return WebhookPolicy(
            url=url,
            secret=secret,
            max_attempts=number("max_attempts", int, minimum=1),
            retry_first_s=number("retry_first_s", float, minimum=0.001),
            retry_max_s=number("retry_max_s", float, minimum=0.001),
            timeout_s=number("timeout_s", float, minimum=0.001),
            max_pending=number("max_pending", int, minimum=1),
            claim_timeout_s=number("claim_timeout_s", float, minimum=0.001),
            poll_s=number("poll_s", float, minimum=0.001),
        )
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}WEBHOOK_*: {exc}") from None


def _restarts(values: Mapping[str, str | None]) -> RestartPolicy:
    first_s = _number(values, "restart_first_s", float, minimum=0.01)
    max_s = _number(values, "restart_max_s", float, minimum=first_s)
    return RestartPolicy(
        first_s=first_s,
        max_s=max_s,
        healthy_after_s=_number(values, "restart_healthy_after_s", float, minimum=0.01),
        failing_after_crashes=_number(values, "restart_failing_after", int, minimum=1),
    )


def _link_policy(values: Mapping[str, str | None]) -> LinkPolicy:
    def number(name: str, kind: type[N], minimum: N) -> N:
        return _number(values, "link_" + name, kind, minimum)

    return LinkPolicy(
        heard_window_s=number("heard_window_s", float, minimum=0.01),
        worker_forget_s=number("worker_forget_s", float, minimum=0.01),
        transaction_ttl_s=number("transaction_ttl_s", float, minimum=0.01),
        max_transactions=number("max_transactions", int, minimum=1),
        max_clients_per_session=number("max_clients_per_session", int, minimum=1),
        housekeeping_interval_s=number("housekeeping_interval_s", float, minimum=0.01),
        keyed_ttl_s=number("keyed_ttl_s", float, minimum=0.01),
        max_rechecks=number("max_rechecks", int, minimum=0),
        io_batch=number("io_batch", int, minimum=1),
        read_interval_s=number("read_interval_s", float, minimum=0.0),
        max_queued_datagrams=number("max_queued_datagrams", int, minimum=1),
    )


def _realtime(values: Mapping[str, str | None]) -> RealtimeLimits:
    return RealtimeLimits(
        lost_notice_s=_number(values, "realtime_lost_notice_s", float, minimum=0.0),
        max_pending_events=_number(values, "realtime_max_pending_events", int, minimum=1),
        item_audio_s=_number(values, "realtime_item_audio_s", float, minimum=0.0),
        item_audio_bytes=_number(values, "realtime_item_audio_bytes", int, minimum=0),
        delta_coalesce_ms=_number(values, "realtime_delta_coalesce_ms", float, minimum=0.0),
    )


def _parser(parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transceiver", description=__doc__, parents=list(parents)
    )
    for name, (default, text) in _SETTINGS.items():
        variable = ENV_PREFIX + name.upper()
        shown = "" if default is None else f", default {default}"
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, help=f"{text} [{variable}{shown}]"
        )
    return parser


def _required(values: Mapping[str, str | None], name: str) -> str:
    value = values.get(name)
    if value is None or not value.strip():
        raise ConfigError(f"{ENV_PREFIX}{name.upper()} (--{name.replace('_', '-')}) is required")
    return value.strip()


def _number(values: Mapping[str, str | None], name: str, kind: type[N], minimum: N) -> N:
    text = _required(values, name)
    return parse_number(text, f"{ENV_PREFIX}{name.upper()}", kind, minimum, ConfigError)


def _switch(values: Mapping[str, str | None], name: str) -> bool:
    text = _required(values, name).strip()
    if text not in ("0", "1"):
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={text!r} is not 0 or 1")
    return text == "1"


def _keyring(spec: str) -> Keyring:
    try:
        return Keyring.parse(spec)
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}KEYS: {exc}") from None


def _agent(name: str) -> str:
    if name not in AGENTS:
        raise ConfigError(f"{ENV_PREFIX}AGENT={name!r} is not one of {', '.join(AGENTS)}")
    return name


def _workers(text: str) -> int:
    """A count of worker processes (1..255), or ``auto`` (0: decided at start)."""
    text = text.strip().lower()
    if text == "auto":
        return 0
    name = f"{ENV_PREFIX}WORKERS"
    workers = parse_number(text, name, int, 1, ConfigError)
    if workers > 255:
        raise ConfigError(f"{name}={workers} is above 255 (a call id names its worker in a byte)")
    return workers


def _media_path(name: str) -> str:
    name = name.strip()
    if name not in MEDIA_PATHS:
        raise ConfigError(f"{ENV_PREFIX}MEDIA_PATH={name!r} is not one of {', '.join(MEDIA_PATHS)}")
    return name


def parse_address(text: str, name: str) -> Address:
    """``host:port`` or ``[v6]:port`` with a literal IP (no DNS at start)."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    where = f"{ENV_PREFIX}{name.upper()}={text!r}"
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where} is not host:port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{where}: {host!r} is not an IP address") from None
    return str(ip), int(port_text)


def parse_addresses(text: str, name: str) -> tuple[Address, ...]:
    """A comma list of addresses, at most one per address family (one candidate each)."""
    addresses = tuple(parse_address(part, name) for part in text.split(",") if part.strip())
    families = [ipaddress.ip_address(host).version for host, _ in addresses]
    if not addresses or len(set(families)) != len(families):
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={text!r}: give one address per family")
    if any(port == 0 for _, port in addresses):
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={text!r}: port 0 cannot be advertised")
    return addresses
