"""The Lua scripts: each runs atomically on the node holding one conversation.

Every script touches only the conversation's own keys (one hash tag, so one
Cluster slot), except that, when the store is told it talks to a single
server, the append and delete scripts also update the listing indexes, whose
names are stored in the conversation's metadata. On a cluster that flag is
off and the store updates the indexes itself, after the script.

Numbers stay below 2^53 and are written as integers; timestamps are passed
and stored as Python's ``repr`` of the float and only compared here, never
re-formatted, so they round-trip exactly.
"""

from __future__ import annotations

__all__ = ["APPEND", "APPEND_FIXED_ARGS", "DELETE", "GET_TURN", "READ_MESSAGES", "READ_TAIL"]

# Messages by seq range, in chunks: unpack() has a stack limit.
_FETCH = """
local unpack = unpack or table.unpack
local function fetch(msgs, from, to)
  local out = {}
  local i = from
  while i <= to do
    local j = math.min(to, i + 511)
    local fields = {}
    for s = i, j do fields[#fields + 1] = s end
    local got = redis.call('HMGET', msgs, unpack(fields))
    for k = 1, #got do out[#out + 1] = got[k] end
    i = j + 1
  end
  return out
end
"""

# The metadata fields of codec.META_FIELDS, in its order; with ``ix`` the
# three index key names after them (a cluster's store bumps those itself).
_META = """
local function meta_of(key, ix)
  if ix then
    return redis.call('HMGET', key, 'conv', 'chat_mode', 'chat_param', 'model', 'system',
      'updated_at', 'count', 'tokens', 'ix_user', 'ix_sys', 'ix_us')
  end
  return redis.call('HMGET', key, 'conv', 'chat_mode', 'chat_param', 'model', 'system',
    'updated_at', 'count', 'tokens')
end
"""

APPEND_FIXED_ARGS = 18

# KEYS: meta, msgs, cum, turns [, the global index when ARGV[12] == '1']
# ARGV: 1 turn_id, 2 expect_last_seq or '', 3 static conversation JSON (used on
#   create), 4 chat_mode, 5 chat_param JSON, 6 model JSON, 7 '1' if the turn
#   names a model, 8 system JSON or '' to keep, 9 created_at, 10 turn record
#   JSON, 11 ttl seconds or '', 12 '1' to update the indexes here, 13-15 user,
#   sys and user+sys index keys (stored on create; '' for no user or sys),
#   16 conv_uid, 17 message count n, 18 '1' if only a conversation with a
#   user may take the turn, then n pairs (token_count, message JSON without
#   its first '{').
# Returns {'dup', meta, record, messages} | {'conflict', last_seq} | {'owner', meta}
# | {'ok', first_seq, meta}, meta as _META gives it (with the index keys when
# ARGV[12] ~= '1').
APPEND = (
    _FETCH
    + _META
    + """
local meta, msgs, cum, turns = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local turn_id = ARGV[1]
local exists = redis.call('EXISTS', meta) == 1

if exists then
  -- storekit.check_turn_owner: the index keys stored on create name the
  -- owner (digests of user_name and sys_code), so equal keys are equal owners.
  local owner = redis.call('HMGET', meta, 'ix_user', 'ix_sys')
  local user, sys = owner[1] or '', owner[2] or ''
  if (ARGV[18] == '1' and user == '')
      or (ARGV[13] ~= '' and user ~= '' and user ~= ARGV[13])
      or (ARGV[14] ~= '' and sys ~= '' and sys ~= ARGV[14]) then
    return {'owner', meta_of(meta, ARGV[12] ~= '1')}
  end
  local rec = redis.call('HGET', turns, turn_id)
  if rec then
    local first, n = string.match(rec, '^(%d+) (%d+) ')
    first, n = tonumber(first), tonumber(n)
    return {'dup', meta_of(meta, ARGV[12] ~= '1'), rec, fetch(msgs, first, first + n - 1)}
  end
end

local last = 0
if exists then last = tonumber(redis.call('HGET', meta, 'count')) end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= last then
  return {'conflict', tostring(last)}
end

local created_at = ARGV[9]
local total = 0
if exists then
  total = tonumber(redis.call('HGET', meta, 'tokens'))
  redis.call('HSET', meta, 'chat_mode', ARGV[4], 'chat_param', ARGV[5])
  if ARGV[7] == '1' then redis.call('HSET', meta, 'model', ARGV[6]) end
  if ARGV[8] ~= '' then redis.call('HSET', meta, 'system', ARGV[8]) end
  if tonumber(created_at) > tonumber(redis.call('HGET', meta, 'updated_at')) then
    redis.call('HSET', meta, 'updated_at', created_at)
  end
else
  -- Leftovers of a conversation whose metadata expired first must not leak in.
  redis.call('DEL', msgs, cum, turns)
  local system = ARGV[8]
  if system == '' then system = '[]' end
  redis.call('HSET', meta, 'conv', ARGV[3], 'chat_mode', ARGV[4], 'chat_param', ARGV[5],
    'model', ARGV[6], 'system', system, 'updated_at', created_at,
    'ix_user', ARGV[13], 'ix_sys', ARGV[14], 'ix_us', ARGV[15])
end

local n = tonumber(ARGV[17])
-- In chunks, as fetch() reads: unpack() fails past ~8,000 values (a turn
-- of thousands of messages, such as a whole history sent at once).
local i = 1
while i <= n do
  local j = math.min(n, i + 511)
  local fields, scores = {}, {}
  for k = i, j do
    local seq = last + k
    fields[#fields + 1] = seq
    fields[#fields + 1] = '{"seq":' .. seq .. ',' .. ARGV[18 + 2 * k]
    scores[#scores + 1] = total
    scores[#scores + 1] = seq
    total = total + tonumber(ARGV[17 + 2 * k])
  end
  redis.call('HSET', msgs, unpack(fields))
  redis.call('ZADD', cum, unpack(scores))
  i = j + 1
end
redis.call('HSET', meta, 'count', last + n, 'tokens', total)
redis.call('HSET', turns, turn_id, (last + 1) .. ' ' .. n .. ' ' .. ARGV[10])

if ARGV[11] ~= '' then
  for _, key in ipairs({meta, msgs, cum, turns}) do redis.call('EXPIRE', key, ARGV[11]) end
end

if ARGV[12] == '1' then
  local updated = redis.call('HGET', meta, 'updated_at')
  -- With a TTL, entries of conversations idle for two TTLs have expired: they
  -- go, so an index holds no more than the conversations of the last two.
  local stale = nil
  if ARGV[11] ~= '' then
    stale = '(' .. string.format('%.6f', tonumber(updated) - 2 * tonumber(ARGV[11]))
  end
  local indexes = {KEYS[5]}
  for _, ix in ipairs(redis.call('HMGET', meta, 'ix_user', 'ix_sys', 'ix_us')) do
    if ix and ix ~= '' then indexes[#indexes + 1] = ix end
  end
  for _, ix in ipairs(indexes) do
    redis.call('ZADD', ix, updated, ARGV[16])
    if stale then redis.call('ZREMRANGEBYSCORE', ix, '-inf', stale) end
  end
end

return {'ok', tostring(last + 1), meta_of(meta, ARGV[12] ~= '1')}
"""
)

