"""Issue 9 acceptance: a real relay in front of a real transceiver, one aiortc call, and a
stranger on loopback that reaches the transceiver's link port directly.

The stranger sends HELLOs (the old unsigned one, one signed with a wrong key, an old one signed
with the right key) and data datagrams naming the live client: it gets nothing back (no ROUTES,
no media), every refusal is counted in the transceiver's /metrics by reason, and the call keeps
carrying its own tone through the real relay.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from deploy.processes import Stack, metric_values
from deploy.waiting import eventually, poll
from loadtest.tones import ToneClient, tone_call
from relay.wire.header import ControlMessage, ControlType, header_for
from relay.wire.hello import MAX_SKEW_S, seal_hello
from relay.wire.ufrag import Keyring

pytestmark = pytest.mark.slow

MEDIA_TIMEOUT_S = 15.0
TONE_HZ = 440.0


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    running = Stack(tmp_path, transceivers=1, workers=1)
    try:
        yield await running.start()
    finally:
        await running.stop()


@pytest.fixture
async def call(stack: Stack) -> AsyncIterator[ToneClient]:
    async with tone_call(stack.base_url(0), TONE_HZ, MEDIA_TIMEOUT_S) as client:
        yield client


def stranger_datagrams(stack: Stack, link: tuple[str, int]) -> dict[str, list[bytes]]:
    """What a host that can reach the link port sends, by the refusal reason it should get."""
    keys = Keyring.parse(stack.keys)
    wrong = Keyring.parse(f"{keys.current_id}:{os.urandom(32).hex()}")
    old_s = time.time() - MAX_SKEW_S - 5
    somebody = ("192.0.2.44", 50000)
    return {
        "hello_length": [bytes(ControlMessage(ControlType.HELLO))],  # no MAC at all
        "hello_mac": [seal_hello(wrong, link, time.time())],
        "hello_stale": [seal_hello(keys, link, old_s)],  # as a HELLO captured long ago
        "unkeyed_source": [
            header_for(somebody) + b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12),
            header_for(somebody) + b"\x16\xfe\xfd" + os.urandom(40),
            header_for(somebody) + b"\x80\x6f" + os.urandom(100),
        ],
    }


async def refused(http: httpx.AsyncClient, stack: Stack) -> dict[str, float]:
    text = (await http.get(stack.base_url(0) + "/metrics")).text
    return metric_values(text, "transceiver_link_refused_total")


async def test_a_stranger_on_the_link_port_gets_nothing_and_is_counted(
    stack: Stack, call: ToneClient
) -> None:
    link = stack.links[0]
    datagrams = stranger_datagrams(stack, link)
    async with httpx.AsyncClient(timeout=10) as http:
        before = await refused(http, stack)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind(("127.0.0.1", 0))
            for group in datagrams.values():
                for datagram in group:
                    stranger.sendto(datagram, link)
            expected = {
                reason: before.get(reason, 0) + len(group) for reason, group in datagrams.items()
            }

            await poll(
                lambda: refused(http, stack),
                lambda counted: all(counted.get(r, 0) >= n for r, n in expected.items()),
                5,
                lambda counted: f"refusals: {counted}",
                0.05,
            )
            # Any answer would have been sent before the refusal was counted: look, don't wait.
            stranger.setblocking(False)
            with pytest.raises(BlockingIOError):
                stranger.recvfrom(4096)
        counted = await refused(http, stack)
    assert {r: counted[r] for r in expected} == expected
    heard = call.frames_received
    await eventually(lambda: call.frames_received > heard + 25, MEDIA_TIMEOUT_S, "more audio")
    assert call.hears_own_tone([])
