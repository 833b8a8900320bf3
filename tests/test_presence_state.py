"""Presence state and the webhook queue, driven through the registry as streams drive it, on the in-process
broker, a real redis-server and a real local Redis Cluster: the same scenarios, the same answers (docs/presence.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from quart_sse import keys
from quart_sse.metrics import Metrics
from quart_sse.presence.model import Change, PresenceEvent
from quart_sse.presence.outbox import MemoryOutbox
from quart_sse.presence.service import Presence
from quart_sse.registry import ConnRecord, MemoryRegistry, RedisRegistry, Registry
from tests.cluster_support import ClusterUnavailable, LocalCluster
from tests.support import make_settings

GRACE = 0.5
TTL = 3
#: Scenarios of several instances on one Redis: not the in-process broker's (one instance).
SHARED = pytest.mark.parametrize("make_backend", ["redis", "cluster"], indirect=True)


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("presence-cluster"), primaries=3)
    try:
        c.start()
    except ClusterUnavailable as exc:
        pytest.fail(f"cannot run a local Redis Cluster: {exc}", pytrace=False)
    try:
        yield c
    finally:
        c.stop()


@dataclass
class Backend:
    kind: str
    presence: Presence
    registry: Registry
    redis: Any

    async def queue(self, app: str) -> list[dict[str, str]]:
        """Every queued event of `app`, oldest first (read without leasing)."""
        if self.redis is None:
            assert isinstance(self.presence.outbox, MemoryOutbox)
            q = self.presence.outbox._apps.get(app)
            return [dict(f) for f in q.entries.values()] if q else []
        entries = await self.redis.xrange(keys.presence_keys(app)[4])
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]

    async def sweep(self, app: str, at: float) -> int:
        return (await self.presence.state.sweep(app, at)).changes

    def admit(self, conn: str, user: str, app: str = "shop") -> Any:
        return self.registry.admit(ConnRecord(conn, app, user, "127.0.0.1"), cap=0)

    async def release(self, rec_id: str) -> None:
        rec = self.records()[rec_id]
        self.registry.release(rec)
        await self.registry.drain()

    def records(self) -> dict[str, ConnRecord]:
        if isinstance(self.registry, RedisRegistry):
            return dict(self.registry.local)
        assert isinstance(self.registry, MemoryRegistry)
        return {c: r for users in self.registry._apps.values() for conns in users.values() for c, r in conns.items()}


def _settings(**kw: Any) -> Any:
    base: dict[str, Any] = {"presence_grace": GRACE, "registry_ttl": TTL, "webhook_url": "http://127.0.0.1:9/hook",
                            "webhook_secret": "s" * 32}
    base.update(kw)
    return make_settings(**base)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def make_backend(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Builds backends (several: several instances on one Redis) of the parametrised kind."""
    kind = str(request.param)
    clients: list[Any] = []
    shared: list[Any] = []

    async def build(**kw: Any) -> Backend:
        settings = _settings(**kw)
        if kind == "memory":
            presence = Presence(settings, Metrics(), "i-mem", None)
            return Backend(kind, presence, MemoryRegistry(presence), None)
        if kind == "redis":
            client: Any = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
        else:
            c: LocalCluster = request.getfixturevalue("local_cluster")
            if not shared:
                c.flushall()
                shared.append(c)
            client = RedisCluster.from_url(c.url)
        clients.append(client)
        presence = Presence(settings, Metrics(), f"i{len(clients)}", client)
        registry = RedisRegistry(client, settings.registry_ttl, cluster=kind == "cluster", presence=presence)
        return Backend(kind, presence, registry, client)

    try:
        yield build
    finally:
        for client in clients:
            await client.aclose()


def _kinds(events: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(e["type"], e["user"]) for e in events]


async def test_first_stream_online_last_stream_offline_after_the_grace(make_backend: Any) -> None:
    b: Backend = await make_backend()
    t0 = time.time()
    assert await b.admit("a1", "alice") and await b.admit("a2", "alice")
    assert _kinds(await b.queue("shop")) == [("user.online", "alice")]  # one, for two streams
    await b.release("a1")
    assert await b.sweep("shop", time.time() + GRACE + 1) == 0  # alice still has a stream: no offline
    await b.release("a2")
    closed = time.time()
    assert await b.presence.online("shop", ["alice"]) == ["alice"]  # online during the grace
    swept = await b.presence.state.sweep("shop", closed + GRACE - 0.1)
    assert swept.changes == 0
    assert swept.next_visit is not None and closed + GRACE - 0.1 < swept.next_visit <= closed + GRACE + 0.001  # due
    assert await b.sweep("shop", closed + GRACE + 0.05) == 1
    assert await b.sweep("shop", closed + GRACE + 5) == 0  # once
    events = await b.queue("shop")
    assert _kinds(events) == [("user.online", "alice"), ("user.offline", "alice")]
    assert int(events[0]["seq"]) < int(events[1]["seq"])
    assert t0 * 1000 - 1 <= int(events[0]["at"]) <= int(events[1]["at"]) <= closed * 1000 + 1
    assert await b.presence.online("shop", ["alice"]) == []


