"""Presence webhooks against real processes (docs/presence.md): `python -m quart_sse serve` instances on a real
redis-server (3 instances), on a real local Redis Cluster (3 instances) and on the in-process broker (1 instance),
posting to a real local HTTP receiver (tests/webhook_receiver.py) that records bodies and headers, answers
500/500/200 when told, and goes down and comes back.

Each test prints the delays it measured (run with -s): online→webhook from the moment the client asked for its
first stream, offline→webhook from the moment it closed its last one (PRESENCE_GRACE included).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import statistics
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster_support import ClusterUnavailable, LocalCluster
from tests.support import (
    RawStream,
    RedisServer,
    ServiceProcess,
    auth,
    free_port,
    make_settings,
    metric_value,
    open_stream,
    token,
)
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.slow
SETTINGS = make_settings()  # mints tokens with the tests' secret
WEBHOOK_SECRET = "webhook-secret-for-tests-" + "w" * 16
GRACE = 2.0
TTL = 5


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
class Deployment:
    kind: str
    procs: list[ServiceProcess]
    receiver: Receiver
    env: dict[str, str]
    tmp: Path
    delays: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    async def restart(self, i: int) -> None:
        """A new process on the same port (the old one has exited)."""
        old = self.procs[i]
        old.stop()
        self.procs[i] = ServiceProcess(old.port, self.env, self.tmp / f"svc{i}-restarted.log")
        await self.procs[i].wait_ready()

    def proc(self, i: int) -> ServiceProcess:
        return self.procs[i % len(self.procs)]

    async def open(self, user: str, app: str, i: int = 0) -> RawStream:
        s = await open_stream(self.proc(i).port, headers=auth(token(SETTINGS, user, app)))
        assert s.status == 200, s.raw
        return s

    def events(self, app: str, user: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.receiver.events()
                if e["app"] == app and (user is None or e["user"] == user) and (kind is None or e["type"] == kind)]

    async def wait_events(self, app: str, n: int, timeout: float, **kw: Any) -> list[dict[str, Any]]:
        await self.receiver.wait_for(lambda _: len(self.events(app, **kw)) >= n, timeout)
        return self.events(app, **kw)

    def arrival(self, event_id: str) -> float:
        return next(r.at for r in self.receiver.accepted() if r.json()["id"] == event_id)

    async def metric(self, name: str, *, only: int | None = None) -> float:
        """A metric summed over the instances (or of instance `only`)."""
        total = 0.0
        async with httpx.AsyncClient(timeout=10) as c:
            for i, p in enumerate(self.procs):
                if only is None or i == only:
                    total += metric_value((await c.get(f"{p.url}/metrics")).text, name)
        return total

    def report(self) -> None:
        for name, values in sorted(self.delays.items()):
            if values:
                print(f"[{self.kind}] {name}: n={len(values)} median {statistics.median(values) * 1000:.0f} ms, "
                      f"max {max(values) * 1000:.0f} ms")


@contextlib.asynccontextmanager
async def deployment(kind: str, tmp: Path, request: pytest.FixtureRequest,
                     **extra_env: str) -> AsyncIterator[Deployment]:
    receiver = Receiver()
    await receiver.start()
    env = {"PRESENCE_GRACE": str(GRACE), "REGISTRY_TTL": str(TTL), "WEBHOOK_URL": receiver.url,
           "WEBHOOK_SECRET": WEBHOOK_SECRET, "WEBHOOK_RETRY_MAX": "1", "PING_INTERVAL": "5",
           "GRACEFUL_TIMEOUT": "2", **extra_env}
    redis: RedisServer | None = None
    n = 3
    if kind == "redis":
        redis = RedisServer(tmp)
        redis.start()
        env["REDIS_URL"] = redis.url
    elif kind == "cluster":
        cluster: LocalCluster = request.getfixturevalue("local_cluster")
        cluster.flushall()
        env.update(REDIS_URL=cluster.url, REDIS_CLUSTER="true")
    else:
        n = 1
    procs = [ServiceProcess(free_port(), env, tmp / f"svc{i}.log") for i in range(n)]
    dep = Deployment(kind, procs, receiver, env, tmp)
    try:
        await asyncio.gather(*(p.wait_ready() for p in procs))
        yield dep
    finally:
        dep.report()
        for p in procs:
            p.stop()
        await receiver.stop()
        if redis is not None:
            redis.stop()


def _signed(dep: Deployment) -> None:
    for r in dep.receiver.received:
        assert r.verifies(WEBHOOK_SECRET.encode()), r.headers
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-webhook-id"] == r.json()["id"]


@pytest.mark.parametrize("kind", ["redis", "cluster", "memory"])
async def test_first_stream_online_last_stream_offline(kind: str, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    """alice on A and B: exactly one user.online; closing A sends nothing; closing B exactly one user.offline,
    between PRESENCE_GRACE and PRESENCE_GRACE + 1 s later."""
    async with deployment(kind, tmp_path, request) as dep:
        t_open = time.time()
        a = await dep.open("alice", "shop", 0)
        b = await dep.open("alice", "shop", 1)
        [online] = await dep.wait_events("shop", 1, 10)
        dep.delays["online->webhook"].append(dep.arrival(online["id"]) - t_open)
        assert (online["type"], online["app"], online["user"]) == ("user.online", "shop", "alice")
        assert await dep.receiver.quiet_for(1.0) == []  # the second stream sent nothing
        await a.close()
        assert await dep.receiver.quiet_for(GRACE + 1.5) == []  # nor did closing one of two
        await b.close()
        t_close = time.time()
        [_, offline] = await dep.wait_events("shop", 2, GRACE + 10)
        took = dep.arrival(offline["id"]) - t_close
        dep.delays["offline->webhook (grace included)"].append(took)
        assert offline["type"] == "user.offline" and offline["seq"] > online["seq"]
        assert GRACE <= took <= GRACE + 1, took
        assert abs(offline["at"] / 1000 - t_close) < 0.5  # `at`: when the last stream closed
        assert await dep.receiver.quiet_for(2.0) == []
        assert len(dep.receiver.received) == 2
        _signed(dep)


@pytest.mark.parametrize("kind", ["redis", "cluster", "memory"])
async def test_a_reconnect_within_the_grace_sends_nothing(kind: str, tmp_path: Path,
                                                          request: pytest.FixtureRequest) -> None:
    async with deployment(kind, tmp_path, request) as dep:
        s = await dep.open("alice", "shop", 0)
        await dep.wait_events("shop", 1, 10)
        for hop in range(1, 4):  # a browser reload, three times, each time onto another instance
            await s.close()
            await asyncio.sleep(GRACE / 3)
            s = await dep.open("alice", "shop", hop)
        assert await dep.receiver.quiet_for(GRACE + 1.5) == []
        await s.close()
        events = await dep.wait_events("shop", 2, GRACE + 10)
        assert [e["type"] for e in events] == ["user.online", "user.offline"]


@pytest.mark.parametrize("kind", ["redis", "cluster"])
async def test_an_instance_restart_does_not_flap(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """SIGTERM ends alice's stream with a `retry:` of up to SSE_RETRY_MS + 10 s; she comes back, to the restarted
    instance, later than PRESENCE_GRACE but within that: nothing is sent. Then she leaves: one user.offline."""
    async with deployment(kind, tmp_path, request) as dep:
        s = await dep.open("alice", "shop", 0)
        await dep.wait_events("shop", 1, 10)
        dep.procs[0].signal(signal.SIGTERM)
        assert b": closing" in await s.read_until_closed(timeout=15)
        closed = time.time()
        await s.close()
        await dep.restart(0)
        await asyncio.sleep(max(0.0, closed + GRACE + 1.5 - time.time()))  # the grace alone would have run out
        s = await dep.open("alice", "shop", 0)
        assert await dep.receiver.quiet_for(2.0) == []
        assert [e["type"] for e in dep.events("shop")] == ["user.online"]
        await s.close()
        await dep.wait_events("shop", 1, GRACE + 10, kind="user.offline")
        assert await dep.receiver.quiet_for(1.0) == []
        assert [e["type"] for e in dep.events("shop")] == ["user.online", "user.offline"]


@pytest.mark.parametrize("kind", ["redis", "cluster"])
async def test_sigkill_of_the_instance_holding_the_only_stream(kind: str, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    """The survivors send alice's user.offline, once, within REGISTRY_TTL + PRESENCE_GRACE of the crash. The
    instance dies right as the receiver gets alice's user.online, before it can acknowledge it: that event is
    delivered again by a survivor once the dead instance's lease on it ran out (at-least-once, same id), ahead of
    the offline (in order per user)."""
    async with deployment(kind, tmp_path, request) as dep:
        s = await dep.open("alice", "shop", 0)
        [online] = await dep.wait_events("shop", 1, 10)
        dep.procs[0].signal(signal.SIGKILL)
        t_kill = time.time()
        [offline] = await dep.wait_events("shop", 1, TTL + GRACE + 5, kind="user.offline")
        took = dep.arrival(offline["id"]) - t_kill
        dep.delays["SIGKILL->offline webhook"].append(took)
        assert took <= TTL + GRACE, took
        assert await dep.receiver.quiet_for(3.0) == []
        events = dep.events("shop")
        assert [e["type"] for e in events][-1] == "user.offline" and len(dep.events("shop", kind="user.offline")) == 1
        assert {e["id"] for e in events if e["type"] == "user.online"} == {online["id"]}  # repeats are the same one
        assert all(p.proc.poll() is None for p in dep.procs[1:])
        await s.close()


@pytest.mark.parametrize("kind", ["redis", "cluster", "memory"])
async def test_500_500_200_same_event_three_times_then_no_more(kind: str, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    async with deployment(kind, tmp_path, request) as dep:
        dep.receiver.scripts["shop"] = deque([500, 500])
        s = await dep.open("alice", "shop", 0)
        await dep.wait_events("shop", 1, 15)
        assert await dep.receiver.quiet_for(2.0) == []
        got = dep.receiver.received
        assert [r.status for r in got] == [500, 500, 200]
        assert len({r.headers["x-webhook-id"] for r in got}) == 1 and len({r.body for r in got}) == 1
        assert [r.headers["x-webhook-attempt"] for r in got] == ["1", "2", "3"]
        _signed(dep)
        assert await dep.metric('sse_webhooks_retried_total{reason="status"}') == 2
        assert await dep.metric('sse_webhooks_sent_total{type="user.online"}') == 1
        await s.close()


@pytest.mark.parametrize("kind", ["redis", "cluster", "memory"])
async def test_a_4xx_is_dropped_and_counted(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    async with deployment(kind, tmp_path, request) as dep:
        dep.receiver.scripts["shop"] = deque([404])
        s = await dep.open("alice", "shop", 0)
        await dep.receiver.wait_for(lambda r: len(r.received) >= 1, 10)
        await s.close()
        events = await dep.wait_events("shop", 1, GRACE + 10)  # the offline still goes; the online is gone
        assert [e["type"] for e in events] == ["user.offline"]
        assert [r.status for r in dep.receiver.received] == [404, 200]
        assert await dep.metric('sse_webhooks_failed_total{reason="rejected"}') == 1


@pytest.mark.parametrize(("kind", "down_for"), [("redis", 60.0), ("cluster", 10.0), ("memory", 10.0)])
async def test_a_receiver_down_gets_every_event_afterwards_in_order_per_user(
        kind: str, down_for: float, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Users come and go on every instance while the receiver refuses connections (60 s on Redis; the other
    brokers run the same scenario for 10 s); once it is back it gets every event, each once, in seq order per
    user."""
    async with deployment(kind, tmp_path, request) as dep:
        await dep.receiver.stop()
        users = [f"u{i}" for i in range(4)]
        cycles: dict[str, int] = defaultdict(int)
        t_end = time.time() + down_for

        async def come_and_go(k: int, user: str) -> None:
            hop = k
            await asyncio.sleep(k * 0.3)
            while time.time() < t_end - GRACE - 1.5:
                s = await dep.open(user, "shop", hop)
                await asyncio.sleep(0.5)
                await s.close()
                cycles[user] += 1
                hop += 1
                await asyncio.sleep(GRACE + 0.7)  # past the grace: each cycle is an online and an offline

        await asyncio.gather(*(come_and_go(k, u) for k, u in enumerate(users)))
        await asyncio.sleep(max(0.0, t_end - time.time()))
        queued = await dep.metric("sse_webhook_queue_depth", only=0)
        oldest = await dep.metric("sse_webhook_oldest_age_seconds", only=0)
        expected = 2 * sum(cycles.values())
        await dep.receiver.start()
        t_up = time.time()
        await dep.wait_events("shop", expected, 60)
        took = time.time() - t_up
        assert await dep.receiver.quiet_for(2.0) == []
        print(f"[{kind}] receiver down {down_for:.0f} s: {expected} events queued (gauge said {queued:.0f}, oldest "
              f"{oldest:.0f} s), all delivered {took:.1f} s after it came back")
        assert queued >= expected - len(users) and oldest >= down_for - GRACE - 4
        events = dep.events("shop")
        assert len(events) == expected and len({e["id"] for e in events}) == expected  # every one, once
        for user in users:
            mine = [e for e in events if e["user"] == user]
            assert [e["type"] for e in mine] == ["user.online", "user.offline"] * cycles[user]
            assert [e["seq"] for e in mine] == sorted(e["seq"] for e in mine)  # delivered in seq order
        _signed(dep)


