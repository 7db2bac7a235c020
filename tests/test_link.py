"""transceiver.webrtc.link on real loopback UDP sockets: demux, route learning, worker choice,
control.

Two sockets in the test play two relay workers (keyed by a signed HELLO, as real workers are),
a third a stranger; the link's clock is injected so the 3 s "heard recently" window and the
keyed relays' expiry are exercised without waiting.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from aioice import stun

from relay.wire.header import (
    HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    ControlMessage,
    ControlType,
    header_for,
    parse_header,
)
from relay.wire.hello import seal_hello
from relay.wire.ufrag import Keyring
from transceiver.webrtc.link import Link, LinkSession
from transceiver.webrtc.link_policy import LinkPolicy

UFRAG = "AQcEfwAAAcI0G5fO0yrdeveSdeaXeQV+kteM"
CLIENT = ("192.0.2.10", 40000)
OTHER_CLIENT = ("2001:db8::10", 40001)
PUBLIC = ("127.0.0.1", 3478)
KEYRING = Keyring.parse("9:" + "5e" * 32)
POLICY = LinkPolicy()  # the defaults: the windows below are the ones a transceiver runs with


class Endpoint(asyncio.DatagramProtocol):
    """A loopback socket that queues what it receives (a relay worker, or a session receiver)."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.put_nowait((data, (addr[0], addr[1])))

    async def next(self) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.received.get(), 2.0)

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, to)


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
async def parts(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[Link, Clock, Endpoint, Endpoint]]:
    loop = asyncio.get_running_loop()
    clock = Clock()
    policy = getattr(request, "param", POLICY)
    link = Link(("127.0.0.1", 0), KEYRING, clock=clock, policy=policy)
    await link.start()
    workers = [Endpoint(), Endpoint()]
    for worker in workers:
        await loop.create_datagram_endpoint(
            functools.partial(lambda w: w, worker), local_addr=("127.0.0.1", 0)
        )
    yield link, clock, workers[0], workers[1]
    await link.aclose()
    for worker in workers:
        assert worker.transport is not None
        worker.transport.close()


def attach(link: Link, ufrag: str = UFRAG) -> tuple[LinkSession, Endpoint, Endpoint]:
    session = link.open_session(ufrag)
    receivers = (Endpoint(), Endpoint())
    for family, receiver in zip((4, 6), receivers, strict=True):
        session.transport(family, PUBLIC).set_protocol(receiver)
    return session, receivers[0], receivers[1]


def binding(cls: stun.Class = stun.Class.REQUEST, username: str | None = None) -> stun.Message:
    message = stun.Message(message_method=stun.Method.BINDING, message_class=cls)
    if username is not None:
        message.attributes["USERNAME"] = username
    message.add_fingerprint()
    return message


def hello(link: Link, keyring: Keyring = KEYRING, **flags: Any) -> bytes:
    return seal_hello(keyring, link.address, time.time(), **flags)


async def routes(worker: Endpoint, link: Link) -> tuple[tuple[str, int], ...]:
    """A keyed HELLO (which also admits ``worker``'s data) and the ROUTES it is answered with."""
    worker.send(hello(link), link.address)
    data, _ = await worker.next()
    assert parse_header(data).is_control
    message = ControlMessage.parse(data[HEADER_BYTES:])
    assert message.kind == ControlType.ROUTES
    return message.routes


async def test_stun_by_ufrag_then_media_by_learned_address(parts: Any) -> None:
    link, _, worker, _ = parts
    session, v4, v6 = attach(link)
    assert await routes(worker, link) == ()
    request = bytes(binding(username=f"{UFRAG}:abcd"))
    worker.send(header_for(CLIENT) + request, link.address)
    assert await v4.next() == (request, CLIENT)
    dtls = b"\x16\xfe\xfd" + b"\x01" * 40
    worker.send(header_for(CLIENT) + dtls, link.address)  # not yet owned: dropped
    assert await routes(worker, link) == ()  # a HELLO round trip orders the two
    session.send(b"\x16\xfe\xfd answer", CLIENT)  # the owner answering teaches the route
    data, _ = await worker.next()
    assert data == header_for(CLIENT) + b"\x16\xfe\xfd answer"
    worker.send(header_for(CLIENT), link.address)  # an empty payload is never delivered
    worker.send(header_for(CLIENT) + dtls, link.address)
    assert await v4.next() == (dtls, CLIENT)
    assert link.counters["drop_no_session"] == 2
    assert await routes(worker, link) == (CLIENT,)
    session.send(b"\x80media", OTHER_CLIENT)
    await worker.next()
    worker.send(header_for(OTHER_CLIENT) + b"\x80rtp", link.address)
    assert await v6.next() == (b"\x80rtp", OTHER_CLIENT)


