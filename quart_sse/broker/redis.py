"""The Redis broker: history in Redis Streams, live delivery over one pub/sub connection per process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from .. import keys
from ..events import EventError, Message, Position, checked_message, decode_payload, parse_position
from .base import MAX_BATCH_EVENTS, BrokerUnavailable, OnControl, OnMessage, OnReconnect, Outgoing, Published, Replay
from .history import MAX_LAST_EVENT_ID, as_position, covered
from .pubsub import PubSubLink
from .seen import MAX_SEEN_IDS

log = logging.getLogger("quart_sse.broker")

# KEYS: the app's seq hash, then for each channel c = 1..C its history stream (KEYS[2c]) and its seen-ids sorted
# set (KEYS[2c+1]). ARGV: maxlen (0 = no history), window ms (HISTORY_TTL; 0 = no history, no dedup), seen ids kept
# per channel (0 = no dedup), C, the C live channels, then four per event: channel number, id ('' = assign), type,
# data JSON. Returns one string per event: its position, or '' when it carries an id its channel published within
# the window (a duplicate: not published again, docs/publishing.md).
#
# One round trip, atomic: an event's live copy, its history entry and its seen id never disagree, and the events
# of one call get consecutive positions in their order. All or nothing: everything that could fail is checked
# before the first write (key types; a history stream whose newest entry is ahead of the app's sequence, which
# XADD would refuse, moves the clock past it), and Redis refuses a script over `maxmemory` only at its first write
# (redis/src/script.c, scriptVerifyOOM), so a failing call leaves nothing written. That matters beyond tidiness:
# an id marked seen without its event published would swallow every retry of it. Each history entry records
# `prev`, the position of the entry before it in the same stream: trimming (which Redis does not record in
# max-deleted-entry-id) and expiry only ever remove a stream's oldest entries, so an entry whose `prev` is missing
# proves a gap.
PUBLISH_LUA = """
local maxlen, window, maxids, nch = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local first = 5 + nch
local history = maxlen > 0 and window > 0
local dedup = maxids > 0 and window > 0
local function wrongtype(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then return 'WRONGTYPE ' .. key .. ' is a ' .. t .. ', not a ' .. want end
  return nil
end
-- 1. reads and checks only
local bad = wrongtype(KEYS[1], 'hash')
if bad then return redis.error_reply(bad) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = redis.call('HMGET', KEYS[1], 'ms', 'n')
local last, n = tonumber(seq[1] or '0'), tonumber(seq[2] or '0')
if now < last then now = last end
local prev = {}
for c = 1, nch do
  if history then
    bad = wrongtype(KEYS[2 * c], 'stream')
    if bad then return redis.error_reply(bad) end
    local newest = redis.call('XREVRANGE', KEYS[2 * c], '+', '-', 'COUNT', 1)
    prev[c] = ''
    if #newest > 0 then
      prev[c] = newest[1][1]
      local pm, pn = string.match(prev[c], '^(%d+)%-(%d+)$')
      pm, pn = tonumber(pm), tonumber(pn)
      if pm > now or (pm == now and pn > n) then now = pm + 1 end
    end
  end
  if dedup then
    bad = wrongtype(KEYS[2 * c + 1], 'zset')
    if bad then return redis.error_reply(bad) end
  end
end
local oldest = now - window
-- 2. duplicates: ZADD NX is the first write, and the only call for the usual case, a new id
local dup, count, seen = {}, 0, {}
if dedup then
  local batch = {}
  for e = first, #ARGV, 4 do
    local id = ARGV[e + 1]
    if id ~= '' then
      local c = tonumber(ARGV[e])
      local mine = batch[c]
      if mine == nil then mine = {}; batch[c] = mine; seen[c] = true end
      if mine[id] then
        dup[e] = true
      else
        mine[id] = true
        if redis.call('ZADD', KEYS[2 * c + 1], 'NX', now, id) == 0 then
          if tonumber(redis.call('ZSCORE', KEYS[2 * c + 1], id)) >= oldest then
            dup[e] = true
          else
            redis.call('ZADD', KEYS[2 * c + 1], now, id)  -- out of the window: new again
          end
        end
      end
    end
  end
end
local out = {}
for e = first, #ARGV, 4 do if not dup[e] then count = count + 1 end end
if count == 0 then
  for e = first, #ARGV, 4 do out[#out + 1] = '' end
  return out
end
-- 3. the events, in their order
redis.call('HSET', KEYS[1], 'ms', now, 'n', n + count)
local added = {}
for e = first, #ARGV, 4 do
  if dup[e] then
    out[#out + 1] = ''
  else
    local c = tonumber(ARGV[e])
    n = n + 1
    local pos = now .. '-' .. n
    local id = ARGV[e + 1]
    if id == '' then id = pos end
    if history then
      redis.call('XADD', KEYS[2 * c], 'MAXLEN', '~', maxlen, pos, 'id', id, 'type', ARGV[e + 2], 'data', ARGV[e + 3],
        'prev', prev[c])
      prev[c] = pos
      added[c] = true
    end
    local payload = '{"id":' .. cjson.encode(id) .. ',"type":' .. cjson.encode(ARGV[e + 2]) .. ',"data":'
      .. ARGV[e + 3] .. ',"pos":"' .. pos .. '"}'
    redis.call('PUBLISH', ARGV[4 + c], payload)
    out[#out + 1] = pos
  end
end
for c in pairs(added) do
  redis.call('XTRIM', KEYS[2 * c], 'MINID', '~', oldest .. '-0')
  redis.call('PEXPIRE', KEYS[2 * c], window)
end
for c in pairs(seen) do
  local key = KEYS[2 * c + 1]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. oldest)
  local extra = redis.call('ZCARD', key) - maxids
  if extra > 0 then redis.call('ZREMRANGEBYRANK', key, 0, extra - 1) end
  redis.call('PEXPIRE', key, window)
end
return out
"""
#: The live copy's command in PUBLISH_LUA (the cluster broker swaps in SPUBLISH).
PUBLISH_CALL = "redis.call('PUBLISH', ARGV[4 + c], payload)"

# KEYS: user history, broadcast history, seq hash. ARGV: last id, history size, ttl ms, '1' when last id is a
# position we know (resync after an outage) rather than an id a client sent, last id as a position ('' when it is
# not written as one of ours). History is the newest `size` entries of each stream, whatever MAXLEN ~ left over,
# so that both brokers keep the same bound. Returns {status, after, user entries, broadcast entries}; status 'ok'
# or a reset reason.
REPLAY_LUA = """
local last, size, ttl, pos = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5]
local function get(fields, name)
  for i = 1, #fields, 2 do if fields[i] == name then return fields[i + 1] end end
  return nil
end
local function split(p)
  local m, n = string.match(p, '^(%d+)%-(%d+)$')
  return tonumber(m), tonumber(n)
end
local function older(a, b)
  local am, an = split(a)
  local bm, bn = split(b)
  return am < bm or (am == bm and an < bn)
end
local function first_match(entries, from, to)
  for i = from, math.min(to, #entries) do
    if get(entries[i][2], 'id') == last then return entries[i][1] end
  end
  return nil
end
-- the most recent entry with id `last` among the newest `size` entries of `key`; reads no more than it must
-- when `last` is a position: the entries after it (owed anyway), then the entry at it
local function find(key)
  if pos == '' then return first_match(redis.call('XREVRANGE', key, '+', '-', 'COUNT', size), 1, size) end
  local newer = redis.call('XREVRANGE', key, '+', '(' .. pos, 'COUNT', size)
  local hit = first_match(newer, 1, size)
  if hit or #newer >= size then return hit end
  local at = redis.call('XREVRANGE', key, pos, '-', 'COUNT', 1)
  hit = first_match(at, 1, 1)
  if hit or #at == 0 or #newer + 1 >= size then return hit end
  return first_match(redis.call('XREVRANGE', key, '(' .. at[1][1], '-', 'COUNT', size - #newer - 1), 1, size)
end
local after
if ARGV[4] == '1' then
  after = pos
else
  local a, b = find(KEYS[1]), find(KEYS[2])
  if a == nil or (b ~= nil and older(a, b)) then after = b else after = a end
  if after == nil then return {'unknown id'} end
  if ttl > 0 then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local seq = tonumber(redis.call('HGET', KEYS[3], 'ms') or '0')
    if seq > now then now = seq end
    if split(after) < now - ttl then return {'history expired'} end
  end
end
local out = {'ok', after}
for k = 1, 2 do
  local entries = redis.call('XRANGE', KEYS[k], '(' .. after, '+', 'COUNT', size + 1)
  if #entries > size then return {'history trimmed'} end
  if #entries > 0 then
    local prev = get(entries[1][2], 'prev')
    if prev and prev ~= '' and older(after, prev) then return {'history trimmed'} end
  end
  out[k + 2] = entries
end
return out
"""


def _settle(done: asyncio.Future[Published], result: Published | None, error: str) -> None:
    """Hand a waiting publish its result (or a BrokerUnavailable of its own); it may have given up (cancelled)."""
    if done.done():
        return
    if result is not None:
        done.set_result(result)
    else:
        done.set_exception(BrokerUnavailable(error))


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def publish_call(app: str, events: Sequence[Outgoing], size: int, ttl_ms: int, max_seen: int,
                 live_channel: Callable[[str, str | None], str]) -> tuple[list[str], list[Any]]:
    """PUBLISH_LUA's keys and arguments for `events` of `app` (also what bench/ceiling.py sends, raw)."""
    numbers: dict[str | None, int] = {}
    script_keys = [keys.seq_key(app)]
    lives: list[str] = []
    per_event: list[Any] = []
    for ev in events:
        c = numbers.get(ev.user)
        if c is None:
            c = numbers[ev.user] = len(lives) + 1
            script_keys += (keys.history_key(app, ev.user), keys.seen_key(app, ev.user))
            lives.append(live_channel(app, ev.user))
        per_event += (c, ev.id or "", ev.type, ev.data)
    return script_keys, [size, ttl_ms, max_seen, len(lives), *lives, *per_event]


def _entry_to_message(entry: list[Any]) -> Message | None:
    """A history entry, re-checked like a raw PUBLISH (anyone with Redis access can XADD); None to skip it."""
    pos = parse_position(entry[0].decode())
    f = entry[1]
    fields = {f[i]: f[i + 1] for i in range(0, len(f), 2)}
    try:
        return checked_message(fields[b"id"].decode(), fields[b"type"].decode(), fields[b"data"], pos)
    except (KeyError, UnicodeDecodeError, EventError):
        return None


class PackedConnection(aioredis.Connection):
    """redis-py's connection, with commands packed by hiredis (C) instead of redis-py's per-argument Python loop: a
    batch of 1,000 events is about 4,000 arguments, 2 ms to pack in Python (17 % of the batch route's server CPU),
    0.3 ms in hiredis. The bytes are the same; anything hiredis does not take (None, bool, ...) goes the old way and
    gets redis-py's own error."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if (isinstance(first, str) and " " in first) or (isinstance(first, bytes) and b" " in first):
            args = (*first.split(), *args[1:])  # 'CLIENT SETINFO' and the like: one argument per word
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)


class ScriptRefused(BrokerUnavailable):
    """The publish script found a key of the wrong type before its first write: nothing of it was written."""


_Waiting = tuple[Outgoing, "asyncio.Future[Published]"]


class RedisBroker:
    name = "redis"

    def __init__(self, url: str, instance: str, history_size: int, history_ttl: int,
                 *, sharded: bool = False, max_seen_ids: int = MAX_SEEN_IDS) -> None:
        self.url = url
        self.instance = instance
        self._size = history_size if history_ttl > 0 else 0  # either setting at 0 turns history off
        self._ttl_ms = history_ttl * 1000
        self._max_seen = max_seen_ids
        self._waiting: dict[str, list[_Waiting]] = {}  # single publishes of this loop iteration, by app
        self._sending: set[asyncio.Task[None]] = set()
        self.redis: aioredis.Redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=64, timeout=5, socket_connect_timeout=2, socket_timeout=5,
                connection_class=PackedConnection,  # rediss:// and unix:// keep their own classes (from_url)
                health_check_interval=10,
                # after a Redis restart each pooled connection fails its next command ("closed by server"): retry
                # that once on a fresh connection. Not time-outs: the command may have run, a publish would double.
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))))
        self._publish = self.redis.register_script(PUBLISH_LUA)
        self._replay = self.redis.register_script(REPLAY_LUA)
        self._on_message: OnMessage | None = None
        self._on_control: OnControl | None = None
        self._on_reconnect: OnReconnect | None = None
        self._reply = keys.reply_channel(instance)
        self._was_up = False
        self.on_drop: Callable[[], None] | None = None
        self._heads: dict[str, asyncio.Task[Position | None]] = {}  # reads of the app's head not sent yet
        self.link = PubSubLink(url, self._received, self._up, self._down, sharded=sharded)

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def start(self, on_message: OnMessage, on_control: OnControl, on_reconnect: OnReconnect) -> None:
        self._on_message, self._on_control, self._on_reconnect = on_message, on_control, on_reconnect
        self.link.subscribe(keys.CONTROL_CHANNEL)
        self.link.subscribe(self._reply)
        self.link.start()

    async def close(self) -> None:
        await self.link.close()
        await self._publishes_sent()
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

    async def _publishes_sent(self) -> None:
        """Publishes already handed to us finish before the connections close (each answers its caller)."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def ready(self) -> bool:
        if not self.link.connected:
            return False
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    def _up(self) -> None:
        if self._was_up and self._on_reconnect is not None:
            self._on_reconnect()
        self._was_up = True

    def _down(self) -> None:
        pass

    # -- live -----------------------------------------------------------------------------------------------
    def _received(self, channel: bytes, payload: bytes) -> None:
        name = channel.decode("utf-8", "replace")
        if name == keys.CONTROL_CHANNEL or name == self._reply:
            if self._on_control is not None:
                asyncio.get_running_loop().create_task(self._on_control(payload))
            return
        try:
            msg = decode_payload(payload)
        except EventError as exc:
            if self.on_drop is not None:
                self.on_drop()
            log.warning("dropped a malformed message on %s: %s", name[:200], str(exc)[:200])
            return
        if self._on_message is not None:
            self._on_message(name, msg)

    def subscribe(self, channel: str) -> Awaitable[None]:
        return self.link.subscribe(channel)

    def unsubscribe(self, channel: str) -> None:
        self.link.unsubscribe(channel)

    # -- history ----------------------------------------------------------------------------------------------
    def _live_channel(self, app: str, user: str | None) -> str:
        """Where the publish script sends the live copy (the cluster broker uses sharded channels instead)."""
        return keys.broadcast_channel(app) if user is None else keys.user_channel(app, user)

    async def _control_publish(self, channel: str, payload: bytes) -> int:
        return int(await self.redis.publish(channel, payload))

    async def publish(self, app: str, user: str | None, event_id: str | None, event_type: str,
                      data: bytes) -> Published:
        """One event. Publishes that arrive in the same event-loop iteration (concurrent requests) go to Redis
        together, one script call per app, in their order of arrival: one round trip and one pooled connection
        for all of them instead of one each."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Published] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._send_waiting)
        self._waiting.setdefault(app, []).append((Outgoing(user, event_id, event_type, data), done))
        return await done

    def _send_waiting(self) -> None:
        waiting, self._waiting = self._waiting, {}
        loop = asyncio.get_running_loop()
        for app, group in waiting.items():
            task = loop.create_task(self._send_group(app, group))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_group(self, app: str, group: list[_Waiting]) -> None:
        for i in range(0, len(group), MAX_BATCH_EVENTS):
            part = group[i:i + MAX_BATCH_EVENTS]
            try:
                results = await self.publish_many(app, [ev for ev, _ in part])
            except ScriptRefused:
                if len(part) == 1:
                    _settle(part[0][1], None, "the publish script was refused")
                    continue
                for ev, done in part:  # nothing was written: each on its own, so that only the culprit fails
                    try:
                        (one,) = await self.publish_many(app, [ev])
                    except BrokerUnavailable as exc:
                        _settle(done, None, str(exc))
                    else:
                        _settle(done, one, "")
            except BrokerUnavailable as exc:  # lost or timed out: it may have run, so never again
                for _, done in part:
                    _settle(done, None, str(exc))
            except Exception as exc:
                log.exception("publishing %d events of %s failed", len(part), app)
                for _, done in part:
                    _settle(done, None, f"{type(exc).__name__}: {exc}")
            else:
                for (_, done), res in zip(part, results, strict=True):
                    _settle(done, res, "")

    async def publish_many(self, app: str, events: Sequence[Outgoing]) -> list[Published]:
        """At most MAX_BATCH_EVENTS events in one script call (they share the app's slot on a cluster)."""
        if not events:
            return []
        script_keys, args = publish_call(app, events, self._size, self._ttl_ms, self._max_seen, self._live_channel)
        try:
            res = await self._publish(keys=script_keys, args=args)
        except ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                raise ScriptRefused(str(exc)) from exc
            raise BrokerUnavailable(str(exc)) from exc
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        out = []
        for ev, raw in zip(events, res, strict=True):
            if raw:
                pos = raw.decode()
                out.append(Published(ev.id if ev.id is not None else pos, parse_position(pos)))
            else:
                assert ev.id is not None  # only an event with an id can be a duplicate
                out.append(Published(ev.id, None, duplicate=True))
        return out

    async def replay(self, app: str, user: str, last_id: str, *, known: bool = False) -> Replay:
        if not self._size:
            return Replay(reset="history is off")
        if len(last_id) > MAX_LAST_EVENT_ID:
            return Replay(reset="unknown id")
        pos = as_position(last_id)
        if known and pos is None:
            return Replay(reset="unknown id")
        try:
            res = await self._replay(
                keys=[keys.history_key(app, user), keys.history_key(app, None), keys.seq_key(app)],
                args=[last_id, self._size, self._ttl_ms, "1" if known else "0", "" if pos is None else last_id])
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        status = res[0].decode()
        if status != "ok":
            return Replay(reset=status)
        user_msgs = [m for m in map(_entry_to_message, res[2]) if m is not None]
        b_msgs = [m for m in map(_entry_to_message, res[3]) if m is not None]
        after = parse_position(res[1].decode())
        assert after is not None
        return covered(after, user_msgs, b_msgs)

    async def head(self, app: str, user: str) -> Position | None:
        """The app's newest position. The streams of one app that ask in the same loop iteration share one read
        (a reconnect storm asks thousands of times a second): each asked after its subscription was confirmed,
        and the read is sent after all of them asked, so it is late enough for every one."""
        read = self._heads.get(app)
        if read is None:
            read = self._heads[app] = asyncio.get_running_loop().create_task(self._read_head(app))
            read.add_done_callback(_retrieved)  # every asker may have left (cancelled): no "never retrieved" line
        return await asyncio.shield(read)

    async def _read_head(self, app: str) -> Position | None:
        await asyncio.sleep(0)  # the rest of this iteration's streams join
        del self._heads[app]  # from here on, a new read: this one may already be on its way
        try:
            ms, n = await self.redis.hmget(keys.seq_key(app), ["ms", "n"])
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        return (int(ms), int(n)) if ms and n else None

    # -- control plane ----------------------------------------------------------------------------------------
    async def publish_control(self, payload: bytes) -> int:
        try:
            return await self._control_publish(keys.CONTROL_CHANNEL, payload)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def send_reply(self, instance: str, payload: bytes) -> None:
        try:
            await self._control_publish(keys.reply_channel(instance), payload)
        except (RedisError, OSError) as exc:
            log.warning("control reply to %s lost: %s", instance, exc)
