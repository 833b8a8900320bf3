"""Presence's Lua: every decision is one atomic script in the app's slot, so exactly one instance makes each one.

Keys (quart_sse.keys.presence_keys, in this order, as KEYS or as the table `P`):
  P[1] on    zset  user -> the time after which a user without a live stream had its instance die (the latest
                   expiry of its streams; while an offline is pending, that offline's due time + REGISTRY_TTL)
  P[2] due   zset  user -> when the pending offline is due
  P[3] gone  hash  user -> Unix ms its last stream closed (the offline's `at`)
  P[4] seq   string the app's last seq
  P[5] q     stream the webhook queue: entries {type, user, at, seq}
  P[6] fly   hash  user -> "consumer|deadline ms|entry id": the lease of the user's event being delivered

A user is online from the admission of its first stream until its offline is emitted. The registry's scripts
(quart_sse.registry) call `presence_emit` from EMIT_LUA; SWEEP_LUA finds the offlines that are due and the users
whose instance died; CLAIM/ACK/EXTEND/ABANDON run the queue with per-user leases.
"""

from __future__ import annotations

# presence_emit(P, kind, user, at, out): counts the change in out.events; when out.queue is '1', appends it to the
# queue with the next seq (Redis's clock in ms, or the last seq + 1 when higher: it keeps increasing after Redis
# lost its data) and drops the oldest entries beyond out.cap, with their leases (counted in out.dropped).
# Numbers go to Redis through string.format('%d'): Lua's tostring keeps 14 digits.
FIELD_LUA = """
local function presence_field(fields, name)
  for i = 1, #fields, 2 do if fields[i] == name then return fields[i + 1] end end
  return nil
end
"""

EMIT_LUA = FIELD_LUA + """
local function presence_emit(P, kind, user, at, out)
  out.events = out.events + 1
  if out.queue ~= '1' then return end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local seq = tonumber(redis.call('GET', P[4]) or '0') + 1
  if now > seq then seq = now end
  seq = string.format('%d', seq)
  redis.call('SET', P[4], seq)
  redis.call('XADD', P[5], '*', 'type', kind, 'user', user, 'at', at, 'seq', seq)
  local over = redis.call('XLEN', P[5]) - out.cap
  if over > 0 then
    for _, e in ipairs(redis.call('XRANGE', P[5], '-', '+', 'COUNT', over)) do
      redis.call('XDEL', P[5], e[1])
      local u = presence_field(e[2], 'user')
      local lease = redis.call('HGET', P[6], u)
      if lease and string.sub(lease, -(#e[1] + 1)) == '|' .. e[1] then redis.call('HDEL', P[6], u) end
      out.dropped = out.dropped + 1
    end
  end
end
"""

# KEYS: presence keys. ARGV: now (Unix s), REGISTRY_TTL, PRESENCE_GRACE, queue ('1' webhooks, '0' state only),
# queue cap, the user-set key prefix (quart_sse.keys.user_conns_key(app, '')), at most how many users per step.
# 1. users whose every stream expired unreleased (their instance died, or stalled past REGISTRY_TTL): their
#    offline is due PRESENCE_GRACE after their last heartbeat (their latest expiry - REGISTRY_TTL), or now;
# 2. offlines that are due: emitted for users still without a live stream, dropped for the others.
# Returns {changes, dropped, when to sweep next ('' never: the earliest of the next due offline and the earliest
# `on` score, when a crash would show), queue length, oldest queued entry id ('' none), more (1: a step hit the
# limit, call again)}.
SWEEP_LUA = EMIT_LUA + """
local now, ttl, grace = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local prefix, limit = ARGV[6], tonumber(ARGV[7])
local out = {events = 0, dropped = 0, queue = ARGV[4], cap = tonumber(ARGV[5])}
local P = KEYS
local more = 0
local function live(user)
  local ukey = prefix .. user
  redis.call('ZREMRANGEBYSCORE', ukey, '-inf', now)
  return redis.call('ZRANGE', ukey, -1, -1, 'WITHSCORES')
end
local stale = redis.call('ZRANGEBYSCORE', P[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
if #stale >= 2 * limit then more = 1 end
for i = 1, #stale, 2 do
  local user, seen = stale[i], tonumber(stale[i + 1]) - ttl
  local top = live(user)
  if #top > 0 then
    redis.call('ZADD', P[1], top[2], user)
  else
    local due = seen + grace
    if due < now then due = now end
    redis.call('ZADD', P[2], 'NX', due, user)
    redis.call('HSETNX', P[3], user, string.format('%d', seen * 1000))
    redis.call('ZADD', P[1], tonumber(redis.call('ZSCORE', P[2], user)) + ttl, user)
  end
end
local ready = redis.call('ZRANGEBYSCORE', P[2], '-inf', now, 'LIMIT', 0, limit)
if #ready >= limit then more = 1 end
for _, user in ipairs(ready) do
  redis.call('ZREM', P[2], user)
  local at = redis.call('HGET', P[3], user) or string.format('%d', now * 1000)
  redis.call('HDEL', P[3], user)
  local top = live(user)
  if #top > 0 then
    redis.call('ZADD', P[1], top[2], user)
  elseif redis.call('ZREM', P[1], user) == 1 then
    presence_emit(P, 'user.offline', user, at, out)
  end
end
local nd = redis.call('ZRANGE', P[2], 0, 0, 'WITHSCORES')
local ns = redis.call('ZRANGE', P[1], 0, 0, 'WITHSCORES')
local nxt = ''
if #nd > 0 then nxt = tonumber(nd[2]) end
if #ns > 0 and (nxt == '' or tonumber(ns[2]) < nxt) then nxt = tonumber(ns[2]) end
if nxt ~= '' then nxt = string.format('%.6f', nxt) end
local oldest = redis.call('XRANGE', P[5], '-', '+', 'COUNT', 1)
local first = ''
if #oldest > 0 then first = oldest[1][1] end
return {out.events, out.dropped, nxt, redis.call('XLEN', P[5]), first, more}
"""

