"""ek_ client secrets: round trip, expiry, tampering, and every rejection path."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transceiver.http import client_secrets
from transceiver.http.auth import AuthConfig, Authenticator
from transceiver.http.client_secrets import ClientSecretError, mint, signing_key, verify

KEY = signing_key(b"k" * 32)
NOW = 1_800_000_000.0


def reason(value: str, now: float = NOW, key: bytes = KEY) -> str:
    with pytest.raises(ClientSecretError) as info:
        verify(key, value, now)
    return info.value.reason


def test_round_trip_carries_expiry_and_session() -> None:
    secret = mint(KEY, NOW, 60, {"instructions": "Be brief."})
    assert secret.value.startswith("ek_") and secret.expires_at == int(NOW) + 60
    back = verify(KEY, secret.value, NOW + 59)
    assert back.session == {"instructions": "Be brief."} and back.expires_at == secret.expires_at


def test_expired_secret_is_refused() -> None:
    assert reason(mint(KEY, NOW, 60).value, now=NOW + 60) == "expired"


def test_other_deployments_secret_is_refused() -> None:
    assert reason(mint(signing_key(b"x" * 32), NOW).value) == "signature"


def test_tampered_payload_is_refused() -> None:
    value = mint(KEY, NOW, 60).value
    payload, mac = value[3:].split(".")
    forged = mint(KEY, NOW, 7200).value[3:].split(".")[0]
    assert reason(f"ek_{forged}.{mac}") == "signature"
    assert reason(f"ek_{payload}") == "signature"


@pytest.mark.parametrize("value", ["", "sk-abc", "ek_", "ek_" + "a" * 7000])
def test_malformed_secret_is_refused(value: str) -> None:
    assert reason(value) in {"format", "signature"}


@pytest.mark.parametrize("ttl_s", [0, 9, 7201])
def test_ttl_out_of_range_is_refused(ttl_s: int) -> None:
    with pytest.raises(ClientSecretError) as info:
        mint(KEY, NOW, ttl_s)
    assert info.value.reason == "ttl"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_verifies(value: str) -> None:
    with pytest.raises(ClientSecretError):
        verify(KEY, value, NOW)


def test_a_session_of_realistic_size_rides_deflated() -> None:
    prose = (Path(__file__).resolve().parent.parent / "ARCHITECTURE.md").read_text()[:8000]
    session = {"type": "realtime", "instructions": prose}  # over 8 KB: once refused at 4.4 KB
    secret = mint(KEY, NOW, 60, session)
    assert verify(KEY, secret.value, NOW).session == session


def test_a_plain_json_payload_minted_before_deflating_still_verifies() -> None:
    payload = client_secrets._b64(b'{"exp":1800000060,"session":{"instructions":"Hi."}}')
    value = f"ek_{payload}.{client_secrets._mac(KEY, payload)}"
    assert verify(KEY, value, NOW).session == {"instructions": "Hi."}


def test_a_payload_inflating_past_its_bound_is_refused() -> None:
    body = b'{"exp":1800000060,"session":{"x":"' + b"a" * 70_000 + b'"}}'
    payload = client_secrets._b64(zlib.compress(body, 9))
    assert reason(f"ek_{payload}.{client_secrets._mac(KEY, payload)}") == "format"


def test_a_reference_secret_names_its_stored_session_and_carries_none() -> None:
    secret = client_secrets.mint_reference(KEY, NOW, 60, "r" * 22, {"instructions": "Long."})
    back = verify(KEY, secret.value, NOW + 59)
    assert (back.reference, back.session, back.expires_at) == ("r" * 22, None, int(NOW) + 60)
    assert reason(secret.value, now=NOW + 60) == "expired"


@pytest.mark.parametrize(
    "body",
    [b'{"exp":1800000060,"ref":"short"}', b'{"exp":1800000060,"ref":7}',
     b'{"exp":1800000060,"ref":"' + b"r" * 22 + b'","session":{"instructions":"Hi."}}'],
)  # fmt: skip
def test_a_malformed_reference_is_refused(body: bytes) -> None:
    payload = client_secrets._b64(zlib.compress(body, 9))
    assert reason(f"ek_{payload}.{client_secrets._mac(KEY, payload)}") == "format"


def random_prose(size_bytes: int) -> str:
    return " ".join(os.urandom(4).hex() for _ in range(size_bytes // 9))


def test_a_session_too_large_to_carry_says_how_large() -> None:
    with pytest.raises(ClientSecretError) as info:
        mint(KEY, NOW, 60, {"instructions": random_prose(40_000)})
    assert info.value.reason == "too_large"
    assert f"over the {client_secrets.MAX_SECRET_CHARS} one secret carries" in str(info.value)


async def test_without_a_session_store_a_large_session_is_refused_with_what_to_do() -> None:
    auth = Authenticator(AuthConfig.validated("off", None, None))
    with pytest.raises(ClientSecretError) as info:
        await auth.mint(60, {"instructions": random_prose(40_000)})
    assert info.value.reason == "too_large" and "REDIS_URL" in str(info.value)
    assert "session.update" in str(info.value)
    assert (await auth.mint(60, {"instructions": "Short."})).reference is None
