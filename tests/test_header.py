"""relay.wire.header: the 20-byte link header and the HELLO/ROUTES/GONE control messages."""

from __future__ import annotations

import pytest

from relay.wire.header import (
    FLAG_CONTROL,
    HEADER_BYTES,
    MAX_ROUTES_PER_MESSAGE,
    ControlMessage,
    ControlType,
    Header,
    HeaderError,
    header_for,
    parse_header,
)


def test_v4_header_bytes() -> None:
    raw = header_for(("192.0.2.7", 50000))
    assert raw == bytes.fromhex("0100c350" + "00000000000000000000ffff" + "c0000207")
    assert len(raw) == HEADER_BYTES
    assert parse_header(raw + b"payload") == Header(0, ("192.0.2.7", 50000))


def test_v6_header_bytes() -> None:
    raw = header_for(("2001:db8::1", 443))
    assert raw == bytes.fromhex("010001bb" + "20010db8000000000000000000000001")
    assert parse_header(raw) == Header(0, ("2001:db8::1", 443))


def test_v6_scope_is_dropped() -> None:
    assert parse_header(header_for(("fe80::1%eth0", 9))).client == ("fe80::1", 9)


def test_header_rejects_short() -> None:
    with pytest.raises(HeaderError, match="^short: 19 bytes is shorter than the header$") as caught:
        parse_header(b"\x01" * 19)
    assert caught.value.reason == "short"


def test_header_rejects_version() -> None:
    raw = b"\x02" + header_for(("127.0.0.1", 1))[1:]
    with pytest.raises(HeaderError, match="^version: header version 2 is not 1$"):
        parse_header(raw)


def test_hello_bytes() -> None:
    raw = bytes(ControlMessage(ControlType.HELLO))
    assert raw == bytes([1, FLAG_CONTROL]) + b"\x00" * 18 + b"\x01"
    header = parse_header(raw)
    assert header.is_control and header.client == ("::", 0)
    assert ControlMessage.parse(raw[HEADER_BYTES:]) == ControlMessage(ControlType.HELLO)


@pytest.mark.parametrize("kind", [ControlType.ROUTES, ControlType.GONE])
def test_route_list_round_trip(kind: ControlType) -> None:
    routes = (("127.0.0.1", 5000), ("::1", 6000), ("2001:db8::2", 65535))
    raw = bytes(ControlMessage(kind, routes))
    assert len(raw) == HEADER_BYTES + 1 + 2 + 18 * 3
    assert ControlMessage.parse(raw[HEADER_BYTES:]) == ControlMessage(kind, routes)


def test_empty_routes_round_trip() -> None:
    raw = bytes(ControlMessage(ControlType.ROUTES))
    assert raw[HEADER_BYTES:] == b"\x02\x00\x00"
    assert ControlMessage.parse(raw[HEADER_BYTES:]).routes == ()


def test_routes_per_message_limit() -> None:
    many = tuple(("10.0.0.1", p) for p in range(1, MAX_ROUTES_PER_MESSAGE + 2))
    assert len(bytes(ControlMessage(ControlType.ROUTES, many[:-1]))) <= 1200
    with pytest.raises(ValueError, match="at most 64 routes per message"):
        bytes(ControlMessage(ControlType.ROUTES, many))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "control: empty control message"),
        (b"\x09", "control: unknown control type 9"),
        (b"\x02", "control: route list without a count"),
        (b"\x02\x00", "control: route list without a count"),
        (b"\x02\x00\x01" + b"\x00" * 17, "control: route list of 1 has 17 bytes"),
        (b"\x03\x00\x00\x00", "control: route list of 0 has 1 bytes"),
    ],
)
def test_control_rejects(payload: bytes, message: str) -> None:
    with pytest.raises(HeaderError) as caught:
        ControlMessage.parse(payload)
    assert str(caught.value) == message and caught.value.reason == "control"
