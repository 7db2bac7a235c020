"""transceiver/webrtc/sctp_bundling.py: the aiortc internals it builds on are still where it
expects them and behave as it assumes (aiortc is pinned; an upgrade that moves them fails here),
and over a real aiortc pair on loopback a burst of messages arrives whole and in order in far
fewer packets than messages, as it does from a real transceiver process to an aiortc client."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiortc.rtcpeerconnection
import httpx
import pytest
import pytest_asyncio
from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.rtcsctptransport import (
    SCTP_DATA_FIRST_FRAG,
    SCTP_DATA_LAST_FRAG,
    SCTP_MAX_PACKET_LENGTH,
    USERDATA_MAX_LENGTH,
    DataChunk,
    RTCSctpTransport,
    parse_packet,
    serialize_packet,
)

from loadtest.realtime_client import RealtimeClient, pipeline_transceiver, user_text
from transceiver.webrtc import sctp_bundling
from transceiver.webrtc.sctp_bundling import BundlingSctpTransport, bundled_packets, payload

HEADER = bytes.fromhex("13881388deadbeef")  # ports 5000 -> 5000, a verification tag
DEADLINE_S = 20.0


def data_chunk(tsn: int, user_data: bytes) -> DataChunk:
    chunk = DataChunk()
    chunk.flags = SCTP_DATA_FIRST_FRAG | SCTP_DATA_LAST_FRAG
    chunk.tsn, chunk.stream_id, chunk.stream_seq, chunk.protocol = tsn, 0, tsn, 51
    chunk.user_data = user_data
    return chunk


# --- the internals it relies on ---------------------------------------------------------------


def test_the_aiortc_internals_it_overrides_are_still_there() -> None:
    for name in ("_data_channel_send", "_data_channel_flush", "_send_chunk", "_transmit"):
        assert callable(getattr(RTCSctpTransport, name)), name
    assert inspect.signature(RTCSctpTransport._data_channel_send).parameters.keys() == {
        "self", "channel", "data"
    }  # fmt: skip
    assert inspect.signature(RTCSctpTransport._send_chunk).parameters.keys() == {"self", "chunk"}
    source = inspect.getsource(RTCSctpTransport._data_channel_send)
    assert "self._data_channel_queue.append((channel, pp_id, user_data))" in source
    assert "asyncio.ensure_future(self._data_channel_flush())" in source
    assert "while self._data_channel_queue" in inspect.getsource(
        RTCSctpTransport._data_channel_flush
    )
    assert "await self._send_chunk(chunk)" in inspect.getsource(RTCSctpTransport._transmit)
    assert "self.__transport._send_data(" in inspect.getsource(RTCSctpTransport._send_chunk)
    peer_connection = inspect.getsource(aiortc.rtcpeerconnection.RTCPeerConnection)
    assert "RTCSctpTransport(dtlsTransport)" in peer_connection  # the name install() replaces


def test_one_chunk_is_the_packet_aiortc_would_send() -> None:
    chunk = data_chunk(7, b'{"type":"response.created"}')
    assert bundled_packets(HEADER, [bytes(chunk)]) == [
        serialize_packet(5000, 5000, 0xDEADBEEF, chunk)
    ]


def test_chunks_are_packed_in_order_within_the_packet_size() -> None:
    chunks = [data_chunk(tsn, bytes([tsn]) * (50 + 97 * tsn)) for tsn in range(12)]
    chunks.append(data_chunk(12, b"x" * USERDATA_MAX_LENGTH))  # a full one goes alone
    packets = bundled_packets(HEADER, [bytes(c) for c in chunks])
    assert all(len(packet) <= SCTP_MAX_PACKET_LENGTH for packet in packets)
    assert len(packets) < len(chunks)
    parsed = [chunk for packet in packets for chunk in parse_packet(packet)[3]]  # CRC checked
    assert all(isinstance(chunk, DataChunk) for chunk in parsed)
    got = [(c.tsn, c.user_data) for c in parsed if isinstance(c, DataChunk)]
    assert got == [(c.tsn, c.user_data) for c in chunks]
    assert len(parse_packet(packets[-1])[3]) == 1  # the full chunk


@pytest.mark.parametrize("data", ["", "héllo", b"", b"\x00\x01"])
def test_a_payload_is_what_aiortc_queues(data: str | bytes) -> None:
    queued: list[tuple[object, int, bytes]] = []

    class Channel:
        def _addBufferedAmount(self, amount: int) -> None:  # noqa: N802 (aiortc's name)
            pass

    transport = object.__new__(RTCSctpTransport)  # only the queue is used before the flush
    transport._remote_max_message_size = 0
    transport._data_channel_queue = queued  # type: ignore[assignment]
    original = asyncio.ensure_future
    try:
        asyncio.ensure_future = lambda coroutine: coroutine.close()  # type: ignore[assignment]
        RTCSctpTransport._data_channel_send(transport, Channel(), data)  # type: ignore[arg-type]
    finally:
        asyncio.ensure_future = original
    assert [(pp_id, user_data) for _, pp_id, user_data in queued] == [payload(data)]


# --- over a real aiortc pair on loopback ------------------------------------------------------


@dataclass
class Pair:
    sender: RTCPeerConnection  # its SCTP association is ours (bundling) or aiortc's
    receiver: RTCPeerConnection
    channel: RTCDataChannel  # the sender's
    received: list[str]


@pytest_asyncio.fixture(params=["bundling", "aiortc"])
async def pair(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Pair]:
    """The sender answers (its SCTP association is built then): ours or aiortc's."""
    receiver, sender = RTCPeerConnection(), RTCPeerConnection()
    received: list[str] = []
    opened = asyncio.Event()

    @receiver.on("datachannel")
    def on_channel(channel: RTCDataChannel) -> None:
        channel.on("message", received.append)
        opened.set()

    receiver.createDataChannel("offered")  # the offer's m=application section
    await receiver.setLocalDescription(await receiver.createOffer())
    with monkeypatch.context() as patch:
        if request.param == "bundling":
            patch.setattr(aiortc.rtcpeerconnection, "RTCSctpTransport", BundlingSctpTransport)
        await sender.setRemoteDescription(receiver.localDescription)
    await sender.setLocalDescription(await sender.createAnswer())
    await receiver.setRemoteDescription(sender.localDescription)
    assert isinstance(sender.sctp, BundlingSctpTransport) == (request.param == "bundling")
    channel = sender.createDataChannel("oai-events")
    await asyncio.wait_for(opened.wait(), DEADLINE_S)
    try:
        yield Pair(sender, receiver, channel, received)
    finally:
        await sender.close()
        await receiver.close()