# KEYS: meta, cum, msgs.  ARGV: max_tokens (>= 0).
# The tail starts at the first seq whose tokens-before are >= total - budget;
# seqs before it are exactly those scored below that, so one ZCOUNT finds it.
READ_TAIL = (
    _FETCH
    + """
local m = redis.call('HMGET', KEYS[1], 'count', 'tokens')
if not m[1] then return {} end
local count, total = tonumber(m[1]), tonumber(m[2])
local start = 1
local threshold = total - tonumber(ARGV[1])
if threshold > 0 then
  start = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. threshold) + 1
end
return fetch(KEYS[3], start, count)
"""
)

# KEYS: meta, msgs.  ARGV: start_seq, limit or ''.
READ_MESSAGES = (
    _FETCH
    + """
local count = redis.call('HGET', KEYS[1], 'count')
if not count then return {} end
count = tonumber(count)
local from = math.max(tonumber(ARGV[1]), 1)
local to = count
if ARGV[2] ~= '' then to = math.min(count, from + tonumber(ARGV[2]) - 1) end
return fetch(KEYS[2], from, to)
"""
)

# KEYS: meta, turns, msgs.  ARGV: turn_id.  Returns {record, messages} or nil.
GET_TURN = (
    _FETCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local rec = redis.call('HGET', KEYS[2], ARGV[1])
if not rec then return false end
local first, n = string.match(rec, '^(%d+) (%d+) ')
first, n = tonumber(first), tonumber(n)
return {rec, fetch(KEYS[3], first, first + n - 1)}
"""
)

# KEYS: meta, msgs, cum, turns [, the global index when ARGV[1] == '1'].
# ARGV: 1 '1' to update the indexes here, 2 conv_uid.
# Returns {0} if there was no conversation, else {1, user, sys, user+sys index keys}.
DELETE = """
local ix = redis.call('HMGET', KEYS[1], 'ix_user', 'ix_sys', 'ix_us')
local existed = redis.call('EXISTS', KEYS[1]) == 1
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
if ARGV[1] == '1' then
  redis.call('ZREM', KEYS[5], ARGV[2])
  for _, key in ipairs(ix) do
    if key and key ~= '' then redis.call('ZREM', key, ARGV[2]) end
  end
end
if not existed then return {0} end
return {1, ix[1] or '', ix[2] or '', ix[3] or ''}
"""

# KEYS: meta, cum, msgs, turns.  ARGV: max_tokens (>= 0, or -1 for no tail), turn_id or ''.
# Returns {} for a missing conversation, else {meta (as _META gives it), turn
# record or false, the turn's messages, the tail}: what a turn reads, in one trip.
READ_CONTEXT = (
    _FETCH
    + _META
    + """
local meta = meta_of(KEYS[1], false)
if not meta[1] then return {} end
local count, total = tonumber(meta[7]), tonumber(meta[8])
if ARGV[2] ~= '' then
  local rec = redis.call('HGET', KEYS[4], ARGV[2])
  if rec then
    local first, n = string.match(rec, '^(%d+) (%d+) ')
    first, n = tonumber(first), tonumber(n)
    return {meta, rec, fetch(KEYS[3], first, first + n - 1), {}}
  end
end
local budget = tonumber(ARGV[1])
if budget < 0 then return {meta, false, {}, {}} end
local start = 1
local threshold = total - budget
if threshold > 0 then
  start = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. threshold) + 1
end
return {meta, false, {}, fetch(KEYS[3], start, count)}
"""
)
