"""The pieces of a forwarded sideband on their own: the hop header (pure) and the directory of
session owners on a real redis-server (a call's session, its lease's owner, the owner's address;
the previous release's records);
and a pod's own hops (its seat's key, ``owner_routing``'s stages), without processes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.requests import Request

from deploy.redis_server import RedisServer, redis_server_binary
from deploy.waiting import poll
from relay.wire.redis_config import RedisConfig
from relay.wire.ufrag import Keyring
from transceiver.http.app import create_app
from transceiver.http.auth import AuthConfig, Authenticator
from transceiver.http.hop_signature import (
    HOP_TTL_S,
    HopError,
    HopKeys,
    hop_header_of,
    hop_headers,
    pod_keys,
    pod_target,
)
from transceiver.http.owner_hop import FORWARD_TIMEOUT_S, OwnerForwarder
from transceiver.http.owner_routing import BETWEEN_TRANSCEIVERS, HANGUP, WITHIN_POD, OwnerRouting
from transceiver.http.websocket import Refused
from transceiver.store.connection import open_redis
from transceiver.store.keys import SessionKeys
from transceiver.store.sideband_directory import (
    Owner,
    SidebandDirectory,
    call_key,
    locate_owner,
    owner_key,
    previous_release_key,
)
from transceiver.webrtc.calls import CallLimits, Calls
from transceiver.webrtc.link import Link
from transceiver.workers.seats import Seat

OLD, NEW = Keyring(1, {1: b"o" * 32}), Keyring(2, {2: b"n" * 32, 1: b"o" * 32})
TARGET, AUTH, NOW_S = "realtime:rtc_0011", "Bearer key-0123456789abcdef", 1_000_000.0
ME = Owner("host-a-1234", ("10.0.0.5", 8080))
PREFIX = "vr"


def refusal(keys: HopKeys, header: str, target: str = TARGET, auth: str = AUTH) -> str:
    with pytest.raises(HopError) as refused:
        keys.verify(header, target, auth, NOW_S)
    return refused.value.reason


def test_a_hop_verifies_for_its_target_credential_and_time_only() -> None:
    keys = HopKeys(OLD)
    header = keys.sign(TARGET, AUTH, NOW_S)
    keys.verify(header, TARGET, AUTH, NOW_S)
    keys.verify(header, TARGET, AUTH, NOW_S + HOP_TTL_S)
    assert refusal(keys, header, target="realtime:rtc_0012") == "signature"
    assert refusal(keys, header, target="live:rtc_0011") == "signature"
    assert refusal(keys, header, auth="Bearer another-key-0123456789") == "signature"
    with pytest.raises(HopError) as late:
        keys.verify(header, TARGET, AUTH, NOW_S + HOP_TTL_S + 1)
    assert late.value.reason == "expired"
    forged_expiry = header.split(".")
    forged_expiry[2] = str(int(NOW_S) + 10 * HOP_TTL_S)
    assert refusal(keys, ".".join(forged_expiry)) == "signature"


def test_the_keyring_rotates_and_a_stranger_s_key_is_refused() -> None:
    assert HopKeys(NEW).verify(HopKeys(OLD).sign(TARGET, AUTH, NOW_S), TARGET, AUTH, NOW_S) is None
    assert refusal(HopKeys(OLD), HopKeys(NEW).sign(TARGET, AUTH, NOW_S)) == "unknown_key"
    stranger = HopKeys(Keyring(1, {1: b"s" * 32}))
    assert refusal(HopKeys(OLD), stranger.sign(TARGET, AUTH, NOW_S)) == "signature"


def test_a_hop_carries_and_is_read_under_both_names_for_one_release() -> None:
    """``X-Voicerelay-Hop``, and ``X-Voicerelay-Sideband-Hop`` (its name before) beside it."""
    assert hop_headers("1.1.5.x") == {
        "x-voicerelay-hop": "1.1.5.x",
        "x-voicerelay-sideband-hop": "1.1.5.x",
    }
    assert hop_header_of({"x-voicerelay-hop": "new"}) == "new"
    assert hop_header_of({"x-voicerelay-sideband-hop": "old"}) == "old"
    assert hop_header_of({"x-voicerelay-hop": "new", "x-voicerelay-sideband-hop": "old"}) == "new"
    assert hop_header_of({"authorization": "Bearer x"}) is None


@pytest.mark.parametrize(
    "header", ["", "1.1.2", "2.1.1000030.x", "1.x.1000030.x", "1.1.-5.x", "1.1.1000030.x.y"]
)
def test_malformed_hops_are_refused(header: str) -> None:
    assert refusal(HopKeys(OLD), header) == "malformed"


def test_an_owner_record_round_trips_and_a_bad_one_is_refused() -> None:
    for owner in (ME, Owner("h-1", ("2001:db8::5", 443)), Owner("h-2", ("10.0.0.5", 80), 3)):
        assert Owner.parse(owner.value()) == owner
    assert Owner("h-2", ("10.0.0.5", 80), 3).value() == "h-2 10.0.0.5:80 3"
    for bad in ("", "h-1", "h-1 10.0.0.5", "h-1 10.0.0.5:0", "h-1 10.0.0.5:x", "h-1 1.2.3.4:5 x"):
        with pytest.raises(ValueError):
            Owner.parse(bad)


needs_redis = pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path_factory.mktemp("sidebands"), "sidebands").start()
    yield redis
    redis.stop()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[Redis]:
    connection = open_redis(RedisConfig(url=server.url))
    await connection.client.flushdb()
    yield connection.client
    await connection.aclose()


def directory(server: RedisServer, me: Owner = ME, ttl_s: float = 0.6) -> SidebandDirectory:
    return SidebandDirectory(open_redis(RedisConfig(url=server.url)), PREFIX, me, ttl_s, 30.0)


async def owner_of(published: SidebandDirectory, target: str, owner: Owner | None) -> None:
    """Wait until the directory names ``owner`` (None: nobody) for ``target``."""
    await poll(lambda: published.locate(target), lambda found: found == owner, 5, repr, 0.02)


async def lease(client: Redis, session_id: str, owner: Owner) -> None:
    """What the lease heartbeat writes: the session's lease names its owner."""
    await client.set(SessionKeys.of(PREFIX, session_id).lease, owner.owner_id, px=30_000)