async def test_a_stream_opened_within_the_grace_cancels_the_offline(make_backend: Any) -> None:
    b: Backend = await make_backend()
    await b.admit("a1", "alice")
    await b.release("a1")
    await b.admit("a2", "alice")  # a browser reload
    assert await b.sweep("shop", time.time() + GRACE + 1) == 0
    await b.release("a2")
    closed = time.time()
    assert await b.sweep("shop", closed + GRACE + 0.05) == 1
    assert _kinds(await b.queue("shop")) == [("user.online", "alice"), ("user.offline", "alice")]


@SHARED
async def test_two_instances_one_user_one_online_one_offline(make_backend: Any) -> None:
    a, b = await make_backend(), await make_backend()
    await a.admit("a1", "alice")
    await b.admit("b1", "alice")
    await a.release("a1")
    await b.release("b1")
    closed = time.time()
    # both instances sweep, each several times: the offline is emitted once
    changes = [await x.sweep("shop", closed + GRACE + 0.05 + i) for i in range(3) for x in (a, b)]
    assert sum(changes) == 1
    assert _kinds(await a.queue("shop")) == [("user.online", "alice"), ("user.offline", "alice")]


@SHARED
async def test_a_dead_instances_users_go_offline_once_their_streams_expired(make_backend: Any) -> None:
    dead, alive = await make_backend(), await make_backend()
    admitted = time.time()
    await dead.admit("d1", "alice")  # then its instance dies: no release, no heartbeat
    swept = await alive.presence.state.sweep("shop", admitted + TTL - 0.5)
    assert swept.changes == 0  # not expired yet; the sweep says when it would be
    assert swept.next_visit is not None and admitted + TTL - 0.5 < swept.next_visit < time.time() + TTL + 0.01
    # expired: PRESENCE_GRACE after the last heartbeat is already past (grace < ttl), so the offline goes now
    assert await alive.sweep("shop", admitted + TTL + 0.3) == 1
    assert await alive.sweep("shop", admitted + TTL + 5) == 0
    events = await alive.queue("shop")
    assert _kinds(events) == [("user.online", "alice"), ("user.offline", "alice")]
    assert abs(int(events[1]["at"]) - admitted * 1000) < 1000  # `at`: its last heartbeat (here its admission)


@SHARED
async def test_a_dead_instance_with_a_grace_longer_than_the_ttl(make_backend: Any) -> None:
    dead, alive = await make_backend(presence_grace=10), await make_backend(presence_grace=10)
    admitted = time.time()
    await dead.admit("d1", "alice")
    assert await alive.sweep("shop", admitted + TTL + 0.3) == 0  # found dead; offline due at last beat + grace
    assert await alive.sweep("shop", admitted + 10 - 0.3) == 0
    assert await alive.sweep("shop", admitted + 10 + 0.3) == 1


@SHARED
async def test_a_user_back_on_another_instance_before_the_expiry_stays_online(make_backend: Any) -> None:
    dead, alive = await make_backend(), await make_backend()
    t0 = time.time()
    await dead.admit("d1", "alice")
    await asyncio.sleep(1)
    await alive.admit("b1", "alice")  # the client reconnected elsewhere after the crash
    assert await alive.sweep("shop", t0 + TTL + 0.3) == 0  # "d1" expired, "b1" lives: still online
    assert _kinds(await alive.queue("shop")) == [("user.online", "alice")]
    assert await alive.presence.online("shop", ["alice"]) == ["alice"]


@SHARED
async def test_heartbeat_after_data_loss_announces_online_again(make_backend: Any) -> None:
    b: Backend = await make_backend()
    await b.admit("a1", "alice")
    first = await b.queue("shop")
    if b.kind == "cluster":
        for node in b.redis.get_primaries():
            await b.redis.flushall(target_nodes=node)
    else:
        await b.redis.flushall()
    assert await b.presence.online("shop", ["alice"]) == []
    assert isinstance(b.registry, RedisRegistry)
    await b.registry.refresh()
    assert await b.presence.online("shop", ["alice"]) == ["alice"]
    again = await b.queue("shop")
    assert _kinds(again) == [("user.online", "alice")]
    assert int(again[0]["seq"]) > int(first[0]["seq"])  # seq keeps increasing though Redis lost the last one
    await b.registry.refresh()
    assert len(await b.queue("shop")) == 1  # a known user: nothing more