async def test_worker_choice_follows_the_sessions_last_forwarder_while_heard(parts: Any) -> None:
    link, clock, first, second = parts
    session, v4, _ = attach(link)
    await routes(first, link)
    first.send(header_for(CLIENT) + bytes(binding(username=f"{UFRAG}:x")), link.address)
    await v4.next()
    await routes(second, link)  # second is now the most recently heard worker
    clock.now_s += POLICY.heard_window_s - 0.5
    session.send(b"\x17one", CLIENT)
    assert (await first.next())[0].endswith(b"\x17one")
    # ICE may answer on another pair: the session's last forwarder, not the address's, wins.
    session.send(b"\x17other pair", OTHER_CLIENT)
    assert (await first.next())[0].endswith(b"\x17other pair")
    clock.now_s += 1.0  # first not heard for > 3 s: the most recently heard worker
    await routes(second, link)
    session.send(b"\x17two", CLIENT)
    assert (await second.next())[0].endswith(b"\x17two")
    assert first.received.empty()


async def test_responses_by_transaction_and_errors_teach_nothing(parts: Any) -> None:
    link, _, worker, _ = parts
    session, v4, _ = attach(link)
    await routes(worker, link)
    request = binding()
    session.send(bytes(request), CLIENT)
    await worker.next()
    response = binding(stun.Class.RESPONSE)
    response.transaction_id = request.transaction_id
    stranger = ("198.51.100.9", 5000)  # an answer from an address the session never sent to
    worker.send(header_for(stranger) + bytes(response), link.address)
    assert await v4.next() == (bytes(response), stranger)
    error = binding(stun.Class.ERROR)
    session.send(bytes(error), stranger)
    await worker.next()
    worker.send(header_for(stranger) + b"\x17\xfe\xfd", link.address)
    await routes(worker, link)
    assert link.counters["drop_no_session"] == 1
    assert v4.received.empty()


async def test_close_sends_gone_and_forgets(parts: Any) -> None:
    link, _, worker, _ = parts
    session, v4, _ = attach(link)
    other, _, _ = attach(link, UFRAG[:-4] + "AAAA")
    await routes(worker, link)
    session.send(b"\x17hi", CLIENT)
    await worker.next()
    other.send(b"\x17mine?", CLIENT)  # already owned by session: not overwritten
    await worker.next()
    assert link.counters["route_conflict"] == 1
    session.close()
    gone, _ = await worker.next()
    assert ControlMessage.parse(gone[HEADER_BYTES:]) == ControlMessage(ControlType.GONE, (CLIENT,))
    assert link.session_count == 1
    worker.send(header_for(CLIENT) + b"\x17late", link.address)
    assert await routes(worker, link) == ()
    assert link.counters["drop_no_session"] == 1
    assert v4.received.empty()
    with pytest.raises(ValueError, match="already on the link"):
        link.open_session(UFRAG[:-4] + "AAAA")


async def test_routes_are_chunked_by_64(parts: Any) -> None:
    link, _, worker, _ = parts
    await routes(worker, link)
    for i in range(70):
        session, _, _ = attach(link, f"{UFRAG[:-4]}{i:04d}")
        session.send(b"\x17x", ("192.0.2.1", 10_000 + i))
        await worker.next()
    worker.send(hello(link), link.address)
    sizes = [
        len(ControlMessage.parse((await worker.next())[0][HEADER_BYTES:]).routes) for _ in "ab"
    ]
    assert sizes == [64, 6]


async def endpoint() -> Endpoint:
    stranger = Endpoint()
    await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: stranger, local_addr=("127.0.0.1", 0)
    )
    return stranger


async def test_data_from_an_unkeyed_address_is_refused_and_never_answered(parts: Any) -> None:
    link, _, worker, _ = parts
    session, v4, _ = attach(link)
    await routes(worker, link)
    stranger = await endpoint()
    try:
        stranger.send(header_for(CLIENT) + bytes(binding(username=f"{UFRAG}:x")), link.address)
        stranger.send(header_for(CLIENT) + b"\x17\xfe\xfd" + b"\x00" * 30, link.address)
        assert await routes(worker, link) == ()  # the round trip orders the stranger's two
        assert link.refused == {"unkeyed_source": 2}
        assert v4.received.empty()
        session.send(b"\x17answer", CLIENT)  # the keyed worker, not the last sender, gets it
        assert (await worker.next())[0].endswith(b"\x17answer")
        assert stranger.received.empty()
    finally:
        assert stranger.transport is not None
        stranger.transport.close()


async def test_hellos_that_do_not_verify_get_no_routes_and_key_nothing(parts: Any) -> None:
    link, _, worker, _ = parts
    attach(link)
    stranger = await endpoint()
    valid = hello(link)
    worker.send(valid, link.address)
    await worker.next()  # ROUTES for the real worker
    refused = {
        "hello_length": bytes(ControlMessage(ControlType.HELLO)),  # the old, unsigned HELLO
        "hello_mac": hello(link, Keyring.parse("9:" + "77" * 32)),
        "hello_key_id": hello(link, Keyring.parse("3:" + "77" * 32)),
        "hello_stale": seal_hello(KEYRING, link.address, time.time() - 31),
        "hello_future": seal_hello(KEYRING, link.address, time.time() + 31),
        "hello_address": seal_hello(KEYRING, ("127.0.0.1", 9), time.time()),
        "hello_replay": valid,
    }
    try:
        for datagram in refused.values():
            stranger.send(datagram, link.address)
        stranger.send(header_for(CLIENT) + bytes(binding(username=f"{UFRAG}:x")), link.address)
        await routes(worker, link)  # orders everything the stranger sent
        assert link.refused == dict.fromkeys([*refused, "unkeyed_source"], 1)
        assert link.counters["sent_routes"] == 2  # both to the worker
        assert stranger.received.empty()
        assert set(link.keyed.sources) == {worker.address}
    finally:
        assert stranger.transport is not None
        stranger.transport.close()