# KEYS: queue, leases. ARGV: consumer, now (Unix ms), lease (ms), n, scan. Leases to `consumer`, until now + lease,
# the oldest queued event of each user that has no live lease on it, at most n of them, among the `scan` oldest
# entries. Only a user's oldest event can be leased, and the next one only once it is acknowledged: one event per
# user in delivery at a time, in queue (= seq) order. Returns {the leased entries as {id, fields}, the earliest
# deadline (ms) of the live leases that held an event back ('' none): when to claim again, should its holder die}.
CLAIM_LUA = FIELD_LUA + """
local now, n = tonumber(ARGV[2]), tonumber(ARGV[4])
local deadline = string.format('%d', now + tonumber(ARGV[3]))
local out, seen, held_till = {}, {}, ''
if n <= 0 then return {out, held_till} end
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[5])) do
  local user = presence_field(e[2], 'user')
  if not seen[user] then
    seen[user] = true
    local lease = redis.call('HGET', KEYS[2], user)
    local free = true
    if lease then
      local till, held = string.match(lease, '^[^|]*|(%d+)|(.+)$')
      if held == e[1] and tonumber(till) > now then
        free = false
        if held_till == '' or tonumber(till) < tonumber(held_till) then held_till = till end
      end
    end
    if free then
      redis.call('HSET', KEYS[2], user, ARGV[1] .. '|' .. deadline .. '|' .. e[1])
      out[#out + 1] = e
      if #out >= n then break end
    end
  end
end
return {out, held_till}
"""

# KEYS: queue, leases. ARGV: user, entry id pairs. Removes the entries (delivered, or rejected by the receiver)
# and whichever lease names them (the user's next event can be leased).
ACK_LUA = """
for i = 1, #ARGV, 2 do
  local user, id = ARGV[i], ARGV[i + 1]
  redis.call('XDEL', KEYS[1], id)
  local lease = redis.call('HGET', KEYS[2], user)
  if lease and string.sub(lease, -(#id + 1)) == '|' .. id then redis.call('HDEL', KEYS[2], user) end
end
return #ARGV / 2
"""

# KEYS: leases. ARGV: consumer, new deadline (Unix ms), then user, entry id pairs. Extends the leases still held by
# `consumer`; returns the pairs it lost (taken over after it looked dead, or acknowledged by another instance).
EXTEND_LUA = """
local mine, lost = ARGV[1] .. '|', {}
for i = 3, #ARGV, 2 do
  local user, id = ARGV[i], ARGV[i + 1]
  local lease = redis.call('HGET', KEYS[1], user)
  if lease and string.sub(lease, 1, #mine) == mine and string.sub(lease, -(#id + 1)) == '|' .. id then
    redis.call('HSET', KEYS[1], user, mine .. ARGV[2] .. '|' .. id)
  else
    lost[#lost + 1] = user
    lost[#lost + 1] = id
  end
end
return lost
"""

# KEYS: leases. ARGV: consumer, then user, entry id pairs. Gives up `consumer`'s leases (shutdown): another instance
# leases those events at once instead of after the lease ran out.
ABANDON_LUA = """
local mine = ARGV[1] .. '|'
for i = 2, #ARGV, 2 do
  local user, id = ARGV[i], ARGV[i + 1]
  local lease = redis.call('HGET', KEYS[1], user)
  if lease and string.sub(lease, 1, #mine) == mine and string.sub(lease, -(#id + 1)) == '|' .. id then
    redis.call('HDEL', KEYS[1], user)
  end
end
return 1
"""
