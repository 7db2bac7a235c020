"""Call records: what every call leaves behind in Redis, as keys, Lua and plain data.

Protocol layer (pure text and data: no redis, no asyncio). ``call_log`` runs the scripts; the
live session's ``transceiver.realtime.call_recording`` makes the writes. One record per Realtime
session ``S`` (a call resumed on another transceiver continues it), under prefix ``P``:

- ``P:call:{S}`` hash: ``session_id``, ``started_at`` and ``ended_at`` (unix ms; ``ended_at``
  empty while a leg runs), ``end_reason`` (the last leg's), ``legs`` (JSON list: one entry per
  connection that served the session: ``call_id``, ``transceiver``, ``started_at``,
  ``ended_at``, ``end_reason``, ``resumed_from``, ``trace_id``: its OpenTelemetry trace, when
  traces are on), ``versions`` (JSON list of the session configs that produced its answers:
  ``hash``, ``from_turn``, ``call_id``, ``at``), counters ``turns``,
  ``trimmed``, ``tool_calls``, ``interruptions``, ``cost_usd``, the worst turn latency
  ``max_latency_ms``, and ``seq:<call_id>`` (each leg's last appended turn: a retried append
  changes nothing).
- ``P:call:{S}:turns`` list of JSON turns, oldest first, at most ``max_turns`` (the oldest are
  trimmed and counted). A turn's ``index`` is its position in the whole call, never reused.
- ``P:callcfg:<hash>`` string: a config version's JSON, stored once per content hash.
- ``P:callidx`` sorted set, every score 0, members ``<started_at, 13 digits>|<S>``: listing by
  time is a lexicographic range, newest first, and ``since``/``until``/cursors are bounds.
- ``P:callalias:<call_id>`` string: the session id of a call id (``GET /v1/calls/rtc_…``).

Every key expires ``ttl_s`` after the record's last write (the retention); index members whose
record is gone are dropped when a listing meets them, and those older than the retention are
trimmed whenever a leg begins. The ``{S}`` hash tag keeps a record's two keys in one Redis
Cluster slot (the session's own keys share it), so one script touches both.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transceiver.store.keys import check_id
from transceiver.store.scripts import LuaScript

Json = dict[str, Any]
TRANSCRIPT_MODES = ("full", "redacted", "off")
MAX_VERSIONS = 64  # config versions kept per record (a client flipping configs is bounded)
STARTED_DIGITS = 13  # unix ms stays 13 digits until the year 2286
HASH_CHARS = 16
MAX_RECORD_TURN_BYTES = 16 * 1024  # one stored turn; longer transcripts are cut to fit


@dataclass(frozen=True)
class CallRecordPolicy:
    """Retention, bounds and what a record may hold (``TRANSCEIVER_CALL_RECORD_*``)."""

    ttl_s: float = 7 * 24 * 3600.0  # a record expires this long after its last write
    max_turns: int = 500  # turns kept per record; the oldest are trimmed (and counted)
    transcripts: str = "full"  # full, redacted (numbers and e-mail addresses masked) or off
    max_pending: int = 1000  # writes waiting for Redis, in all; more are dropped and counted
    write_attempts: int = 3  # tries per write while Redis is unreachable, then it is dropped
    retry_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if self.transcripts not in TRANSCRIPT_MODES:
            raise ValueError(f"call record transcripts: one of {TRANSCRIPT_MODES}, got {self}")
        if self.ttl_s < 1 or self.max_turns < 1 or self.max_pending < 1:
            raise ValueError(f"call record policy: ttl_s >= 1 and bounds >= 1, got {self}")
        if self.write_attempts < 1 or self.retry_interval_s <= 0:
            raise ValueError(f"call record policy: 1+ attempts, a positive pause, got {self}")

    @property
    def ttl_ms(self) -> int:
        return round(self.ttl_s * 1000)


@dataclass(frozen=True)
class CallRecordKeys:
    meta: str
    turns: str

    @classmethod
    def of(cls, prefix: str, session_id: str) -> CallRecordKeys:
        base = f"{prefix}:call:{{{check_id('session id', session_id)}}}"
        return cls(base, f"{base}:turns")

    def all(self) -> list[str]:
        return [self.meta, self.turns]


def index_key(prefix: str) -> str:
    return f"{prefix}:callidx"


def config_key(prefix: str, config_hash: str) -> str:
    return f"{prefix}:callcfg:{config_hash}"


def alias_key(prefix: str, call_id: str) -> str:
    return f"{prefix}:callalias:{check_id('call id', call_id)}"


def index_member(started_ms: int, session_id: str) -> str:
    return f"{started_ms:0{STARTED_DIGITS}d}|{session_id}"


def member_session(member: str) -> str:
    return member.partition("|")[2]


def time_bound(ms: int) -> str:
    """The index's exclusive bound just above every record started at or before ``ms``."""
    return "(" + f"{ms + 1:0{STARTED_DIGITS}d}"


