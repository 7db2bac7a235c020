"""relay.wire.ufrag: the signed ufrag codec and the derived ICE password."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from relay.wire.ufrag import (
    Keyring,
    UfragError,
    decode_ufrag,
    derive_password,
    mint_ufrag,
)

OLD = Keyring.parse("1:" + "11" * 32)
NEW_AND_OLD = Keyring.parse("2:" + "22" * 32 + ",1:" + "11" * 32)
ONLY_NEW = Keyring.parse("2:" + "22" * 32)
ICE_CHARS = re.compile(r"[A-Za-z0-9+/]{4,256}")


def _reencode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _resign(ring: Keyring, body: bytes) -> str:
    """Sign ``body`` the way mint_ufrag does, so a test can build well-signed odd layouts."""
    key = ring.mac_key(body[1])
    assert key is not None
    return _reencode(body + hmac.new(key, body, hashlib.sha256).digest()[:10])


@pytest.mark.parametrize(
    ("address", "chars"),
    [(("127.0.0.1", 7000), 36), (("10.1.2.3", 65535), 36), (("::1", 7001), 52)],
)
def test_round_trip(address: tuple[str, int], chars: int) -> None:
    ufrag = mint_ufrag(OLD, address)
    assert len(ufrag) == chars and ICE_CHARS.fullmatch(ufrag) and ":" not in ufrag
    assert decode_ufrag(OLD, ufrag) == address
    assert decode_ufrag(OLD, ufrag.encode("ascii")) == address


def test_round_trip_v6_full_address() -> None:
    address = ("2001:db8::8a2e:370:7334", 443)
    assert decode_ufrag(OLD, mint_ufrag(OLD, address)) == address


def test_fresh_nonce_each_time() -> None:
    assert mint_ufrag(OLD, ("127.0.0.1", 1)) != mint_ufrag(OLD, ("127.0.0.1", 1))


def test_rotation_accepts_previous_key() -> None:
    minted_before_rotation = mint_ufrag(OLD, ("127.0.0.1", 7000))
    assert decode_ufrag(NEW_AND_OLD, minted_before_rotation) == ("127.0.0.1", 7000)
    password = derive_password(OLD, minted_before_rotation)
    assert derive_password(NEW_AND_OLD, minted_before_rotation) == password


def test_rotation_signs_with_current_key() -> None:
    ufrag = mint_ufrag(NEW_AND_OLD, ("127.0.0.1", 7000))
    assert base64.b64decode(ufrag)[1] == 2
    assert decode_ufrag(ONLY_NEW, ufrag) == ("127.0.0.1", 7000)


def test_unknown_key_rejected() -> None:
    with pytest.raises(UfragError, match="^key_id: unknown key id 1$") as caught:
        decode_ufrag(ONLY_NEW, mint_ufrag(OLD, ("127.0.0.1", 7000)))
    assert caught.value.reason == "key_id"
    with pytest.raises(UfragError, match="^key_id: "):
        derive_password(ONLY_NEW, mint_ufrag(OLD, ("127.0.0.1", 7000)))


def test_same_id_different_secret_fails_mac() -> None:
    impostor = Keyring.parse("1:" + "99" * 32)
    with pytest.raises(UfragError, match="^mac: ufrag MAC does not verify$"):
        decode_ufrag(OLD, mint_ufrag(impostor, ("127.0.0.1", 7000)))


@pytest.mark.parametrize("ufrag", ["", "abcd", "A" * 35, "A" * 37, "A" * 51, "A" * 256])
def test_reject_length(ufrag: str) -> None:
    with pytest.raises(UfragError) as caught:
        decode_ufrag(OLD, ufrag)
    assert caught.value.reason == "length"
    assert str(caught.value) == f"length: ufrag of {len(ufrag)} characters is not ours"


@pytest.mark.parametrize("bad", ["-", "_", "=", ":", " ", "é"])
def test_reject_charset(bad: str) -> None:
    ufrag = mint_ufrag(OLD, ("127.0.0.1", 7000))
    with pytest.raises(UfragError) as caught:
        decode_ufrag(OLD, bad + ufrag[1:] if bad != "é" else ufrag[:-1] + bad)
    assert caught.value.reason in ("charset", "length")
    if bad != "é":  # a two-byte character also changes the byte length
        assert str(caught.value) == "charset: ufrag has characters outside the ICE set"


def test_reject_version() -> None:
    raw = bytearray(base64.b64decode(mint_ufrag(OLD, ("127.0.0.1", 7000))))
    raw[0] = 9
    with pytest.raises(UfragError, match="^version: ufrag version 9 is not 1$"):
        decode_ufrag(OLD, _reencode(bytes(raw)))


@pytest.mark.parametrize("position", [3, 7, 8, 9, 12, 17, 26])
def test_reject_mac_on_any_changed_byte(position: int) -> None:
    """Changing the transceiver address, the port, the nonce or the MAC itself fails."""
    raw = bytearray(base64.b64decode(mint_ufrag(OLD, ("127.0.0.1", 7000))))
    raw[position] ^= 0x01
    with pytest.raises(UfragError) as caught:
        decode_ufrag(OLD, _reencode(bytes(raw)))
    assert caught.value.reason == "mac"


def test_reject_family_mismatch() -> None:
    body = bytes([1, 1, 6]) + bytes([127, 0, 0, 1]) + (7000).to_bytes(2, "big") + b"N" * 8
    with pytest.raises(UfragError, match="^family: family 6 does not match a 27-byte ufrag$"):
        decode_ufrag(OLD, _resign(OLD, body))


def test_reject_port_zero() -> None:
    body = bytes([1, 1, 4]) + bytes([127, 0, 0, 1]) + b"\x00\x00" + b"N" * 8
    with pytest.raises(UfragError, match="^port: transceiver port 0$"):
        decode_ufrag(OLD, _resign(OLD, body))


def test_password_is_ice_chars_and_bound_to_ufrag() -> None:
    a, b = mint_ufrag(OLD, ("127.0.0.1", 7000)), mint_ufrag(OLD, ("127.0.0.1", 7000))
    assert len(derive_password(OLD, a)) == 32 and ICE_CHARS.fullmatch(derive_password(OLD, a))
    assert derive_password(OLD, a) == derive_password(OLD, a)
    assert derive_password(OLD, a) != derive_password(OLD, b)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no keys given"),
        ("1", "is not ID:HEXSECRET"),
        ("x:00", "is not ID:HEXSECRET"),
        ("1:zz", "key 1 secret is not hex"),
        ("1:" + "ab" * 31, "key 1 is shorter than 32 bytes; generate one with: python -c"),
        ("1:" + "00" * 32, "key 1 is all zeros (a placeholder); generate one with"),
        ("300:" + "ab" * 32, "key id 300 is outside 0..255"),
    ],
)
def test_keyring_rejects(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Keyring.parse(spec)
