"""The signed header a transceiver puts on a request it forwards to the session's owner.

Protocol layer (pure). A sideband or a hang-up that lands on a transceiver not running its
session is forwarded to the one that does (``owner_routing``, ``owner_hop``); the owner must
tell that hop from a client's own request, because a hop is never forwarded again (a stale
directory record could otherwise bounce a request between transceivers). A client could
write any header, so the hop proves itself: ``X-Voicerelay-Hop: 1.<key id>.<expires, unix
s>.<MAC>``, an HMAC-SHA256 over the key id, the expiry,
the target (``realtime:<call id>``, ``live:<session id>``, ``hangup:<call id>``, each with its
stage) and the SHA-256 of the forwarded ``Authorization`` header, so a captured header opens
nothing else and lapses within ``HOP_TTL_S``. It proves where the request came from, not who
the caller is: the owner checks the forwarded credential itself, as for any request.

The key is derived from the ``ek_`` secret keyring (``TRANSCEIVER_SECRET_KEYS``), which the
transceivers share and nobody else holds (not the relays: see ``auth``); it is a key of its own
(HMAC of each secret with a fixed label), never the secret's own signing key. Every key of the
ring verifies, the current one signs, so the ring rotates as it does for secrets.

Within a pod of workers (``transceiver.workers``) the same header marks the requests the pod
sends itself (a follow-up to the worker that owns it, an offer passed to a worker with room,
the supervisor's asks for ``/readyz`` and ``/metrics``), signed with the pod's own key
(``pod_keys``: 32 random bytes its supervisor makes at start and hands each worker in its seat),
so a pod needs no keyring of its own to route. A pod-wide request's target is ``pod_target``.

The header was named ``X-Voicerelay-Sideband-Hop`` when only sidebands hopped. For one release
(rolling upgrades) a hop carries it under both names (``hop_headers``) and either is read
(``hop_header_of``, the new name first), so a transceiver not yet upgraded still tells a hop from
a client's request, and an upgraded one a hop from one not yet upgraded. The next release drops
``PREVIOUS_HOP_HEADER``. The key's label keeps its old words: changing it would change the keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping

from relay.wire.ufrag import Keyring

HOP_HEADER = "x-voicerelay-hop"
PREVIOUS_HOP_HEADER = "x-voicerelay-sideband-hop"  # read and sent for one release
HOP_TTL_S = 30
VERSION = "1"
_LABEL = b"voicerelay sideband hop"


def hop_headers(header: str) -> dict[str, str]:
    """The headers a hop carries: ``header`` under its name, and for one release its old one."""
    return {HOP_HEADER: header, PREVIOUS_HOP_HEADER: header}


def hop_header_of(headers: Mapping[str, str]) -> str | None:
    """A request's hop header under either name, the new name first (None: not a hop)."""
    found = headers.get(HOP_HEADER)
    return headers.get(PREVIOUS_HOP_HEADER) if found is None else found


class HopError(Exception):
    """A hop header that does not verify; ``reason`` is short and stable."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"sideband hop refused: {reason}")
        self.reason = reason


class HopKeys:
    def __init__(self, keyring: Keyring) -> None:
        self._current_id = keyring.current_id
        self._keys: Mapping[int, bytes] = {
            key_id: hmac.new(secret, _LABEL, hashlib.sha256).digest()
            for key_id, secret in keyring.secrets.items()
        }

    def sign(self, target: str, authorization: str | None, now_s: float) -> str:
        expires_s = int(now_s) + HOP_TTL_S
        mac = _mac(self._keys[self._current_id], self._current_id, expires_s, target, authorization)
        return f"{VERSION}.{self._current_id}.{expires_s}.{mac}"

    def verify(self, header: str, target: str, authorization: str | None, now_s: float) -> None:
        """HopError unless ``header`` is a fresh hop for ``target`` and this credential."""
        parts = header.strip().split(".")
        if len(parts) != 4 or parts[0] != VERSION:
            raise HopError("malformed")
        key_text, expires_text, mac = parts[1:]
        if not key_text.isdigit() or not expires_text.isdigit():
            raise HopError("malformed")
        key = self._keys.get(int(key_text))
        if key is None:
            raise HopError("unknown_key")
        expected = _mac(key, int(key_text), int(expires_text), target, authorization)
        if not hmac.compare_digest(expected.encode(), mac.encode()):
            raise HopError("signature")
        if not now_s <= int(expires_text) <= now_s + 2 * HOP_TTL_S:
            raise HopError("expired")


def _mac(key: bytes, key_id: int, expires_s: int, target: str, authorization: str | None) -> str:
    credential = hashlib.sha256((authorization or "").encode()).hexdigest()
    signed = f"{VERSION}\n{key_id}\n{expires_s}\n{target}\n{credential}".encode()
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def pod_keys(secret_hex: str) -> HopKeys:
    """The hop keys of a pod's own secret (hex, as its seat carries it)."""
    return HopKeys(Keyring(0, {0: bytes.fromhex(secret_hex)}))


def pod_target(path: str) -> str:
    """What a pod-wide request's hop signs (its stage is always within the pod)."""
    return f"pod:{path}:pod"