def since_bound(ms: int) -> str:
    """The index's inclusive bound below every record started at or after ``ms``."""
    return "[" + f"{ms:0{STARTED_DIGITS}d}"


# --- the writes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BeginLeg:
    """A connection starts serving the session (a new call, or a resume of it)."""

    session_id: str
    call_id: str
    transceiver: str
    at_ms: int
    trace_id: str = ""  # the leg's OpenTelemetry trace (hex), when traces are on


@dataclass(frozen=True)
class ConfigVersion:
    """The config that produces the answers from now on (stored once per hash)."""

    session_id: str
    call_id: str
    config_hash: str
    config: Mapping[str, Any]
    at_ms: int


@dataclass(frozen=True)
class AppendTurn:
    session_id: str
    call_id: str
    seq: int  # the leg's own turn counter: 1, 2, ... (idempotency)
    turn: Mapping[str, Any]
    latency_ms: float | None
    cost_usd: float
    interrupted: bool
    tool_calls: int


@dataclass(frozen=True)
class HeardTime:
    """The client's heard time of a turn already stored (its report came after the turn)."""

    session_id: str
    call_id: str
    turn: int  # the engine's turn number in that leg (the stored turn's ``turn``)
    heard: Mapping[str, Any]


@dataclass(frozen=True)
class EndLeg:
    session_id: str
    call_id: str
    reason: str
    at_ms: int


RecordWrite = BeginLeg | ConfigVersion | AppendTurn | HeardTime | EndLeg
HEARD_WINDOW = 8  # a late heard time finds its turn among the record's newest this many


def encode_turn(turn: Mapping[str, Any]) -> bytes:
    raw = compact(turn)
    if len(raw) > MAX_RECORD_TURN_BYTES:
        raise ValueError(f"turn is {len(raw)} bytes, over {MAX_RECORD_TURN_BYTES}")
    return raw


