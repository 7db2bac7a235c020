"""The route cache: pure key/value codec, then publish/lookup/expire/withdraw on a real Redis."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from relay.route_record import RouteValueError, decode_route, encode_route, route_key
from tests.redis_server import RedisServer, free_tcp_port
from transceiver.redis_config import RedisConfig
from transceiver.redis_connection import open_redis
from transceiver.route_cache import RouteCache, RoutePublisher, lookup
from transceiver.store_errors import StoreUnavailableError

CLIENT = ("198.51.100.7", 50_123)
LINK = ("10.0.0.5", 7000)
OTHER_LINK = ("10.0.0.6", 7000)


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


async def until_gone(cache: RouteCache, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await cache.lookup(CLIENT) is not None:
        assert loop.time() < deadline, "the route did not expire"
        await asyncio.sleep(0.02)


async def test_publish_lookup_expire(client: Redis) -> None:
    cache = RouteCache(client, "rt1", ttl_s=0.3)
    assert await cache.lookup(CLIENT) is None
    await cache.publish(CLIENT, LINK)
    assert await cache.lookup(CLIENT) == LINK
    assert await lookup(client, "rt1", CLIENT) == LINK  # the relay helper's entry point
    assert 0 < await client.pttl(route_key("rt1", CLIENT)) <= 300
    await until_gone(cache, 3.0)


async def test_withdraw_deletes_only_its_own_route(client: Redis) -> None:
    cache = RouteCache(client, "rt2", ttl_s=30)
    await cache.publish(CLIENT, OTHER_LINK)  # the client moved to another transceiver
    assert not await cache.withdraw(CLIENT, LINK)
    assert await cache.lookup(CLIENT) == OTHER_LINK
    assert await cache.withdraw(CLIENT, OTHER_LINK)
    assert await cache.lookup(CLIENT) is None


async def test_publisher_refreshes_until_closed(client: Redis) -> None:
    cache = RouteCache(client, "rt3", ttl_s=0.3)
    routes = {CLIENT: LINK, ("2001:db8::9", 4000): OTHER_LINK}
    async with RoutePublisher(cache, lambda: routes, refresh_s=0.05):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.0
        while await cache.lookup(CLIENT) is None:  # the first publish
            assert loop.time() < deadline, "the route was never published"
            await asyncio.sleep(0.01)
        until = loop.time() + 1.0  # over three TTLs: alive only because it is refreshed
        while loop.time() < until:
            assert await cache.lookup(CLIENT) == LINK
            await asyncio.sleep(0.05)
        assert await cache.lookup(("2001:db8::9", 4000)) == OTHER_LINK
    await until_gone(cache, 3.0)


async def test_a_malformed_value_is_no_route(client: Redis) -> None:
    await client.set(route_key("rt4", CLIENT), b"garbage")
    assert await lookup(client, "rt4", CLIENT) is None


async def test_redis_down_is_a_retryable_error() -> None:
    config = RedisConfig(url=f"redis://127.0.0.1:{free_tcp_port()}/0", connect_timeout_s=0.2)
    connection = open_redis(config)
    try:
        with pytest.raises(StoreUnavailableError) as down:
            await lookup(connection.client, "rt5", CLIENT)
        assert down.value.retryable
    finally:
        await connection.aclose()


def test_ipv6_clients_are_normalised() -> None:
    expanded = str(ipaddress.IPv6Address("2001:db8::1").exploded)
    assert route_key("vr", (expanded, 1)) == route_key("vr", ("2001:db8::1", 1))
