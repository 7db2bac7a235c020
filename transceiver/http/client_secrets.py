"""Short-lived ``ek_`` client secrets, as OpenAI's ``POST /v1/realtime/client_secrets`` mints.

Pure: bytes and numbers in, values out; the clock is passed in. A secret is stateless and
self-contained, so any transceiver that shares the signing key accepts it, whichever one minted
it::

    ek_ + base64url(deflate(JSON {"exp": unix s, "session": {...} | null})) + "." + base64url(MAC)

The MAC is HMAC-SHA256 (truncated to 128 bits) under a key derived, for this purpose only, from
a secret of ``TRANSCEIVER_SECRET_KEYS`` (``transceiver.http.auth``), which the relays never hold.
The optional session config rides inside the secret, so the calls endpoint can apply it without
any shared store; deflated, so a session of realistic instructions and tools fits
(``MAX_SECRET_CHARS`` bounds the secret, one HTTP header; prose and JSON schemas deflate to
about a third). A payload that is plain JSON (``{`` first) is read as it is: the secrets
minted before the payload was deflated stay valid until they expire.

A session too large to ride (``too_large`` from ``mint``) can be kept by the deployment's
session store instead (``transceiver.store.secret_sessions``, with Redis): the secret then
carries only its reference, ``{"exp": unix s, "ref": id}`` (``mint_reference``), and whoever
verifies it loads the session by that id (``ClientSecret.reference``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PREFIX = "ek_"
MAC_BYTES = 16
MIN_TTL_S = 10
MAX_TTL_S = 7200
DEFAULT_TTL_S = 600
MAX_SECRET_CHARS = 6000  # fits comfortably in one HTTP header
MAX_PAYLOAD_BYTES = 64 * 1024  # a payload inflating past this is no secret of ours
REFERENCE = re.compile(r"[A-Za-z0-9_-]{16,64}")  # a stored session's id, as the store mints it


class ClientSecretError(ValueError):
    """A secret that does not verify; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class ClientSecret:
    value: str
    expires_at: int
    session: Mapping[str, Any] | None
    reference: str | None = None  # the stored session this secret names, when it carries none


def signing_key(deployment_secret: bytes) -> bytes:
    return hmac.new(deployment_secret, b"voicerelay client secret", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest()[:MAC_BYTES])


def mint(
    key: bytes, now_s: float, ttl_s: int = DEFAULT_TTL_S, session: Mapping[str, Any] | None = None
) -> ClientSecret:
    if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
        raise ClientSecretError("ttl", f"expires_after.seconds must be {MIN_TTL_S}..{MAX_TTL_S}")
    expires_at = int(now_s) + ttl_s
    value = _signed(key, {"exp": expires_at, "session": session})
    if len(value) > MAX_SECRET_CHARS:
        raise ClientSecretError(
            "too_large",
            f"the session config takes {len(value)} characters deflated in a secret, over the "
            f"{MAX_SECRET_CHARS} one secret carries",
        )
    return ClientSecret(value, expires_at, session)


def mint_reference(
    key: bytes, now_s: float, ttl_s: int, reference: str, session: Mapping[str, Any]
) -> ClientSecret:
    """A secret naming ``session`` by the id the session store keeps it under (``reference``)."""
    if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
        raise ClientSecretError("ttl", f"expires_after.seconds must be {MIN_TTL_S}..{MAX_TTL_S}")
    if not REFERENCE.fullmatch(reference):
        raise ValueError(f"session reference {reference!r} is not {REFERENCE.pattern}")
    expires_at = int(now_s) + ttl_s
    value = _signed(key, {"exp": expires_at, "ref": reference})
    return ClientSecret(value, expires_at, session, reference)


def _signed(key: bytes, body: Mapping[str, Any]) -> str:
    payload = _b64(zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 9))
    return f"{PREFIX}{payload}.{_mac(key, payload)}"


def verify(key: bytes, value: str, now_s: float) -> ClientSecret:
    """The secret's contents, if it is ours, intact and unexpired."""
    if not value.startswith(PREFIX) or len(value) > MAX_SECRET_CHARS:
        raise ClientSecretError("format", "not an ek_ client secret")
    payload, sep, mac = value[len(PREFIX) :].partition(".")
    if not sep or not hmac.compare_digest(_mac(key, payload), mac):
        raise ClientSecretError("signature", "client secret signature does not verify")
    body = _decode(payload)
    if body["exp"] <= now_s:
        raise ClientSecretError("expired", "client secret has expired")
    return ClientSecret(value, body["exp"], body.get("session"), body.get("ref"))


def _inflated(data: bytes) -> bytes:
    """The JSON a payload holds: deflated, or plain (``{`` first) as older secrets had it."""
    if data.startswith(b"{"):
        return data
    inflater = zlib.decompressobj()
    body = inflater.decompress(data, MAX_PAYLOAD_BYTES)
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("client secret payload is not whole or too large")
    return body


def _decode(payload: str) -> dict[str, Any]:
    try:
        body = json.loads(_inflated(_unb64(payload)))
    except (ValueError, binascii.Error, zlib.error):
        raise ClientSecretError("format", "client secret payload is unreadable") from None
    if not isinstance(body, dict) or not isinstance(body.get("exp"), int):
        raise ClientSecretError("format", "client secret payload lacks an expiry")
    if body.get("session") is not None and not isinstance(body["session"], dict):
        raise ClientSecretError("format", "client secret session is not an object")
    if "ref" in body:
        _check_reference(body)
    return body


def _check_reference(body: Mapping[str, Any]) -> None:
    reference = body["ref"]
    if not isinstance(reference, str) or not REFERENCE.fullmatch(reference):
        raise ClientSecretError("format", "client secret session reference is malformed")
    if body.get("session") is not None:
        raise ClientSecretError("format", "client secret carries a session and a reference")
