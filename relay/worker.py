"""One relay worker process: the public sockets (shared by SO_REUSEPORT), its own link socket,
and the forwarding loop.

I/O layer. Each socket is read with ``loop.add_reader`` and a bounded drain loop (recvfrom until
BlockingIOError): asyncio's DatagramProtocol costs one epoll round per datagram and measured
0.34x of a C forwarder here, a plain loop ~0.6x (DESIGN.md). The hot paths are inlined and keep
their lookups in local variables; everything else goes through ``relay.routing.Router``.
Counters are plain ints, copied into the supervisor's shared array every
``timing.publish_interval_s`` (``relay.timing``). Which transceivers the worker forwards to
changes at run time when ``RELAY_TRANSCEIVERS`` names DNS names: ``relay.discovery`` looks them
up on this loop and ``relay.transceivers`` decides; ``Worker.transceivers_changed`` applies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, MutableSequence

from relay import counters as c
from relay.config import RelayConfig
from relay.counters import DROP_INDEX
from relay.discovery import Resolve, TransceiverDiscovery, getaddrinfo_addresses
from relay.loop_lag import LoopLagMonitor, LoopLagPolicy, shared_observer
from relay.restarts import run_restarting
from relay.route_lookup import RouteLookups
from relay.routing import (
    UNKNOWN_TRANSCEIVER,
    Action,
    ClientKey,
    Control,
    Drop,
    Forward,
    Router,
    RouteTable,
    SendToClient,
    StunRateLimit,
    needs_route_lookup,
)
from relay.tracing import RouteTracer, route_tracer
from relay.transceivers import Address, Change, TransceiverDirectory
from relay.wire.header import HEADER_BYTES, MAX_LINK_DATAGRAM_BYTES, MAX_PAYLOAD_BYTES
from relay.wire.hello import seal_hello

# Datagrams are read one byte past the limit: a longer one shows as such and is dropped and
# counted (recvfrom would otherwise truncate it silently, and the rest would be forwarded).
OVERSIZED = c.DROPS + DROP_INDEX["oversized"]
OVERSIZED_LINK = c.DROPS + DROP_INDEX["oversized_link"]
DRAIN_BATCH = 256  # datagrams per readiness callback, so one busy socket cannot starve another
SOCKET_BUFFER_BYTES = 4 << 20
_PR_SET_PDEATHSIG = 1


def open_public_socket(host: str, port: int) -> socket.socket:
    """A UDP socket on the shared public port; IPv6 sockets carry IPv6 only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return _finish_socket(sock, host, port)


def open_link_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _finish_socket(socket.socket(family, socket.SOCK_DGRAM), host, port)