def encode_heard(heard: Mapping[str, Any]) -> bytes:
    """A late heard time, as it goes into its stored turn (its size is bounded: three numbers)."""
    raw = compact(heard)
    if len(raw) > 256:
        raise ValueError(f"heard time of {len(raw)} bytes is not three numbers")
    return raw


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def config_hash(config: Mapping[str, Any]) -> str:
    """Content hash of a config version: the same settings always give the same hash."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_CHARS]


_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_NUMBER = re.compile(r"\d[\d\s().-]{1,}\d|\d")


def transcript(text: str, mode: str) -> str | None:
    """A transcript as the policy keeps it: whole, masked, or not at all (``None``)."""
    if mode == "off":
        return None
    if mode == "redacted":
        return _NUMBER.sub("[number]", _EMAIL.sub("[email]", text))
    return text


# --- reading back ----------------------------------------------------------------------------


def decode_record(
    meta: Mapping[bytes, bytes], turns: Sequence[bytes] | None, configs: Mapping[str, Any]
) -> Json:
    """A stored record as the API shows it; ``turns`` None: a summary (the list's shape)."""

    def text(name: str, default: str = "") -> str:
        return meta.get(name.encode(), default.encode()).decode()

    def number(name: str) -> int | None:
        value = text(name)
        return int(value) if value else None

    legs = _json_list(text("legs", "[]"))
    versions = _json_list(text("versions", "[]"))
    for leg in legs:
        for name in ("ended_at", "end_reason", "resumed_from", "trace_id"):
            leg.setdefault(name, None)
    latency = float(text("max_latency_ms", "-1"))
    ended_at = number("ended_at")
    record: Json = {
        "object": "voicerelay.call",
        "id": text("session_id"),
        "session_id": text("session_id"),
        "call_ids": [leg["call_id"] for leg in legs],
        "resumed_from": legs[-1]["resumed_from"] if legs else None,
        "status": "in_progress" if ended_at is None else "ended",
        "started_at": number("started_at"),
        "ended_at": ended_at,
        "end_reason": text("end_reason") or None,
        "transceivers": list(dict.fromkeys(leg["transceiver"] for leg in legs)),
        "legs": legs,
        "turn_count": int(text("turns", "0")),
        "turns_trimmed": int(text("trimmed", "0")),
        "max_latency_ms": None if latency < 0 else latency,
        "tool_calls": int(text("tool_calls", "0")),
        "interruptions": int(text("interruptions", "0")),
        "cost_usd": round(float(text("cost_usd", "0")), 8),
        "config_versions": [
            {**version, "config": configs.get(version["hash"])} for version in versions
        ]
        if turns is not None
        else [version["hash"] for version in versions],
    }
    if turns is not None:
        record["turns"] = [json.loads(raw) for raw in turns]
    return record


def _json_list(raw: str) -> list[Json]:
    value = json.loads(raw)
    return list(value) if isinstance(value, list) else []  # Lua's cjson writes [] as {}


# --- the Lua ---------------------------------------------------------------------------------
# KEYS[1] meta, KEYS[2] turns; ARGV[1] is always the retention in ms.

_TOUCH = """
local function touch()
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
local function list(field)
  local raw = redis.call('HGET', KEYS[1], field)
  if not raw then return {} end
  local value = cjson.decode(raw)
  if type(value) ~= 'table' then return {} end
  return value
end
local function encoded(items)
  if #items == 0 then return '[]' end
  return cjson.encode(items)
end
"""

# ARGV: ttl_ms, session_id, call_id, transceiver, at_ms, trace_id ('' when untraced) -> the
# record's started_at (ms). A leg already there (a retry) changes nothing; a previous leg still
# open ended when this one began.
BEGIN_LEG = LuaScript(
    "call_begin_leg",
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'session_id', ARGV[2], 'started_at', ARGV[5], 'ended_at', '',
             'end_reason', '', 'legs', '[]', 'versions', '[]', 'turns', 0, 'trimmed', 0,
             'tool_calls', 0, 'interruptions', 0, 'cost_usd', 0, 'max_latency_ms', -1)
end
local legs = list('legs')
for _, leg in ipairs(legs) do
  if leg.call_id == ARGV[3] then
    touch()
    return tonumber(redis.call('HGET', KEYS[1], 'started_at'))
  end
end
local leg = {call_id = ARGV[3], transceiver = ARGV[4], started_at = tonumber(ARGV[5])}
if ARGV[6] and ARGV[6] ~= '' then leg.trace_id = ARGV[6] end
local previous = legs[#legs]
if previous then
  leg.resumed_from = previous.call_id
  if previous.ended_at == nil then
    previous.ended_at = tonumber(ARGV[5])
    previous.end_reason = 'resumed_elsewhere'
  end
end
table.insert(legs, leg)
redis.call('HSET', KEYS[1], 'legs', encoded(legs), 'ended_at', '', 'end_reason', '')
touch()
return tonumber(redis.call('HGET', KEYS[1], 'started_at'))
""",
)

# ARGV: ttl_ms, config_hash, call_id, at_ms, max_versions -> 1 added, 0 the current one already
CONFIG_VERSION = LuaScript(
    "call_config_version",
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NO_RECORD') end
local versions = list('versions')
local last = versions[#versions]
if last and last.hash == ARGV[2] then
  touch()
  return 0
end
local from = tonumber(redis.call('HGET', KEYS[1], 'turns')) + 1
table.insert(versions,
             {hash = ARGV[2], call_id = ARGV[3], at = tonumber(ARGV[4]), from_turn = from})
while #versions > tonumber(ARGV[5]) do table.remove(versions, 1) end
redis.call('HSET', KEYS[1], 'versions', encoded(versions))
touch()
return 1
""",
)

# ARGV: ttl_ms, max_turns, call_id, seq, turn_json, latency_ms ('' none), cost_usd,
# interrupted (0|1), tool_calls -> the turn's index in the call, 0 for a retry already stored
APPEND_TURN = LuaScript(
    "call_append_turn",
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NO_RECORD') end
local seq_field = 'seq:' .. ARGV[3]
if tonumber(ARGV[4]) <= tonumber(redis.call('HGET', KEYS[1], seq_field) or '0') then
  touch()
  return 0
end
redis.call('HSET', KEYS[1], seq_field, ARGV[4])
local index = redis.call('HINCRBY', KEYS[1], 'turns', 1)
redis.call('RPUSH', KEYS[2], '{"index":' .. index .. ',' .. string.sub(ARGV[5], 2))
local over = redis.call('LLEN', KEYS[2]) - tonumber(ARGV[2])
if over > 0 then
  redis.call('LTRIM', KEYS[2], over, -1)
  redis.call('HINCRBY', KEYS[1], 'trimmed', over)
end
if ARGV[6] ~= '' then
  if tonumber(ARGV[6]) > tonumber(redis.call('HGET', KEYS[1], 'max_latency_ms')) then
    redis.call('HSET', KEYS[1], 'max_latency_ms', ARGV[6])
  end
end
redis.call('HINCRBYFLOAT', KEYS[1], 'cost_usd', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'interruptions', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'tool_calls', ARGV[9])
touch()
return index
""",
)

# ARGV: ttl_ms, call_id, turn, heard_json, window -> 1 stored, 0 the turn is not among the newest
# ``window`` (trimmed, or never stored) or has its heard time already. A stored turn starts
# ``{"index":N,"call_id":"<call_id>","turn":<turn>,`` and ends ``,"heard":null}`` until then.
TURN_HEARD = LuaScript(
    "call_turn_heard",
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NO_RECORD') end
local needle = ',"call_id":"' .. ARGV[2] .. '","turn":' .. ARGV[3] .. ','
local tail = ',"heard":null}'
local length = redis.call('LLEN', KEYS[2])
touch()
for i = length - 1, math.max(0, length - tonumber(ARGV[5])), -1 do
  local entry = redis.call('LINDEX', KEYS[2], i)
  if string.find(entry, needle, 1, true) then
    if string.sub(entry, -#tail) ~= tail then return 0 end
    local heard = string.sub(entry, 1, -#tail - 1) .. ',"heard":' .. ARGV[4] .. '}'
    redis.call('LSET', KEYS[2], i, heard)
    return 1
  end
end
return 0
""",
)

# ARGV: ttl_ms, call_id, reason, at_ms -> 1. The leg's own end always wins over a presumed one
# ('resumed_elsewhere'); the record's end is its last leg's.
END_LEG = LuaScript(
    "call_end_leg",
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NO_RECORD') end
local legs = list('legs')
local found = nil
for i, leg in ipairs(legs) do
  if leg.call_id == ARGV[2] then
    leg.ended_at = tonumber(ARGV[4])
    leg.end_reason = ARGV[3]
    found = i
  end
end
if not found then return redis.error_reply('NO_LEG') end
redis.call('HSET', KEYS[1], 'legs', encoded(legs))
if found == #legs then
  redis.call('HSET', KEYS[1], 'ended_at', ARGV[4], 'end_reason', ARGV[3])
end
touch()
return 1
""",
)
