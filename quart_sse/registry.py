"""Who is connected where: the seed's listing shape, the seed's `{app}:client:{user}` hash, per-user caps.

In Redis every live stream is a member of two sorted sets (per app and per user) scored by the time its entry
expires; each instance re-writes its own entries every `ttl/3` seconds, so a crashed instance's streams drop out of
listings and caps within `ttl` and a Redis restart is repaired by the next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from . import keys
from .broker.base import BrokerUnavailable
from .presence.scripts import EMIT_LUA
from .tasks import cancel_and_wait, raise_if_cancelling

log = logging.getLogger("quart_sse.registry")


@dataclass(slots=True)
class ConnRecord:
    id: str
    app: str
    user: str
    remote_addr: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    member: bytes = b""

    def __post_init__(self) -> None:
        # a copy: orjson's output keeps a 4 KiB buffer, and this lives as long as the stream
        self.member = bytes(memoryview(orjson.dumps(self.as_seed())))

    def as_seed(self) -> dict[str, Any]:
        """The seed's JSON shape of one connection."""
        return {"id": self.id, "created_at": self.created_at, "remote_addr": self.remote_addr,
                "application": {"id": self.app}, "user": {"id": self.user}}


class Registry(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def admit(self, rec: ConnRecord, cap: int) -> bool:
        """Add `rec` unless its user already holds `cap` streams (0 = no cap) across all instances."""
        ...

    def release(self, rec: ConnRecord) -> None:
        """Forget `rec`; synchronous so that a cancelled stream can call it from `finally`."""
        ...

    async def released(self, *recs: ConnRecord) -> None:
        """Wait until the `release`s of `recs` already made are done everywhere (a server-ended stream awaits its
        own before its last bytes, so that the client reconnecting at once is admitted on any instance)."""
        ...

    async def list_app(self, app: str) -> dict[str, dict[str, Any]]: ...

    async def list_user(self, app: str, user: str) -> dict[str, Any]: ...

    async def drain(self) -> None:
        """Wait for pending releases (shutdown)."""
        ...


class PresenceLink(Protocol):
    """What the Redis registry's scripts need from presence (quart_sse.presence.service.Presence): the registry's
    admit, release and heartbeat decide every user's online/offline in the same atomic script that counts its
    streams (docs/presence.md)."""

    queue_max: int

    def queued(self, app: str) -> bool:
        """Whether the app's changes go to the webhook queue."""
        ...

    def release_delay(self) -> float:
        """Seconds from a user's last close to its offline (PRESENCE_GRACE, more while shutting down)."""
        ...

    def changed(self, app: str, changes: int, dropped: int) -> None:
        """Scripts made `changes` users of `app` online and dropped `dropped` queued events at the cap."""
        ...

    def scheduled(self, app: str, due: float) -> None:
        """A user's last stream closed: its offline is due at Unix time `due`."""
        ...

    async def index(self, *apps: str, force: bool = False) -> None:
        """Make sure every instance's sweeper visits these apps."""
        ...


class MemoryPresenceLink(Protocol):
    """The in-process registry tells presence of first and last streams (quart_sse.presence.service.Presence)."""

    def admitted(self, app: str, user: str) -> None: ...

    def released(self, app: str, user: str) -> None: ...


class MemoryRegistry:
    def __init__(self, presence: MemoryPresenceLink | None = None) -> None:
        self._apps: dict[str, dict[str, dict[str, ConnRecord]]] = {}
        self.presence = presence

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self._apps.clear()

    async def admit(self, rec: ConnRecord, cap: int) -> bool:
        users = self._apps.setdefault(rec.app, {})
        conns = users.setdefault(rec.user, {})
        if cap and len(conns) >= cap:
            if not conns:
                del users[rec.user]
            return False
        conns[rec.id] = rec
        if self.presence is not None:
            self.presence.admitted(rec.app, rec.user)
        return True

    def release(self, rec: ConnRecord) -> None:
        users = self._apps.get(rec.app, {})
        conns = users.get(rec.user)
        if conns is not None and conns.pop(rec.id, None) is not None and not conns:
            del users[rec.user]
            if not users:
                self._apps.pop(rec.app, None)
            if self.presence is not None:
                self.presence.released(rec.app, rec.user)

    async def released(self, *recs: ConnRecord) -> None:
        pass

    async def list_app(self, app: str) -> dict[str, dict[str, Any]]:
        return {u: {c: r.as_seed() for c, r in conns.items()} for u, conns in self._apps.get(app, {}).items()}

    async def list_user(self, app: str, user: str) -> dict[str, Any]:
        return {c: r.as_seed() for c, r in self._apps.get(app, {}).get(user, {}).items()}

    async def drain(self) -> None:
        pass


# KEYS: user set, app set, then with presence the app's presence keys (quart_sse.keys.presence_keys). ARGV: now,
# expiry, member, cap, ttl seconds, the seed hash to write ('' in a cluster, where it lives in another slot), app,
# user, channel, presence ('': off; '0': state only; '1': and queue webhooks), queue cap, now in ms. One round trip
# per new stream. Returns {admitted, changes, dropped}: a user not online yet becomes online (a change); one whose
# offline was pending stays online and the offline is cancelled.
ADMIT_LUA = EMIT_LUA + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local cap = tonumber(ARGV[4])
if cap > 0 and redis.call('ZCARD', KEYS[1]) >= cap then return {0, 0, 0} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[5])
if ARGV[6] ~= '' then
  redis.call('HSET', ARGV[6], 'application_id', ARGV[7], 'user_id', ARGV[8], 'channel_id', ARGV[9])
  redis.call('EXPIRE', ARGV[6], ARGV[5])
