"""RTP header extensions on the lean path (transceiver/webrtc/rtp_extensions.py, lean_media.py).

The parser reads untrusted bytes (after SRTP a caller holding the keys can send anything), up to
the largest payload a relay forwards (``MAX_PAYLOAD_BYTES``): it never raises, what it returns
lies inside the block, and ``parse_rtp`` finds the payload after any block, the largest one
included. Blocks built by ``one_byte_block`` parse back to their elements, at the one-byte form's
limits (ids 1 and 14, values of 1 and 16 bytes) and refuse what it cannot carry. The audio level
(RFC 6464) a packet carries is the frame's level with the V bit, read back as aiortc reads it.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sized_inputs import around, mutated

from relay.wire.header import MAX_PAYLOAD_BYTES
from transceiver.webrtc.lean_media import level_dbov, parse_rtp, rtp_header, with_extension
from transceiver.webrtc.rtp_extensions import (
    AUDIO_LEVEL_URI,
    MID_URI,
    ONE_BYTE_PROFILE,
    SILENT_LEVEL_DBOV,
    Element,
    OutgoingExtensions,
    audio_level,
    audio_level_byte,
    one_byte_block,
    parse_extensions,
    rtp_extensions,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEADER = rtp_header(False, 111, 1, 2, 3)

one_byte_elements = st.lists(
    st.builds(Element, st.integers(1, 14), st.binary(min_size=1, max_size=16)), max_size=40
)


@st.composite
def packets_with_blocks(draw: st.DrawFn) -> bytes:
    """An RTP packet whose extension block is of any form and length, up to and past the
    link's limit (its length field may claim more than there is), then a few bytes changed."""
    size = draw(around(MAX_PAYLOAD_BYTES) | st.integers(12, 120))
    profile = draw(st.sampled_from([ONE_BYTE_PROFILE, 0x1000, 0x100F, 0x0000, 0xFFFF]))
    words = draw(st.integers(0, 0xFFFF) | around((MAX_PAYLOAD_BYTES - 16) // 4, 4))
    body = draw(st.binary(max_size=80))
    packet = bytes([0x90]) + HEADER[1:] + struct.pack("!HH", profile, words) + body
    packet = (packet + bytes(max(0, size - len(packet))))[:size]
    return bytes(draw(mutated(packet)))


@FUZZ
@given(st.one_of(packets_with_blocks(), st.binary(max_size=64)))
def test_extensions_of_any_packet_never_raise_and_agree_with_parse_rtp(packet: bytes) -> None:
    elements = rtp_extensions(packet)
    view = parse_rtp(packet)
    if elements is None:
        return
    for extension_id, value in elements:
        assert 1 <= extension_id <= 255 and len(value) <= len(packet)
    if view is not None and packet[0] & 0x10:
        block_words = int.from_bytes(packet[14 + 4 * (packet[0] & 0x0F) :][:2], "big")
        assert view.start == 12 + 4 * (packet[0] & 0x0F) + 4 + 4 * block_words


@FUZZ
@given(one_byte_elements, st.binary(max_size=40))
def test_a_one_byte_block_parses_back_and_the_payload_follows_it(
    elements: list[Element], payload: bytes
) -> None:
    block = one_byte_block(elements)
    assert len(block) % 4 == 0
    packet = with_extension(HEADER, block) + payload
    assert rtp_extensions(packet) == elements
    view = parse_rtp(packet)
    assert view is not None and packet[view.start : view.end] == payload


def test_the_largest_block_a_link_datagram_holds_is_read_and_one_byte_more_is_refused() -> None:
    room = MAX_PAYLOAD_BYTES - 12 - 4  # every byte after the RTP header and the block's head
    elements = [Element(1 + i % 14, bytes([i % 256]) * 16) for i in range(room // 17)]
    block = one_byte_block(elements)
    block = block[:2] + (room // 4).to_bytes(2, "big") + block[4:].ljust(room - room % 4, b"\0")
    packet = with_extension(HEADER, block)
    assert len(packet) <= MAX_PAYLOAD_BYTES and rtp_extensions(packet) == elements
    view = parse_rtp(packet)
    assert view is not None and view.start == view.end == len(packet)  # nothing after it
    too_long = packet[:14] + (room // 4 + 1).to_bytes(2, "big") + packet[16:]
    assert rtp_extensions(too_long) is None and parse_rtp(too_long) is None


@pytest.mark.parametrize(
    ("extension_id", "value", "refused"),
    [(0, b"x", "id 0"), (15, b"x", "id 15"), (1, b"", "0 bytes"), (14, bytes(17), "17 bytes")],
)
def test_a_one_byte_block_refuses_what_the_form_cannot_carry(
    extension_id: int, value: bytes, refused: str
) -> None:
    with pytest.raises(ValueError, match=refused):
        one_byte_block([Element(extension_id, value)])
    assert one_byte_block([Element(1, b"x"), Element(14, bytes(16))])  # the limits themselves


def test_the_parser_reads_padding_stops_at_reserved_ids_and_refuses_overruns() -> None:
    assert parse_extensions(ONE_BYTE_PROFILE, b"\x10a\0\0\x21bc\0") == [
        Element(1, b"a"),
        Element(2, b"bc"),
    ]
    assert parse_extensions(ONE_BYTE_PROFILE, b"\x10a\xf0b\x20c") == [Element(1, b"a")]  # id 15
    assert parse_extensions(ONE_BYTE_PROFILE, b"\x10a\x05\x20c") == [Element(1, b"a")]  # id 0
    assert parse_extensions(ONE_BYTE_PROFILE, b"\x10a\x21b") is None  # 2 bytes claimed, 1 left
    assert parse_extensions(0x1003, b"\x01\x00\0\x05\x02ab\0") == [
        Element(1, b""),
        Element(5, b"ab"),
    ]
    assert parse_extensions(0x1000, b"\x05\x03ab") is None
    assert parse_extensions(0x1000, b"\x05") is None
    assert parse_extensions(0x0001, b"anything") == []


def test_the_audio_level_is_the_frames_level_with_the_voice_bit_as_aiortc_reads_it() -> None:
    rate_hz = 48_000
    t = np.arange(rate_hz // 50) / rate_hz
    half_scale = (16_384 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).tobytes()
    assert level_dbov(half_scale) == 9  # a sine's RMS is 3 dB under its peak: -6 - 3
    assert level_dbov(bytes(960)) == SILENT_LEVEL_DBOV == level_dbov(b"")
    assert level_dbov(b"\x01\x00" * 480) == 90  # one step of 16 bits: the quietest not silent
    assert level_dbov(b"\xff\x7f" * 480) == 0
    assert audio_level_byte(200, True) == 0x80 | 127 and audio_level_byte(-3, False) == 0

    outgoing = OutgoingExtensions(4, "0", 1)
    packet = with_extension(HEADER, outgoing.block(audio_level_byte(9, True))) + b"opus"
    assert rtp_extensions(packet) == [Element(4, b"0"), Element(1, bytes([0x80 | 9]))]
    assert audio_level(bytes([0x80 | 9])) == (True, 9) and audio_level(b"ab") is None
    ids = HeaderExtensionsMap()
    negotiated = {MID_URI: 4, AUDIO_LEVEL_URI: 1}
    extensions = [RTCRtpHeaderExtensionParameters(id=i, uri=u) for u, i in negotiated.items()]
    ids.configure(RTCRtpParameters(headerExtensions=extensions))
    parsed = RtpPacket.parse(packet, ids)
    assert (parsed.extensions.mid, parsed.extensions.audio_level) == ("0", (True, 9))
    assert parsed.payload == b"opus"

    assert OutgoingExtensions(None, "", None).block(5) == b""
    assert rtp_extensions(with_extension(HEADER, OutgoingExtensions(None, "", 3).block(7))) == [
        Element(3, b"\x07")
    ]
