"""A lean call's inbound path, packet by packet: real SRTP (pylibsrtp, one key both ways) and
real Opus, the call wired as ``LeanCall._configure`` leaves it once DTLS is up (its SRTP
session and accepted payload type; no aiortc around it). Whatever order the packets arrive
in, the consumer hears exactly what a decoder fed them in order hears (a lost one concealed
where it was), each frame once; the reception report counts what came.
"""

from __future__ import annotations

import math
import os
import struct
from types import SimpleNamespace

import pylibsrtp
import pytest

from transceiver.webrtc.lean_media import (
    LeanCall,
    LeanInputTrack,
    LeanMedia,
    OpusDecoder,
    OpusEncoder,
    SrtpReceiver,
    has_fec,
    rtp_header,
)

RATE_HZ = 16_000
FRAME_SAMPLES = RATE_HZ // 50
PAYLOAD_TYPE = 111
CALLER_SSRC = 0x1234_5678
FIRST_SEQUENCE = 65_530  # the sequence numbers wrap during the stream
PROFILE = pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM


def tone_packets(count: int) -> list[bytes]:
    """``count`` Opus packets of a 300 Hz tone, 20 ms each."""
    encoder = OpusEncoder(RATE_HZ, FRAME_SAMPLES)
    packets = []
    for index in range(count):
        samples = (
            int(6000 * math.sin(2 * math.pi * 300 * (index * FRAME_SAMPLES + n) / RATE_HZ))
            for n in range(FRAME_SAMPLES)
        )
        packets.append(encoder.encode(struct.pack(f"<{FRAME_SAMPLES}h", *samples)))
    return packets


def heard_in_order(packets: list[bytes], lost: frozenset[int] = frozenset()) -> list[bytes]:
    """What a decoder fed the packets in order hears, each lost one rebuilt from the next
    one's in-band FEC if it has any, else concealed (PLC)."""
    decoder = OpusDecoder(RATE_HZ)
    frames = []
    for index, payload in enumerate(packets):
        if index in lost:
            following = packets[index + 1]
            frames.append(decoder.recover(following if has_fec(following) else None))
        else:
            frames.append(decoder.decode(payload))
    return [frame or b"" for frame in frames]


class Caller:
    """The far end's SRTP sender and a lean call receiving from it, whose consumer collects
    every frame it is pushed."""

    def __init__(self) -> None:
        key = os.urandom(32 + 12)
        self._sender = pylibsrtp.Session(
            pylibsrtp.Policy(key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, PROFILE)
        )
        receiver = pylibsrtp.Session(
            pylibsrtp.Policy(key, pylibsrtp.Policy.SSRC_ANY_INBOUND, PROFILE)
        )
        self.heard: list[bytes] = []
        track = LeanInputTrack()
        track.push, track.rate_hz = self.heard.append, RATE_HZ
        self.call = LeanCall(
            LeanMedia(), SimpleNamespace(sender=SimpleNamespace(_ssrc=1)), track, None
        )
        self.call._dtls = SimpleNamespace(_rx_srtp=receiver)
        self.call._accepted_types = frozenset({PAYLOAD_TYPE})
        self._protected: dict[int, bytes] = {}

    def send(self, packets: list[bytes], order: list[int]) -> None:
        for index in order:
            if index not in self._protected:  # SRTP protects each sequence number once
                sequence = (FIRST_SEQUENCE + index) & 0xFFFF
                header = rtp_header(False, PAYLOAD_TYPE, sequence, 960 * index, CALLER_SSRC)
                self._protected[index] = self._sender.protect(header + packets[index])
            self.call.on_media(self._protected[index])


@pytest.mark.parametrize(
    "order",
    [
        list(range(12)),
        [0, 1, 3, 2, 4, 6, 5, 7, 8, 9, 10, 11],  # two swaps, each within the window
        [0, 1, 2, 2, 3, 4, 1, 5, 6, 7, 8, 9, 10, 11],  # replays: SRTP refuses them
    ],
)
def test_every_arrival_order_is_heard_as_sent_once(order: list[int]) -> None:
    packets = tone_packets(12)
    caller = Caller()
    caller.send(packets, order)
    assert caller.heard == heard_in_order(packets)
    counters = caller.call.counters
    assert counters["rtp_in"] == 12
    assert counters["rtp_late"] == 0
    assert counters["lost"] == 0
    assert counters["srtp_rejected"] == len(order) - 12
    stats = caller.call._stats
    assert (stats.ssrc, stats.received) == (CALLER_SSRC, 12)
    assert stats.base is not None
    assert stats.highest - stats.base == 11  # extended across the sequence numbers' wrap


def test_a_lost_packet_is_concealed_in_its_place_and_the_rest_heard_as_sent() -> None:
    packets = tone_packets(12)
    caller = Caller()
    caller.send(packets, [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11])  # 4 never comes
    assert caller.heard == heard_in_order(packets, lost=frozenset({4}))
    counters = caller.call.counters
    assert counters["lost"] == 1
    assert counters["concealed_plc"] + counters["recovered_fec"] == 1
    assert counters["rtp_in"] == 11
    block = caller.call._stats.block(0.0)
    assert block is not None and block.cumulative_lost == 1


def test_a_packet_behind_one_heard_is_late_and_not_heard_again() -> None:
    packets = tone_packets(12)
    caller = Caller()
    caller.send(packets, [0, 1, 2, 4, 5, 6, 3, 7, 8, 9, 10, 11])  # 3 after its gap was closed
    assert caller.heard == heard_in_order(packets, lost=frozenset({3}))
    assert caller.call.counters["rtp_late"] == 1
    assert caller.call.counters["lost"] == 1


def test_the_srtp_receiver_answers_as_pylibsrtp_does() -> None:
    """Two receiving sessions on one key, one read through ``SrtpReceiver``, the other through
    pylibsrtp's ``unprotect``: the same packets out, the same ones refused (damaged, replayed),
    and a packet longer than the session's buffer refused with pylibsrtp's own error."""
    key = os.urandom(32 + 12)
    sender, ours, theirs = (
        pylibsrtp.Session(pylibsrtp.Policy(key, direction, PROFILE))
        for direction in (
            pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
            pylibsrtp.Policy.SSRC_ANY_INBOUND,
            pylibsrtp.Policy.SSRC_ANY_INBOUND,
        )
    )
    receiver = SrtpReceiver(ours)
    packets = [
        sender.protect(rtp_header(False, PAYLOAD_TYPE, n, 960 * n, CALLER_SSRC) + payload)
        for n, payload in enumerate(tone_packets(4))
    ]
    damaged = packets[2][:-1] + bytes([packets[2][-1] ^ 1])
    for packet in [packets[0], packets[1], packets[1], damaged, packets[2], packets[0], packets[3]]:
        try:
            expected: bytes | None = theirs.unprotect(packet)
        except pylibsrtp.Error:
            expected = None
        assert receiver.unprotect(packet) == expected
    assert [receiver.unprotect(p) is None for p in packets] == [True] * 4  # all replays now
    with pytest.raises(ValueError, match="packet is too long"):
        receiver.unprotect(bytes(1501))