end
local out = {events = 0, dropped = 0, queue = ARGV[10], cap = tonumber(ARGV[11])}
if ARGV[10] ~= '' then
  local P, user = {KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]}, ARGV[8]
  if not redis.call('ZSCORE', P[1], user) then
    redis.call('ZADD', P[1], ARGV[2], user)
    presence_emit(P, 'user.online', user, ARGV[12], out)
  elseif redis.call('ZREM', P[2], user) == 1 then
    redis.call('HDEL', P[3], user)
    redis.call('ZADD', P[1], ARGV[2], user)
  else
    redis.call('ZADD', P[1], 'GT', ARGV[2], user)
  end
end
return {1, out.events, out.dropped}
"""

# KEYS: user set, app set, then with presence the app's `on`, `due` and `gone` keys. ARGV: member, now, the seed
# hash to delete with the user's last stream ('' in a cluster), user, presence ('' off), when the offline is due,
# now in ms, ttl. Returns how many live streams the user still has. The user's last stream schedules its offline
# (its `on` score moves past the due time, so the crash detection leaves it alone); otherwise its `on` score
# becomes its streams' latest expiry.
RELEASE_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local left = redis.call('ZCARD', KEYS[1])
if left == 0 and ARGV[3] ~= '' then redis.call('DEL', ARGV[3]) end
local user = ARGV[4]
if ARGV[5] ~= '' and redis.call('ZSCORE', KEYS[3], user) and not redis.call('ZSCORE', KEYS[4], user) then
  if left == 0 then
    redis.call('ZADD', KEYS[4], ARGV[6], user)
    redis.call('HSET', KEYS[5], user, ARGV[7])
    redis.call('ZADD', KEYS[3], tonumber(ARGV[6]) + tonumber(ARGV[8]), user)
  else
    redis.call('ZADD', KEYS[3], redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2], user)
  end
end
return left
"""