@needs_redis
async def test_a_call_leads_to_its_session_s_lease_and_the_owner_s_address(
    server: RedisServer, client: Redis
) -> None:
    """One record per process, refreshed and withdrawn at exit; one per call, written once,
    with the session's time to live; the owner is the lease's, so a resume moves it."""
    other = Owner("host-b-5678", ("10.0.0.6", 8080), 1)
    async with directory(server, other, ttl_s=30):
        async with directory(server) as published:
            published.alias("rtc_1", "sess_1")
            await poll(lambda: client.get(call_key(PREFIX, "rtc_1")), bool, 5, repr, 0.02)
            assert 0 < await client.pttl(call_key(PREFIX, "rtc_1")) <= 30_000
            assert await published.locate("rtc_1") is None  # no lease: not running
            await lease(client, "sess_1", ME)
            assert await published.locate("rtc_1") == ME
            assert await published.locate("sess_1") == ME  # a Live session's id is its own
            key = owner_key(PREFIX, ME.owner_id)
            first_ms = await client.pttl(key)
            assert 0 < first_ms <= 600  # the lease's time to live
            await poll(lambda: client.pttl(key), lambda ms: ms > first_ms, 5, repr, 0.02)
            await lease(client, "sess_1", other)  # resumed on the other transceiver
            assert await published.locate("rtc_1") == other
            await lease(client, "sess_1", ME)
        assert await client.get(key) is None  # withdrawn at exit
        assert await client.get(owner_key(PREFIX, other.owner_id)) is not None
        assert await locate_owner(client, PREFIX, "rtc_1") is None
        assert await locate_owner(client, PREFIX, "rtc_2") is None


@needs_redis
async def test_the_previous_release_s_records_are_still_read(client: Redis) -> None:
    """An owner not yet upgraded published ``P:sideband:{id}``: read when nothing newer names
    an owner; a malformed one names nobody."""
    old = Owner("host-c-9", ("10.0.0.7", 8080))
    await client.set(previous_release_key(PREFIX, "rtc_9"), old.value())
    assert await locate_owner(client, PREFIX, "rtc_9") == old
    await client.set(previous_release_key(PREFIX, "rtc_9"), "garbage")
    assert await locate_owner(client, PREFIX, "rtc_9") is None


