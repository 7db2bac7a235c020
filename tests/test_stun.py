"""relay.wire.stun against golden captures: RFC 5769, aioice, a real Chromium request,
Chrome-style."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from relay.wire.stun import (
    BindingRequest,
    Kind,
    StunError,
    classify,
    integrity_ok,
    read_binding_request,
)
from relay.wire.ufrag import Keyring, decode_ufrag, derive_password

CAPTURES = Path(__file__).parent / "data" / "stun"
RFC5769 = (CAPTURES / "rfc5769-request.bin").read_bytes()
AIOICE = (CAPTURES / "aioice-request.bin").read_bytes()
CHROME = (CAPTURES / "chrome-request.bin").read_bytes()
# Captured from Debian Chromium 156 by capture_chromium.py: its first connectivity check.
CHROMIUM = (CAPTURES / "chromium-request.bin").read_bytes()
RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
CAPTURE_KEYS = Keyring.parse("7:" + "5a" * 32)  # the keyring make_captures.py used


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (0, Kind.STUN),
        (3, Kind.STUN),
        (4, Kind.OTHER),
        (19, Kind.OTHER),
        (20, Kind.DTLS),
        (63, Kind.DTLS),
        (64, Kind.OTHER),
        (127, Kind.OTHER),
        (128, Kind.MEDIA),
        (191, Kind.MEDIA),
        (192, Kind.OTHER),
        (255, Kind.OTHER),
    ],
)
def test_rfc7983_first_byte(first: int, kind: Kind) -> None:
    assert classify(bytes([first, 0, 0])) is kind


def test_empty_datagram_is_other() -> None:
    assert classify(b"") is Kind.OTHER


def test_rfc5769_sample_request_verifies() -> None:
    request = read_binding_request(RFC5769)
    assert request == BindingRequest(b"evtj:h6vY", 76)
    assert request.server_ufrag == b"evtj"
    assert integrity_ok(RFC5769, request, RFC5769_PASSWORD)
    assert not integrity_ok(RFC5769, request, b"VOkJxbRl1RmTxUk/WvJxBu")


@pytest.mark.parametrize("position", [8, 24, 44, 64, 83])
def test_rfc5769_tampered_fails(position: int) -> None:
    """Any changed byte before MESSAGE-INTEGRITY (id, SOFTWARE, PRIORITY, USERNAME, MI) fails."""
    tampered = bytearray(RFC5769)
    tampered[position] ^= 0x01
    data = bytes(tampered)
    assert not integrity_ok(data, read_binding_request(data), RFC5769_PASSWORD)


def test_rfc5769_fingerprint_is_not_covered() -> None:
    """RFC 8489 §14.5: attributes after MESSAGE-INTEGRITY are ignored."""
    tampered = RFC5769[:-1] + bytes([RFC5769[-1] ^ 0xFF])
    assert integrity_ok(tampered, read_binding_request(tampered), RFC5769_PASSWORD)


@pytest.mark.parametrize(
    ("capture", "transceiver", "client_ufrag"),
    [
        (AIOICE, ("127.0.0.1", 7000), b"Ab3d"),
        (CHROME, ("::1", 7001), b"pQ9x"),
        (CHROMIUM, ("127.0.0.1", 7000), b"7RDy"),
    ],
    ids=["aioice", "chrome-style", "chromium-captured"],
)
def test_captured_request(
    capture: bytes, transceiver: tuple[str, int], client_ufrag: bytes
) -> None:
    request = read_binding_request(capture)
    assert request.username.endswith(b":" + client_ufrag)
    assert decode_ufrag(CAPTURE_KEYS, request.server_ufrag) == transceiver
    password = derive_password(CAPTURE_KEYS, request.server_ufrag.decode("ascii"))
    assert integrity_ok(capture, request, password.encode("ascii"))
    assert not integrity_ok(capture, request, b"x" + password.encode("ascii")[1:])


def test_chrome_capture_walks_past_goog_network_info() -> None:
    assert struct.unpack_from("!H", CHROME, 20 + 4 + 60)[0] == 0xC057
    assert read_binding_request(CHROME).integrity_offset == len(CHROME) - 24 - 8


def test_chromium_capture_carries_chrome_attributes_before_integrity() -> None:
    """Walk the real capture: GOOG-NETWORK-INFO, ICE-CONTROLLING, USE-CANDIDATE, PRIORITY."""
    offset, kinds = 20, []
    while offset < len(CHROMIUM):
        kind, size = struct.unpack_from("!HH", CHROMIUM, offset)
        kinds.append(kind)
        offset += 4 + size + (-size % 4)
    assert kinds == [0x0006, 0xC057, 0x802A, 0x0025, 0x0024, 0x0008, 0x8028]
    assert read_binding_request(CHROMIUM).integrity_offset == len(CHROMIUM) - 24 - 8


def _with_length(data: bytes, length: int) -> bytes:
    return data[:2] + struct.pack("!H", length) + data[4:]


def _request(*attributes: bytes) -> bytes:
    body = b"".join(attributes)
    return struct.pack("!HHI", 1, len(body), 0x2112A442) + b"T" * 12 + body


def _attr(kind: int, value: bytes, declared: int | None = None) -> bytes:
    size = len(value) if declared is None else declared
    return struct.pack("!HH", kind, size) + value + b"\x00" * (-len(value) % 4)


MI = _attr(0x0008, b"\x00" * 20)
USER = _attr(0x0006, b"abcd:efgh")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "stun_short: 0 bytes is shorter than a STUN header"),
        (RFC5769[:19], "stun_short: 19 bytes is shorter than a STUN header"),
        (RFC5769[:4] + b"\x21\x12\xa4\x43" + RFC5769[8:], "stun_cookie: magic cookie"),
        (RFC5769[:-4], "stun_length: length field 88 does not match 104 bytes"),
        (RFC5769 + b"\x00" * 4, "stun_length: length field 88 does not match 112 bytes"),
        (_with_length(RFC5769, 86)[:106], "stun_length: length field 86 does not match 106"),
        (b"\x01\x01" + RFC5769[2:], "not_request: message type 0x0101 is not a binding request"),
        (b"\x00\x11" + RFC5769[2:], "not_request: message type 0x0011"),
        (_request(USER, _attr(0x8022, b"x" * 8, 40)), "stun_attribute: attribute 0x8022 overruns"),
        (_request(USER), "no_integrity: binding request without MESSAGE-INTEGRITY"),
        (_request(), "no_integrity: binding request without MESSAGE-INTEGRITY"),
        (_request(MI), "no_username: no USERNAME before MESSAGE-INTEGRITY"),
        (_request(MI, USER), "no_username: no USERNAME before MESSAGE-INTEGRITY"),
        (_request(_attr(0x0006, b"abcdefgh"), MI), "username: USERNAME is not server-ufrag"),
        (_request(USER, _attr(0x0008, b"\x00" * 16)), "stun_attribute: MESSAGE-INTEGRITY of 16"),
    ],
)
def test_rejections(data: bytes, message: str) -> None:
    with pytest.raises(StunError) as caught:
        read_binding_request(data)
    assert str(caught.value).startswith(message)
    assert caught.value.reason == message.split(":", 1)[0]


def test_username_longer_than_rfc_limit() -> None:
    with pytest.raises(StunError, match="^username: "):
        read_binding_request(_request(_attr(0x0006, b"a:" + b"b" * 520), MI))


def test_username_found_among_other_attributes() -> None:
    data = _request(_attr(0x8022, b"abc"), USER, _attr(0xC057, b"\x00\x01\x00\x0a"), MI)
    assert read_binding_request(data) == BindingRequest(b"abcd:efgh", len(data) - 24)
