"""The Redis broker: history in Redis Streams, live delivery over one pub/sub connection per process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .. import keys
from ..events import EventError, Message, Position, checked_message, decode_payload, parse_position
from .base import BrokerUnavailable, OnControl, OnMessage, OnReconnect, Replay
from .history import MAX_LAST_EVENT_ID, as_position, covered
from .pubsub import PubSubLink

log = logging.getLogger("quart_sse.broker")

# KEYS: seq hash, history stream. ARGV: channel, id ('' = assign), type, data JSON, maxlen, ttl ms.
# One round trip, atomic: the live copy and the history entry can never disagree. Each entry records `prev`, the
# position of the entry before it in the same stream: trimming (which Redis does not record in
# max-deleted-entry-id) and expiry only ever remove a stream's oldest entries, so an entry whose `prev` is missing
# proves a gap.
PUBLISH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[1], 'ms') or '0')
if now < last then now = last end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 'ms', now)
local pos = now .. '-' .. n
local id = ARGV[2]
if id == '' then id = pos end
local maxlen = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
if maxlen > 0 and ttl > 0 then
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  local prev = ''
  if #newest > 0 then prev = newest[1][1] end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, pos, 'id', id, 'type', ARGV[3], 'data', ARGV[4], 'prev', prev)
  redis.call('XTRIM', KEYS[2], 'MINID', '~', (now - ttl) .. '-0')
  redis.call('PEXPIRE', KEYS[2], ttl)
end
local payload = '{"id":' .. cjson.encode(id) .. ',"type":' .. cjson.encode(ARGV[3]) .. ',"data":' .. ARGV[4]
  .. ',"pos":"' .. pos .. '"}'
redis.call('PUBLISH', ARGV[1], payload)
return {pos, id}
"""

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


def _entry_to_message(entry: list[Any]) -> Message | None:
    """A history entry, re-checked like a raw PUBLISH (anyone with Redis access can XADD); None to skip it."""
    pos = parse_position(entry[0].decode())
    f = entry[1]
    fields = {f[i]: f[i + 1] for i in range(0, len(f), 2)}
    try:
        return checked_message(fields[b"id"].decode(), fields[b"type"].decode(), fields[b"data"], pos)
    except (KeyError, UnicodeDecodeError, EventError):
        return None


class RedisBroker:
    name = "redis"

    def __init__(self, url: str, instance: str, history_size: int, history_ttl: int,
                 *, sharded: bool = False) -> None:
        self.url = url
        self.instance = instance
        self._size = history_size if history_ttl > 0 else 0  # either setting at 0 turns history off
        self._ttl_ms = history_ttl * 1000
        self.redis: aioredis.Redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=64, timeout=5, socket_connect_timeout=2, socket_timeout=5,
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
        self.link = PubSubLink(url, self._received, self._up, self._down, sharded=sharded)

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def start(self, on_message: OnMessage, on_control: OnControl, on_reconnect: OnReconnect) -> None:
        self._on_message, self._on_control, self._on_reconnect = on_message, on_control, on_reconnect
        self.link.subscribe(keys.CONTROL_CHANNEL)
        self.link.subscribe(self._reply)
        self.link.start()

    async def close(self) -> None:
        await self.link.close()
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

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
                      data: bytes) -> Message:
        channel = self._live_channel(app, user)
        try:
            pos_raw, id_raw = await self._publish(
                keys=[keys.seq_key(app), keys.history_key(app, user)],
                args=[channel, event_id or "", event_type, data, self._size, self._ttl_ms])
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        return Message.build(id_raw.decode(), event_type, data, parse_position(pos_raw.decode()))

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
