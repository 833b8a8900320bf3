"""Who is online per app, and the changes to announce: in Redis (atomic scripts, cluster-wide) or in-process.

A user is online from the admission of its first stream anywhere until its `user.offline` is emitted:
PRESENCE_GRACE after its last stream closed (a stream opened in between cancels it), or, when its instance died,
PRESENCE_GRACE after the last heartbeat of its last stream (at the earliest when the registry sees it expired).
The registry's admit, release and heartbeat decide the first two in their own scripts (quart_sse.registry);
`sweep` emits the offlines that are due and finds the users whose instance died. Both the bulk query and the
webhooks read this one state, so they never disagree.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .. import keys
from ..broker.base import BrokerUnavailable
from .model import Change
from .outbox import MemoryOutbox
from .scripts import SWEEP_LUA

#: At most this many users per step of one sweep call (a sweep that hits it says `more` and is called again).
SWEEP_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep of an app did and saw."""

    changes: int  # offlines emitted
    dropped: int  # queued events dropped at WEBHOOK_QUEUE_MAX
    next_visit: float | None  # Unix s when to sweep again: the next pending offline, or the earliest time a
    # dead instance's users could be found (the earliest stream expiry); None: nothing pending
    depth: int  # events queued for delivery
    oldest: float | None  # Unix s the oldest queued event was queued
    more: bool  # a step hit SWEEP_LIMIT: sweep again


class PresenceState(Protocol):
    async def sweep(self, app: str, now: float) -> Sweep: ...

    async def online(self, app: str, users: Sequence[str]) -> list[str]:
        """Those of `users` online now, in the order given, each once."""
        ...

    async def apps(self) -> list[str]:
        """Every app with presence state (the sweepers visit each)."""
        ...


def entry_time(entry: str) -> float:
    """Unix s from a queue entry id `<ms>-<n>` (Redis Stream ids and ours)."""
    return int(entry.split("-", 1)[0]) / 1000


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class RedisPresenceState:
    """SWEEP_LUA per app; the bulk query is one ZMSCORE (one round trip, any number of users)."""

    def __init__(self, redis: aioredis.Redis, ttl: int, grace: float, queue_max: int,
                 queued: Callable[[str], bool]) -> None:
        self.redis = redis
        self.ttl = ttl
        self.grace = grace
        self.queue_max = queue_max
        self.queued = queued  # whether the app's changes go to the webhook queue
        self._sweep = redis.register_script(SWEEP_LUA)
        self._indexed: set[str] = set()

    async def index(self, *apps: str, force: bool = False) -> None:
        """Put apps in the index the sweepers visit (once per app and process; `force`: again, after a Redis
        restart may have lost it)."""
        new = [a for a in apps if force or a not in self._indexed]
        if not new:
            return
        try:
            await self.redis.sadd(keys.PRESENCE_APPS, *new)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        self._indexed.update(new)

    async def apps(self) -> list[str]:
        try:
            return sorted(_text(a) for a in await self.redis.smembers(keys.PRESENCE_APPS))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def sweep(self, app: str, now: float) -> Sweep:
        try:
            changes, dropped, due, depth, oldest, more = await self._sweep(
                keys=keys.presence_keys(app),
                args=[repr(now), self.ttl, repr(self.grace), "1" if self.queued(app) else "0", self.queue_max,
                      keys.user_conns_key(app, ""), SWEEP_LIMIT])
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        due_s, oldest_s = _text(due), _text(oldest)
        return Sweep(int(changes), int(dropped), float(due_s) if due_s else None, int(depth),
                     entry_time(oldest_s) if oldest_s else None, bool(more))

    async def online(self, app: str, users: Sequence[str]) -> list[str]:
        unique = list(dict.fromkeys(users))
        if not unique:
            return []
        try:
            scores = await self.redis.zmscore(keys.presence_keys(app)[0], unique)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        return [u for u, s in zip(unique, scores, strict=True) if s is not None]


@dataclass(slots=True)
class _AppState:
    online: set[str]
    due: dict[str, tuple[float, int]]  # user -> (due Unix s, `at` Unix ms)
    seq: int = 0


class MemoryPresenceState:
    """The same state machine in this process (the in-process broker: one instance, so no crash to detect)."""

    def __init__(self, outbox: MemoryOutbox, grace: float, queue_max: int, queued: Callable[[str], bool]) -> None:
        self.outbox = outbox
        self.grace = grace
        self.queue_max = queue_max
        self.queued = queued
        self._apps: dict[str, _AppState] = {}

    def admitted(self, app: str, user: str) -> tuple[int, int]:
        """A stream of `user` opened; returns (1 when that made the user online, else 0; events dropped)."""
        st = self._apps.setdefault(app, _AppState(set(), {}))
        if user in st.online:
            st.due.pop(user, None)  # back within the grace: nothing to announce
            return 0, 0
        st.online.add(user)
        return 1, self._emit(app, st, Change.ONLINE, user, int(time.time() * 1000))

    def released(self, app: str, user: str, due: float) -> None:
        """`user`'s last stream closed: its offline is due at `due` unless a stream opens before."""
        st = self._apps.get(app)
        if st is not None and user in st.online and user not in st.due:
            st.due[user] = (due, int(time.time() * 1000))

    def _emit(self, app: str, st: _AppState, change: Change, user: str, at: int) -> int:
        """Queue the change (when the app has a webhook); returns how many old events that dropped."""
        if not self.queued(app):
            return 0
        st.seq = max(st.seq + 1, int(time.time() * 1000))
        return self.outbox.append(
            app, {"type": change.value, "user": user, "at": str(at), "seq": str(st.seq)}, self.queue_max)

    async def sweep(self, app: str, now: float) -> Sweep:
        st = self._apps.get(app)
        changes = dropped = 0
        if st is not None:
            for user, (due, at) in sorted(st.due.items(), key=lambda kv: kv[1][0]):
                if due > now:
                    break
                del st.due[user]
                st.online.discard(user)
                dropped += self._emit(app, st, Change.OFFLINE, user, at)
                changes += 1
        depth, oldest = self.outbox.backlog(app)
        next_visit = min((d for d, _ in st.due.values()), default=None) if st is not None else None
        return Sweep(changes, dropped, next_visit, depth, entry_time(oldest) if oldest else None, False)

    async def online(self, app: str, users: Sequence[str]) -> list[str]:
        st = self._apps.get(app)
        if st is None:
            return []
        return [u for u in dict.fromkeys(users) if u in st.online]

    async def apps(self) -> list[str]:
        return sorted(self._apps)
