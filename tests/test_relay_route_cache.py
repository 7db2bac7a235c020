"""Issue 5, item 5: a relay that never saw a session forwards its media after consulting the
route cache.

Real redis-server, a real transceiver publishing its routes (``REDIS_URL``), real relays and an
aiortc tone client. The load-balancer re-hash is simulated by SIGKILLing the relay that carried
the session and starting a fresh one on the same public port with ``--hello off``: the client
keeps sending from the same address to the same public address, and it lands on a relay whose
route table is empty. With HELLO off that relay cannot ask the transceiver for its routes (its
keyed HELLOs only prove the keyring), and the transceiver keeps answering the dead relay's link
sockets (a HELLO that asks for nothing does not draw media), so no outbound media teaches the
route either. What remains is the route
cache — or the client's next ICE consent check, seconds later, which the metrics rule out:
every route the new relay learned was installed from the cache.

The same kill/restart is timed with HELLO recovery (no Redis on the new relay) side by side.
"""

from __future__ import annotations

import signal
import socket
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.processes import (
    Process,
    free_port,
    metric_values,
    random_keys,
    relay_process,
    text,
    transceiver_process,
)
from deploy.redis_server import RedisServer
from deploy.waiting import eventually, poll
from loadtest.tones import ToneClient, tone_call
from relay import counters as c
from relay.route_lookup import LookupAdmission, RouteLookups
from relay.routing import Router, RouteTable, StunRateLimit, needs_route_lookup
from relay.timing import RelayTiming
from relay.wire.redis_config import RedisConfig
from relay.wire.route_record import encode_route
from relay.wire.ufrag import Keyring

pytestmark = pytest.mark.slow

MEDIA_TIMEOUT_S = 15.0
RUNS_PER_MODE = 3
FRESH_FRAMES = 5  # 100 ms of audio: media flows again
Address = tuple[str, int]


@dataclass
class Deployment:
    """One transceiver behind one relay at a time, all on loopback."""

    log_dir: Path
    redis_url: str
    keys: str
    public: Address
    relay_http: Address
    link: Address
    transceiver: Process
    relay: Process | None = None

    def start_relay(self, **flags: Any) -> Process:
        self.relay = relay_process(
            text(self.public), [self.link], self.keys, self.relay_http, self.log_dir, **flags
        )
        return self.relay.start()

    async def metrics(self, http: httpx.AsyncClient) -> str:
        return (await http.get(f"http://{text(self.relay_http)}/metrics")).text


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path, "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def deployment(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Deployment]:
    keys, public = random_keys(), ("127.0.0.1", free_port())
    link = ("127.0.0.1", free_port())
    transceiver = transceiver_process(
        "transceiver",
        link,
        ("127.0.0.1", free_port(socket.SOCK_STREAM)),
        text(public),
        keys,
        tmp_path,
        env={"REDIS_URL": redis_server.url},
    )
    relay_http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    running = Deployment(tmp_path, redis_server.url, keys, public, relay_http, link, transceiver)
    try:
        await transceiver.start().ready()
        await running.start_relay(workers=2, redis_url=redis_server.url).ready()
        yield running
    finally:
        for process in [running.relay, transceiver]:
            if process is not None:
                await process.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
async def client(deployment: Deployment) -> AsyncIterator[ToneClient]:
    argv = deployment.transceiver.argv
    base_url = "http://" + argv[argv.index("--http") + 1]
    async with tone_call(base_url, 440.0, MEDIA_TIMEOUT_S) as tone:
        yield tone


async def rehash(deployment: Deployment, client: ToneClient, **flags: Any) -> tuple[float, float]:
    """SIGKILL the relay, start a fresh one with ``flags`` on the same public port; seconds
    from kill to media and from the new relay's ready line to media."""
    assert deployment.relay is not None
    await deployment.relay.stop(signal.SIGKILL)
    killed = time.monotonic()
    relay = await deployment.start_relay(workers=2, **flags).ready()
    assert relay.ready_at is not None
    mark = client.frames_received
    await eventually(
        lambda: client.frames_received > mark + FRESH_FRAMES, MEDIA_TIMEOUT_S, "media again"
    )
    recovered = time.monotonic()
    return recovered - killed, recovered - relay.ready_at