@pytest.mark.parametrize("kind", ["redis", "cluster", "memory"])
async def test_1000_users_come_and_go_concurrently(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Exactly 1,000 user.online and 1,000 user.offline, none lost or doubled; while they are connected, the bulk
    query with 10,000 ids returns exactly them, on every instance."""
    n = 1000
    async with deployment(kind, tmp_path, request, WEBHOOK_CONCURRENCY="32") as dep:
        users = [f"user-{i:05d}" for i in range(n)]
        sem = asyncio.Semaphore(200)

        asked_at: dict[str, float] = {}
        open_at: dict[str, float] = {}

        async def connect(i: int, user: str) -> RawStream:
            async with sem:
                asked_at[user] = time.time()
                s = await dep.open(user, "crowd", i)
                open_at[user] = time.time()
                return s

        streams = await asyncio.gather(*(connect(i, u) for i, u in enumerate(users)))
        online = await dep.wait_events("crowd", n, 120, kind="user.online")
        arrived = {r.json()["id"]: r.at for r in dep.receiver.accepted()}
        dep.delays["1000 users: request->stream open, per user"] += [open_at[u] - asked_at[u] for u in users]
        dep.delays["1000 users: stream open->online webhook, per user"] += [
            arrived[e["id"]] - open_at[e["user"]] for e in online]

        asked = users + [f"nobody-{i:05d}" for i in range(10_000 - n)]
        random.Random(15).shuffle(asked)
        hdrs = auth(token(SETTINGS, "ops", "crowd", "presence"))
        async with httpx.AsyncClient(timeout=30) as c:
            for p in dep.procs:
                r = await c.post(f"{p.url}/presence/crowd", json={"users": asked}, headers=hdrs)
                assert r.status_code == 200
                assert r.json()["online"] == [u for u in asked if u.startswith("user-")]

        random.Random(16).shuffle(streams)
        t_close = time.time()
        await asyncio.gather(*(s.close() for s in streams))
        offline = await dep.wait_events("crowd", n, 120, kind="user.offline")
        arrived = {r.json()["id"]: r.at for r in dep.receiver.accepted()}
        dep.delays["1000 users: offline->webhook, per user (grace included)"] += [
            arrived[e["id"]] - t_close for e in offline]
        assert await dep.receiver.quiet_for(2.0) == []
        events = dep.events("crowd")
        assert len(events) == 2 * n and len({e["id"] for e in events}) == 2 * n
        by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for e in events:
            by_user[e["user"]].append(e)
        assert sorted(by_user) == users
        for evs in by_user.values():
            assert [e["type"] for e in evs] == ["user.online", "user.offline"] and evs[0]["seq"] < evs[1]["seq"]
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.post(f"{dep.procs[0].url}/presence/crowd", json={"users": asked}, headers=hdrs)
            assert r.json() == {"online": []}
