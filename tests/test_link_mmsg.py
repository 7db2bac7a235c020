"""transceiver.webrtc.mmsg on real loopback sockets: batches sent and drained, both kinds
(``sendmmsg``/``recvmmsg`` and the plain fallback), a datagram larger than a slot counted and
dropped, a datagram the kernel refuses skipped with its error, IPv6 names."""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Iterator

import pytest

from transceiver.webrtc.mmsg import (
    BatchedDatagrams,
    Datagram,
    Datagrams,
    PlainDatagrams,
    batched_available,
    datagrams_for,
)

SLOT_BYTES = 64
BATCH = 16
DEADLINE_S = 5.0

KINDS = ["batched", "plain"]


def make(kind: str, sock: socket.socket) -> Datagrams:
    if kind == "batched":
        if not batched_available():
            pytest.skip("no sendmmsg/recvmmsg here")
        return BatchedDatagrams(sock, BATCH, SLOT_BYTES)
    return PlainDatagrams(sock, SLOT_BYTES, BATCH)


def udp(host: str = "127.0.0.1", family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made = [udp() for _ in range(3)]
    yield made
    for sock in made:
        sock.close()


def drain(io: Datagrams, sock: socket.socket, want: int) -> tuple[list[Datagram], int]:
    """What ``io`` receives until ``want`` datagrams (received or oversized) or the deadline."""
    got: list[Datagram] = []
    oversized = 0
    deadline = time.monotonic() + DEADLINE_S
    while len(got) + oversized < want and time.monotonic() < deadline:
        select.select([sock], [], [], 0.1)
        received = io.receive()
        got += received.datagrams
        oversized += received.oversized
    return got, oversized


def plain_drain(sock: socket.socket, want: int) -> list[bytes]:
    return [data for data, _ in drain(PlainDatagrams(sock, 4096), sock, want)[0]]


def send_all(io: Datagrams, datagrams: list[Datagram]) -> None:
    rest = datagrams
    for _ in range(len(datagrams)):  # each send takes one at least, or is blocked
        if not rest:
            return
        outcome = io.send(rest)
        assert not outcome.blocked and not outcome.refused
        rest = rest[outcome.sent :]
    assert not rest


@pytest.mark.parametrize("kind", KINDS)
def test_batches_out_to_two_addresses_and_in_from_two(
    kind: str, sockets: list[socket.socket]
) -> None:
    link, first, second = sockets
    io = make(kind, link)
    to = [first.getsockname(), second.getsockname()]
    out = [(b"out %d" % i, to[i % 2]) for i in range(3 * BATCH + 1)]  # four batches
    send_all(io, out)
    assert plain_drain(first, len(out) // 2 + 1) == [d for d, a in out if a == to[0]]
    assert plain_drain(second, len(out) // 2) == [d for d, a in out if a == to[1]]
    for i in range(2 * BATCH + 3):
        (first if i % 2 else second).sendto(b"in %d" % i, link.getsockname())
    got, oversized = drain(io, link, 2 * BATCH + 3)
    assert oversized == 0
    assert [d for d, a in got if a == to[0]] == [b"in %d" % i for i in range(1, 2 * BATCH + 3, 2)]
    assert [d for d, a in got if a == to[1]] == [b"in %d" % i for i in range(0, 2 * BATCH + 3, 2)]
    assert len(got) == 2 * BATCH + 3


@pytest.mark.parametrize("kind", KINDS)
def test_a_datagram_larger_than_a_slot_is_counted_and_dropped(
    kind: str, sockets: list[socket.socket]
) -> None:
    link, peer, _ = sockets
    io = make(kind, link)
    for size in (10, SLOT_BYTES + 1, SLOT_BYTES, 4000):
        peer.sendto(bytes([size % 256]) * size, link.getsockname())
    got, oversized = drain(io, link, 4)
    assert oversized == 2
    assert got == [(bytes([10]) * 10, peer.getsockname()), (b"@" * SLOT_BYTES, peer.getsockname())]


@pytest.mark.parametrize("kind", KINDS)
def test_a_datagram_the_kernel_refuses_is_skipped_with_its_error(
    kind: str, sockets: list[socket.socket]
) -> None:
    link, peer, _ = sockets
    io = make(kind, link)
    to = peer.getsockname()
    broadcast = ("255.255.255.255", to[1])  # no SO_BROADCAST: EACCES
    outcome = io.send([(b"one", to), (b"two", broadcast), (b"three", to)])
    assert outcome.sent == 3 and not outcome.blocked
    assert [error.errno for error in outcome.refused] == [errno.EACCES]
    assert plain_drain(peer, 2) == [b"one", b"three"]


@pytest.mark.parametrize("kind", KINDS)
def test_ipv6_names(kind: str) -> None:
    try:
        link, peer = udp("::1", socket.AF_INET6), udp("::1", socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with link, peer:
        io = make(kind, link)
        to = peer.getsockname()[:2]
        send_all(io, [(b"a", to), (b"b", to)])
        assert plain_drain(peer, 2) == [b"a", b"b"]
        peer.sendto(b"c", link.getsockname())
        peer.sendto(b"d", link.getsockname())
        assert drain(io, link, 2) == ([(b"c", ("::1", to[1])), (b"d", ("::1", to[1]))], 0)


def test_a_batch_of_one_is_plain_or_batched_by_the_setting(sockets: list[socket.socket]) -> None:
    link = sockets[0]
    assert isinstance(datagrams_for(link, 1, SLOT_BYTES), PlainDatagrams)
    if batched_available():
        assert isinstance(datagrams_for(link, 2, SLOT_BYTES), BatchedDatagrams)