async def test_a_hello_without_the_routes_flag_keys_quietly_until_it_expires(parts: Any) -> None:
    link, clock, worker, other = parts
    _, v4, _ = attach(link)
    worker.send(hello(link, want_routes=False), link.address)
    request = bytes(binding(username=f"{UFRAG}:x"))
    worker.send(header_for(CLIENT) + request, link.address)
    assert await v4.next() == (request, CLIENT)
    assert link.counters["hello"] == 1 and link.counters["sent_routes"] == 0
    await routes(other, link)
    clock.now_s += POLICY.keyed_ttl_s + 1  # worker's last HELLO is now too old; other HELLOs again
    await routes(other, link)
    link.expire()
    assert set(link.keyed.sources) == {other.address}
    worker.send(header_for(CLIENT) + request, link.address)
    await routes(other, link)
    assert link.refused == {"unkeyed_source": 1}
    assert v4.received.empty()


async def test_a_datagram_at_the_size_limit_is_delivered_and_one_byte_more_is_dropped(
    parts: Any,
) -> None:
    """The link takes what a relay sends at most (header + MAX_PAYLOAD_BYTES); a larger
    datagram is dropped and counted, even from a keyed relay for a known client."""
    link, _, worker, _ = parts
    session, v4, _ = attach(link)
    await routes(worker, link)
    session.send(b"\x17\xfe\xfd answer", CLIENT)  # the owner answering teaches the route
    await worker.next()
    at_limit = b"\x17" + b"a" * (MAX_PAYLOAD_BYTES - 1)
    worker.send(header_for(CLIENT) + b"\x17" + b"o" * MAX_PAYLOAD_BYTES, link.address)
    worker.send(header_for(CLIENT) + at_limit, link.address)  # the same socket: in order
    assert await v4.next() == (at_limit, CLIENT)
    assert link.counters["drop_oversized"] == 1
    assert v4.received.empty()


READ_WHEN_READABLE = LinkPolicy(read_interval_s=0.0)


@pytest.mark.parametrize(
    "parts",
    [POLICY, READ_WHEN_READABLE],
    indirect=True,
    ids=["read_interval", "read_when_readable"],
)
async def test_bursts_each_way_arrive_whole_and_in_order(parts: Any) -> None:
    """What one loop pass sends goes out in batches (sendmmsg), what waits is drained in
    batches (recvmmsg), read every ``read_interval_s`` while busy or whenever readable: a burst
    of several batches, each way, all of it in order."""
    link, _, worker, _ = parts
    session, v4, _ = attach(link)
    await routes(worker, link)
    count = 3 * POLICY.io_batch + 5
    for i in range(count):
        session.send(b"\x17out %d" % i, CLIENT)
    assert [(await worker.next())[0][HEADER_BYTES:] for _ in range(count)] == [
        b"\x17out %d" % i for i in range(count)
    ]
    for i in range(count):
        worker.send(header_for(CLIENT) + b"\x17in %d" % i, link.address)
    assert [await v4.next() for _ in range(count)] == [
        (b"\x17in %d" % i, CLIENT) for i in range(count)
    ]


class Choking:
    """The link's own socket I/O, but a full buffer (EAGAIN) after ``per_call`` datagrams, the
    first ``chokes`` times: loopback never fills a UDP send buffer (the kernel hands each
    datagram on at once), so the full buffer is told, not provoked."""

    def __init__(self, io: Any, per_call: int, chokes: int) -> None:
        self.io, self.per_call, self.chokes = io, per_call, chokes

    def send(self, datagrams: Any) -> Any:
        if self.chokes <= 0:
            return self.io.send(datagrams)
        self.chokes -= 1
        outcome = self.io.send(datagrams[: self.per_call])
        return outcome._replace(blocked=True)

    def receive(self) -> Any:
        return self.io.receive()


async def test_a_full_send_buffer_holds_the_rest_until_the_socket_is_writable(
    parts: Any,
) -> None:
    link, _, worker, _ = parts
    session, _, _ = attach(link)
    await routes(worker, link)
    link._io = Choking(link._io, per_call=3, chokes=4)
    for i in range(20):
        session.send(b"\x17held %d" % i, CLIENT)
    assert [(await worker.next())[0][HEADER_BYTES:] for _ in range(20)] == [
        b"\x17held %d" % i for i in range(20)
    ]
    assert link.counters["send_blocked"] == 4
    session.send(b"\x17after", CLIENT)  # writable again: sent on the next pass, as before
    assert (await worker.next())[0].endswith(b"\x17after")
