"""Session state in Redis: the key layout, (de)serialisation and the records the store returns.

Protocol layer (pure: no redis, no asyncio). Key layout for session ``S`` under prefix ``P``
(the ``{S}`` hash tag puts all of a session's keys in one Redis Cluster slot, so one Lua script
may touch them all):

- ``P:sess:{S}:meta``  hash: ``config`` (JSON), ``turn``, ``fence`` (last token issued),
  ``owner`` and ``token`` (the current owner and its fencing token; both ``""`` after release),
  ``credential`` (SHA-256 hex of the resume credential), ``seq`` (last item sequence number),
  ``trimmed`` (how many of the oldest items were dropped by the cap). An ended session's meta
  is a tombstone: only ``ended`` and ``credential``, and no other key.
- ``P:sess:{S}:items`` list of JSON items, oldest first, at most ``max_items``.
- ``P:sess:{S}:ids``   sorted set item id -> sequence number, the same items as the list: it
  makes an append idempotent by item id (a retry returns the first append's sequence number).
- ``P:sess:{S}:lease`` string: the owner id, with the lease as its TTL (server clock).
- ``P:sess:{S}:images`` hash: image ref (``image_ref``: SHA-256 hex of its data URL) -> the
  data URL. A user item with images names them in its JSON (``images``: ``ref`` and
  ``detail`` each), so an item stays small (``MAX_ITEM_BYTES``) and an image shown twice is
  kept once. Which images are kept is the writer's rule (``journal.kept_images``: the newest
  within a byte budget); an item whose image is not kept loads without it (``decode_state``
  counts it in ``SessionState.images_missing``).

Every key expires: meta, items, ids and images after the session TTL, refreshed by every
write and heartbeat; the lease after the lease time, refreshed by ``renew``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_ITEM_BYTES = 64 * 1024  # one conversation item (a long transcript is a few KiB)
MAX_CONFIG_BYTES = 64 * 1024  # a session.update with instructions and tools
MAX_ID_CHARS = 128
_ID_RE = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_ID_CHARS}}}")
# A credential hash to compare against when the session has none: keeps verification
# constant-time whether or not the session exists.
_ABSENT_HASH = hashlib.sha256(b"voicerelay: no credential").hexdigest()

Json = dict[str, Any]


def check_id(kind: str, value: object) -> str:
    """Session, owner and item ids: 1-128 of ``A-Z a-z 0-9 _ . -`` (no hash-tag braces)."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"{kind} {value!r}: use 1-{MAX_ID_CHARS} of A-Z a-z 0-9 _ . -")
    return value


@dataclass(frozen=True)
class SessionKeys:
    meta: str
    items: str
    ids: str
    lease: str
    images: str

    @classmethod
    def of(cls, prefix: str, session_id: str) -> SessionKeys:
        base = f"{prefix}:sess:{{{check_id('session id', session_id)}}}"
        names = ("meta", "items", "ids", "lease", "images")
        return cls(*(f"{base}:{name}" for name in names))

    def all(self) -> list[str]:
        """In the order every Lua script takes them as KEYS."""
        return [self.meta, self.items, self.ids, self.lease, self.images]


@dataclass(frozen=True)
class Lease:
    """Proof of ownership: every write carries it, and the store refuses a stale token."""

    session_id: str
    owner_id: str
    token: int


@dataclass(frozen=True)
class AppendAck:
    seq: int  # the item's position in the conversation, 1-based, never reused
    appended: bool  # False: the item id was already stored (a retry), nothing changed
    replicas_acked: int | None  # None when the deployment asks for no WAIT


@dataclass(frozen=True)
class WriteAck:
    replicas_acked: int | None


@dataclass(frozen=True)
class SessionState:
    """What a transceiver needs to resume a session."""

    session_id: str
    config: Json
    items: tuple[Json, ...]
    turn: int
    owner_id: str  # "" when released
    token: int  # 0 when released
    first_seq: int  # sequence number of items[0]; > 1 once the cap trimmed older items
    images_missing: int = 0  # images the items name that were not kept (``decode_state``)


