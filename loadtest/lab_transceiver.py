"""A lab transceiver: the far end of the ``relay`` scenario, speaking the real link protocol.

It does what a transceiver's link does, minus the calls: it accepts datagrams only from relay
link sockets that proved the keyring with a keyed HELLO (answering HELLOs that ask for routes
with ROUTES naming every client it has seen, as a restarted relay expects), answers each
forwarded STUN binding request with a success response (XOR-MAPPED-ADDRESS,
MESSAGE-INTEGRITY under the password the server ufrag derives, FINGERPRINT), and echoes every
RTP-shaped datagram back with its link header, so the relay routes it to the client. Echoes go
back in batches (``recvmmsg``/``sendmmsg``, the received buffers sent as they are); STUN and
control messages are handled one by one.

    python -m loadtest lab-transceiver --listen 127.0.0.1:7000   # keys: LOADTEST_KEYS or RELAY_KEYS

Prints ``lab-transceiver listening on HOST:PORT`` when ready and a JSON line of counters every
``--stats-s`` seconds; stops on SIGTERM/SIGINT or after ``--duration-s``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence

import numpy as np
import redis

from loadtest.mmsg import Messages
from loadtest.stun_messages import (
    StunError,
    binding_success,
    integrity_key,
    mapped_address,
    read_username,
)
from relay.wire.header import (
    FLAG_CONTROL,
    HEADER_BYTES,
    MAX_LINK_DATAGRAM_BYTES,
    MAX_ROUTES_PER_MESSAGE,
    ControlType,
    HeaderError,
    encode_header,
    pack_address,
    parse_header,
)
from relay.wire.hello import HelloError, ReplayGuard, open_hello
from relay.wire.route_record import encode_route, route_key
from relay.wire.ufrag import Keyring, derive_password

Address = tuple[str, int]
BATCH = 256
SMALL_BATCH = 24
MAX_CACHED = 1_000_000  # per-client caches are cleared (and refilled) past this many entries
ROUTES_HEADER = encode_header(b"\x00" * 18, FLAG_CONTROL) + bytes([ControlType.ROUTES])
KEYED_FOR_S = 120.0
CLIENT_IDLE_S = 60.0
SOCKET_BUFFER_BYTES = 8 << 20


class RoutePublisher:
    """Writes ``client -> this transceiver`` into the relays' Redis route cache, as a
    transceiver's route publishing does: new routes at once (one pipeline per poll), every live
    route again each third of the TTL."""

    def __init__(self, url: str, prefix: str, link: Address, ttl_s: float) -> None:
        self.redis = redis.Redis.from_url(url)
        self.prefix = prefix
        self.value = encode_route(link)
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.refresh_s = ttl_s / 3
        self.pending: list[Address] = []
        self.refreshed_at = time.monotonic()
        self.published = 0

    def publish(self, clients: dict[Address, float], now: float) -> None:
        if now - self.refreshed_at >= self.refresh_s:
            self.refreshed_at = now
            self.pending = list(clients)
        if not self.pending:
            return
        pipe = self.redis.pipeline(transaction=False)
        for client in self.pending:
            pipe.set(route_key(self.prefix, client), self.value, px=self.ttl_ms)
        pipe.execute()
        self.published += len(self.pending)
        self.pending = []


class LabTransceiver:
    """One link socket; ``serve`` handles datagrams until stopped."""

    def __init__(self, keyring: Keyring, listen: Address, advertise: Address | None = None) -> None:
        self.keyring = keyring
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        self.sock.bind(listen)
        host, port = self.sock.getsockname()[:2]
        # HELLOs name their addressee: the address the relays were given for this transceiver
        self.address: Address = advertise or (str(host), int(port))
        self.inbox = Messages(BATCH, MAX_LINK_DATAGRAM_BYTES, names=True)
        self.keyed: dict[bytes, float] = {}  # relay link sockaddr bytes -> keyed until
        self.replays = ReplayGuard()
        self.passwords: dict[bytes, hmac.HMAC] = {}  # server ufrag -> its integrity key
        self.by_header: dict[bytes, tuple[Address, bytes]] = {}  # -> client, XOR-MAPPED-ADDRESS
        self.clients: dict[Address, float] = {}
        self.packed: dict[Address, bytes] = {}  # client -> its 18-byte ROUTES entry
        self.counts = dict.fromkeys(
            (
                "echoed",
                "stun_answered",
                "stun_refused",
                "hellos",
                "hellos_refused",
                "unkeyed_dropped",
                "malformed",
            ),
            0,
        )
        self.stopping = False
        self.routes: RoutePublisher | None = None

    def serve(self, duration_s: float | None = None, stats_s: float = 0.0) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        deadline = None if duration_s is None else time.monotonic() + duration_s
        next_stats = time.monotonic() + stats_s
        while not self.stopping and (deadline is None or time.monotonic() < deadline):
            poller.poll(50)
            for _ in range(64):
                count = self.inbox.receive(self.sock.fileno())
                if count == 0:
                    break
                self.handle(count)
            if self.routes is not None:
                self.routes.publish(self.clients, time.monotonic())
            if stats_s and time.monotonic() >= next_stats:
                next_stats += stats_s
                print(json.dumps(self.counts), flush=True)

    def handle(self, count: int) -> None:
        """The first ``count`` datagrams of the inbox. Small batches (the common case at
        keepalive rates: a wakeup or two per consent check) one by one in Python, where numpy's
        fixed cost per call would dominate; large ones with numpy."""
        if count < SMALL_BATCH:
            self._handle_each(count, time.monotonic())
        else:
            self._handle_batch(count)

    def _handle_each(self, count: int, now: float) -> None:
        lengths = self.inbox.headers["len"][:count].tolist()
        names = self.inbox.names[:count, :8].tobytes()
        rows = self.inbox.data
        echo: list[int] = []
        for slot in range(count):
            name, length, row = names[8 * slot : 8 * slot + 8], lengths[slot], rows[slot]
            if row[1] & FLAG_CONTROL:
                self._control(row[:length].tobytes(), name, now)
            elif self.keyed.get(name, 0.0) <= now:
                self.counts["unkeyed_dropped"] += 1
            elif length > HEADER_BYTES and row[HEADER_BYTES] & 0xC0 == 0x80:
                echo.append(slot)
            else:
                source = (socket.inet_ntoa(name[4:8]), int.from_bytes(name[2:4], "big"))
                self._stun(row[:length].tobytes(), source, now)
        if echo:
            slots = np.array(echo, np.intp)
            self.counts["echoed"] += self.inbox.send(
                self.sock.fileno(), slots, self.inbox.headers["len"][slots]
            )

    def _handle_batch(self, count: int) -> None:
        """Control first (a HELLO keys its sender for the data behind it in the same batch),
        then echoes in one batch, then STUN."""
        now = time.monotonic()
        data = self.inbox.data[:count]
        lengths = self.inbox.lengths(count).astype(np.int64)
        names = self.inbox.names[:count]
        is_control = (data[:, 1] & FLAG_CONTROL) != 0
        for slot in np.flatnonzero(is_control):
            self._control(bytes(data[slot, : lengths[slot]]), bytes(names[slot, :8]), now)
        # the first 8 bytes of a sockaddr_in (family, port, address) as one number per datagram
        live = [int.from_bytes(name, "little") for name, until in self.keyed.items() if until > now]
        keyed = np.isin(names[:, :8].copy().view("<u8")[:, 0], np.array(live, np.uint64))
        first = data[:, HEADER_BYTES]
        echo = keyed & ~is_control & ((first & 0xC0) == 0x80) & (lengths > HEADER_BYTES)
        echo_slots = np.flatnonzero(echo)
        if echo_slots.size:
            self.counts["echoed"] += self.inbox.send(
                self.sock.fileno(), echo_slots, lengths[echo_slots]
            )
        for slot in np.flatnonzero(~echo & ~is_control):
            if not keyed[slot]:
                self.counts["unkeyed_dropped"] += 1
                continue
            name = bytes(names[slot, :8])
            source = (socket.inet_ntoa(name[4:8]), int.from_bytes(name[2:4], "big"))
            self._stun(bytes(data[slot, : lengths[slot]]), source, now)

    def _control(self, datagram: bytes, name: bytes, now: float) -> None:
        payload = datagram[HEADER_BYTES:]
        if not payload.startswith(bytes([ControlType.HELLO])):
            self.counts["malformed"] += 1
            return
        try:
            hello = open_hello(self.keyring, payload, self.address, time.time())
            self.replays.check(hello, time.time())
        except HelloError:
            self.counts["hellos_refused"] += 1
            return
        self.counts["hellos"] += 1
        self.keyed[name] = now + KEYED_FOR_S
        if hello.want_routes:
            source = (socket.inet_ntoa(name[4:8]), int.from_bytes(name[2:4], "big"))
            self._send_routes(source, now)

    def _send_routes(self, relay: Address, now: float) -> None:
        """ROUTES naming every client seen within ``CLIENT_IDLE_S`` (as a transceiver answers a
        HELLO that asks), built from entries packed once per client."""
        stale = [c for c, seen in self.clients.items() if now - seen >= CLIENT_IDLE_S]
        for client in stale:
            del self.clients[client]
            self.packed.pop(client, None)
        entries = [self.packed[c] for c in self.clients]
        head = ROUTES_HEADER
        for start in range(0, len(entries), MAX_ROUTES_PER_MESSAGE):
            chunk = entries[start : start + MAX_ROUTES_PER_MESSAGE]
            self.sock.sendto(head + len(chunk).to_bytes(2, "big") + b"".join(chunk), relay)

    def _stun(self, datagram: bytes, source: Address, now: float) -> None:
        link_header = datagram[:HEADER_BYTES]
        try:
            known = self.by_header.get(link_header)
            if known is None:
                client = parse_header(datagram).client
                known = (client, mapped_address(client))
                if len(self.by_header) > MAX_CACHED:
                    self.by_header.clear()
                self.by_header[link_header] = known
            request = datagram[HEADER_BYTES:]
            server_ufrag = read_username(request).split(b":", 1)[0]
            key = self.passwords.get(server_ufrag)
            if key is None:
                password = derive_password(self.keyring, server_ufrag.decode("ascii"))
                key = integrity_key(password.encode())
                if len(self.passwords) > MAX_CACHED:
                    self.passwords.clear()
                self.passwords[server_ufrag] = key
        except (HeaderError, StunError, UnicodeDecodeError, ValueError):
            self.counts["stun_refused"] += 1
            return
        client, mapped = known
        if client not in self.clients:
            self.packed[client] = pack_address(client)
            if self.routes is not None:
                self.routes.pending.append(client)
        self.clients[client] = now
        answer = binding_success(request[8:20], client, key, mapped)
        self.sock.sendto(link_header + answer, source)
        self.counts["stun_answered"] += 1


def keyring_from_env() -> Keyring:
    spec = os.environ.get("LOADTEST_KEYS") or os.environ.get("RELAY_KEYS")
    if not spec:
        raise SystemExit("lab-transceiver: set LOADTEST_KEYS (the relay's keyring, ID:HEX)")
    return Keyring.parse(spec)


def parse_address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest lab-transceiver")
    parser.add_argument("--listen", type=parse_address, default=("127.0.0.1", 0))
    parser.add_argument(
        "--advertise",
        type=parse_address,
        default=None,
        help="the address relays know this transceiver by (default: --listen)",
    )
    parser.add_argument("--redis-url", help="publish routes to this Redis (the relays' cache)")
    parser.add_argument("--redis-key-prefix", default="voicerelay")
    parser.add_argument("--route-ttl-s", type=float, default=60.0)
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument("--stats-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    lab = LabTransceiver(keyring_from_env(), args.listen, args.advertise)
    if args.redis_url:
        lab.routes = RoutePublisher(
            args.redis_url, args.redis_key_prefix, lab.address, args.route_ttl_s
        )

    def stop(*_: object) -> None:
        lab.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"lab-transceiver listening on {lab.address[0]}:{lab.address[1]}", flush=True)
    lab.serve(args.duration_s, args.stats_s)
    print(json.dumps(lab.counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