async def test_one_event_per_user_in_delivery_at_a_time_in_order(make_backend: Any) -> None:
    b: Backend = await make_backend()
    await b.admit("a1", "alice")
    await b.admit("b1", "bob")
    await b.release("a1")
    await b.sweep("shop", time.time() + GRACE + 0.05)  # alice's offline is queued behind her online
    out = b.presence.outbox
    t0 = time.time()
    first = (await out.claim("shop", "c1", 10, lease=30)).events
    assert [(e.change, e.user) for e in first] == [(Change.ONLINE, "alice"), (Change.ONLINE, "bob")]
    held = await out.claim("shop", "c2", 10, lease=30)
    assert held.events == []  # each user's head is leased
    assert held.held_until is not None and t0 + 29 < held.held_until < time.time() + 30.01  # claim again then
    await out.ack("shop", [first[0]])
    nxt = (await out.claim("shop", "c2", 10, lease=30)).events
    assert [(e.change, e.user) for e in nxt] == [(Change.OFFLINE, "alice")]
    assert nxt[0].seq > first[0].seq
    await out.ack("shop", [first[1], nxt[0]])
    assert await b.queue("shop") == []


async def test_a_lease_that_runs_out_is_taken_over(make_backend: Any) -> None:
    b: Backend = await make_backend()
    await b.admit("a1", "alice")
    out = b.presence.outbox
    [ev] = (await out.claim("shop", "dead", 10, lease=0.2)).events
    assert (await out.claim("shop", "other", 10, lease=30)).events == []
    await asyncio.sleep(0.3)
    [again] = (await out.claim("shop", "other", 10, lease=30)).events
    assert (again.id, again.entry) == (ev.id, ev.entry)  # the same event, the same id: at-least-once
    assert await out.extend("shop", "dead", [ev], 30) == [ev]  # the first holder learns it lost it
    assert await out.extend("shop", "other", [again], 30) == []
    await out.abandon("shop", "other", [again])  # a shutdown: the next consumer takes it at once
    [third] = (await out.claim("shop", "third", 10, lease=30)).events
    assert third.entry == ev.entry


async def test_the_queue_cap_drops_the_oldest(make_backend: Any) -> None:
    b: Backend = await make_backend(webhook_queue_max=3)
    await b.admit("u0", "u0")
    [held] = (await b.presence.outbox.claim("shop", "c1", 1, lease=30)).events
    for i in range(1, 5):
        await b.admit(f"u{i}", f"u{i}")
    assert [e["user"] for e in await b.queue("shop")] == ["u2", "u3", "u4"]
    # the lease on the dropped event went with it; acknowledging it later harms nothing
    await b.presence.outbox.ack("shop", [held])
    assert [e.user for e in (await b.presence.outbox.claim("shop", "c2", 10, lease=30)).events] == ["u2", "u3", "u4"]


async def test_without_a_webhook_the_state_is_kept_and_nothing_queued(make_backend: Any) -> None:
    b: Backend = await make_backend(webhook_url=None, webhook_secret=None)
    await b.admit("a1", "alice")
    assert await b.presence.online("shop", ["alice", "bob"]) == ["alice"]
    await b.release("a1")
    assert await b.sweep("shop", time.time() + GRACE + 0.05) == 1
    assert await b.presence.online("shop", ["alice"]) == []
    assert await b.queue("shop") == []


async def test_webhooks_for_some_apps_only(make_backend: Any) -> None:
    b: Backend = await make_backend(webhook_url='{"shop": "http://127.0.0.1:9/shop"}')
    await b.admit("a1", "alice", app="shop")
    await b.admit("a2", "alice", app="blog")
    assert _kinds(await b.queue("shop")) == [("user.online", "alice")]
    assert await b.queue("blog") == []
    assert await b.presence.online("blog", ["alice"]) == ["alice"]


async def test_bulk_query_of_10000_ids(make_backend: Any) -> None:
    b: Backend = await make_backend(webhook_url=None, webhook_secret=None)
    online = {f"user-{i}" for i in range(0, 10_000, 97)}
    for u in sorted(online):
        await b.admit(f"c-{u}", u)
    asked = [f"user-{i}" for i in range(10_000)]
    asked = asked[::-1] + asked[:10]  # any order, repeats
    got = await b.presence.online("shop", asked[:10_000])
    assert got == [u for u in asked[:10_000] if u in online]
    assert await b.presence.online("other-app", asked[:10]) == []


def test_event_body_and_id() -> None:
    ev = PresenceEvent("shop", "alice", Change.ONLINE, 1_764_208_123_456, 1_764_208_123_457, "1-0")
    again = PresenceEvent("shop", "alice", Change.ONLINE, 1_764_208_123_456, 1_764_208_123_457, "9-9")
    assert ev.id == again.id  # stable: from app and seq, not from where it sits in a queue
    assert ev.id != PresenceEvent("blog", "alice", Change.ONLINE, 1, 1_764_208_123_457, "1-0").id
    import json

    assert json.loads(ev.body()) == {"id": ev.id, "type": "user.online", "app": "shop", "user": "alice",
                                     "at": 1_764_208_123_456, "seq": 1_764_208_123_457}