def test_install_has_peer_connections_build_the_bundling_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aiortc.rtcpeerconnection, "RTCSctpTransport", RTCSctpTransport)
    sctp_bundling.install()
    sctp_bundling.install()
    assert vars(aiortc.rtcpeerconnection)["RTCSctpTransport"] is BundlingSctpTransport


def count_packets(pc: RTCPeerConnection) -> list[bytes]:
    """The SCTP packets ``pc`` hands to its DTLS transport from now on (each still sent)."""
    assert pc.sctp is not None
    dtls = pc.sctp.transport
    send_data, sent = dtls._send_data, []

    async def counted(data: bytes) -> None:
        sent.append(data)
        await send_data(data)

    dtls._send_data = counted  # type: ignore[method-assign]
    return sent


async def arrived(pair: Pair, count: int) -> None:
    deadline_s = asyncio.get_running_loop().time() + DEADLINE_S
    while len(pair.received) < count:
        assert asyncio.get_running_loop().time() < deadline_s, len(pair.received)
        await asyncio.sleep(0.01)  # polling what the receiver's channel appended


@pytest.mark.asyncio
async def test_a_burst_arrives_whole_and_in_order_in_fewer_packets(pair: Pair) -> None:
    messages = [
        json.dumps({"type": "event", "n": n, "text": "x" * (n * 37 % 180)}) for n in range(60)
    ]
    messages.append("y" * (3 * USERDATA_MAX_LENGTH))  # fragmented: three chunks of one message
    messages.append(json.dumps({"type": "after"}))
    sent = count_packets(pair.sender)
    for message in messages:  # one loop iteration: one burst
        pair.channel.send(message)
    await arrived(pair, len(messages))
    assert pair.received == messages
    data = [p for p in sent if any(isinstance(c, DataChunk) for c in parse_packet(p)[3])]
    if isinstance(pair.sender.sctp, BundlingSctpTransport):
        assert len(data) <= len(messages) // 4, len(data)
    else:
        assert len(data) == len(messages) + 2  # one a chunk (the long message's: three)
    pair.channel.send("next")  # a later burst still leaves
    await arrived(pair, len(messages) + 1)
    assert pair.received[-1] == "next"


# --- from a real transceiver process -----------------------------------------------------------


def data_chunks_per_packet(pc: RTCPeerConnection) -> list[int]:
    """How many DATA chunks each SCTP packet ``pc`` receives from now on carries."""
    assert pc.sctp is not None
    sctp = pc.sctp
    handle_data, counts = sctp._handle_data, []

    async def counted(data: bytes) -> None:
        counts.append(sum(isinstance(c, DataChunk) for c in parse_packet(data)[3]))
        await handle_data(data)

    sctp._handle_data = counted  # type: ignore[method-assign]
    return counts


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_transceiver_sends_a_turn_s_bursts_bundled(
    tmp_path_factory: pytest.TempPathFactory, peer: RealtimeClient
) -> None:
    async with (
        pipeline_transceiver(tmp_path_factory.mktemp("bundling")) as running,
        httpx.AsyncClient(timeout=30) as http,
    ):
        await peer.connect(http, running.base_url)
        counts = data_chunks_per_packet(peer.pc)
        start = len(peer.events)
        peer.send(user_text("Tell me about coffee."))
        peer.send({"type": "response.create"})
        await peer.wait_for("response.done", after=start, timeout_s=DEADLINE_S * 3)
        await peer.close()  # hung up: the transceiver's stop need not drain the call (15 s)
    kinds = [event["type"] for event in peer.events[start:]]
    assert kinds.index("response.created") < kinds.index("response.output_item.added")
    carrying = [count for count in counts if count]  # not the SACKs for the client's events
    assert sum(carrying) == len(kinds)  # every event in a chunk of its own (none fragmented)
    assert max(carrying) > 1, carrying  # response.created and the items it opens: one packet
    assert len(carrying) < len(kinds), carrying
