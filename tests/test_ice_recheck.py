"""The transceiver's first connectivity check races the client's through the relay.

The answerer (transceiver) starts checking as soon as it has answered; the client starts only
once it has the answer. So the transceiver's first check usually reaches the client before the
relay has seen the client, and the relay drops the client's answer to it (unknown address).
aioice would then wait for its retransmission; ``RelayedConnection.check_incoming`` resends the
check the moment the client's own check arrives. Here the retransmission timer is made 30 s
long, so the connection only comes up in time if that resend works.
"""

from __future__ import annotations

import asyncio

import aioice.stun
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from deploy.processes import Address, LoopbackRelay
from deploy.waiting import eventually
from relay.wire.ufrag import Keyring
from transceiver.webrtc import ice
from transceiver.webrtc.link import Link

KEYS = "5:" + "cd" * 32
KEYRING = Keyring.parse(KEYS)
STUN_SUCCESS = b"\x01\x01"
STUN_REQUEST = b"\x00\x01"
CONNECT_TIMEOUT_S = 10.0


class LearningRelay(LoopbackRelay):
    """Like the real relay: a client is known once its binding request came through; a STUN
    response from an address not known yet is dropped."""

    def __init__(self, transceiver: Address, keys: str) -> None:
        super().__init__(transceiver, keys)
        self.known: set[Address] = set()
        self.dropped_responses = 0

    def _from_client(self, data: bytes, client: Address) -> None:
        if data[:2] == STUN_REQUEST:
            self.known.add(client)
        elif data[:2] == STUN_SUCCESS and client not in self.known:
            self.dropped_responses += 1
            return
        super()._from_client(data, client)


async def test_a_check_answered_into_the_void_is_resent_when_the_client_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aioice.stun, "RETRY_RTO", 30.0)
    ice.install()
    link = Link(("127.0.0.1", 0), KEYRING)
    relay = LearningRelay(await link.start(), KEYS)
    public = await relay.start()
    relay.hello()  # as the real relay does: the link now knows where to send
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    transceiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        client.createDataChannel("oai-events")
        await client.setLocalDescription(await client.createOffer())
        with ice.relayed_through(ice.RelayedIce(link, KEYRING, (public,))):
            await transceiver.setRemoteDescription(client.localDescription)
            await transceiver.setLocalDescription(await transceiver.createAnswer())
        # The transceiver checks the client now; the client answers; the relay drops that.
        await eventually(lambda: relay.dropped_responses >= 1, 5.0, "the first answer dropped")
        answer = RTCSessionDescription(transceiver.localDescription.sdp, "answer")
        await client.setRemoteDescription(answer)
        await eventually(
            lambda: transceiver.connectionState == client.connectionState == "connected",
            CONNECT_TIMEOUT_S,
            "both sides connected without waiting for a 30 s retransmission",
        )
        assert relay.dropped_responses == 1  # answered once, dropped once, resent once
    finally:
        await client.close()
        await transceiver.close()
        relay.close()
        await link.aclose()
        await asyncio.sleep(0)