async def learned_only_from_cache(deployment: Deployment, http: httpx.AsyncClient) -> None:
    """The new relay's routes all came from Redis hits (its HELLOs asked for no ROUTES)."""

    async def counts() -> tuple[float, float, float, float]:
        page = await deployment.metrics(http)
        hits = metric_values(page, "relay_route_cache_lookups_total").get("hit", 0.0)
        learned = metric_values(page, "relay_routes_learned_total")[""]
        cached = metric_values(page, "relay_routes_from_cache_total")[""]
        return hits, learned, cached, metric_values(page, "relay_control_received_total")[""]

    # counters publish every 0.5 s; a timeout fails with the counts, as the first assert would
    latest = await poll(counts, lambda seen: seen[2] >= 1, MEDIA_TIMEOUT_S, str, interval_s=0.05)
    hits, learned, cached, control = latest
    assert hits >= 1 and cached >= 1, latest
    assert learned == cached, f"routes learned otherwise than from the cache: {latest}"
    assert control == 0  # no ROUTES came back to its HELLOs


async def test_relay_that_never_saw_the_session_routes_it_from_the_cache(
    deployment: Deployment, client: ToneClient, redis_server: RedisServer, http: httpx.AsyncClient
) -> None:
    with redis_server.client() as redis:
        await eventually(
            lambda: bool(redis.keys("voicerelay:route:*")), MEDIA_TIMEOUT_S, "a cached route"
        )
    timings: dict[str, list[tuple[float, float]]] = {"cache": [], "hello": []}
    for _ in range(RUNS_PER_MODE):
        timings["cache"].append(
            await rehash(deployment, client, hello="off", redis_url=deployment.redis_url)
        )
        await learned_only_from_cache(deployment, http)
        timings["hello"].append(await rehash(deployment, client))
    await eventually(lambda: client.hears_own_tone([]), MEDIA_TIMEOUT_S, "the tone again")
    for mode, runs in timings.items():
        kill_s = statistics.median(k for k, _ in runs)
        ready_s = statistics.median(r for _, r in runs)
        print(
            f"\nrelay kill to media ({mode}, median of {len(runs)}): {kill_s:.3f} s; "
            f"new relay ready to media {ready_s * 1000:.0f} ms"
        )


# The pure decisions around a lookup, without Redis.

T1, T2 = ("127.0.0.1", 7001), ("127.0.0.1", 7002)
CLIENT = ("192.0.2.1", 5000)


def lookups() -> RouteLookups:
    ring = Keyring.parse("2:" + "22" * 32)
    router = Router(ring, [T1, T2], [4], RouteTable(30.0), StunRateLimit(20.0, 40.0))
    redis = RedisConfig(url="redis://127.0.0.1:1/0", key_prefix="p")
    return RouteLookups(redis, router, [0] * c.ROW, RelayTiming())


def test_only_dtls_and_srtp_from_unknown_addresses_are_looked_up() -> None:
    router = lookups().router
    for first_byte, wanted in ((22, True), (128, True), (0, False), (70, False)):
        data = bytes([first_byte]) + b"\x00" * 40
        assert needs_route_lookup(router.on_public(data, CLIENT, 0, 0.0), data) is wanted
    router.routes.learn(CLIENT, T1, 0, 0.0)
    assert not needs_route_lookup(router.on_public(b"\x16" * 40, CLIENT, 0, 0.0), b"\x16")


def test_one_lookup_per_source_per_retry_interval() -> None:
    admission = LookupAdmission(retry_after_s=1.0)
    assert admission.admit(CLIENT, 0.0)
    assert not admission.admit(CLIENT, 0.5)  # in flight, or a recent miss
    assert admission.admit(("192.0.2.2", 5000), 0.5)
    assert admission.sweep(1.2) == 1
    assert admission.admit(CLIENT, 1.2)


def test_a_hit_installs_only_a_configured_transceiver_and_never_overwrites() -> None:
    target = lookups()
    target._answer(CLIENT, 0, encode_route(("10.9.9.9", 7001)), 0.0)  # not configured
    assert CLIENT not in target.router.routes.inbound
    target._answer(CLIENT, 0, b"garbage", 0.0)
    target._answer(CLIENT, 0, encode_route(T1), 0.0)
    assert target.router.routes.inbound[CLIENT].link == T1
    target._answer(CLIENT, 0, encode_route(T2), 1.0)  # a live route is kept
    assert target.router.routes.inbound[CLIENT].link == T1
    counts = target.counts
    assert (counts[c.ROUTE_CACHE_MISSES], counts[c.ROUTE_CACHE_HITS]) == (2, 2)
    assert counts[c.ROUTES_FROM_CACHE] == 1