def encode_json(value: Mapping[str, Any], limit_bytes: int, what: str) -> bytes:
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw) > limit_bytes:
        raise ValueError(f"{what} is {len(raw)} bytes, over the {limit_bytes}-byte limit")
    return raw


def encode_item(item: Mapping[str, Any]) -> tuple[str, bytes]:
    """The item's stable id (its ``id`` field) and its JSON."""
    return check_id("item id", item.get("id")), encode_json(item, MAX_ITEM_BYTES, "item")


def image_ref(data_url: str) -> str:
    """How a stored item names an image it shows: the SHA-256 hex of its data URL."""
    return hashlib.sha256(data_url.encode()).hexdigest()


def with_images(item: Json, images: Mapping[bytes, bytes]) -> tuple[Json, int]:
    """A stored item with each image it names (``ref``) given as its ``image_url`` from the
    session's ``images``, and how many it names that are not there (not kept: dropped)."""
    named = item.get("images")
    if not isinstance(named, list) or not named:
        return item, 0
    found = [(part, images.get(str(part.get("ref", "")).encode())) for part in named]
    shown = [
        {"image_url": url.decode(), "detail": str(part.get("detail", "auto"))}
        for part, url in found
        if url is not None
    ]
    return {**item, "images": shown}, len(named) - len(shown)


def decode_state(
    session_id: str,
    meta: Mapping[bytes, bytes],
    items: Sequence[bytes],
    images: Mapping[bytes, bytes] | None = None,
) -> SessionState:
    def field(name: str, default: str = "") -> str:
        return meta.get(name.encode(), default.encode()).decode()

    token = field("token")
    loaded = [with_images(json.loads(raw), images or {}) for raw in items]
    return SessionState(
        session_id=session_id,
        config=json.loads(field("config", "{}")),
        items=tuple(item for item, _ in loaded),
        turn=int(field("turn", "0")),
        owner_id=field("owner"),
        token=int(token) if token else 0,
        first_seq=int(field("seq", "0")) - len(items) + 1,
        images_missing=sum(missing for _, missing in loaded),
    )


def new_credential() -> str:
    """A resume credential for the client: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def hash_credential(credential: str) -> str:
    """What the store keeps. Unsalted SHA-256 is enough: credentials are 256-bit random."""
    return hashlib.sha256(credential.encode()).hexdigest()


def credential_matches(given: str | None, stored_hash: str | None) -> bool:
    """Constant-time check; a missing credential or a session without one never matches."""
    expected = stored_hash or _ABSENT_HASH
    ok = hmac.compare_digest(hash_credential(given or ""), expected)
    return ok and bool(given) and bool(stored_hash)


@dataclass(frozen=True)
class OutboxKeys:
    """The ``call.ended`` webhook outbox under prefix ``P``, one for every transceiver
    (``transceiver.store.outbox``). The ``{outbox}`` hash tag keeps its keys in one Redis
    Cluster slot, so one script touches them all.

    - ``P:webhooks:{outbox}:due`` sorted set: event id -> when it may next be claimed (unix ms,
      Redis's clock): a new event's, a retry's, or the end of the lease a sender holds on it.
    - ``P:webhooks:{outbox}:entries`` hash: event id -> JSON: ``session_id``, ``call_id``,
      ``ended_at`` (unix ms), ``attempts`` (claims so far), ``last_error``.
    - ``P:webhooks:{outbox}:bodies`` hash: event id -> the event's JSON, set once: every
      attempt, by any transceiver, sends the same bytes.

    No TTL: an entry leaves when it is delivered or given up; ``max_pending`` bounds them.
    """

    due: str
    entries: str
    bodies: str

    @classmethod
    def of(cls, prefix: str) -> OutboxKeys:
        base = f"{prefix}:webhooks:{{outbox}}"
        return cls(f"{base}:due", f"{base}:entries", f"{base}:bodies")

    def all(self) -> list[str]:
        """In the order every outbox script takes them as KEYS."""
        return [self.due, self.entries, self.bodies]
