"""Issue 2 acceptance: a real relay (2 workers, one public port) in front of 2 real transceivers.

Six aiortc clients in this process each send their own tone through the relay and must hear
back only their own tone. Then: one SIGKILLed transceiver, a SIGKILLed and restarted relay,
and forged traffic on the public port, while the other sessions keep carrying media.

The tests share one stack (a process start each is most of their CPU); each test has its own
six clients, and a process an earlier test killed is started again before the next one.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from aioice import stun

from deploy.processes import Stack, metric_values, udp_socket_count
from deploy.waiting import eventually, poll
from loadtest.tones import ToneClient
from relay.wire.ufrag import Keyring, mint_ufrag
from transceiver.webrtc.sdp import candidate_addresses

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

TONES_HZ = [330.0, 470.0, 620.0, 780.0, 950.0, 1130.0]
MEDIA_TIMEOUT_S = 15.0
RECOVERY_LIMIT_S = 2.0


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """One stack for the module's tests: a relay and transceivers start once, not per test."""
    started = Stack(tmp_path_factory.mktemp("stack"), transceivers=2, workers=2, dual_stack=True)
    try:
        yield await started.start()
    finally:
        await started.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def stack(running: Stack) -> Stack:
    """The module's stack made whole for each test: a transceiver or relay an earlier test
    killed is started again (same ports, same keys) and every worker keys every transceiver."""
    return await running.heal()


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def clients(stack: Stack, http: httpx.AsyncClient) -> AsyncIterator[list[ToneClient]]:
    """Six connected tone clients, alternating between the two transceivers."""
    tone_clients = [ToneClient(hz) for hz in TONES_HZ]
    try:
        for i, client in enumerate(tone_clients):
            response = await client.offer(http, stack.base_url(i % 2))
            assert response.status_code == 201, response.text
        await asyncio.gather(*(c.connected(MEDIA_TIMEOUT_S) for c in tone_clients))
        await all_hear_own_tone(tone_clients)
        yield tone_clients
    finally:
        await asyncio.gather(*(c.close() for c in tone_clients))


def others(client: ToneClient) -> list[float]:
    return [hz for hz in TONES_HZ if hz != client.frequency_hz]


async def all_hear_own_tone(clients: list[ToneClient], timeout_s: float = MEDIA_TIMEOUT_S) -> None:
    await eventually(
        lambda: all(c.hears_own_tone(others(c)) for c in clients), timeout_s, "every own tone"
    )


async def fresh_audio(clients: list[ToneClient], timeout_s: float = MEDIA_TIMEOUT_S) -> float:
    """Wait until every client has 25 new frames (0.5 s) and they are its own tone."""
    marks = {id(c): c.frames_received for c in clients}
    took = await eventually(
        lambda: all(c.frames_received > marks[id(c)] + 25 for c in clients),
        timeout_s,
        "fresh audio on every session",
    )
    assert all(c.hears_own_tone(others(c)) for c in clients)
    return took


async def test_tones_answers_and_one_socket_per_transceiver(
    stack: Stack, clients: list[ToneClient]
) -> None:
    for client in clients:
        assert candidate_addresses(client.answer_sdp) == stack.public_addresses
    await fresh_audio(clients)
    for process in stack.transceivers:
        assert udp_socket_count(process.pid) == 1, f"{process.name} holds more than one UDP socket"


async def test_killing_one_transceiver_leaves_the_other_sessions_alone(
    stack: Stack, clients: list[ToneClient], http: httpx.AsyncClient
) -> None:
    stack.transceivers[0].send_signal(signal.SIGKILL)
    survivors = clients[1::2]
    await fresh_audio(survivors)
    await fresh_audio(survivors)
    assert stack.relay.alive()
    assert (await http.get(f"http://{stack.relay_http[0]}:{stack.relay_http[1]}/livez")).is_success
    dead = clients[0::2]
    marks = [c.frames_received for c in dead]
    await fresh_audio(survivors)
    assert all(c.frames_received - m < 25 for c, m in zip(dead, marks, strict=True))


