"""Bench sessions: client sockets with live routes through one forwarder, and the transceiver end.

The harness plays the transceiver on one link socket: it learns each forwarder worker's link
address from the HELLOs it receives, authenticates every bench client with a real STUN binding
request (USERNAME ``server_ufrag:client_ufrag``, MESSAGE-INTEGRITY keyed with the password
derived from the signed ufrag, RFC 8489 §14.5), records which worker forwarded it (the worker
that owns the client, like a real transceiver would) and answers with ROUTES so every worker
knows every route. The sockets are then handed to the C load generator, which only carries data.
"""

from __future__ import annotations

import os
import select
import socket
import time
from dataclasses import dataclass, field

from aioice import stun

from relay.wire.header import (
    HEADER_BYTES,
    MAX_ROUTES_PER_MESSAGE,
    ControlMessage,
    ControlType,
    HeaderError,
    parse_header,
)
from relay.wire.ufrag import Keyring, derive_password, mint_ufrag

Address = tuple[str, int]
LOOPBACK = "127.0.0.1"
SOCKET_BUFFER_BYTES = 4 << 20
SETUP_TIMEOUT_S = 10.0
STUN_RETRY_S = 0.25


def new_keyring_spec() -> str:
    """A fresh ``ID:HEX`` keyring for one benchmark run."""
    return f"1:{os.urandom(32).hex()}"


def udp_socket(host: str = LOOPBACK) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.bind((host, 0))
    return sock


def address_of(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


@dataclass
class LinkPeer:
    """The transceiver end of the link: one socket, the worker addresses seen in HELLOs."""

    sock: socket.socket = field(default_factory=udp_socket)
    workers: list[Address] = field(default_factory=list)
    owners: dict[Address, Address] = field(default_factory=dict)  # client -> worker link
    clients: list[Address] = field(default_factory=list)

    @property
    def address(self) -> Address:
        return address_of(self.sock)

    def handle(self, datagram: bytes, source: Address) -> None:
        """A HELLO is answered with ROUTES; a forwarded STUN request marks its client owned."""
        try:
            header = parse_header(datagram)
        except HeaderError:
            return
        if header.is_control and datagram[HEADER_BYTES:].startswith(bytes([ControlType.HELLO])):
            if source not in self.workers:
                self.workers.append(source)
            self.send_routes(source)
        elif not header.is_control and datagram[HEADER_BYTES : HEADER_BYTES + 1] == b"\x00":
            self.owners.setdefault(header.client, source)

    def send_routes(self, worker: Address) -> None:
        for start in range(0, len(self.clients), MAX_ROUTES_PER_MESSAGE):
            chunk = tuple(self.clients[start : start + MAX_ROUTES_PER_MESSAGE])
            self.sock.sendto(bytes(ControlMessage(ControlType.ROUTES, chunk)), worker)

    def serve_until(self, deadline: float) -> None:
        """Handle link datagrams for up to 50 ms or until the deadline passes."""
        wait_s = max(0.0, min(0.05, deadline - time.monotonic()))
        if select.select([self.sock], [], [], wait_s)[0]:
            datagram, source = self.sock.recvfrom(4096)
            self.handle(datagram, (str(source[0]), int(source[1])))

    def wait_for_workers(self, count: int, timeout_s: float = SETUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.workers) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"HELLO from {len(self.workers)} of {count} workers")
            self.serve_until(deadline)

    def drain(self) -> None:
        """Handle whatever is queued (HELLOs that arrived meanwhile), without waiting."""
        while select.select([self.sock], [], [], 0)[0]:
            datagram, source = self.sock.recvfrom(4096)
            self.handle(datagram, (str(source[0]), int(source[1])))


def binding_request(keyring: Keyring, transceiver: Address) -> bytes:
    """An ICE connectivity check as a browser sends it, for a session on ``transceiver``."""
    server_ufrag = mint_ufrag(keyring, transceiver)
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    request.attributes["USERNAME"] = f"{server_ufrag}:benchclient"
    request.attributes["PRIORITY"] = 1853817087
    request.attributes["ICE-CONTROLLING"] = int.from_bytes(os.urandom(8), "big")
    request.add_message_integrity(derive_password(keyring, server_ufrag).encode("ascii"))
    return bytes(request)


@dataclass
class BenchSessions:
    """Client sockets, each with a route through the forwarder at ``public``."""

    peer: LinkPeer
    public: Address
    sockets: list[socket.socket]

    @property
    def addresses(self) -> list[Address]:
        return [address_of(s) for s in self.sockets]

    def owner_of(self, client: Address) -> Address:
        return self.peer.owners[client]

    def close(self) -> None:
        for sock in (*self.sockets, self.peer.sock):
            sock.close()


def open_sessions(peer: LinkPeer, public: Address, keyring: Keyring, count: int) -> BenchSessions:
    """``count`` clients, each authenticated with STUN until a worker forwards it to ``peer``."""
    sessions = BenchSessions(peer, public, [udp_socket() for _ in range(count)])
    peer.clients = sessions.addresses
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while missing := [s for s in sessions.sockets if address_of(s) not in peer.owners]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} of {count} clients got no route through {public}")
        for sock in missing:
            sock.sendto(binding_request(keyring, peer.address), public)
        retry_at = min(deadline, time.monotonic() + STUN_RETRY_S)
        while time.monotonic() < retry_at and not _all_owned(sessions):
            peer.serve_until(retry_at)
    for worker in peer.workers:
        peer.send_routes(worker)
    return sessions


def _all_owned(sessions: BenchSessions) -> bool:
    return all(a in sessions.peer.owners for a in sessions.addresses)
