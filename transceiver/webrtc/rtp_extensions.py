"""RTP header extensions (RFC 8285) as the lean media path writes and reads them (pure).

Written: one one-byte-header block (RFC 8285 §4.2) per packet, carrying the MID (RFC 8843
§15) and the audio level (RFC 6464) when the answer negotiated them. The block of a call is
the same for every packet but the level byte, so :class:`OutgoingExtensions` builds the 256
possible blocks once and a packet picks one.

Read: :func:`parse_extensions` walks a block of either form (one-byte ``0xBEDE``, two-byte
``0x100x``) into its elements, refusing (None) a block whose elements overrun it; padding bytes
are skipped, unknown ids kept, and a one-byte block is read up to a reserved id (15, or 0 with
a length) as RFC 8285 §4.2 says and libwebrtc does. The lean path itself ignores the caller's
extensions (``lean_media.parse_rtp`` skips the block by its length, RFC 3550 §5.3.1), so a
malformed one costs nothing but its own bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
ONE_BYTE_PROFILE = 0xBEDE
TWO_BYTE_PROFILE = 0x1000  # the top 12 bits; the low 4 are "appbits" (RFC 8285 §4.3)
ONE_BYTE_MAX_ID = 14  # 15 is reserved: a parser stops at it (RFC 8285 §4.2)
ONE_BYTE_MAX_VALUE_BYTES = 16
SILENT_LEVEL_DBOV = 127  # RFC 6464 §3: 0 is the loudest, 127 digital silence (or quieter)
VOICE_BIT = 0x80


class Element(NamedTuple):
    extension_id: int
    value: bytes


def one_byte_block(elements: Sequence[Element]) -> bytes:
    """An extension block (profile, length in words, elements, zero padding) of one-byte
    elements; ValueError for an id or value the form cannot carry."""
    body = b""
    for extension_id, value in elements:
        if not 1 <= extension_id <= ONE_BYTE_MAX_ID:
            raise ValueError(f"one-byte extension id {extension_id} is not in 1..14")
        if not 1 <= len(value) <= ONE_BYTE_MAX_VALUE_BYTES:
            raise ValueError(f"one-byte extension {extension_id} of {len(value)} bytes")
        body += bytes([(extension_id << 4) | (len(value) - 1)]) + value
    if not body:
        return b""
    body += bytes(-len(body) % 4)
    return ONE_BYTE_PROFILE.to_bytes(2, "big") + (len(body) // 4).to_bytes(2, "big") + body


def audio_level_byte(level_dbov: int, voice: bool) -> int:
    """RFC 6464 §3's one byte: the V bit, then the level as -dBov clamped to 0..127."""
    return (VOICE_BIT if voice else 0) | max(0, min(SILENT_LEVEL_DBOV, level_dbov))


class OutgoingExtensions:
    """The block every packet of a call carries: the MID if negotiated, then the audio level
    if negotiated (one byte, chosen per packet). Empty when neither was negotiated."""

    def __init__(self, mid_id: int | None, mid: str, level_id: int | None) -> None:
        head = [] if mid_id is None or not mid else [Element(mid_id, mid.encode("ascii"))]
        if level_id is None:
            self._blocks = [one_byte_block(head)] * 256
        else:
            self._blocks = [
                one_byte_block([*head, Element(level_id, bytes([b]))]) for b in range(256)
            ]
        self.carries_level = level_id is not None

    def block(self, level_byte: int) -> bytes:
        return self._blocks[level_byte]


def parse_extensions(profile: int, data: bytes) -> list[Element] | None:
    """The elements of an extension block's data (``data`` is the block after its 4-byte head,
    ``4 * length`` bytes). Other profiles have no elements here ([]); None if an element runs
    past the block. Never raises on any input."""
    if profile == ONE_BYTE_PROFILE:
        return _one_byte_elements(data)
    if profile >> 4 == TWO_BYTE_PROFILE >> 4:
        return _two_byte_elements(data)
    return []


def _one_byte_elements(data: bytes) -> list[Element] | None:
    elements: list[Element] = []
    offset, size = 0, len(data)
    while offset < size:
        head = data[offset]
        if head == 0:  # padding
            offset += 1
            continue
        if head >> 4 in (0, 15):  # id 15 is reserved, id 0 only pads: the rest is not read
            break
        end = offset + 1 + (head & 0x0F) + 1
        if end > size:
            return None
        elements.append(Element(head >> 4, data[offset + 1 : end]))
        offset = end
    return elements


def _two_byte_elements(data: bytes) -> list[Element] | None:
    elements: list[Element] = []
    offset, size = 0, len(data)
    while offset < size:
        if data[offset] == 0:  # padding
            offset += 1
            continue
        if offset + 2 > size or offset + 2 + data[offset + 1] > size:
            return None
        end = offset + 2 + data[offset + 1]
        elements.append(Element(data[offset], data[offset + 2 : end]))
        offset = end
    return elements


def rtp_extensions(packet: bytes) -> list[Element] | None:
    """The header extension elements of an RTP packet ([] without an extension); None when the
    packet is too short for its header or the block is malformed."""
    if len(packet) < 12 or packet[0] >> 6 != 2:
        return None
    start = 12 + 4 * (packet[0] & 0x0F)
    if not packet[0] & 0x10:
        return [] if start <= len(packet) else None
    if start + 4 > len(packet):
        return None
    profile = int.from_bytes(packet[start : start + 2], "big")
    end = start + 4 + 4 * int.from_bytes(packet[start + 2 : start + 4], "big")
    if end > len(packet):
        return None
    return parse_extensions(profile, packet[start + 4 : end])


def audio_level(value: bytes) -> tuple[bool, int] | None:
    """An RFC 6464 element's (voice, level in -dBov), or None if it is not one byte."""
    if len(value) != 1:
        return None
    return bool(value[0] & VOICE_BIT), value[0] & 0x7F