async def test_relay_restart_recovers_media_within_two_seconds(
    stack: Stack, clients: list[ToneClient]
) -> None:
    stack.relay.send_signal(signal.SIGKILL)
    await stack.relay.stop(signal.SIGKILL)
    await silence(clients)
    marks = [c.frames_received for c in clients]
    started = time.monotonic()
    relay = await stack.restart_relay()
    assert relay.ready_at is not None
    await eventually(
        lambda: all(c.frames_received > m for c, m in zip(clients, marks, strict=True)),
        MEDIA_TIMEOUT_S,
        "media on every session after the relay restart",
    )
    recovered = time.monotonic()
    print(
        f"\nrelay restart: process start to ready {relay.ready_at - started:.3f} s, "
        f"ready to media on all {len(clients)} sessions {recovered - relay.ready_at:.3f} s "
        f"(process start to media {recovered - started:.3f} s)"
    )
    assert recovered - relay.ready_at <= RECOVERY_LIMIT_S
    await fresh_audio(clients)


async def silence(clients: list[ToneClient], quiet_s: float = 0.3) -> None:
    """Wait until no client has received a frame for ``quiet_s``."""
    loop = asyncio.get_running_loop()
    marks: list[int] = []
    since = loop.time()

    def quiet() -> bool:
        nonlocal marks, since
        now_marks = [c.frames_received for c in clients]
        if now_marks != marks:
            marks, since = now_marks, loop.time()
        return loop.time() - since >= quiet_s

    await eventually(quiet, 5.0, "the media to stop")


def binding_request(ufrag: str, key: bytes) -> bytes:
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    request.attributes["USERNAME"] = f"{ufrag}:abcd"
    request.attributes["PRIORITY"] = 1853824767
    request.attributes["ICE-CONTROLLING"] = 1
    request.attributes["USE-CANDIDATE"] = None
    request.add_message_integrity(key)
    request.add_fingerprint()
    return bytes(request)


def forged_datagrams(stack: Stack, real_ufrag: str) -> list[bytes]:
    keys = Keyring.parse(stack.keys)
    wrong_keys = Keyring.parse(f"{keys.current_id}:{os.urandom(32).hex()}")
    changed = bytearray(base64.b64decode(real_ufrag))
    changed[7] ^= 0x01  # the transceiver port's low byte: same length, MAC no longer matches
    forged = [
        binding_request(base64.b64encode(os.urandom(27)).decode(), os.urandom(16)),  # random
        binding_request(mint_ufrag(wrong_keys, stack.links[0]), os.urandom(16)),  # wrong MAC
        binding_request(base64.b64encode(bytes(changed)).decode(), os.urandom(16)),  # hint
        binding_request(mint_ufrag(keys, ("127.0.0.1", 9)), os.urandom(16)),  # unknown tx
        b"\x16\xfe\xfd" + os.urandom(60),  # DTLS from an unknown address
        b"\x80\x6f" + os.urandom(100),  # SRTP from an unknown address
        b"\x70junk" + os.urandom(20),  # junk: first byte outside every RFC 7983 range
    ]
    truncated = binding_request(mint_ufrag(keys, stack.links[0]), os.urandom(16))[:30]
    return [*forged, truncated, b"\x00\x01\x00"]


async def test_forged_traffic_is_dropped_and_counted(
    stack: Stack, clients: list[ToneClient], http: httpx.AsyncClient
) -> None:
    real_ufrag = next(
        line.split(":", 1)[1]
        for line in clients[0].answer_sdp.splitlines()
        if line.startswith("a=ice-ufrag:")
    )
    datagrams = forged_datagrams(stack, real_ufrag)
    for _ in range(5):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            attacker.bind(("127.0.0.1", 0))
            for datagram in datagrams:
                attacker.sendto(datagram, stack.public)
    await fresh_audio(clients)

    async def drops() -> dict[str, float]:
        return metric_values(await stack.relay_metrics(http), "relay_dropped_packets_total")

    expected = {"not_webrtc", "unknown_address", "unknown_transceiver", "bad_ufrag_mac"}
    await poll(
        drops,
        lambda seen: expected <= {reason for reason, n in seen.items() if n > 0},
        5,
        lambda seen: f"drops by reason: {seen}",
        0.1,
    )
    counted = await drops()
    print("\nrelay drops by reason:", {r: int(n) for r, n in counted.items() if n})
    truncated = sum(n for r, n in counted.items() if r.startswith("bad_ufrag_stun"))
    random_ufrag = sum(n for r, n in counted.items() if r.startswith("bad_ufrag_"))
    assert truncated > 0, counted
    assert random_ufrag >= 5 * 4, counted
