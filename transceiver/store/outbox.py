"""The ``call.ended`` webhook outbox in Redis: durable, shared by every transceiver.

I/O layer (redis) and its Lua; keys in ``keys.OutboxKeys``. Delivery is at least once across
processes: an event waits here, not in a process, until a 2xx acknowledges it. Its life:

1. **reserve**, in the same transaction as the call-record write that ends a leg
   (``call_log``): an entry without a body yet, due ``grace_ms`` later. An id already there
   changes nothing (a retried write); a full outbox (``max_pending`` entries) refuses it:
   dropped, logged and counted.
2. **freeze**: the body, the event exactly as it will be sent, is set once. The process that
   ended the leg does it as soon as it has read the record back, and the entry comes due at
   once; if that process died first, whoever claims the entry after the grace builds the body
   from the stored record (``webhooks``).
3. **claim**: one due entry is leased to one sender. Its ``attempts`` goes up by one and it is
   not due again until the lease (``lease_ms``) ends, so an attempt cut short by a SIGKILL is
   made again by the next claim, in any process.
4. **ack** after a 2xx (gone); **retry** after a failure (due again after the pause; only the
   claim that holds it, by its attempt number, may reschedule it); or **ack** to give up.

Every time is Redis's own clock (``TIME``): transceivers' clocks need not agree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from transceiver.store.call_records import EndLeg
from transceiver.store.connection import unavailable_as_store_error
from transceiver.store.errors import StoreError
from transceiver.store.keys import OutboxKeys
from transceiver.store.scripts import LuaScript

log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 200

_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# ARGV: event id, entry JSON, grace_ms, max_pending -> 1 reserved, 0 already there, -1 full
RESERVE = LuaScript(
    "outbox_reserve",
    _NOW
    + """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[3]), ARGV[1])
return 1
""",
)

# ARGV: event id, body -> the stored body (the first one set wins), or nil: no such entry.
# An entry nobody has claimed yet comes due at once.
FREEZE = LuaScript(
    "outbox_freeze",
    _NOW
    + """
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return nil end
redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2])
if cjson.decode(raw).attempts == 0 then redis.call('ZADD', KEYS[1], now_ms(), ARGV[1]) end
return redis.call('HGET', KEYS[3], ARGV[1])
""",
)

# ARGV: lease_ms -> {event id, entry JSON (attempts counted), body or nil}, or {}: none due
CLAIM = LuaScript(
    "outbox_claim",
    _NOW
    + """
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)
if #due == 0 then return {} end
local id = due[1]
local raw = redis.call('HGET', KEYS[2], id)
if not raw then
  redis.call('ZREM', KEYS[1], id)
  return {}
end
local entry = cjson.decode(raw)
entry.attempts = entry.attempts + 1
raw = cjson.encode(entry)
redis.call('HSET', KEYS[2], id, raw)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
return {id, raw, redis.call('HGET', KEYS[3], id)}
""",
)

# ARGV: event id -> 1 removed, 0 not there
ACK = LuaScript(
    "outbox_ack",
    """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return redis.call('HDEL', KEYS[2], ARGV[1])
""",
)

# ARGV: event id, attempts (the claim's), pause_ms, error -> 1 rescheduled, 0 not ours any more
RETRY = LuaScript(
    "outbox_retry",
    _NOW
    + """
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return 0 end
local entry = cjson.decode(raw)
if entry.attempts ~= tonumber(ARGV[2]) then return 0 end
entry.last_error = ARGV[4]
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(entry))
redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[3]), ARGV[1])
return 1
""",
)

# -> {entries, ms until the next one is due (0: now; -1: none)}
STATE = LuaScript(
    "outbox_state",
    _NOW
    + """
local depth = redis.call('ZCARD', KEYS[1])
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then return {depth, -1} end
return {depth, math.max(0, tonumber(first[2]) - now_ms())}
""",
)


def event_id(call_id: str) -> str:
    """The event's id, its idempotency key: one per leg, the same on every attempt."""
    return f"evt_{call_id}"