# KEYS: app set, then with presence the app's presence keys. ARGV: expiry, ttl, '1' to refresh the seed hashes here
# too (not in a cluster: other slots), app, user-set key prefix, seed-hash prefix, channel prefix, presence ('' off,
# '0' state, '1' and queue), queue cap, now in ms, then user, member pairs. Re-writes (not only re-expires): after a
# Redis restart the entries are gone and come back with the next beat, and a user that presence does not know as
# online (Redis lost it, or this instance stalled past the ttl and was taken for dead) becomes online again.
# Returns {streams, changes, dropped}.
REFRESH_LUA = EMIT_LUA + """
local expiry, ttl, seed, app = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local uprefix, sprefix, cprefix = ARGV[5], ARGV[6], ARGV[7]
local out = {events = 0, dropped = 0, queue = ARGV[8], cap = tonumber(ARGV[9])}
local P = {KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]}
local done = {}
for i = 11, #ARGV, 2 do
  local user, member = ARGV[i], ARGV[i + 1]
  local ukey = uprefix .. user
  redis.call('ZADD', KEYS[1], expiry, member)
  redis.call('ZADD', ukey, expiry, member)
  if not done[user] then
    done[user] = true
    redis.call('EXPIRE', ukey, ttl)
    if seed == '1' then
      local h = sprefix .. user
      if redis.call('EXPIRE', h, ttl) == 0 then
        redis.call('HSET', h, 'application_id', app, 'user_id', user, 'channel_id', cprefix .. user)
        redis.call('EXPIRE', h, ttl)
      end
    end
    if ARGV[8] ~= '' then
      if redis.call('ZSCORE', P[1], user) then
        redis.call('ZADD', P[1], 'GT', expiry, user)
      else
        redis.call('ZADD', P[1], expiry, user)
        presence_emit(P, 'user.online', user, ARGV[10], out)
      end
    end
  end
end
redis.call('EXPIRE', KEYS[1], ttl)
return {(#ARGV - 10) / 2, out.events, out.dropped}
"""


@dataclass(slots=True)
class _Admission:
    rec: ConnRecord
    keys: list[str]
    args: list[bytes | str | float]
    waiter: asyncio.Future[bool]


