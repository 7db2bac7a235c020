"""The route cache: pure key/value codec; the transceiver's publishing (``RouteCache``,
``RoutePublishing``) on a real Redis, read back as a relay reads it."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from deploy.processes import free_port
from deploy.redis_server import RedisServer
from deploy.waiting import eventually
from relay.wire.redis_config import RedisConfig
from relay.wire.route_record import RouteValueError, decode_route, encode_route, route_key
from transceiver.store.connection import open_redis
from transceiver.store.errors import StoreUnavailableError
from transceiver.store.route_cache import RouteCache
from transceiver.store.route_publishing import RoutePublishing

CLIENT = ("198.51.100.7", 50_123)
LINK = ("10.0.0.5", 7000)
OTHER_LINK = ("10.0.0.6", 7000)
SECOND = ("2001:db8::9", 4000)
Address = tuple[str, int]


def unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """IPv4-mapped addresses are stored as IPv4 (route_key_layout checks that)."""
    return not (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None)


ips = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).filter(unmapped).map(str))


@given(ips, st.integers(1, 65535))
def test_route_value_round_trips(host: str, port: int) -> None:
    assert decode_route(encode_route((host, port))) == (host, port)


def test_route_key_layout() -> None:
    assert route_key("vr", CLIENT) == "vr:route:198.51.100.7:50123"
    assert route_key("vr", ("2001:DB8::1", 5)) == "vr:route:[2001:db8::1]:5"
    assert route_key("vr", ("::ffff:198.51.100.7", 5)) == "vr:route:198.51.100.7:5"
    assert encode_route(("::ffff:10.0.0.5", 7000)) == b"1 10.0.0.5 7000"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"2 10.0.0.5 7000", "not a version-1 route"),
        (b"1 10.0.0.5", "not a version-1 route"),
        (b"1 10.0.0.5 0", "route port b'0' is out of range"),
        (b"1 10.0.0.5 70000", "route port b'70000' is out of range"),
        (b"1 example.com 7000", "route host 'example.com' is not an IP address"),
        (b"1 " + b"9" * 80 + b" 1", "not a version-1 route"),
    ],
)
def test_bad_route_values_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(RouteValueError, match=message):
        decode_route(raw)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path_factory.mktemp("routes"), "routes").start()
    yield redis
    redis.stop()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[Redis]:
    connection = open_redis(RedisConfig(url=server.url))
    yield connection.client
    await connection.aclose()


async def route_of(redis: Redis, prefix: str, client: Address) -> Address | None:
    """What a relay reads for ``client`` (``relay.route_lookup``: the raw value, decoded)."""
    raw = await redis.get(route_key(prefix, client))
    return None if raw is None else decode_route(raw)


async def test_publish_expire_and_withdraw_only_its_own_route(client: Redis) -> None:
    cache = RouteCache(client, "rt1", ttl_s=0.3)
    await cache.publish_many({CLIENT: LINK, SECOND: OTHER_LINK})
    assert await route_of(client, "rt1", CLIENT) == LINK
    assert await route_of(client, "rt1", SECOND) == OTHER_LINK
    assert 0 < await client.pttl(route_key("rt1", CLIENT)) <= 300
    await eventually(lambda: gone(client, "rt1", CLIENT), 3.0, "the route to expire")

    cache = RouteCache(client, "rt2", ttl_s=30)
    await cache.publish_many({CLIENT: OTHER_LINK})  # the client moved to another transceiver
    assert not await cache.withdraw(CLIENT, LINK)
    assert await route_of(client, "rt2", CLIENT) == OTHER_LINK
    assert await cache.withdraw(CLIENT, OTHER_LINK)
    assert await route_of(client, "rt2", CLIENT) is None


async def gone(client: Redis, prefix: str, address: Address) -> bool:
    return await route_of(client, prefix, address) is None


async def test_publishing_follows_the_links_sessions(server: RedisServer, client: Redis) -> None:
    config = RedisConfig(url=server.url, key_prefix="rt3", route_ttl_s=0.3)
    live: dict[Address, Address] = {}
    async with RoutePublishing.from_config(config, LINK, lambda: live) as routes:
        live[CLIENT] = LINK
        routes.learned(CLIENT)  # published at once, not at the next refresh
        await eventually(lambda: has(client, CLIENT), 3.0, "the learned route")
        loop = asyncio.get_running_loop()
        until_s = loop.time() + 1.0  # over three TTLs: alive only because it is refreshed
        while loop.time() < until_s:
            assert await route_of(client, "rt3", CLIENT) == LINK
            await asyncio.sleep(0.05)
        del live[CLIENT]
        routes.withdrawn(CLIENT)
        await eventually(lambda: gone(client, "rt3", CLIENT), 3.0, "the withdrawn route")
        live[SECOND] = LINK
        routes.learned(SECOND)
        await eventually(lambda: has(client, SECOND), 3.0, "the second route")
    assert await route_of(client, "rt3", SECOND) == LINK  # closing withdraws only what ended


async def has(client: Redis, address: Address) -> bool:
    return await route_of(client, "rt3", address) == LINK


async def test_redis_down_is_a_retryable_error_and_publishing_closes() -> None:
    config = RedisConfig(
        url=f"redis://127.0.0.1:{free_port(socket.SOCK_STREAM)}/0",
        connect_timeout_s=0.2,
        route_ttl_s=0.3,
    )
    connection = open_redis(config)
    try:
        with pytest.raises(StoreUnavailableError) as down:
            await RouteCache(connection.client, "rt4", ttl_s=0.3).publish_many({CLIENT: LINK})
        assert down.value.retryable
    finally:
        await connection.aclose()
    async with RoutePublishing.from_config(config, LINK, lambda: {CLIENT: LINK}) as routes:
        routes.learned(CLIENT)
        routes.withdrawn(CLIENT)  # its close tries this once, bounded, and leaves it to the TTL


def test_ipv6_clients_are_normalised() -> None:
    expanded = str(ipaddress.IPv6Address("2001:db8::1").exploded)
    assert route_key("vr", (expanded, 1)) == route_key("vr", ("2001:db8::1", 1))
