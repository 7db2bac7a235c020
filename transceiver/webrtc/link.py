"""The one UDP link socket a transceiver shares between all of its sessions.

I/O layer. Relay workers forward client datagrams here behind the 20-byte header of
``relay.wire.header`` ("came from"); sessions send through here behind the same header ("send to").

Only relays that prove the keyring are heard: a HELLO must verify (``relay.wire.hello``: MAC,
timestamp window, nonce not seen before, addressed to this link) before the link takes data
from the address it came from, and no ROUTES go to anyone else. Data from any other address is
dropped with one dict membership test and counted in ``refused`` (by reason, with the refused
HELLOs).

Demux of an inbound datagram (after the header):

- STUN request: by the server ufrag, the first half of USERNAME (RFC 8445 §7.2.2), read with
  the wire contract's peek (``relay.wire.stun.peek_server_ufrag``);
- STUN response or error: by transaction id (recorded when a session sent the request), falling
  back to the client address;
- anything else (DTLS, SRTP/SRTCP): by client address, one dict lookup on the raw header bytes.

A client address belongs to the session that first *sent* to it (the owner answering, not a
stranger writing); STUN error responses teach nothing, as aioice sends them to strangers.

Which relay worker gets a session's datagram: the worker that last forwarded that session's
packets, if it was heard within the policy's ``heard_window_s``; otherwise the most recently
heard worker. Each worker has its own socket, so answering the right one keeps flows on one
worker. "That session", not "that client address": ICE may select a different pair in each
direction (the controlling client nominates aggressively), so the address a session sends to can
be one the client never sends from; keyed by address, it kept answering a dead worker after a
relay restart until the window (3 s by default) ran out (measured: 1.6-1.8 s recovery instead of
~0.1 s).

Datagrams move in batches (``mmsg``; ``LinkPolicy.io_batch`` per system call, 1: one each):
everything sent during one event-loop pass (the lean media tick's packets for all calls, the
answers to one batch received) is queued and sent at the end of the pass with ``sendmmsg``; a
readable socket is drained with ``recvmmsg``, a few batches per wake. A full send buffer keeps
the rest queued (bounded by ``max_queued_datagrams``) until the socket is writable.

Given a ``RoutePublisher`` (with Redis: ``transceiver.store.route_publishing``, built by
``python -m transceiver``), the link tells it every client address it learns and every one it
forgets, so the route cache holds ``client -> this link`` and a relay that never saw the session
can still route it (``relay.route_lookup``). The link knows no Redis.

Size (over 400 lines): the socket, its demux tables, the worker choice and each call's face on
it (``LinkSession``, ``SessionTransport``) are one hot path over the same dictionaries; apart,
each would reach into the other's tables on every datagram.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from relay.wire.header import (
    FLAG_CONTROL,
    HEADER_BYTES,
    HEADER_VERSION,
    MAX_LINK_DATAGRAM_BYTES,
    MAX_ROUTES_PER_MESSAGE,
    ControlMessage,
    ControlType,
    HeaderError,
    header_for,
    ip_text,
)
from relay.wire.hello import HelloError
from relay.wire.stun import CLASS_ERROR, CLASS_REQUEST, message_class, peek_server_ufrag
from relay.wire.ufrag import Keyring
from transceiver.background import BackgroundLoop
from transceiver.restarts import RestartPolicy
from transceiver.webrtc.keyed_relays import KeyedRelays
from transceiver.webrtc.link_policy import LinkPolicy
from transceiver.webrtc.mmsg import Datagram, Datagrams, datagrams_for

Address = tuple[str, int]
Clock = Callable[[], float]
READ_BATCHES_PER_WAKE = 4  # batches drained per readiness of the socket

log = logging.getLogger(__name__)


class RoutePublisher(Protocol):
    """Where the link's client routes go: told of each client address a session learns and
    each it forgets, never waited on (``transceiver.store.route_publishing``)."""

    def learned(self, client: Address) -> None: ...
    def withdrawn(self, client: Address) -> None: ...
    def start(self) -> None: ...
    async def aclose(self) -> None: ...


# (the link's bound address, its live routes: client -> link) -> the publisher of those routes
RoutePublisherFactory = Callable[[Address, Callable[[], Mapping[Address, Address]]], RoutePublisher]


def key_address(key: bytes) -> Address:
    """The client address of the 18 header bytes ``port:2 | ip:16``."""
    return ip_text(key[2:18]), int.from_bytes(key[0:2], "big")


class LinkSession:
    """One session on the link: its ufrag, its receivers by address family, its clients."""

    def __init__(self, link: Link, ufrag: bytes) -> None:
        self.link = link
        self.ufrag = ufrag
        self.receivers: dict[int, asyncio.DatagramProtocol] = {}
        self.clients: dict[bytes, Address] = {}
        self.transactions: set[bytes] = set()
        self.worker: Address | None = None  # the relay worker that last forwarded to us
        self.closed = False
        self._headers: dict[Address, bytes] = {}

    def transport(self, family: int, sockname: Address) -> SessionTransport:
        return SessionTransport(self, family, sockname)

    def deliver(self, payload: bytes, client: Address) -> None:
        receiver = self.receivers.get(6 if ":" in client[0] else 4)
        if receiver is None:
            self.link.counters["drop_family"] += 1
            return
        receiver.datagram_received(payload, client)

    def send(self, payload: bytes, client: Address) -> None:
        header = self._headers.get(client)
        if header is None:
            header = self._headers[client] = header_for(client)
        self.link.send(self, header, payload)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.link.forget(self)


class SessionTransport(asyncio.DatagramTransport):
    """What aioice's StunProtocol sees as its socket: sendto adds the link header."""

    def __init__(self, session: LinkSession, family: int, sockname: Address) -> None:
        super().__init__(extra={"sockname": sockname})
        self._session = session
        self._family = family
        self._protocol: asyncio.DatagramProtocol | None = None
        self._closing = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.DatagramProtocol)
        self._protocol = protocol
        self._session.receivers[self._family] = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def sendto(self, data: Any, addr: Any = None) -> None:
        if not self._closing and addr is not None:
            self._session.send(bytes(data), (addr[0], addr[1]))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._session.receivers.pop(self._family, None)
        if not self._session.receivers:
            self._session.close()
        if self._protocol is not None:
            asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0