def _finish_socket(sock: socket.socket, host: str, port: int) -> socket.socket:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)  # capped by rmem_max
    sock.setblocking(False)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Worker:
    """Owns its sockets and its ticker task: ``start()`` binds and serves, ``aclose()`` stops."""

    def __init__(
        self,
        config: RelayConfig,
        index: int,
        shared: MutableSequence[int],
        resolve: Resolve = getaddrinfo_addresses,
    ) -> None:
        self.config = config
        self.index = index
        self.shared = shared
        self.counts = [0] * c.ROW
        self.routes = RouteTable(config.route_idle_s)
        self.directory = TransceiverDirectory(
            config.transceivers, config.timing.transceivers_grace_s
        )
        self.router = Router(
            config.keys,
            self.directory.current,
            (6 if ":" in host else 4 for host, _ in config.public),
            self.routes,
            StunRateLimit(config.stun_rate, config.stun_burst),
        )
        self.counts[c.TRANSCEIVERS] = len(self.directory.current)
        self.counts[c.NAMES_UNRESOLVED] = len(self.directory.failing)
        self.public: list[socket.socket] = []
        self.link: socket.socket | None = None
        self.now_s = 0.0
        self._ticker: asyncio.Task[None] | None = None
        self._discovery_task: asyncio.Task[None] | None = None
        self.wall_clock: Callable[[], float] = time.time  # HELLO timestamps compare across hosts
        self.started_s = time.monotonic()
        # HELLOs ask a transceiver for its ROUTES while it is new to this worker
        self.known_since = dict.fromkeys(self.router.transceivers, self.started_s)
        self.route_tracer: RouteTracer | None = None  # OTEL_* on: a span per route verdict
        self.lookups: RouteLookups | None = None
        if config.redis is not None:
            self.lookups = RouteLookups(config.redis, self.router, self.counts, config.timing)
        self.discovery: TransceiverDiscovery | None = None
        if self.directory.names:
            family = socket.AF_INET6 if ":" in config.internal_host else socket.AF_INET
            self.discovery = TransceiverDiscovery(
                self.directory,
                family,
                config.timing,
                self.counts,
                self.transceivers_changed,
                self.links_in_use,
                resolve,
                f"relay worker {index}",
            )

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.now_s = loop.time()
        for host, port in self.config.public:
            self.public.append(open_public_socket(host, port))
        link_port = self.config.internal_port + self.index if self.config.internal_port else 0
        self.link = open_link_socket(self.config.internal_host, link_port)
        for number, sock in enumerate(self.public):
            loop.add_reader(sock.fileno(), self._drain_public, number)
        loop.add_reader(self.link.fileno(), self._drain_link)
        if self.lookups is not None:
            self.lookups.start()
        self.counts[c.READY] = 1
        self.send_hellos()
        self.publish()
        self._ticker = asyncio.create_task(
            run_restarting("ticker", self._tick, self._ticker_crashed, self.config.timing.restarts),
            name="ticker",
        )
        if self.discovery is not None:
            self._discovery_task = asyncio.create_task(
                run_restarting(
                    "transceiver discovery",
                    self.discovery.run,
                    self._discovery_crashed,
                    self.config.timing.restarts,
                ),
                name="transceiver discovery",
            )

    def _ticker_crashed(self) -> None:
        self.counts[c.TICKER_CRASHES] += 1

    def _discovery_crashed(self) -> None:
        self.counts[c.DISCOVERY_CRASHES] += 1

    def links_in_use(self) -> set[Address]:
        """The transceivers this worker's routes point to (asked only when one may go)."""
        return {route.link for route in self.routes.inbound.values()}

    def transceivers_changed(self, change: Change) -> None:
        """Forward to (and take link datagrams from) the new set; HELLO each newcomer now, so
        it takes this worker's datagrams from the first one."""
        self.router.set_transceivers(self.directory.current)
        now_s = time.monotonic()
        for address in change.removed:
            self.known_since.pop(address, None)
        for address in change.added:
            self.known_since[address] = now_s
        self.send_hellos(change.added)
        self.publish()

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        for task in (self._ticker, self._discovery_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.lookups is not None:
            await self.lookups.aclose()
        for sock in [*self.public, *([self.link] if self.link else [])]:
            loop.remove_reader(sock.fileno())
            sock.close()
        self.counts[c.READY] = 0
        self.publish()

    def _drain_public(self, number: int) -> None:
        """Client -> transceiver. Hot path inlined (> 10 lines on purpose): one dict lookup,
        one concatenation, one sendto per datagram; misses go to the Router."""
        recvfrom = self.public[number].recvfrom
        routes_get = self.routes.inbound.get
        sendto = self.link.sendto  # type: ignore[union-attr]
        now_s = self.now_s
        limit = MAX_PAYLOAD_BYTES
        packets = octets = 0
        for _ in range(DRAIN_BATCH):
            try:
                data, source = recvfrom(limit + 1)
            except OSError:  # BlockingIOError: drained; anything else: try again on readiness
                break
            if len(data) > limit:
                self.counts[OVERSIZED] += 1
                continue
            route = routes_get(source)
            if route is None:
                self._miss_public(data, source, number)
                continue
            route.seen_s = now_s
            try:
                sendto(route.header + data, route.link)
            except OSError:
                self.counts[c.SEND_ERRORS] += 1
                continue
            packets += 1
            octets += len(data)
        counts = self.counts
        counts[c.TO_TRANSCEIVER_PACKETS] += packets
        counts[c.TO_TRANSCEIVER_BYTES] += octets

    def _drain_link(self) -> None:
        """Transceiver -> client. Hot path inlined: source check, one lookup of the 20-byte
        header in the outbound cache, one sendto; anything else goes to the Router."""
        recvfrom = self.link.recvfrom  # type: ignore[union-attr]
        sources = self.router.link_sources
        outbound_get = self.routes.outbound.get
        senders = [sock.sendto for sock in self.public]
        limit = MAX_LINK_DATAGRAM_BYTES
        packets = octets = 0
        for _ in range(DRAIN_BATCH):
            try:
                data, source = recvfrom(limit + 1)
            except OSError:
                break
            if len(data) > limit:
                self.counts[OVERSIZED_LINK] += 1
                continue
            hit = outbound_get(data[:HEADER_BYTES]) if source in sources else None
            if hit is None:
                self._miss_link(data, source)
                continue
            try:
                senders[hit[0]](data[HEADER_BYTES:], hit[1])
            except OSError:
                self.counts[c.SEND_ERRORS] += 1
                continue
            packets += 1
            octets += len(data) - HEADER_BYTES
        counts = self.counts
        counts[c.TO_CLIENT_PACKETS] += packets
        counts[c.TO_CLIENT_BYTES] += octets

    def _miss_public(self, data: bytes, source: ClientKey, number: int) -> None:
        now = self._clock()
        action = self.router.on_public(data, source, number, now)
        if self.route_tracer is not None:
            self.route_tracer.verdict(data, source, action)
        if self.lookups is not None and needs_route_lookup(action, data):
            self.lookups.want(source, number, now)  # queues only: the answer comes later
        elif action is UNKNOWN_TRANSCEIVER and self.discovery is not None:
            self.discovery.wake()  # a transceiver the names may stand for by now
        self._execute(action)

    def _miss_link(self, data: bytes, source: ClientKey) -> None:
        self._execute(self.router.on_link(data, source, self._clock()))

    def _clock(self) -> float:
        return asyncio.get_running_loop().time()

    def _execute(self, action: Action) -> None:
        counts = self.counts
        match action:
            case Forward(link, datagram):
                if self._send(self.link, datagram, link):  # type: ignore[arg-type]
                    counts[c.TO_TRANSCEIVER_PACKETS] += 1
                    counts[c.TO_TRANSCEIVER_BYTES] += len(datagram) - HEADER_BYTES
            case SendToClient(number, client, payload):
                if self._send(self.public[number], payload, client):
                    counts[c.TO_CLIENT_PACKETS] += 1
                    counts[c.TO_CLIENT_BYTES] += len(payload)
            case Drop(reason):
                counts[c.DROPS + DROP_INDEX[reason]] += 1
            case Control():
                counts[c.CONTROL_RECEIVED] += 1

    def _send(self, sock: socket.socket, data: bytes, address: tuple[object, ...]) -> bool:
        try:
            sock.sendto(data, address)
        except OSError:
            self.counts[c.SEND_ERRORS] += 1
            return False
        return True

    def send_hellos(self, transceivers: Iterable[Address] | None = None) -> None:
        """Prove the keyring to every known transceiver (it takes no data from this link
        socket otherwise) and, with ``hello`` on, ask for its live routes (answered with
        ROUTES) while it is new to this worker (``timing.routes_request_s`` from the worker's
        start, or from when a lookup first named it). One sealed HELLO per transceiver: each
        names its addressee."""
        now_s = self.wall_clock()
        monotonic_s = time.monotonic()
        window_s = self.config.timing.routes_request_s
        for transceiver in self.router.transceivers if transceivers is None else transceivers:
            known_s = self.known_since.get(transceiver, self.started_s)
            want_routes = self.config.hello and monotonic_s - known_s < window_s
            hello = seal_hello(self.config.keys, transceiver, now_s, want_routes)
            if self._send(self.link, hello, transceiver):  # type: ignore[arg-type]
                self.counts[c.HELLOS_SENT] += 1

    def publish(self) -> None:
        """Copy this worker's counters into its row of the shared array."""
        self.counts[c.ROUTES] = len(self.routes.inbound)
        self.counts[c.ROUTES_LEARNED] = self.routes.learned
        base = self.index * c.ROW
        for slot, value in enumerate(self.counts):
            self.shared[base + slot] = value

    async def _tick(self) -> None:
        """Clock stamp, counter publishing, HELLO, expiry: timers, never per packet."""
        loop, timing = asyncio.get_running_loop(), self.config.timing
        last_publish_s = last_hello_s = last_expiry_s = loop.time()
        while True:
            await asyncio.sleep(timing.clock_interval_s)
            self.now_s = now_s = loop.time()
            if now_s - last_publish_s >= timing.publish_interval_s:
                last_publish_s = now_s
                self.publish()
            if now_s - last_hello_s >= timing.hello_interval_s:
                last_hello_s = now_s
                self.send_hellos()
            if now_s - last_expiry_s >= timing.expiry_interval_s:
                last_expiry_s = now_s
                self.routes.expire(now_s)
                self.router.rate_limit.sweep(now_s)
                if self.lookups is not None:
                    self.lookups.admission.sweep(now_s)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the supervisor dies, so no orphan keeps the port."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def _serve(
    config: RelayConfig,
    index: int,
    shared: MutableSequence[int],
    lag: MutableSequence[int] | None = None,
    lag_policy: LoopLagPolicy | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    parent = os.getppid()
    worker = Worker(config, index, shared)
    worker.route_tracer = route_tracer(os.environ, index)
    try:
        worker.start()
    except OSError as error:
        print(f"relay worker {index}: cannot bind: {error}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    monitor = None
    if lag is not None:  # row 0 is the supervisor's
        observe = shared_observer(lag, index + 1)
        logger = logging.getLogger("relay.worker")
        name = f"relay worker {index} event loop"
        monitor = LoopLagMonitor(lag_policy or LoopLagPolicy(), observe, logger, name)
        monitor.start()
    try:
        while not stop.is_set() and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
    finally:
        if monitor is not None:
            await monitor.aclose()
        await worker.aclose()
        if worker.route_tracer is not None:
            await asyncio.to_thread(worker.route_tracer.shutdown)


def run_worker(
    config: RelayConfig,
    index: int,
    shared: MutableSequence[int],
    lag: MutableSequence[int] | None = None,
    lag_policy: LoopLagPolicy | None = None,
) -> None:
    """Entry point of a worker process (spawned by the supervisor); ``lag``: the shared
    event-loop lag histogram (``relay.loop_lag``), this worker's row ``index + 1``."""
    import uvloop

    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Ctrl-C reaches the whole process group; the supervisor alone decides, then SIGTERMs us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(_serve(config, index, shared, lag, lag_policy))
