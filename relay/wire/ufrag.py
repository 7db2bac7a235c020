"""The server ICE ufrag as a signed routing hint, and the ICE password derived from it.

Pure: bytes and strings in, decisions out. Shared by the relay (which decodes) and the
transceiver (which mints).

Wire layout, before base64 (standard alphabet, no padding: exactly the ICE characters
``A-Z a-z 0-9 + /`` of RFC 8445 §5.3 / RFC 8839 §5.4)::

    version:1 | key_id:1 | family:1 (4 or 6) | address:4|16 | port:2 | nonce:8 | mac:10

Both layouts are a multiple of 3 bytes (27 and 39), so the text is 36 or 52 characters with no
padding. The MAC is HMAC-SHA256 truncated to 80 bits over everything before it.

Why the transceiver's *address* and not an id: the relay then routes a first packet with no
lookup, no registry and no shared state between its SO_REUSEPORT workers. The MAC makes the
address unforgeable, so the relay is never an open proxy; it still checks the address against
its set of known transceivers, as defence in depth and to count "unknown transceiver" drops.

One configured secret per key id yields independent subkeys: one signs ufrags, one derives the
ICE password from the ufrag, so the relay can check a STUN request's MESSAGE-INTEGRITY without
any per-session state, and one signs the relay's HELLO on the link (``relay.wire.hello``). The relay
accepts every key in its keyring (the current one and the previous one during a rotation);
transceivers mint with the current.

A secret must be at least ``MIN_SECRET_BYTES`` (32) bytes and not all zeros: HMAC-SHA256 keys
shorter than its 32-byte output weaken it (RFC 2104 §3), and an all-zero key is a placeholder
that anybody can guess.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

UFRAG_VERSION = 1
NONCE_BYTES = 8
MAC_BYTES = 10
PASSWORD_CHARS = 32
MIN_SECRET_BYTES = 32
GENERATE_HINT = (
    "generate one with: python -c 'import secrets; print(\"1:\" + secrets.token_hex(32))'"
)
_V4_LEN = 3 + 4 + 2 + NONCE_BYTES + MAC_BYTES
_V6_LEN = 3 + 16 + 2 + NONCE_BYTES + MAC_BYTES
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")

Address = tuple[str, int]


class UfragError(ValueError):
    """A ufrag that does not decode; ``reason`` is a short stable code for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Keyring:
    """Secrets by key id; ``current_id`` signs, every key in ``secrets`` verifies."""

    current_id: int
    secrets: Mapping[int, bytes]

    def __post_init__(self) -> None:
        if self.current_id not in self.secrets:
            raise ValueError(f"current key id {self.current_id} has no secret")
        for key_id, secret in self.secrets.items():
            if not 0 <= key_id <= 255:
                raise ValueError(f"key id {key_id} is outside 0..255")
            if len(secret) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"key {key_id} is shorter than {MIN_SECRET_BYTES} bytes; {GENERATE_HINT}"
                )
            if not any(secret):
                raise ValueError(f"key {key_id} is all zeros (a placeholder); {GENERATE_HINT}")

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        """Parse ``"ID:HEX[,ID:HEX]"``; the first entry is the current key."""
        entries: dict[int, bytes] = {}
        first: int | None = None
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key_id, secret = _parse_key(part)
            entries[key_id] = secret
            first = key_id if first is None else first
        if first is None:
            raise ValueError("no keys given: expected ID:HEXSECRET[,ID:HEXSECRET]")
        return cls(first, entries)

    def mac_key(self, key_id: int) -> bytes | None:
        secret = self.secrets.get(key_id)
        return None if secret is None else _subkey(secret, b"voicerelay ufrag mac")

    def password_key(self, key_id: int) -> bytes | None:
        secret = self.secrets.get(key_id)
        return None if secret is None else _subkey(secret, b"voicerelay ice pwd")

    def link_key(self, key_id: int) -> bytes | None:
        secret = self.secrets.get(key_id)
        return None if secret is None else _subkey(secret, b"voicerelay link hello")


def _parse_key(part: str) -> tuple[int, bytes]:
    key_id_text, sep, hex_secret = part.partition(":")
    if not sep or not key_id_text.isdigit():
        raise ValueError(f"key entry {part!r} is not ID:HEXSECRET")
    try:
        return int(key_id_text), bytes.fromhex(hex_secret)
    except ValueError:
        raise ValueError(f"key {key_id_text} secret is not hex; {GENERATE_HINT}") from None


def _subkey(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, label, hashlib.sha256).digest()


def mint_ufrag(keyring: Keyring, transceiver: Address, nonce: bytes | None = None) -> str:
    """A fresh ufrag naming ``transceiver`` (its link socket address)."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    ip = ipaddress.ip_address(transceiver[0])
    body = bytes([UFRAG_VERSION, keyring.current_id, ip.version]) + ip.packed
    body += transceiver[1].to_bytes(2, "big") + nonce
    mac_key = keyring.mac_key(keyring.current_id)
    assert mac_key is not None  # guaranteed by Keyring.__post_init__
    return base64.b64encode(body + _mac(mac_key, body)).decode("ascii")


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:MAC_BYTES]


def decode_ufrag(keyring: Keyring, ufrag: str | bytes) -> Address:
    """The transceiver address a ufrag names; raises UfragError with a reason code."""
    raw = _unbase64(ufrag)
    if raw[0] != UFRAG_VERSION:
        raise UfragError("version", f"ufrag version {raw[0]} is not {UFRAG_VERSION}")
    mac_key = keyring.mac_key(raw[1])
    if mac_key is None:
        raise UfragError("key_id", f"unknown key id {raw[1]}")
    body, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if not hmac.compare_digest(_mac(mac_key, body), mac):
        raise UfragError("mac", "ufrag MAC does not verify")
    return _address(raw)


def _unbase64(ufrag: str | bytes) -> bytes:
    text = ufrag.encode("ascii", "replace") if isinstance(ufrag, str) else ufrag
    if len(text) not in (_V4_LEN * 4 // 3, _V6_LEN * 4 // 3):
        raise UfragError("length", f"ufrag of {len(text)} characters is not ours")
    if not _ICE_CHARS.fullmatch(text.decode("ascii", "replace")):
        raise UfragError("charset", "ufrag has characters outside the ICE set")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise UfragError("charset", "ufrag is not base64") from None


def _address(raw: bytes) -> Address:
    family, size = raw[2], len(raw)
    if (family, size) == (4, _V4_LEN):
        ip_bytes = raw[3:7]
    elif (family, size) == (6, _V6_LEN):
        ip_bytes = raw[3:19]
    else:
        raise UfragError("family", f"family {family} does not match a {size}-byte ufrag")
    port = int.from_bytes(raw[3 + len(ip_bytes) : 5 + len(ip_bytes)], "big")
    if port == 0:
        raise UfragError("port", "transceiver port 0")
    return str(ipaddress.ip_address(ip_bytes)), port


def derive_password(keyring: Keyring, ufrag: str) -> str:
    """The ICE password that goes with ``ufrag`` (32 ICE characters, RFC 8839 asks >= 22).

    Uses the key id inside the ufrag so that passwords survive a key rotation.
    """
    raw = _unbase64(ufrag)
    key = keyring.password_key(raw[1])
    if key is None:
        raise UfragError("key_id", f"unknown key id {raw[1]}")
    digest = hmac.new(key, ufrag.encode("ascii"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")[:PASSWORD_CHARS]
