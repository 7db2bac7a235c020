"""Routing decisions for one relay worker: the route table, its learning rules, and what to
do with a datagram from either side.

Pure: no sockets, no asyncio; time is passed in (``now`` in seconds from any monotonic clock).
The worker inlines the hot path (known client -> forward) for speed and calls ``Router`` for
everything else; ``Router.on_public`` also handles the hot path so the rules can be tested
(and fuzzed) here in one place.

Learning rules (DESIGN.md, relay section):
- a binding request from an unknown address whose USERNAME carries our ufrag with a valid MAC,
  naming a known transceiver (``Router.transceivers``, kept by ``relay.transceivers``), with a
  MESSAGE-INTEGRITY valid under the derived password;
- ROUTES from a known transceiver (restart recovery);
- a known transceiver's outbound DTLS/SRTP to an address without a route.
A live route pointing to another transceiver is never overwritten.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from relay.counters import DROP_REASONS
from relay.wire.header import HEADER_BYTES, ControlMessage, ControlType, HeaderError, header_for
from relay.wire.header import parse_header as parse_link_header
from relay.wire.stun import FIRST_BYTE_KINDS, Kind, StunError, integrity_ok, read_binding_request
from relay.wire.ufrag import Keyring, UfragError, decode_ufrag, derive_password

Address = tuple[str, int]
# How a socket names a peer: (host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6.
ClientKey = tuple[str, int] | tuple[str, int, int, int]

MAX_RATE_SOURCES = 100_000


def client_key(address: Address) -> ClientKey:
    """The key a socket's recvfrom would produce for ``address`` (v6: flowinfo 0, scope 0)."""
    host, port = address[0], address[1]
    return (host, port, 0, 0) if ":" in host else (host, port)


def normalize_address(address: Address) -> Address:
    return str(ipaddress.ip_address(address[0])), address[1]


@dataclass(frozen=True, slots=True)
class Forward:
    """Send ``datagram`` (link header + client payload) to the transceiver at ``link``."""

    link: Address
    datagram: bytes


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Send ``payload`` to ``client`` from public socket number ``socket_index``."""

    socket_index: int
    client: ClientKey
    payload: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str  # one of relay.counters.DROP_REASONS


@dataclass(frozen=True, slots=True)
class Control:
    """A control message from a transceiver, already applied to the route table."""

    message: ControlMessage
    changed: int  # routes learned (ROUTES) or forgotten (GONE)


Action = Forward | SendToClient | Drop | Control

_DROPS = {reason: Drop(reason) for reason in DROP_REASONS}


UNKNOWN_ADDRESS = _DROPS["unknown_address"]
# A signed ufrag naming a transceiver this worker does not know (yet: a new pod, say).
UNKNOWN_TRANSCEIVER = _DROPS["unknown_transceiver"]


def needs_route_lookup(action: Action, data: bytes) -> bool:
    """A DTLS or SRTP datagram from an address without a route: the route cache may know it."""
    return action is UNKNOWN_ADDRESS and FIRST_BYTE_KINDS[data[0]] != Kind.STUN


class Route:
    """Where a client's datagrams go: the transceiver and the cached 20-byte link header."""

    __slots__ = ("link", "header", "seen_s", "socket_index")

    def __init__(self, link: Address, header: bytes, seen_s: float, socket_index: int) -> None:
        self.link = link
        self.header = header  # header_for(client): prepended to every forwarded datagram
        self.seen_s = seen_s  # last datagram from the client (or ROUTES naming it)
        self.socket_index = socket_index  # the public socket that answers this client


class StunRateLimit:
    """A token bucket per source address for STUN from unknown addresses (before any HMAC)."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.buckets: dict[ClientKey, list[float]] = {}  # source -> [tokens, updated_s]

    def allow(self, source: ClientKey, now: float) -> bool:
        bucket = self.buckets.get(source)
        if bucket is None:
            if len(self.buckets) >= MAX_RATE_SOURCES and not self.sweep(now):
                return False  # a flood of sources: refuse newcomers until buckets refill
            bucket = self.buckets[source] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate_per_s)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def sweep(self, now: float) -> int:
        """Forget sources whose bucket has refilled: they behave as new. Returns how many."""
        refill_s = self.burst / self.rate_per_s
        stale = [s for s, (_, at) in self.buckets.items() if now - at >= refill_s]
        for source in stale:
            del self.buckets[source]
        return len(stale)


class RouteTable:
    """Client address -> transceiver, with idle expiry and the outbound header cache.

    ``inbound`` maps a client key to a Route list; ``outbound`` maps a route's 20-byte link
    header to (public socket index, client key), so a transceiver's datagram is routed by one
    lookup of its first 20 bytes.
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.inbound: dict[ClientKey, Route] = {}
        self.outbound: dict[bytes, tuple[int, ClientKey]] = {}
        self.learned = 0  # routes added since start (a counter)

    def learn(self, client: ClientKey, link: Address, socket_index: int, now: float) -> bool:
        """Add or refresh a route; never overwrite a live route to another transceiver."""
        route = self.inbound.get(client)
        if route is not None and route.link != link:
            if now - route.seen_s < self.idle_s:
                return False
            self.forget(client)
            route = None
        if route is not None:
            route.seen_s = now
            return False
        header = header_for((client[0], client[1]))
        self.inbound[client] = Route(link, header, now, socket_index)
        self.outbound[header] = (socket_index, client)
        self.learned += 1
        return True

    def forget(self, client: ClientKey, link: Address | None = None) -> bool:
        """Remove a route (only if it points to ``link``, when given)."""
        route = self.inbound.get(client)
        if route is None or (link is not None and route.link != link):
            return False
        del self.inbound[client]
        self.outbound.pop(route.header, None)
        return True

    def expire(self, now: float) -> int:
        """Drop routes idle for longer than ``idle_s``; returns how many."""
        idle = [c for c, r in self.inbound.items() if now - r.seen_s > self.idle_s]
        for client in idle:
            self.forget(client)
        return len(idle)