class Link:
    """The link socket: demux in, worker choice out, HELLO/ROUTES/GONE. ``policy``: its timings
    and bounds; ``restarts``: how its housekeeping loop is restarted after a crash."""

    def __init__(
        self,
        address: Address,
        keyring: Keyring,
        clock: Clock | None = None,
        routes: RoutePublisherFactory | None = None,
        wall_clock: Clock = time.time,
        policy: LinkPolicy | None = None,
        restarts: RestartPolicy | None = None,
    ) -> None:
        self.address = address
        self.policy = policy = policy or LinkPolicy()
        self._route_publisher = routes  # made once the link is bound (it names the address)
        self.routes: RoutePublisher | None = None
        self.counters: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # reason -> datagrams refused as not from a relay
        self.keyed = KeyedRelays(keyring, policy.keyed_ttl_s)
        self._keyed_sources = self.keyed.sources  # the hot path's membership test
        self._clock = clock
        self._wall_clock = wall_clock  # HELLO timestamps are the relay host's wall clock
        self._socket: socket.socket | None = None
        self._io: Datagrams | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[Datagram] = []  # sent at the end of this loop pass, in one batch
        self._flush_due = False  # a flush is scheduled, or waits for the socket to be writable
        self._waiting_writable = False
        self._poller: asyncio.TimerHandle | None = None
        self._by_ufrag: dict[bytes, LinkSession] = {}
        self._by_key: dict[bytes, LinkSession] = {}
        self._transactions: dict[bytes, tuple[LinkSession, float]] = {}
        self._workers: dict[Address, float] = {}
        self._latest: Address | None = None
        self.housekeeping = LinkHousekeeping(self.expire, policy.housekeeping_interval_s, restarts)

    async def start(self) -> Address:
        self._loop = loop = asyncio.get_running_loop()
        self._clock = self._clock or loop.time
        self._socket = sock = await _bound_socket(self.address)
        self._io = datagrams_for(sock, self.policy.io_batch, MAX_LINK_DATAGRAM_BYTES)
        loop.add_reader(sock.fileno(), self._readable)
        host, port = sock.getsockname()[:2]
        self.address = (host, port)
        self.housekeeping.start()
        self._start_route_publishing()
        return self.address

    def _start_route_publishing(self) -> None:
        if self._route_publisher is None:
            return
        if ipaddress.ip_address(self.address[0]).is_unspecified:
            log.warning("route cache: link bound to %s; no route to publish", self.address[0])
            return
        self.routes = self._route_publisher(self.address, self.live_routes)
        self.routes.start()

    def live_routes(self) -> dict[Address, Address]:
        """Every client address of a live session -> this link."""
        return {
            client: self.address
            for session in self._by_ufrag.values()
            for client in session.clients.values()
        }

    async def aclose(self) -> None:
        for session in list(self._by_ufrag.values()):
            session.close()
        await self.housekeeping.aclose()
        if self.routes is not None:
            await self.routes.aclose()
        self._close_socket()

    def _close_socket(self) -> None:
        sock, loop = self._socket, self._loop
        if sock is None or loop is None:
            return
        self._flush()  # the GONEs just queued, as far as the buffer takes them
        loop.remove_reader(sock.fileno())
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        loop.remove_writer(sock.fileno())
        sock.close()
        self._socket = self._io = None
        if self._outbox:
            self.counters["drop_closed"] += len(self._outbox)
            self._outbox.clear()

    def open_session(self, ufrag: str) -> LinkSession:
        raw = ufrag.encode("ascii")
        if raw in self._by_ufrag:
            raise ValueError(f"ufrag {ufrag} is already on the link")
        session = self._by_ufrag[raw] = LinkSession(self, raw)
        return session

    @property
    def session_count(self) -> int:
        return len(self._by_ufrag)

    # inbound

    def _readable(self) -> None:
        """The socket is readable: read it now, then (with ``read_interval_s``) not before
        that interval has passed, and on readiness again once a read finds nothing."""
        self._drain()
        interval_s = self.policy.read_interval_s
        if interval_s > 0 and self._socket is not None and self._loop is not None:
            self._loop.remove_reader(self._socket.fileno())
            self._poller = self._loop.call_later(interval_s, self._poll)

    def _poll(self) -> None:
        self._poller = None
        if self._socket is None or self._loop is None:
            return
        if self._drain():  # still busy: read again after the interval
            self._poller = self._loop.call_later(self.policy.read_interval_s, self._poll)
        else:
            self._loop.add_reader(self._socket.fileno(), self._readable)

    def _drain(self) -> int:
        """Read what waits, in batches: at most ``READ_BATCHES_PER_WAKE`` of them, so that a
        flood cannot hold the loop (what is left is read on the next pass). How many were read."""
        read = 0
        for _ in range(READ_BATCHES_PER_WAKE):
            if self._io is None:
                return read
            try:
                received = self._io.receive()
            except OSError as error:
                self.counters["socket_error"] += 1
                log.debug("link receive: %s", error)
                return read
            self.counters["drop_oversized"] += received.oversized
            for data, src in received.datagrams:
                self._received(data, src)
            got = len(received.datagrams) + received.oversized
            read += got
            if got < self.policy.io_batch:
                return read
        return read

    def _received(self, data: bytes, src: Address) -> None:
        try:
            self.datagram_received(data, src)
        except Exception:  # a bug on one datagram: seen, and the batch's others still go on
            self.counters["receive_errors"] += 1
            log.exception("link: a datagram from %s failed", src)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) > MAX_LINK_DATAGRAM_BYTES:  # larger than any relay forwards: dropped whole
            self.counters["drop_oversized"] += 1
            return
        if len(data) < HEADER_BYTES or data[0] != HEADER_VERSION:
            self.counters["drop_header"] += 1
            return
        src: Address = (addr[0], addr[1])
        if data[1] & FLAG_CONTROL:
            self._control(data[HEADER_BYTES:], src)
            return
        if src not in self._keyed_sources:
            self.refused["unkeyed_source"] += 1
            return
        key, payload = data[2:HEADER_BYTES], data[HEADER_BYTES:]
        session = self._owner(key, payload)
        if session is None:
            self.counters["drop_no_session"] += 1
            return
        self.counters["datagrams_in"] += 1
        self._heard(src)
        session.worker = src
        session.deliver(payload, session.clients.get(key) or key_address(key))

    def _heard(self, worker: Address) -> None:
        assert self._clock is not None
        self._workers[worker] = self._clock()
        self._latest = worker

    def _owner(self, key: bytes, payload: bytes) -> LinkSession | None:
        if not payload:  # aiortc's DTLS reader indexes data[0]: never hand it an empty datagram
            return None
        if payload[0] > 3:
            return self._by_key.get(key)
        kind = message_class(payload)
        if kind == CLASS_REQUEST:
            ufrag = peek_server_ufrag(payload)
            return None if ufrag is None else self._by_ufrag.get(ufrag)
        if kind is not None and kind & 0x0100:  # success or error response
            entry = self._transactions.get(payload[8:20])
            if entry is not None:
                return entry[0]
        return self._by_key.get(key)

    def _control(self, body: bytes, src: Address) -> None:
        if body[:1] == bytes([ControlType.HELLO]):
            self._hello(body, src)
            return
        try:
            ControlMessage.parse(body)
        except HeaderError:
            self.counters["drop_control"] += 1
            return
        self.counters["drop_unexpected_control"] += 1

    def _hello(self, body: bytes, src: Address) -> None:
        assert self._clock is not None
        try:
            hello = self.keyed.admit(body, src, self.address, self._wall_clock(), self._clock())
        except HelloError as exc:
            self.refused[exc.reason] += 1
            return
        self.counters["hello"] += 1
        if hello.want_routes:  # a relay that asks for nothing gets media once it forwards some
            self._heard(src)
            live = [session.clients.values() for session in self._by_ufrag.values()]
            self._send_control(ControlType.ROUTES, live, [src])

    # outbound

    def send(self, session: LinkSession, header: bytes, payload: bytes) -> None:
        key = header[2:HEADER_BYTES]
        worker = self._worker_for(session)
        if worker is None or self._socket is None:
            self.counters["drop_no_relay"] += 1
            return
        if len(payload) > MAX_LINK_DATAGRAM_BYTES - HEADER_BYTES:
            self.counters["drop_send_oversized"] += 1
            return
        kind = message_class(payload) if payload[:1] < b"\x04" else None
        if kind != CLASS_ERROR and key not in session.clients:
            self._learn(session, key)
        if kind == CLASS_REQUEST:
            self._record_transaction(session, payload[8:20])
        self.counters["datagrams_out"] += 1
        self._queue(header + payload, worker)

    def _queue(self, data: bytes, to: Address) -> None:
        """Send ``data`` at the end of this loop pass, batched with whatever else is sent in it
        (the media tick's packets for every call go out in one system call)."""
        if len(self._outbox) >= self.policy.max_queued_datagrams:
            self.counters["drop_send_backlog"] += 1
            return
        self._outbox.append((data, to))
        if not self._flush_due and self._loop is not None:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send the outbox; when the socket's buffer is full, the rest when it is writable."""
        outbox, io = self._outbox, self._io
        while outbox and io is not None:  # each pass sends or refuses one at least, or returns
            outcome = io.send(outbox)
            del outbox[: outcome.sent]
            if outcome.refused:
                self.counters["socket_error"] += len(outcome.refused)
                log.debug("link send refused: %s", outcome.refused[0])
            if outcome.blocked:
                self.counters["send_blocked"] += 1
                self._wait_writable(True)
                return
        self._flush_due = False
        self._wait_writable(False)

    def _wait_writable(self, waiting: bool) -> None:
        if waiting == self._waiting_writable or self._socket is None or self._loop is None:
            return
        self._waiting_writable = waiting
        if waiting:
            self._loop.add_writer(self._socket.fileno(), self._flush)
        else:
            self._loop.remove_writer(self._socket.fileno())

    def _worker_for(self, session: LinkSession) -> Address | None:
        assert self._clock is not None
        worker = session.worker
        window_s = self.policy.heard_window_s
        if worker is not None and self._clock() - self._workers.get(worker, -1e9) <= window_s:
            return worker
        return self._latest

    def _learn(self, session: LinkSession, key: bytes) -> None:
        owner = self._by_key.get(key)
        if owner is not None and owner is not session:
            self.counters["route_conflict"] += 1
        elif owner is None and len(session.clients) < self.policy.max_clients_per_session:
            self._by_key[key] = session
            session.clients[key] = client = key_address(key)
            if self.routes is not None:
                self.routes.learned(client)

    def _record_transaction(self, session: LinkSession, txid: bytes) -> None:
        assert self._clock is not None
        if len(self._transactions) >= self.policy.max_transactions:
            oldest = next(iter(self._transactions))
            self._transactions.pop(oldest)[0].transactions.discard(oldest)
        self._transactions[txid] = (session, self._clock() + self.policy.transaction_ttl_s)
        session.transactions.add(txid)

    # control and lifecycle

    def forget(self, session: LinkSession) -> None:
        """Remove a session's ufrag, routes and transactions; tell the relays GONE."""
        self._by_ufrag.pop(session.ufrag, None)
        for key, client in session.clients.items():
            if self._by_key.get(key) is session:
                del self._by_key[key]
                if self.routes is not None:
                    self.routes.withdrawn(client)
        for txid in session.transactions:
            self._transactions.pop(txid, None)
        session.transactions.clear()
        if session.clients:
            self._send_control(ControlType.GONE, [session.clients.values()], list(self._workers))

    def _send_control(
        self, kind: ControlType, groups: Iterable[Iterable[Address]], workers: list[Address]
    ) -> None:
        routes = sorted({a for group in groups for a in group})
        chunks = [
            routes[i : i + MAX_ROUTES_PER_MESSAGE]
            for i in range(0, len(routes), MAX_ROUTES_PER_MESSAGE)
        ]
        messages = [bytes(ControlMessage(kind, tuple(c))) for c in chunks or [[]]]
        if self._socket is None:
            return
        for worker in workers:
            for message in messages:
                self._queue(message, worker)
        self.counters[f"sent_{kind.name.lower()}"] += len(workers) * len(messages)

    def expire(self) -> None:
        """Forget old transactions, silent workers and relays that stopped proving a key."""
        assert self._clock is not None
        now = self._clock()
        for relay in self.keyed.expire(now):
            self._workers.pop(relay, None)
        for txid in [t for t, (_, until) in self._transactions.items() if until < now]:
            self._transactions.pop(txid)[0].transactions.discard(txid)
        forget_s = self.policy.worker_forget_s
        for worker in [w for w, heard in self._workers.items() if now - heard > forget_s]:
            del self._workers[worker]
        if self._latest is not None and self._latest not in self._workers:
            self._latest = None


async def _bound_socket(address: Address) -> socket.socket:
    """A non-blocking UDP socket bound to ``address`` (the first family that binds)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(*address, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
    error: OSError = OSError(f"no address for {address}")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error


class LinkHousekeeping(BackgroundLoop):
    """``expire`` every ``interval_s``. Restarted when it crashes: ``expire`` keeps its state on
    the link and each pass is idempotent, and without it old transactions, silent workers and
    lapsed relays would never be forgotten. Readiness does not follow it (a link that forgets
    late still forwards every call); the crash counter shows a loop that keeps crashing."""

    task_name = "link housekeeping"

    def __init__(
        self, expire: Callable[[], None], interval_s: float, restarts: RestartPolicy | None = None
    ) -> None:
        super().__init__(restarts)
        self._expire = expire
        self.interval_s = interval_s

    async def _run(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.interval_s)
            self._expire()