@dataclass(frozen=True)
class Claimed:
    """One due event, leased to the sender that claimed it."""

    event_id: str
    session_id: str
    call_id: str
    ended_at_ms: int
    attempts: int  # this claim's included: its number, for ``retry``
    body: bytes | None  # None: not frozen yet (the process that ended the leg died first)


@dataclass(frozen=True)
class OutboxState:
    depth: int  # entries waiting, leased ones included
    next_due_ms: int | None  # from now; None: nothing waits


class WebhookOutbox:
    """The outbox under one prefix, on one Redis client."""

    def __init__(self, redis: Redis, prefix: str, max_pending: int, grace_ms: int) -> None:
        self._redis = redis
        self._keys = OutboxKeys.of(prefix).all()
        self.max_pending = max_pending
        self.grace_ms = grace_ms
        self.dropped = 0  # reservations refused: the outbox was full
        self.on_reserved: Callable[[], None] | None = None  # a new event: the sender wakes

    def reserve_in(self, pipe: Pipeline, end: EndLeg) -> None:
        """Queue the reservation of ``end``'s event on ``pipe`` (the record writer's
        transaction); pass its reply to ``reserved``."""
        entry = {"session_id": end.session_id, "call_id": end.call_id,
                 "ended_at": end.at_ms, "attempts": 0, "last_error": ""}  # fmt: skip
        args: list[str | int] = [event_id(end.call_id), json.dumps(entry), self.grace_ms,
                                 self.max_pending]  # fmt: skip
        pipe.eval(RESERVE.text, len(self._keys), *self._keys, *args)

    def reserved(self, end: EndLeg, reply: Any) -> None:
        if reply == -1:
            self.dropped += 1
            log.warning("webhook outbox full (%d events); %s dropped",
                        self.max_pending, event_id(end.call_id))  # fmt: skip
        elif self.on_reserved is not None:
            self.on_reserved()

    async def freeze(self, event: str, body: bytes) -> bytes | None:
        """Set the event's body unless one is set; the body to send (None: no such event)."""
        stored = await self._run(FREEZE, event, body)
        return None if stored is None else bytes(stored)

    async def claim(self, lease_ms: int) -> Claimed | None:
        """Lease one due event; None when nothing is due."""
        reply = await self._run(CLAIM, lease_ms)
        if not reply:
            return None
        entry = json.loads(reply[1])
        body = None if reply[2] is None else bytes(reply[2])
        return Claimed(_text(reply[0]), entry["session_id"], entry["call_id"],
                       int(entry["ended_at"]), int(entry["attempts"]), body)  # fmt: skip

    async def ack(self, event: str) -> bool:
        """Remove the event (delivered, given up or announcing nothing)."""
        return bool(await self._run(ACK, event))

    async def retry(self, claimed: Claimed, pause_ms: int, error: str) -> bool:
        """Due again in ``pause_ms``; False when the claim is no longer the event's latest."""
        args = [claimed.event_id, claimed.attempts, pause_ms, error[:MAX_ERROR_CHARS]]
        return bool(await self._run(RETRY, *args))

    async def state(self) -> OutboxState:
        depth, next_due_ms = await self._run(STATE)
        return OutboxState(int(depth), None if next_due_ms < 0 else int(next_due_ms))

    async def entry(self, event: str) -> dict[str, Any] | None:
        """An event's entry as stored (for operators and tests); None: not waiting."""
        with unavailable_as_store_error("webhook outbox"):
            raw = await self._redis.hget(self._keys[1], event)
        return None if raw is None else dict(json.loads(raw))

    async def _run(self, script: LuaScript, *args: Any) -> Any:
        with unavailable_as_store_error("webhook outbox"):
            try:
                return await self._redis.eval(script.text, len(self._keys), *self._keys, *args)
            except redis_errors.ResponseError as error:
                raise StoreError(f"{script.name}: {error}") from None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