POD_KEY = "9a" * 32
POD_SEAT = Seat(1, (41000, 41001), 40999, 7, POD_KEY)
SIBLINGS_CALL = "rtc_00" + "ab" * 11  # a call id naming worker 0, this seat's sibling
FROM_HERE = f"hangup:{SIBLINGS_CALL}"  # what a hang-up's hop for it signs (and its stage)


def pod_routing(shared: Keyring | None = None) -> OwnerRouting:
    return OwnerRouting(None, None if shared is None else HopKeys(shared), POD_SEAT, lambda: NOW_S)


def stage(routing: OwnerRouting, header: str) -> str | None:
    return routing.stage_of(header, HANGUP, SIBLINGS_CALL, AUTH)


def test_a_pod_signs_its_own_hops_with_its_seat_s_key() -> None:
    """Within a pod the seat's key signs and verifies (no keyring needed); a hop within the
    pod signed with the shared keyring verifies too; the pod's key never passes for a hop
    between transceivers, and a hop within the pod goes no further."""
    routing, pod = pod_routing(), pod_keys(POD_KEY)
    assert stage(routing, pod.sign(FROM_HERE + WITHIN_POD, AUTH, NOW_S)) == WITHIN_POD
    assert stage(pod_routing(OLD), HopKeys(OLD).sign(FROM_HERE + WITHIN_POD, AUTH, NOW_S)) == (
        WITHIN_POD
    )
    with pytest.raises(Refused) as refused:
        stage(pod_routing(OLD), pod.sign(FROM_HERE + BETWEEN_TRANSCEIVERS, AUTH, NOW_S))
    assert refused.value.response.status_code == 403
    hop = asyncio.run(routing.hop(HANGUP, SIBLINGS_CALL, AUTH, None))
    assert (hop.address, hop.stage) == (POD_SEAT.private_address(0), WITHIN_POD)
    assert stage(routing, hop.header) == WITHIN_POD
    with pytest.raises(Refused) as again:
        asyncio.run(routing.hop(HANGUP, SIBLINGS_CALL, AUTH, WITHIN_POD))
    assert again.value.response.status_code == 404


@needs_redis
async def test_a_call_id_leads_where_its_session_runs_now_not_where_it_began(
    server: RedisServer, client: Redis
) -> None:
    """Worker 2 of a pod of three, for a call that began on worker 0 (its id names it): the
    directory goes first, so a session resumed since on worker 1 (or another transceiver) is
    reached there, where the call id would lead to worker 0, which does not run it and may
    not forward a hop within the pod further (404). Until the directory names an owner (the
    call answered a moment ago), the worker the id names."""
    seat = Seat(2, (41000, 41001, 41002), 40999, 7, POD_KEY)
    pod = ("10.0.0.5", 8080)  # the pod's workers share its address
    began, resumed = Owner("pod-w0", pod, 0), Owner("pod-w1", pod, 1)
    elsewhere = Owner("host-b-5678", ("10.0.0.6", 8080))
    async with directory(server, Owner("pod-w2", pod, 2), ttl_s=30) as published:
        routing = OwnerRouting(published, HopKeys(OLD), seat, lambda: NOW_S)

        async def route() -> tuple[tuple[str, int], str]:
            hop = await routing.hop(HANGUP, SIBLINGS_CALL, AUTH, None)
            return hop.address, hop.stage

        assert await route() == (seat.private_address(0), WITHIN_POD)  # not in Redis yet
        others = (directory(server, owner, 30) for owner in (began, resumed, elsewhere))
        async with next(others), next(others), next(others):
            published.alias(SIBLINGS_CALL, "sess_pod")
            await lease(client, "sess_pod", resumed)  # resumed on worker 1
            await owner_of(published, SIBLINGS_CALL, resumed)
            assert await route() == (seat.private_address(1), WITHIN_POD)
            await lease(client, "sess_pod", elsewhere)  # resumed on another transceiver
            assert await route() == (elsewhere.address, BETWEEN_TRANSCEIVERS)
            await lease(client, "sess_pod", began)
            assert await route() == (seat.private_address(0), WITHIN_POD)


