"""The keyed HELLO: how a relay worker proves to a transceiver that it holds the keyring.

Pure: bytes, a keyring and a wall-clock reading in, a verdict out. The relay seals
(``seal_hello``); the transceiver opens (``open_hello``) and refuses repeats (``ReplayGuard``).
Only after a HELLO opens does a transceiver take data from the address it came from, so a host
that merely reaches the link port learns no routes and never becomes a worker it answers.

A HELLO is a control datagram (``relay.wire.header``): the 20-byte header with the control flag, the
control type ``HELLO`` (1), then::

    version:1 | flags:1 | key_id:1 | sent_ms:8 | nonce:8 | to:18 | mac:16

- ``flags`` bit 0: "answer with ROUTES". A relay run with ``RELAY_HELLO=off`` still proves its
  key every second, but asks for no routes (it learns them from the Redis route cache).
- ``sent_ms``: the relay's wall clock in unix milliseconds (the two ends are different hosts, so
  only the wall clock compares); refused outside ``MAX_SKEW_S`` either way.
- ``nonce``: random; a nonce seen before (within the window) is a replay.
- ``to``: the transceiver link address it is meant for (IP as 16 bytes, IPv4-mapped, then the
  port), so a HELLO captured on its way to one transceiver is of no use at another. The relay
  sends to the address the transceiver's ufrags name, which is the link's own address.
- ``mac``: HMAC-SHA256 truncated to 128 bits, under the key id's link subkey
  (``Keyring.link_key``, neither the ufrag nor the ICE password key), over the control type
  byte and everything before the MAC.

What a HELLO cannot stop: a host that spoofs a keyed relay's source address can still inject
datagrams (UDP has no return-path check), though every answer goes to the real relay. Keep the
link network private (a NetworkPolicy in Kubernetes).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from relay.wire.header import FLAG_CONTROL, ControlType, encode_header, pack_address, unpack_address
from relay.wire.ufrag import Keyring

Address = tuple[str, int]

HELLO_VERSION = 1
FLAG_WANT_ROUTES = 0x01
NONCE_BYTES = 8
MAC_BYTES = 16
# ±30 s: hosts kept by NTP agree to milliseconds, but a VM resumed or migrated, or a host whose
# clock is stepped at boot, can be seconds off; 30 s absorbs that and still makes a captured
# HELLO useless half a minute later, which is also all the replay guard must remember.
MAX_SKEW_S = 30.0
# One HELLO per relay worker per second, each nonce kept at most 60 s: room for ~1,000 workers.
MAX_REMEMBERED_NONCES = 65_536
_BODY = struct.Struct("!BBBBQ8s18s")  # type, version, flags, key id, sent_ms, nonce, to
HELLO_BYTES = _BODY.size + MAC_BYTES  # after the 20-byte header
_TYPE = bytes([ControlType.HELLO])


class HelloError(ValueError):
    """A HELLO that is refused; ``reason`` is a short stable code for the refusal counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Hello:
    """An opened HELLO: who signed it, when, and whether the relay wants ROUTES back."""

    key_id: int
    sent_ms: int
    nonce: bytes
    to: Address
    want_routes: bool


def seal_hello(
    keyring: Keyring,
    to: Address,
    now_s: float,
    want_routes: bool = True,
    nonce: bytes | None = None,
) -> bytes:
    """The whole HELLO datagram for the transceiver at ``to``, signed with the current key."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    flags = FLAG_WANT_ROUTES if want_routes else 0
    key_id = keyring.current_id
    body = _BODY.pack(
        ControlType.HELLO, HELLO_VERSION, flags, key_id, int(now_s * 1000), nonce, pack_address(to)
    )
    key = keyring.link_key(key_id)
    assert key is not None  # guaranteed by Keyring.__post_init__
    return encode_header(b"\x00" * 18, FLAG_CONTROL) + body + _mac(key, body)


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:MAC_BYTES]


def open_hello(keyring: Keyring, payload: bytes, to: Address, now_s: float) -> Hello:
    """The HELLO in ``payload`` (what follows the header), if a key of ``keyring`` signed it
    for ``to`` within ``MAX_SKEW_S`` of ``now_s``; raises HelloError otherwise."""
    if len(payload) != HELLO_BYTES or payload[:1] != _TYPE:
        raise HelloError("hello_length", f"a HELLO is {HELLO_BYTES} bytes, not {len(payload)}")
    _, version, flags, key_id, sent_ms, nonce, packed_to = _BODY.unpack_from(payload)
    if version != HELLO_VERSION:
        raise HelloError("hello_version", f"HELLO version {version} is not {HELLO_VERSION}")
    key = keyring.link_key(key_id)
    if key is None:
        raise HelloError("hello_key_id", f"unknown key id {key_id}")
    body, mac = payload[: _BODY.size], payload[_BODY.size :]
    if not hmac.compare_digest(_mac(key, body), mac):
        raise HelloError("hello_mac", "HELLO MAC does not verify")
    if packed_to != pack_address(to):
        raise HelloError("hello_address", f"HELLO for {unpack_address(packed_to)}, not {to}")
    _check_time(sent_ms / 1000, now_s)
    return Hello(key_id, sent_ms, nonce, to, bool(flags & FLAG_WANT_ROUTES))


def _check_time(sent_s: float, now_s: float) -> None:
    if sent_s < now_s - MAX_SKEW_S:
        raise HelloError("hello_stale", f"HELLO sent {now_s - sent_s:.1f} s ago")
    if sent_s > now_s + MAX_SKEW_S:
        raise HelloError("hello_future", f"HELLO sent {sent_s - now_s:.1f} s in the future")


class ReplayGuard:
    """Nonces of accepted HELLOs, each kept until its HELLO would be refused as stale anyway."""

    def __init__(self, capacity: int = MAX_REMEMBERED_NONCES) -> None:
        self._capacity = capacity
        self._forget_at_s: dict[bytes, float] = {}  # nonce -> wall time it may be forgotten

    def __len__(self) -> int:
        return len(self._forget_at_s)

    def check(self, hello: Hello, now_s: float) -> None:
        """Remember ``hello``'s nonce; raises HelloError if it was seen before."""
        self._forget(now_s)
        if hello.nonce in self._forget_at_s:
            raise HelloError("hello_replay", "HELLO nonce seen before")
        if len(self._forget_at_s) >= self._capacity:
            # Only key holders add nonces, so a full guard means a misconfigured fleet: keep
            # admitting relays and forget the oldest nonce rather than refuse.
            del self._forget_at_s[next(iter(self._forget_at_s))]
        self._forget_at_s[hello.nonce] = hello.sent_ms / 1000 + MAX_SKEW_S

    def _forget(self, now_s: float) -> None:
        # Insertion order is roughly expiry order (senders' clocks agree within the skew); a
        # late entry stuck behind an earlier one goes on a later call. Bounded by the size.
        while self._forget_at_s:
            nonce, forget_at_s = next(iter(self._forget_at_s.items()))
            if forget_at_s >= now_s:
                return
            del self._forget_at_s[nonce]
