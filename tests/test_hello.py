"""relay.wire.hello: the keyed HELLO a relay worker proves the keyring with, and its replay
guard."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from relay.wire.header import HEADER_BYTES, parse_header
from relay.wire.hello import (
    HELLO_BYTES,
    MAX_SKEW_S,
    Hello,
    HelloError,
    ReplayGuard,
    open_hello,
    seal_hello,
)
from relay.wire.ufrag import Keyring

SECRET_1 = bytes.fromhex("11" * 32)
OLD = Keyring.parse("1:" + SECRET_1.hex())
NEW_AND_OLD = Keyring.parse("2:" + "22" * 32 + ",1:" + SECRET_1.hex())
ONLY_NEW = Keyring.parse("2:" + "22" * 32)
TO = ("10.0.0.7", 7000)
NOW_S = 1_750_000_000.0
NONCE = bytes(range(8))


def payload(datagram: bytes) -> bytes:
    assert parse_header(datagram).is_control
    return datagram[HEADER_BYTES:]


def test_layout_byte_for_byte() -> None:
    datagram = seal_hello(OLD, TO, NOW_S + 0.1234, nonce=NONCE)
    body = (
        b"\x01"  # control type HELLO
        + b"\x01\x01\x01"  # version 1, flags: want routes, key id 1
        + (1_750_000_000_123).to_bytes(8, "big")
        + NONCE
        + b"\x00" * 10
        + b"\xff\xff\x0a\x00\x00\x07"  # 10.0.0.7, IPv4-mapped
        + (7000).to_bytes(2, "big")
    )
    link_key = hmac.new(SECRET_1, b"voicerelay link hello", hashlib.sha256).digest()
    mac = hmac.new(link_key, body, hashlib.sha256).digest()[:16]
    assert datagram == b"\x01\x01" + b"\x00" * 18 + body + mac
    assert len(datagram) == HEADER_BYTES + HELLO_BYTES == 74


def test_round_trip_and_the_routes_flag() -> None:
    opened = open_hello(OLD, payload(seal_hello(OLD, TO, NOW_S, nonce=NONCE)), TO, NOW_S)
    assert opened == Hello(1, int(NOW_S * 1000), NONCE, TO, want_routes=True)
    quiet = seal_hello(OLD, ("::1", 7001), NOW_S, want_routes=False)
    assert not open_hello(OLD, payload(quiet), ("::1", 7001), NOW_S).want_routes


def test_link_key_is_its_own_subkey() -> None:
    keys = {OLD.link_key(1), OLD.mac_key(1), OLD.password_key(1), SECRET_1}
    assert len(keys) == 4


def test_rotated_key_signs_and_the_previous_still_verifies() -> None:
    before_rotation = payload(seal_hello(OLD, TO, NOW_S))
    assert open_hello(NEW_AND_OLD, before_rotation, TO, NOW_S).key_id == 1
    after_rotation = payload(seal_hello(NEW_AND_OLD, TO, NOW_S))
    assert open_hello(ONLY_NEW, after_rotation, TO, NOW_S).key_id == 2
    with pytest.raises(HelloError, match="^hello_key_id: unknown key id 1$"):
        open_hello(ONLY_NEW, before_rotation, TO, NOW_S)


def refusal(body: bytes, now_s: float = NOW_S, ring: Keyring = OLD) -> str:
    with pytest.raises(HelloError) as caught:
        open_hello(ring, body, TO, now_s)
    return str(caught.value)


def test_bad_mac_wrong_key_and_tampering() -> None:
    impostor = Keyring.parse("1:" + "99" * 32)
    assert (
        refusal(payload(seal_hello(impostor, TO, NOW_S))) == "hello_mac: HELLO MAC does not verify"
    )
    good = bytearray(payload(seal_hello(OLD, TO, NOW_S)))
    for index in (2, 5, 20, len(good) - 1):  # flags, timestamp, address, MAC
        tampered = bytearray(good)
        tampered[index] ^= 0x01
        assert refusal(bytes(tampered)).startswith("hello_mac: ")


def test_old_and_future_timestamps() -> None:
    sealed = payload(seal_hello(OLD, TO, NOW_S))
    assert open_hello(OLD, sealed, TO, NOW_S + MAX_SKEW_S).sent_ms == int(NOW_S * 1000)
    assert open_hello(OLD, sealed, TO, NOW_S - MAX_SKEW_S).sent_ms == int(NOW_S * 1000)
    assert refusal(sealed, NOW_S + MAX_SKEW_S + 1) == "hello_stale: HELLO sent 31.0 s ago"
    assert refusal(sealed, NOW_S - 3600) == "hello_future: HELLO sent 3600.0 s in the future"


def test_for_another_transceiver() -> None:
    sealed = payload(seal_hello(OLD, ("10.0.0.8", 7000), NOW_S))
    assert refusal(sealed) == "hello_address: HELLO for ('10.0.0.8', 7000), not ('10.0.0.7', 7000)"


@pytest.mark.parametrize("cut", [0, 1, 2, 20, HELLO_BYTES - 1])
def test_truncated_and_padded(cut: int) -> None:
    sealed = payload(seal_hello(OLD, TO, NOW_S))
    expected = f"hello_length: a HELLO is {HELLO_BYTES} bytes, not {cut}"
    assert refusal(sealed[:cut]) == expected
    assert refusal(sealed + b"\x00").startswith("hello_length: ")


def test_unknown_version_and_type() -> None:
    sealed = payload(seal_hello(OLD, TO, NOW_S))
    assert refusal(sealed[:1] + b"\x02" + sealed[2:]) == "hello_version: HELLO version 2 is not 1"
    assert refusal(b"\x02" + sealed[1:]).startswith("hello_length: ")  # a ROUTES, not a HELLO


def test_replay_refused_until_the_window_has_passed() -> None:
    guard = ReplayGuard()
    hello = open_hello(OLD, payload(seal_hello(OLD, TO, NOW_S)), TO, NOW_S)
    guard.check(hello, NOW_S)
    with pytest.raises(HelloError, match="^hello_replay: HELLO nonce seen before$"):
        guard.check(hello, NOW_S + MAX_SKEW_S)
    guard.check(open_hello(OLD, payload(seal_hello(OLD, TO, NOW_S)), TO, NOW_S), NOW_S)
    assert len(guard) == 2
    guard.check(
        open_hello(OLD, payload(seal_hello(OLD, TO, NOW_S + 31)), TO, NOW_S + 31), NOW_S + 31
    )
    assert len(guard) == 1  # the first two would now be refused as stale: forgotten


def test_replay_guard_is_bounded() -> None:
    guard = ReplayGuard(capacity=3)
    hellos = [Hello(1, int(NOW_S * 1000), bytes([i]) * 8, TO, True) for i in range(5)]
    for hello in hellos:
        guard.check(hello, NOW_S)
    assert len(guard) == 3
    guard.check(hellos[0], NOW_S)  # evicted, so no longer known: the price of the bound
    with pytest.raises(HelloError):
        guard.check(hellos[4], NOW_S)