class Router:
    """The decisions of one worker. ``public_families[i]`` is 4 or 6 for public socket i."""

    def __init__(
        self,
        keyring: Keyring,
        transceivers: Iterable[Address],
        public_families: Iterable[int],
        routes: RouteTable,
        rate_limit: StunRateLimit,
    ) -> None:
        self.keyring = keyring
        self.transceivers: frozenset[Address] = frozenset()
        self.link_sources: frozenset[ClientKey] = frozenset()
        self.set_transceivers(transceivers)
        self.family_socket: dict[int, int] = {}
        for index, family in enumerate(public_families):
            self.family_socket.setdefault(family, index)
        self.routes = routes
        self.rate_limit = rate_limit

    def set_transceivers(self, transceivers: Iterable[Address]) -> None:
        """The transceivers this worker forwards to and takes link datagrams from, as of now
        (``relay.transceivers`` decides; routes are not touched)."""
        self.transceivers = frozenset(normalize_address(t) for t in transceivers)
        # The link socket reports IPv6 peers as 4-tuples; accept both spellings.
        self.link_sources = self.transceivers | {(h, p, 0, 0) for h, p in self.transceivers}

    def on_public(self, data: bytes, source: ClientKey, socket_index: int, now: float) -> Action:
        """A datagram from a client arrived on public socket ``socket_index``."""
        route = self.routes.inbound.get(source)
        if route is not None:
            route.seen_s = now
            return Forward(route.link, route.header + data)
        kind = FIRST_BYTE_KINDS[data[0]] if data else Kind.OTHER
        if kind != Kind.STUN:
            return _DROPS["unknown_address" if kind else "not_webrtc"]
        if not self.rate_limit.allow(source, now):
            return _DROPS["rate_limited"]
        return self._authenticate(data, source, socket_index, now)

    def _authenticate(self, data: bytes, source: ClientKey, index: int, now: float) -> Action:
        try:
            request = read_binding_request(data)
            ufrag = request.server_ufrag
            link = decode_ufrag(self.keyring, ufrag)
            password = derive_password(self.keyring, ufrag.decode("ascii"))
        except StunError as error:
            if error.reason == "not_request":  # a response or indication: not a session start
                return _DROPS["unknown_address"]
            return Drop(f"bad_ufrag_{error.reason}")
        except UfragError as error:
            return Drop(f"bad_ufrag_{error.reason}")
        if link not in self.transceivers:
            return UNKNOWN_TRANSCEIVER
        if not integrity_ok(data, request, password.encode("ascii")):
            return Drop("bad_ufrag_integrity")
        self.routes.learn(source, link, index, now)
        return Forward(link, header_for((source[0], source[1])) + data)

    def on_link(self, data: bytes, source: ClientKey, now: float) -> Action:
        """A datagram arrived on this worker's link socket from ``source``."""
        if source not in self.link_sources:
            return _DROPS["unknown_link_source"]
        hit = self.routes.outbound.get(data[:HEADER_BYTES])
        if hit is not None:
            return SendToClient(hit[0], hit[1], data[HEADER_BYTES:])
        try:
            header = parse_link_header(data)
            if header.is_control:
                return self._control(ControlMessage.parse(data[HEADER_BYTES:]), source, now)
        except HeaderError:
            return _DROPS["malformed_link"]
        return self._send_to_client(data[HEADER_BYTES:], header.client, (source[0], source[1]), now)

    def _send_to_client(self, payload: bytes, client: Address, link: Address, now: float) -> Action:
        kind = FIRST_BYTE_KINDS[payload[0]] if payload else Kind.OTHER
        if kind == Kind.OTHER:
            return _DROPS["not_webrtc"]
        index = self.family_socket.get(6 if ":" in client[0] else 4)
        if index is None or client[1] == 0:
            return _DROPS["malformed_link"]  # no public socket of that family, or port 0
        key = client_key(client)
        if kind != Kind.STUN and key not in self.routes.inbound:
            self.routes.learn(key, link, index, now)  # the owner speaks: learn (DESIGN.md)
        return SendToClient(index, key, payload)

    def _control(self, message: ControlMessage, source: ClientKey, now: float) -> Action:
        link = (source[0], source[1])
        changed = 0
        for client in message.routes:
            key = client_key(client)
            if message.kind == ControlType.GONE:
                changed += self.routes.forget(key, link)
                continue
            index = self.family_socket.get(6 if ":" in client[0] else 4)
            if index is not None and client[1] != 0:
                changed += self.routes.learn(key, link, index, now)
        return Control(message, changed)