def test_pod_wide_requests_and_seats_carry_the_pod_s_key() -> None:
    pod = pod_keys(POD_KEY)
    pod.verify(pod.sign(pod_target("/readyz"), None, NOW_S), "pod:/readyz:pod", None, NOW_S)
    assert Seat.from_env(POD_SEAT.to_env()) == POD_SEAT
    with pytest.raises(ValueError):
        pod_keys("")  # a seat without a key routes nothing


def hang_up(call_id: str) -> Request:
    """A client's ``DELETE /v1/realtime/calls/{call_id}``, as the app receives it."""

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "method": "DELETE",
        "path": f"/v1/realtime/calls/{call_id}",
        "query_string": b"",
        "headers": [(b"authorization", AUTH.encode()), (b"host", b"front.example")],
    }
    return Request(scope, receive)


async def test_forwarded_hang_ups_share_the_forwarder_s_kept_alive_connection() -> None:
    """Two hang-ups forwarded to one owner (a real socket answering HTTP/1.1) go over one
    connection, each with its path, credential and hop header; a dead owner is None."""
    accepted: list[int] = []
    heads: list[bytes] = []
    finished = asyncio.Event()

    async def owner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("peername")[1])
        for _ in range(10):  # requests on this connection
            try:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
        writer.close()
        finished.set()

    server = await asyncio.start_server(owner, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()[:2]
    with socket.socket() as closed:  # a port nothing listens on: a dead owner
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[:2]
    forwarder = OwnerForwarder()
    try:
        for call_id in ("rtc_1", "rtc_2"):
            answer = await forwarder.forward(hang_up(call_id), address, hop_headers("1.1.5.x"))
            assert answer is not None and answer.status_code == 204
        assert await forwarder.forward(hang_up("rtc_3"), dead, hop_headers("h")) is None
    finally:
        await forwarder.aclose()
        server.close()
        await asyncio.wait_for(finished.wait(), 10)  # the owner saw the connection close
    assert len(accepted) == 1, accepted  # the second hang-up reused the first's connection
    assert [head.split(b" ")[1] for head in heads] == [
        b"/v1/realtime/calls/rtc_1",
        b"/v1/realtime/calls/rtc_2",
    ]
    assert all(b"x-voicerelay-hop: 1.1.5.x" in head and AUTH.encode() in head for head in heads)


async def test_a_forwarded_hang_up_gives_up_on_an_owner_that_never_answers() -> None:
    """An owner that takes the connection and never answers (a stopped worker: the kernel
    accepts for it) is None once the forwarder's own timeout ends, well before the default's."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()[:2]
    forwarder = OwnerForwarder(timeout_s=0.2)
    try:
        async with asyncio.timeout(FORWARD_TIMEOUT_S / 2):  # the default would outlast it
            assert await forwarder.forward(hang_up("rtc_4"), address, hop_headers("h")) is None
    finally:
        await forwarder.aclose()
        for writer in held:
            writer.close()
        server.close()


def test_an_app_closes_the_forwarder_it_made_when_its_lifespan_ends() -> None:
    """``create_app`` without a forwarder makes its own and closes it as it stops; one it is
    given stays its caller's to close."""
    given = OwnerForwarder()
    apps = [app_with(None), app_with(given)]
    for app in apps:
        with TestClient(app) as client:  # the lifespan: started, then ended
            assert client.get("/livez").status_code == 200
            assert not app.state.forwarder.closed
    assert apps[0].state.forwarder.closed
    assert not given.closed
    asyncio.run(given.aclose())


def app_with(forwarder: OwnerForwarder | None) -> FastAPI:
    """The transceiver's app over calls that run nothing and a link never started."""
    registry = CollectorRegistry()
    calls = Calls(None, CallLimits(capacity=1, connect_timeout_s=1.0), registry, None)  # type: ignore[arg-type]
    link = Link(("127.0.0.1", 0), OLD)
    return create_app(
        calls, link, registry, Authenticator(AuthConfig("off", None)), forwarder=forwarder
    )
