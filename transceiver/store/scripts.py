"""The Lua scripts behind every session-store write: fencing checks and writes in one step.

Protocol layer (pure text). Each script takes the session's keys in ``SessionKeys.all()`` order
(KEYS[1] meta, KEYS[2] items, KEYS[3] ids, KEYS[4] lease, KEYS[5] images) and answers with a
value or an error reply whose first word is a code from ``store_errors``.

Fencing rules:
- ``create`` makes the session with fencing token 1 owned by its creator.
- ``claim`` refuses (LEASE_HELD) while the lease key names another owner, unless forced; then
  increments ``fence`` and makes the new value the current ``token``. Tokens only grow.
- Every other write first checks that ``owner`` and ``token`` are the session's current ones
  (STALE_OWNER otherwise). The lease key gates claims only: an owner whose lease ran out but whom
  nobody replaced may still write (its token is still current) and may renew.
- ``release`` clears owner and token, so every token the session ever issued is stale.
- ``end`` (the caller hung up) deletes the conversation and leaves a tombstone without owner or
  token: every later write finds no session (NO_SESSION), and ``claim`` is refused for good
  (SESSION_ENDED).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LuaScript:
    name: str
    text: str


# touch(ttl_ms): refresh the session TTL. fenced(owner, token): nil, or the error to reply.
_PRELUDE = """
local function touch(ttl_ms)
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  redis.call('PEXPIRE', KEYS[2], ttl_ms)
  redis.call('PEXPIRE', KEYS[3], ttl_ms)
  redis.call('PEXPIRE', KEYS[5], ttl_ms)
end
local function fenced(owner, token)
  local current = redis.call('HMGET', KEYS[1], 'owner', 'token')
  if not current[2] then return 'NO_SESSION' end
  if current[1] ~= owner or current[2] ~= token then
    return 'STALE_OWNER ' .. current[2]
  end
  return nil
end
"""

# For fenced writes ARGV[1] owner, ARGV[2] token, ARGV[3] session TTL in ms.
_FENCE = """
local refused = fenced(ARGV[1], ARGV[2])
if refused then return redis.error_reply(refused) end
"""


def _script(name: str, body: str, fenced: bool = True) -> LuaScript:
    return LuaScript(name, _PRELUDE + (_FENCE if fenced else "") + body)


# ARGV: owner, ttl_ms, lease_ms, config_json, credential_hash. A replay of the same create
# (same owner and credential, nobody claimed since) succeeds again: the caller may retry it.
CREATE = _script(
    "create",
    """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local was = redis.call('HMGET', KEYS[1], 'owner', 'token', 'credential')
  if was[1] == ARGV[1] and was[2] == '1' and was[3] == ARGV[5] then
    touch(ARGV[2])
    return 1
  end
  return redis.error_reply('SESSION_EXISTS')
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[5])
redis.call('HSET', KEYS[1], 'config', ARGV[4], 'turn', 0, 'fence', 1, 'owner', ARGV[1],
           'token', 1, 'credential', ARGV[5], 'seq', 0, 'trimmed', 0)
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[3])
touch(ARGV[2])
return 1
""",
    fenced=False,
)

# ARGV: owner, ttl_ms, lease_ms, force ('1' or '0')
CLAIM = _script(
    "claim",
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NO_SESSION') end
if redis.call('HEXISTS', KEYS[1], 'ended') == 1 then return redis.error_reply('SESSION_ENDED') end
local holder = redis.call('GET', KEYS[4])
if holder and holder ~= ARGV[1] and ARGV[4] ~= '1' then
  return redis.error_reply('LEASE_HELD ' .. holder .. ' ' .. redis.call('PTTL', KEYS[4]))
end
local token = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token)
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[3])
touch(ARGV[2])
return token
""",
    fenced=False,
)

# ARGV: owner, token, ttl_ms, lease_ms
RENEW = _script(
    "renew",
    """
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[4])
touch(ARGV[3])
return 1
""",
)

# ARGV: owner, token, ttl_ms
RELEASE = _script(
    "release",
    """
redis.call('HSET', KEYS[1], 'owner', '', 'token', '')
redis.call('DEL', KEYS[4])
touch(ARGV[3])
return 1
""",
)

# ARGV: owner, token, ttl_ms. Leaves a tombstone (meta with ``ended`` and the credential hash
# only, for the session TTL): a resume with the right credential learns the session ended. A
# repeated end (its reply was lost) succeeds again.
END = _script(
    "end",
    """
if redis.call('HEXISTS', KEYS[1], 'ended') == 1 then return 1 end
local refused = fenced(ARGV[1], ARGV[2])
if refused then return redis.error_reply(refused) end
local credential = redis.call('HGET', KEYS[1], 'credential')
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('HSET', KEYS[1], 'ended', 1, 'credential', credential or '')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""",
    fenced=False,
)

