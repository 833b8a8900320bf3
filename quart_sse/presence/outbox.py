"""The webhook queue: durable in Redis (one Stream per app), in-process without Redis, same rules for both.

Why not a consumer group: a group hands each entry to one consumer, but entries of the same user to different
consumers, which deliver them concurrently and retry them independently, so a user's `user.offline` could overtake
its `user.online`. Here each user's events go out one at a time, in queue order: a consumer *leases* a user's
oldest event (CLAIM_LUA), delivers it (retrying as long as it takes), then acknowledges it, which deletes it and
frees the user's next event. A lease lasts `lease` seconds and its holder extends it while it works; an instance
that dies stops extending, and once its leases run out any other instance takes those events over. The stream
holds an event until it is acknowledged, so neither a crash nor a restart loses one (at-least-once: an event whose
delivery succeeded just before its consumer died is sent again, with the same id).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .. import keys
from ..broker.base import BrokerUnavailable
from .model import PresenceEvent
from .scripts import ABANDON_LUA, ACK_LUA, CLAIM_LUA, EXTEND_LUA

#: How many of an app's oldest queued entries a claim looks at. Entries of users whose previous event is still
#: being delivered are skipped; with more than this many of them at the head, the others wait their turn.
CLAIM_SCAN = 1000


@dataclass(frozen=True, slots=True)
class Claimed:
    events: list[PresenceEvent]  # leased to the caller now
    held_until: float | None  # Unix s: the earliest live lease that held an event back (claim again then)


class Outbox(Protocol):
    async def claim(self, app: str, consumer: str, n: int, lease: float) -> Claimed:
        """Lease up to `n` deliverable events (each its user's oldest, none of whose user is leased)."""
        ...

    async def ack(self, app: str, events: list[PresenceEvent]) -> None:
        """Done with these events (delivered or rejected): delete them, free their users' next events."""
        ...

    async def extend(self, app: str, consumer: str, events: list[PresenceEvent], lease: float) -> list[PresenceEvent]:
        """Extend `consumer`'s leases on `events` to now + `lease`; returns those it no longer holds."""
        ...

    async def abandon(self, app: str, consumer: str, events: list[PresenceEvent]) -> None:
        """Give the leases up so that another consumer takes the events over at once."""
        ...


def _ms(t: float) -> int:
    return int(t * 1000)


class RedisOutbox:
    """Every call is one script in the app's slot (Redis Cluster: one node)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._claim = redis.register_script(CLAIM_LUA)
        self._ack = redis.register_script(ACK_LUA)
        self._extend = redis.register_script(EXTEND_LUA)
        self._abandon = redis.register_script(ABANDON_LUA)

    async def claim(self, app: str, consumer: str, n: int, lease: float) -> Claimed:
        k = keys.presence_keys(app)
        try:
            raw, held = await self._claim(keys=[k[4], k[5]],
                                          args=[consumer, _ms(time.time()), _ms(lease), n, CLAIM_SCAN])
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        out = []
        for entry, flat in raw:
            fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
            out.append(PresenceEvent.from_fields(app, _text(entry), fields))
        held_ms = _text(held)
        return Claimed(out, int(held_ms) / 1000 if held_ms else None)

    async def ack(self, app: str, events: list[PresenceEvent]) -> None:
        k = keys.presence_keys(app)
        try:
            await self._ack(keys=[k[4], k[5]], args=_pairs(events))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def extend(self, app: str, consumer: str, events: list[PresenceEvent], lease: float) -> list[PresenceEvent]:
        try:
            lost = await self._extend(keys=[keys.presence_keys(app)[5]],
                                      args=[consumer, _ms(time.time() + lease), *_pairs(events)])
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        gone = {(_text(lost[i]), _text(lost[i + 1])) for i in range(0, len(lost), 2)}
        return [e for e in events if (e.user, e.entry) in gone]

    async def abandon(self, app: str, consumer: str, events: list[PresenceEvent]) -> None:
        try:
            await self._abandon(keys=[keys.presence_keys(app)[5]], args=[consumer, *_pairs(events)])
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc


def _pairs(events: list[PresenceEvent]) -> list[str]:
    out: list[str] = []
    for e in events:
        out += (e.user, e.entry)
    return out


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


@dataclass(slots=True)
class _Lease:
    consumer: str
    deadline: float
    entry: str


class _AppQueue:
    __slots__ = ("entries", "last_ms", "leases", "n")

    def __init__(self) -> None:
        self.entries: OrderedDict[str, dict[str, str]] = OrderedDict()
        self.leases: dict[str, _Lease] = {}
        self.last_ms = 0
        self.n = 0


class MemoryOutbox:
    """The same queue and leases in this process (the in-process broker: one instance, nothing survives it)."""

    def __init__(self) -> None:
        self._apps: dict[str, _AppQueue] = {}

    def append(self, app: str, fields: dict[str, str], cap: int) -> int:
        """Queue one event; returns how many of the oldest were dropped to stay within `cap`."""
        q = self._apps.setdefault(app, _AppQueue())
        ms = max(_ms(time.time()), q.last_ms)
        q.n = q.n + 1 if ms == q.last_ms else 0
        q.last_ms = ms
        q.entries[f"{ms}-{q.n}"] = fields
        dropped = 0
        while len(q.entries) > cap:
            entry, old = q.entries.popitem(last=False)
            lease = q.leases.get(old["user"])
            if lease is not None and lease.entry == entry:
                del q.leases[old["user"]]
            dropped += 1
        return dropped

    def backlog(self, app: str) -> tuple[int, str | None]:
        """Queue length and the oldest entry id."""
        q = self._apps.get(app)
        if q is None or not q.entries:
            return 0, None
        return len(q.entries), next(iter(q.entries))

    async def claim(self, app: str, consumer: str, n: int, lease: float) -> Claimed:
        q = self._apps.get(app)
        out: list[PresenceEvent] = []
        held_until: float | None = None
        if q is None or n <= 0:
            return Claimed(out, held_until)
        now = time.time()
        seen: set[str] = set()
        for i, (entry, fields) in enumerate(q.entries.items()):
            if i >= CLAIM_SCAN:
                break
            user = fields["user"]
            if user in seen:
                continue
            seen.add(user)
            held = q.leases.get(user)
            if held is not None and held.entry == entry and held.deadline > now:
                held_until = held.deadline if held_until is None else min(held_until, held.deadline)
                continue
            q.leases[user] = _Lease(consumer, now + lease, entry)
            out.append(PresenceEvent.from_fields(app, entry, fields))
            if len(out) >= n:
                break
        return Claimed(out, held_until)

    async def ack(self, app: str, events: list[PresenceEvent]) -> None:
        q = self._apps.get(app)
        if q is None:
            return
        for e in events:
            q.entries.pop(e.entry, None)
            held = q.leases.get(e.user)
            if held is not None and held.entry == e.entry:
                del q.leases[e.user]

    async def extend(self, app: str, consumer: str, events: list[PresenceEvent], lease: float) -> list[PresenceEvent]:
        q = self._apps.get(app)
        lost = []
        for e in events:
            held = q.leases.get(e.user) if q is not None else None
            if held is not None and held.consumer == consumer and held.entry == e.entry:
                held.deadline = time.time() + lease
            else:
                lost.append(e)
        return lost

    async def abandon(self, app: str, consumer: str, events: list[PresenceEvent]) -> None:
        q = self._apps.get(app)
        if q is None:
            return
        for e in events:
            held = q.leases.get(e.user)
            if held is not None and held.consumer == consumer and held.entry == e.entry:
                del q.leases[e.user]