class RedisRegistry:
    def __init__(self, redis: aioredis.Redis, ttl: int, *, cluster: bool = False,
                 presence: PresenceLink | None = None) -> None:
        self.redis = redis
        self.ttl = ttl
        self.cluster = cluster
        self.presence = presence
        self._admit = redis.register_script(ADMIT_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._refresh = redis.register_script(REFRESH_LUA)
        self.local: dict[str, ConnRecord] = {}
        self._releasing: dict[str, asyncio.Task[None]] = {}  # releases on their way to Redis, by connection id
        self._batch: list[ConnRecord] | None = None  # releases of this loop iteration (outside a cluster)
        self._user_releasing: dict[tuple[str, str], asyncio.Task[None]] = {}  # the latest release of each user
        self._batch_task: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._admitting: list[_Admission] = []
        self._admitting_tasks: set[asyncio.Task[None]] = set()
        self._refreshing: set[str] = set()  # ids in the heartbeat script call now in flight
        self._released_meanwhile: list[ConnRecord] = []  # released while their heartbeat was in flight

    async def start(self) -> None:
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="registry-heartbeat")

    async def stop(self) -> None:
        await cancel_and_wait(self._heartbeat)
        await self.drain()

    async def drain(self) -> None:
        while self._releasing:
            await asyncio.gather(*set(self._releasing.values()), return_exceptions=True)

    async def admit(self, rec: ConnRecord, cap: int) -> bool:
        pending = self._user_releasing.get((rec.app, rec.user)) if cap else None
        if pending is not None:  # a stream of this user that just left must not count against the cap here
            await self._wait({pending})
        h = keys.seed_client_hash(rec.app, rec.user)
        script_keys = [keys.user_conns_key(rec.app, rec.user), keys.app_conns_key(rec.app)]
        try:
            if self.presence is not None:  # before the first state of the app: every sweeper must know it
                await self.presence.index(rec.app)
            now = time.time()
            # outside a cluster the seed hash is written in the same script: one round trip per new stream
            args: list[bytes | str | float] = [now, now + self.ttl, rec.member, cap, self.ttl,
                                               "" if self.cluster else h, rec.app, rec.user,
                                               keys.user_channel(rec.app, rec.user), *self._presence_args(rec.app)]
            if self.presence is not None:
                script_keys += keys.presence_keys(rec.app)
            try:
                ok = await self._admit_together(rec, script_keys, args)
                if not ok:
                    return False
                if self.cluster:  # in another slot than the sets
                    async with self.redis.pipeline(transaction=False) as p:
                        p.hset(h, mapping={"application_id": rec.app, "user_id": rec.user,
                                           "channel_id": keys.user_channel(rec.app, rec.user)})
                        p.expire(h, self.ttl)
                        await p.execute()
            except BaseException:
                # Admitted, and then this request was cancelled (its client left) or the seed hash failed: the
                # caller never gets the stream, so its place is given back here. The cancel can come after the
                # admission's reply, in the same loop iteration: the await then raises although the place is
                # held (`_admitted` listed it in `local` already). A no-op when nothing was admitted.
                self.release(rec)
                raise
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        return True

    def _admit_together(self, rec: ConnRecord, script_keys: list[str],
                         args: list[bytes | str | float]) -> asyncio.Future[bool]:
        """ADMIT_LUA for `rec`, sent with every other admission of this loop iteration in one pipeline: a reconnect
        storm admits thousands of streams in a few iterations, and a script call (a round trip and redis-py's
        per-command work, ~70 µs of CPU) each was the registry's share of its CPU (docs/performance.md). Sent by a
        task of its own: a stream whose client leaves meanwhile (its request cancelled) never interrupts a call
        half-way, and an admission nobody waits for any more is given back at once."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if not self._admitting:
            asyncio.get_running_loop().call_soon(self._send_admissions)
        self._admitting.append(_Admission(rec, script_keys, args, fut))
        return fut

    def _send_admissions(self) -> None:
        batch, self._admitting = self._admitting, []
        task = asyncio.get_running_loop().create_task(self._admit_batch(batch))
        self._admitting_tasks.add(task)
        task.add_done_callback(self._admitting_tasks.discard)

    async def _admit_batch(self, batch: list[_Admission]) -> None:
        if len(batch) == 1 or self.cluster:  # one call each: the script object loads the script when needed, and
            for a in batch:  # the cluster client routes each call to its slot
                try:
                    self._admitted(a, await self._admit(keys=a.keys, args=a.args))
                except (RedisError, OSError) as exc:
                    _settle(a.waiter, exc)
            return
        sha = self._admit.sha
        for i in range(0, len(batch), 1000):
            chunk = batch[i:i + 1000]
            try:
                async with self.redis.pipeline(transaction=False) as p:
                    for a in chunk:  # EVALSHA without the pipeline's SCRIPT EXISTS round trip
                        p.evalsha(sha, len(a.keys), *a.keys, *a.args)
                    results = await p.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                for a in chunk:
                    _settle(a.waiter, exc)
                continue
            for a, res in zip(chunk, results, strict=True):
                if isinstance(res, NoScriptError):  # a restarted Redis: the script object's call loads it again
                    try:
                        res = await self._admit(keys=a.keys, args=a.args)
                    except (RedisError, OSError) as exc:
                        res = exc
                if isinstance(res, BaseException):
                    _settle(a.waiter, res)
                else:
                    self._admitted(a, res)

    def _admitted(self, a: _Admission, reply: list[Any]) -> None:
        ok, changes, dropped = reply
        if changes or dropped:
            assert self.presence is not None
            self.presence.changed(a.rec.app, int(changes), int(dropped))
        if ok:  # held from here on: whatever happens to the request, `release` finds it
            self.local[a.rec.id] = a.rec
        if a.waiter.done():  # its request was cancelled meanwhile (the client left): give the place back
            self.release(a.rec)
            return
        a.waiter.set_result(bool(ok))

    def _presence_args(self, app: str) -> list[bytes | str | float]:
        """ADMIT_LUA's and REFRESH_LUA's presence arguments: mode, queue cap, now in ms."""
        if self.presence is None:
            return ["", 0, 0]
        return ["1" if self.presence.queued(app) else "0", self.presence.queue_max, int(time.time() * 1000)]

    def release(self, rec: ConnRecord) -> None:
        """Outside a cluster, the releases of one loop iteration go to Redis together: one pipeline for the
        thousands of streams a shutdown or a DELETE ends at once (one round trip each took 3.3 s for 15,000)."""
        if self.local.pop(rec.id, None) is None:
            return
        if rec.id in self._refreshing:  # the heartbeat in flight would write it back: release it again after
            self._released_meanwhile.append(rec)
        if self.cluster:  # per-slot routing, and the seed hash in another slot: one by one
            task = asyncio.get_running_loop().create_task(self._do_release(rec))
            self._releasing[rec.id] = task
            self._user_releasing[(rec.app, rec.user)] = task
            task.add_done_callback(lambda _: self._forget([rec]))
            return
        if self._batch is None:
            batch: list[ConnRecord] = []
            self._batch = batch
            self._batch_task = asyncio.get_running_loop().create_task(self._release_batch(batch))
            self._batch_task.add_done_callback(lambda _: self._forget(batch))
        self._batch.append(rec)
        assert self._batch_task is not None
        self._releasing[rec.id] = self._batch_task
        self._user_releasing[(rec.app, rec.user)] = self._batch_task

    def _forget(self, batch: list[ConnRecord]) -> None:
        for r in batch:
            task = self._releasing.pop(r.id, None)
            if task is not None and self._user_releasing.get((r.app, r.user)) is task:
                del self._user_releasing[(r.app, r.user)]

    async def _release_batch(self, batch: list[ConnRecord]) -> None:
        if self._batch is batch:  # releases from here on start the next batch
            self._batch = None
        if len(batch) == 1:  # the common case (a client left): one script call
            await self._do_release(batch[0])
            return
        now = time.time()
        sha = self._release.sha
        for i in range(0, len(batch), 1000):
            chunk = batch[i:i + 1000]
            try:
                async with self.redis.pipeline(transaction=False) as p:
                    for rec in chunk:  # EVALSHA without the pipeline's SCRIPT EXISTS round trip first
                        script_keys, args = self._release_call(rec, now)
                        p.evalsha(sha, len(script_keys), *script_keys, *args)
                    results = await p.execute(raise_on_error=False)
                for rec, res in zip(chunk, results, strict=True):
                    if isinstance(res, NoScriptError):  # a restarted Redis: the script call loads it again
                        await self._do_release(rec)
                    elif res == 0:
                        self._last_closed(rec, now)
            except (RedisError, OSError) as exc:
                log.warning("could not release %d connections (%s); they expire within %d s", len(chunk), exc,
                            self.ttl)

    async def released(self, *recs: ConnRecord, timeout: float = 1.0) -> None:
        """Bounded, for when Redis is away. Thousands of streams a shutdown ends share one batch: it is awaited
        once, not once per stream."""
        tasks = {t for r in recs if (t := self._releasing.get(r.id)) is not None}
        if tasks:
            await self._wait(tasks, timeout)

    @staticmethod
    async def _wait(tasks: set[asyncio.Task[None]], timeout: float = 1.0) -> None:
        """Never cancels a release (shield); not `asyncio.wait`, whose every waiter removes its callback from the
        shared task in O(waiters)."""
        if all(t.done() for t in tasks):
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))

    def _release_call(self, rec: ConnRecord, now: float) -> tuple[list[str], list[bytes | str | float]]:
        """RELEASE_LUA's keys and arguments; outside a cluster the script deletes the seed hash with the last stream."""
        script_keys = [keys.user_conns_key(rec.app, rec.user), keys.app_conns_key(rec.app)]
        seed = "" if self.cluster else keys.seed_client_hash(rec.app, rec.user)
        args: list[bytes | str | float] = [rec.member, now, seed, rec.user]
        if self.presence is None:
            args += ["", 0, 0, self.ttl]
        else:
            script_keys += keys.presence_keys(rec.app)[:3]
            args += ["1", now + self.presence.release_delay(), int(now * 1000), self.ttl]
        return script_keys, args

    def _last_closed(self, rec: ConnRecord, now: float) -> None:
        """The user's last stream is gone: its offline falls due at the time RELEASE_LUA was given."""
        if self.presence is not None:
            self.presence.scheduled(rec.app, now + self.presence.release_delay())

    async def _do_release(self, rec: ConnRecord) -> None:
        try:
            now = time.time()
            script_keys, args = self._release_call(rec, now)
            left = await self._release(keys=script_keys, args=args)
            if not left:
                self._last_closed(rec, now)
                if self.cluster:
                    await self.redis.delete(keys.seed_client_hash(rec.app, rec.user))
        except (RedisError, OSError) as exc:
            log.warning("could not release connection %s (%s); it expires within %d s", rec.id, exc, self.ttl)

    async def _live(self, key: str) -> list[dict[str, Any]]:
        try:
            members = await self.redis.zrangebyscore(key, time.time(), "+inf")
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        return [orjson.loads(m) for m in members if isinstance(m, bytes | str)]

    async def list_app(self, app: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for rec in await self._live(keys.app_conns_key(app)):
            out.setdefault(rec["user"]["id"], {})[rec["id"]] = rec
        return out

    async def list_user(self, app: str, user: str) -> dict[str, Any]:
        return {rec["id"]: rec for rec in await self._live(keys.user_conns_key(app, user))}

    async def refresh(self) -> None:
        """Re-write (not only re-expire) every local entry: after a Redis restart they are gone.

        One script call per app and 1,000 streams: a pipeline of six commands per stream cost ~60 % of a core
        every beat at 19,000 streams (redis-py's per-command overhead), the script a few milliseconds. Each call
        takes the streams still open when it is made, and a stream released while its call is in flight (which
        may write it back) is released again after it: no closed stream lingers in listings, caps and presence."""
        by_app: dict[str, list[ConnRecord]] = {}
        for rec in list(self.local.values()):
            by_app.setdefault(rec.app, []).append(rec)
        if self.presence is not None and by_app:  # again each beat: a Redis restart may have lost the index
            await self.presence.index(*by_app, force=True)
        seed = "0" if self.cluster else "1"
        for app, recs in by_app.items():
            for i in range(0, len(recs), 1000):
                chunk = [r for r in recs[i:i + 1000] if r.id in self.local]
                if chunk:
                    await self._refresh_chunk(app, chunk, seed)
            if self.cluster:  # the seed hashes live in other slots: refresh them one by one
                await self._refresh_seed_hashes(app, sorted({r.user for r in recs if r.id in self.local}))

    async def _refresh_chunk(self, app: str, chunk: list[ConnRecord], seed: str) -> None:
        args: list[bytes | str | float] = [time.time() + self.ttl, self.ttl, seed, app, keys.user_conns_key(app, ""),
                                           keys.seed_client_hash(app, ""), keys.user_channel(app, ""),
                                           *self._presence_args(app)]
        for rec in chunk:
            args += (rec.user, rec.member)
        script_keys = [keys.app_conns_key(app)]
        if self.presence is not None:
            script_keys += keys.presence_keys(app)
        self._refreshing = {r.id for r in chunk}
        try:
            _, changes, dropped = await self._refresh(keys=script_keys, args=args)
        finally:
            self._refreshing = set()
            again, self._released_meanwhile = self._released_meanwhile, []
            for rec in again:
                await self._do_release(rec)
        if self.presence is not None and (changes or dropped):
            self.presence.changed(app, int(changes), int(dropped))

    async def _refresh_seed_hashes(self, app: str, users: list[str]) -> None:
        async with self.redis.pipeline(transaction=False) as p:
            for user in users:
                p.expire(keys.seed_client_hash(app, user), self.ttl)
            found = await p.execute()
        missing = [u for u, ok in zip(users, found, strict=True) if not ok]
        if missing:
            async with self.redis.pipeline(transaction=False) as p:
                for user in missing:
                    h = keys.seed_client_hash(app, user)
                    p.hset(h, mapping={"application_id": app, "user_id": user,
                                       "channel_id": keys.user_channel(app, user)})
                    p.expire(h, self.ttl)
                await p.execute()

    async def _beat(self) -> None:
        while True:
            raise_if_cancelling()  # a cancellation the Redis client swallowed (stop() waits for this task)
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.refresh()
            except (RedisError, OSError, BrokerUnavailable) as exc:  # the next beat tries again
                log.warning("registry heartbeat failed: %s", exc)


def _settle(fut: asyncio.Future[bool], exc: BaseException) -> None:
    """An admission's failure (the RedisError/OSError its call raised), unless its waiter left."""
    if not fut.done():
        fut.set_exception(exc)