# ARGV: owner, token, ttl_ms, max_items, item_id, item_json -> {appended 0|1, seq}
# Cap policy: keep the newest max_items; the oldest leave the list and the id set together,
# and meta.trimmed counts them. A retry of an item already trimmed would be appended again,
# so a write-behind queue must hold fewer than max_items entries per session.
APPEND_ITEM = _script(
    "append_item",
    """
local seen = redis.call('ZSCORE', KEYS[3], ARGV[5])
if seen then
  touch(ARGV[3])
  return {0, tonumber(seen)}
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('RPUSH', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], seq, ARGV[5])
local over = redis.call('LLEN', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  redis.call('LTRIM', KEYS[2], over, -1)
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, over - 1)
  redis.call('HINCRBY', KEYS[1], 'trimmed', over)
end
touch(ARGV[3])
return {1, seq}
""",
)

# ARGV: owner, token, ttl_ms, max_items, first_seq_offset, then item id and JSON per item, oldest
# first. The whole history again (it was edited): list and ids replaced, item i's sequence
# number first_seq_offset + i, seq the last; the cap as in append_item. A repeat changes nothing.
REPLACE_ITEMS = _script(
    "replace_items",
    """
redis.call('DEL', KEYS[2], KEYS[3])
local offset = tonumber(ARGV[5])
local count = (#ARGV - 5) / 2
for i = 1, count do
  redis.call('RPUSH', KEYS[2], ARGV[5 + 2 * i])
  redis.call('ZADD', KEYS[3], offset + i, ARGV[4 + 2 * i])
end
redis.call('HSET', KEYS[1], 'seq', offset + count)
local over = count - tonumber(ARGV[4])
if over > 0 then
  redis.call('LTRIM', KEYS[2], over, -1)
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, over - 1)
  redis.call('HINCRBY', KEYS[1], 'trimmed', over)
end
touch(ARGV[3])
return count
""",
)

# ARGV: owner, token, ttl_ms, n, the n image refs to keep, then ref and data URL per image to
# add. The session's images become those kept: any other is deleted, the added are set. A
# repeat changes nothing.
STORE_IMAGES = _script(
    "store_images",
    """
local count = tonumber(ARGV[4])
local keep = {}
for i = 1, count do keep[ARGV[4 + i]] = true end
for _, ref in ipairs(redis.call('HKEYS', KEYS[5])) do
  if not keep[ref] then redis.call('HDEL', KEYS[5], ref) end
end
for i = 5 + count, #ARGV - 1, 2 do
  redis.call('HSET', KEYS[5], ARGV[i], ARGV[i + 1])
end
touch(ARGV[3])
return 1
""",
)

# ARGV: owner, token, ttl_ms, config_json
UPDATE_CONFIG = _script(
    "update_config",
    """
redis.call('HSET', KEYS[1], 'config', ARGV[4])
touch(ARGV[3])
return 1
""",
)

# ARGV: owner, token, ttl_ms, turn -> the stored turn. Monotonic (max), so a retry is harmless.
ADVANCE_TURN = _script(
    "advance_turn",
    """
local turn = tonumber(redis.call('HGET', KEYS[1], 'turn') or '0')
if tonumber(ARGV[4]) > turn then
  turn = tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'turn', turn)
end
touch(ARGV[3])
return turn
""",
)

# Rate limits (``transceiver.store.rate_limits``): token buckets, one hash per bucket
# (``level`` tokens at ``at_ms``, Redis's own clock, shared by every transceiver). KEYS: the
# buckets. ARGV[1] mode: 'take' (every bucket gives its cost, or none gives any) or 'spend'
# (tokens already used: taken even below zero); then per bucket: limit, window_ms, cost.
# -> per bucket {allowed 0|1, remaining, reset_ms, retry_after_ms}. The arithmetic is
# ``rate_limits.refilled``/``taken``'s, which tests hold to it.
TAKE_BUCKETS = LuaScript(
    "take_buckets",
    """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local spend = ARGV[1] == 'spend'
local levels, all_allowed = {}, true
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[i * 3 - 1])
  local window_ms = tonumber(ARGV[i * 3])
  local cost = tonumber(ARGV[i * 3 + 1])
  local stored = redis.call('HMGET', key, 'level', 'at_ms')
  local level = limit
  if stored[1] then
    local elapsed_ms = math.max(0, now_ms - tonumber(stored[2]))
    level = math.min(limit, tonumber(stored[1]) + elapsed_ms * limit / window_ms)
  end
  levels[i] = level
  if level < cost and not spend then all_allowed = false end
end
local replies = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[i * 3 - 1])
  local window_ms = tonumber(ARGV[i * 3])
  local cost = tonumber(ARGV[i * 3 + 1])
  local level = levels[i]
  local allowed = spend or level >= cost
  if all_allowed or spend then
    level = level - cost
  end
  local reset_ms = math.ceil((limit - level) * window_ms / limit)
  local retry_ms = 0
  if not allowed then retry_ms = math.ceil((cost - level) * window_ms / limit) end
  if all_allowed or spend then
    redis.call('HSET', key, 'level', tostring(level), 'at_ms', now_ms)
    redis.call('PEXPIRE', key, reset_ms + 1)
  end
  replies[i] = {allowed and 1 or 0, math.max(0, math.floor(level)), reset_ms, retry_ms}
end
return replies
""",
)
