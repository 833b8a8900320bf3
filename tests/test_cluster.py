"""REDIS_CLUSTER=true against a real local Redis Cluster (docs/scaling.md).

Live traffic goes over sharded pub/sub, routed by slot to the primary that owns each app; history, the registry,
tickets, cluster-wide DELETE and the seed's raw classic PUBLISH keep working; a primary's failover is survived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.crc import key_slot

from quart_sse import keys
from quart_sse.broker.cluster import RedisClusterBroker, node_url, sharded_twin
from tests.cluster_support import ClusterUnavailable, LocalCluster, Node
from tests.support import (
    RawStream,
    ServiceProcess,
    auth,
    free_port,
    live_server,
    make_settings,
    open_stream,
    service_env,
    token,
)
from tests.support_publish import retried_publishes_reach_each_stream_once

pytestmark = pytest.mark.slow
SETTINGS = make_settings()  # mints tokens with the tests' secret


def _start(cluster: LocalCluster) -> None:
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        pytest.fail(f"cannot run a local Redis Cluster: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three primaries, no replicas: shared by the tests that do not break it."""
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), primaries=3)
    _start(c)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def clean(cluster: LocalCluster) -> LocalCluster:
    cluster.flushall()
    return cluster


def cluster_settings(url: str, **kw: Any) -> Any:
    return make_settings(redis_url=url, redis_cluster=True, **kw)


@contextlib.asynccontextmanager
async def streams_of(port: int, *idents: tuple[str, str]) -> AsyncIterator[list[RawStream]]:
    out = []
    try:
        for user, app in idents:
            s = await open_stream(port, headers=auth(token(SETTINGS, user, app)))
            assert s.status == 200, s.raw
            out.append(s)
        yield out
    finally:
        for s in out:
            await s.close()


async def publish(base: str, app: str, user: str | None, body: dict[str, Any]) -> str:
    path = f"/publish/{app}" + (f"/{user}" if user else "")
    async with httpx.AsyncClient(base_url=base) as c:
        r = await c.post(path, json=body, headers=auth(token(SETTINGS, "backend", app, "publish")))
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


def apps_on_distinct_primaries(cluster: LocalCluster, n: int) -> list[str]:
    """App ids whose slots live on `n` different primaries."""
    found: dict[int, str] = {}
    for i in range(1000):
        app = f"app{i}"
        found.setdefault(cluster.owner_of(keys.seq_key(app)).port, app)
        if len(found) == n:
            return list(found.values())
    raise AssertionError("could not spread apps over the primaries")


def shard_subscribers(cluster: LocalCluster, channel: str) -> int:
    c = cluster.owner_of(channel).client()
    try:
        return int(dict(c.execute_command("PUBSUB SHARDNUMSUB", channel)).get(channel.encode(), 0))  # type: ignore[no-untyped-call]
    finally:
        c.close()


def classic_subscribers(cluster: LocalCluster, channel: str) -> int:
    total = 0
    for node in cluster.live_nodes():
        c = node.client()
        try:
            total += int(dict(c.pubsub_numsub(channel)).get(channel.encode(), 0))
        finally:
            c.close()
    return total


async def until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------------------------ names
def test_live_channels_share_the_slot_of_their_app() -> None:
    """What makes the publish script single-slot: history, sequence and the sharded live channel hash alike; the
    seed's names map to their sharded twins, anything else has none."""
    for app, user in (("shop", "alice"), ("a.b@c|d+e-f", "u_1")):
        slot = key_slot(keys.seq_key(app).encode())
        for name in (keys.history_key(app, user), keys.history_key(app, None), keys.sharded_user_channel(app, user),
                     keys.sharded_broadcast_channel(app), keys.app_conns_key(app), keys.user_conns_key(app, user)):
            assert key_slot(name.encode()) == slot, name
        assert sharded_twin(keys.user_channel(app, user)) == keys.sharded_user_channel(app, user)
        assert sharded_twin(keys.broadcast_channel(app)) == keys.sharded_broadcast_channel(app)
    assert sharded_twin(keys.CONTROL_CHANNEL) is None and sharded_twin("x:channel") is None


def test_node_url_keeps_scheme_and_credentials() -> None:
    assert node_url("rediss://user:p%40ss@h1:6379/0", "10.0.0.2", 7000) == "rediss://user:p%40ss@10.0.0.2:7000"
    assert node_url("redis://h1:6379", "::1", 7001) == "redis://[::1]:7001"


# ------------------------------------------------------------------------------------------------------ tests
async def test_sharded_delivery_and_resume_across_instances(clean: LocalCluster, tmp_path: Path) -> None:
    """Two instances (one a real `serve` process configured by env) on the cluster: publishes of apps owned by three
    different primaries reach the streams of both, over sharded channels routed to each owner; resume from history
    works across instances."""
    apps = apps_on_distinct_primaries(clean, 3)
    proc = ServiceProcess(free_port(), {"REDIS_URL": clean.url, "REDIS_CLUSTER": "true"}, tmp_path / "b.log")
    try:
        async with live_server(cluster_settings(clean.url)) as a:
            await proc.wait_ready()
            async with httpx.AsyncClient() as c:
                await until(lambda: _ready(c, proc.url), 10, "instance B ready")
                ready = (await c.get(proc.url + "/ready")).json()
                assert ready["broker"] == "redis-cluster"
            idents = [("alice", app) for app in apps]
            async with streams_of(a.port, *idents) as on_a, streams_of(proc.port, *idents) as on_b:
                broker: RedisClusterBroker = a.services.broker
                routes = broker.routes()
                for app in apps:  # each app's live channel is subscribed at the primary that owns its slot
                    ch = keys.sharded_user_channel(app, "alice")
                    assert routes[ch] == clean.owner_of(ch).addr
                    assert shard_subscribers(clean, ch) == 2  # A and B, at that one node only
                    assert classic_subscribers(clean, keys.user_channel(app, "alice")) == 2  # the seed's name
                assert len({routes[keys.sharded_user_channel(app, "alice")] for app in apps}) == 3

                sent: dict[str, list[str]] = {app: [] for app in apps}
                for i, app in enumerate(apps):
                    for n in range(2):
                        src = proc.url if (i + n) % 2 else a.url
                        sent[app].append(await publish(src, app, "alice", {"type": "t", "data": [app, n]}))
                    sent[app].append(await publish(a.url, app, None, {"type": "news", "data": app}))
                for k, app in enumerate(apps):
                    for s in (on_a[k], on_b[k]):
                        got = [await s.next_event() for _ in range(3)]
                        assert [e.id for e in got if e] == sent[app]  # once each, in order, nothing extra
                        assert [e.event for e in got if e] == ["t", "t", "news"]

                # `python -m quart_sse publish` with REDIS_CLUSTER=true, for an app that REDIS_URL's node does not own
                k = next(i for i, app in enumerate(apps) if clean.owner_of(keys.seq_key(app)) is not clean.nodes[0])
                cli = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "quart_sse", "publish", "--app", apps[k], "--user", "alice", "--type", "cli",
                    '{"n": 1}', env=service_env({"REDIS_URL": clean.url, "REDIS_CLUSTER": "true"}), cwd=tmp_path,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await cli.communicate()
                assert cli.returncode == 0, err.decode()
                cli_id = json.loads(out)["id"]
                sent[apps[k]].append(cli_id)
                for s in (on_a[k], on_b[k]):
                    ev = await s.next_event()
                    assert ev is not None and (ev.id, ev.event) == (cli_id, "cli")

            # resume on the other instance from the first event: the rest, user and broadcast, from history
            app = apps[0]
            hdrs = {**auth(token(SETTINGS, "alice", app)), "Last-Event-ID": sent[app][0]}
            s = await open_stream(proc.port, headers=hdrs)
            try:
                got = [await s.next_event() for _ in range(len(sent[app]) - 1)]
                assert [e.id for e in got if e] == sent[app][1:]
            finally:
                await s.close()
    finally:
        assert proc.stop() == 0, proc.log()


async def test_batches_and_safe_retries_on_the_cluster(clean: LocalCluster) -> None:
    """Batch publishes of apps owned by different primaries: each batch is one script call at its app's primary,
    and a publisher retrying every request three times (one after another, and racing) still gets each event to
    every stream and into history exactly once."""
    apps = apps_on_distinct_primaries(clean, 2)
    settings = cluster_settings(clean.url)
    async with live_server(settings) as srv:
        for app, concurrent in zip(apps, (False, True), strict=True):
            await retried_publishes_reach_each_stream_once(srv.url, srv.port, SETTINGS, app, concurrent=concurrent)
        app = apps[0]
        owner = clean.owner_of(keys.seq_key(app)).client()
        try:
            owner.config_resetstat()
            batch = [{"user": f"u{i % 40}", "type": "t", "data": i, "id": f"big-{i}"} for i in range(1000)]
            async with httpx.AsyncClient(base_url=srv.url) as c:
                r = await c.post(f"/publish/{app}", json=batch, headers=auth(token(SETTINGS, "backend", app,
                                                                                   "publish")))
            assert r.status_code == 202 and r.json()["ids"] == [e["id"] for e in batch], r.text
            stats = owner.info("commandstats")
            assert stats["cmdstat_evalsha"]["calls"] == 1, stats.get("cmdstat_evalsha")
        finally:
            owner.close()


async def _ready(c: httpx.AsyncClient, base: str) -> bool:
    return (await c.get(base + "/ready")).status_code == 200


async def test_seed_names_registry_tickets_and_delete(clean: LocalCluster) -> None:
    """Raw classic PUBLISH on any node reaches streams; the seed hash, listings, tickets and a cluster-wide DELETE
    work with keys spread over the cluster."""
    app = "shop"
    async with live_server(cluster_settings(clean.url)) as a, live_server(cluster_settings(clean.url)) as b, \
            streams_of(a.port, ("alice", app)) as (alice_a,), \
            streams_of(b.port, ("alice", app), ("bob", app)) as (alice_b, bob_b):
        rc = redis.RedisCluster.from_url(clean.url)
        try:
            assert rc.hgetall(keys.seed_client_hash(app, "alice")) == {
                b"application_id": b"shop", b"user_id": b"alice", b"channel_id": b"shop:channel:alice"}
            # the seed's raw PUBLISH, sent to a node that is not REDIS_URL's
            far = clean.nodes[-1].client()
            try:
                far.publish(keys.user_channel(app, "alice"), json.dumps({"id": "r1", "type": "raw", "data": 1}))
                far.publish(keys.broadcast_channel(app), json.dumps({"id": "r2", "type": "rawb", "data": 2}))
            finally:
                far.close()
            for s in (alice_a, alice_b):
                got = [await s.next_event(), await s.next_event()]
                assert [(e.id, e.event) for e in got if e] == [("r1", "raw"), ("r2", "rawb")]
            ev = await bob_b.next_event()
            assert ev is not None and (ev.id, ev.event) == ("r2", "rawb")

            async with httpx.AsyncClient() as c:
                ops = auth(token(SETTINGS, "ops", app, "connections"))
                listing = (await c.get(f"{a.url}/connections/{app}", headers=ops)).json()
                assert set(listing) == {"alice", "bob"} and len(listing["alice"]) == 2
                assert set(listing["alice"]) == {alice_a.headers["x-connection-id"],
                                                 alice_b.headers["x-connection-id"]}

                r = await c.post(f"{a.url}/sse/ticket", headers=auth(token(SETTINGS, "carol", app)))
                assert r.status_code == 201
                tk = r.json()["ticket"]
                carol = await open_stream(b.port, f"/sse?ticket={tk}")
                assert carol.status == 200
                await carol.close()
                again = await open_stream(b.port, f"/sse?ticket={tk}")
                assert again.status == 401  # single use, across instances
                await again.close()

                r = await c.delete(f"{b.url}/connections/{app}/alice", headers=ops)
                assert r.json() == {"closed": 2}  # one on each instance
            for s in (alice_a, alice_b):
                assert await s.next_event(timeout=5) is None
            deadline = time.monotonic() + 5
            while rc.exists(keys.seed_client_hash(app, "alice")):
                assert time.monotonic() < deadline, "the seed hash outlived the last stream"
                await asyncio.sleep(0.05)
            assert rc.exists(keys.seed_client_hash(app, "bob")) == 1
            assert await publish_and_read(a.url, app, "bob", bob_b) == "still-open"
        finally:
            rc.close()


async def publish_and_read(base: str, app: str, user: str, s: RawStream) -> str:
    sent = await publish(base, app, user, {"type": "check", "data": "still-open"})
    ev = await s.next_event()
    assert ev is not None and ev.id == sent
    return str(ev.json())


# ------------------------------------------------------------------------------------------------------ failover
def _sync_replicas(cluster: LocalCluster, primary: Node, timeout: float = 5.0) -> None:
    """Until every replica of `primary` has applied all its writes (so a failover loses nothing acknowledged)."""
    deadline = time.monotonic() + timeout
    c = primary.client()
    try:
        while time.monotonic() < deadline:
            info = c.info("replication")
            slaves = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            if slaves and all(int(s["offset"]) >= int(info["master_repl_offset"]) for s in slaves):
                return
            time.sleep(0.02)
    finally:
        c.close()
    raise AssertionError("replicas did not catch up")


async def test_failover_of_a_primary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start before the cluster exists (503, then ready). A graceful failover of one shard (the old primary drops
    our subscriptions with `sunsubscribe`), then a crash of the primary that owns the app and that REDIS_URL names
    (the classic link's node too): streams stay open, every event accepted while the service re-routes arrives
    once and in order, history resume, raw PUBLISH and DELETE still work."""
    cl = LocalCluster(tmp_path / "c", primaries=3, replicas=1)
    settings = cluster_settings(cl.url, registry_ttl=3)
    try:
        async with live_server(settings) as srv:
            async with httpx.AsyncClient() as c:
                assert (await c.get(srv.url + "/health")).status_code == 200
                assert (await c.get(srv.url + "/ready")).status_code == 503
                early = await open_stream(srv.port, headers=auth(token(SETTINGS, "alice", "shop")),
                                          accept="application/json")
                assert early.status == 503  # not a 500: no node answers yet
                await early.close()
                r = await c.post(srv.url + "/publish/shop/alice", json={"type": "t"},
                                 headers=auth(token(SETTINGS, "b", "shop", "publish")))
                assert r.status_code == 503, r.text
                _start(cl)
                await until(lambda: _ready(c, srv.url), 15, "ready once the cluster exists")
            # `app` lives on the REDIS_URL node (crashed below), `other` on another primary (failed over gracefully)
            app = next(f"app{i}" for i in range(5000) if cl.owner_of(keys.seq_key(f"app{i}")) is cl.nodes[0])
            other = next(f"app{i}" for i in range(5000) if cl.owner_of(keys.seq_key(f"app{i}")) is not cl.nodes[0])
            broker: RedisClusterBroker = srv.services.broker

            def resyncs() -> float:  # streams resynced from history after channels moved: the operators' metric
                return float(srv.services.metrics.redis_reconnects._value.get())

            async with streams_of(srv.port, ("alice", app), ("alice", other)) as (s, s_other):
                accepted = [await publish(srv.url, app, "alice", {"type": "t", "data": n}) for n in range(3)]
                got: list[str] = []
                for _ in range(3):
                    ev = await s.next_event()
                    got.append(ev.id if ev and ev.id else "")
                assert got == accepted

                # 1. graceful: a replica takes over, the old primary drops our subscriptions (sunsubscribe)
                ch_other = keys.sharded_user_channel(other, "alice")
                old = cl.owner_of(ch_other)
                replica = _replica_of(cl, old)
                rc = replica.client()
                try:
                    assert rc.execute_command("CLUSTER FAILOVER")  # type: ignore[no-untyped-call]
                finally:
                    rc.close()
                t0 = time.monotonic()
                await asyncio.to_thread(cl.wait_failover, old, ch_other)
                await until(lambda: _routed_to(broker, ch_other, replica), 10, "re-route after a manual failover")
                print(f"\nmanual failover: streams re-routed {time.monotonic() - t0:.2f} s after CLUSTER FAILOVER")
                sent = await publish(srv.url, other, "alice", {"type": "t", "data": "after-manual"})
                ev = await s_other.next_event()
                assert ev is not None and ev.id == sent
                assert resyncs() == 1

                # 2. crash of the (new) primary while events are published all along. The router is held back
                # until events accepted by the promoted replica sit in the gap, so that the resync is exercised.
                gate = asyncio.Event()
                real_reconcile = broker._reconcile

                async def gated() -> bool:
                    if broker._lost and not gate.is_set():
                        await gate.wait()
                    return await real_reconcile()

                monkeypatch.setattr(broker, "_reconcile", gated)
                ch = keys.sharded_user_channel(app, "alice")
                primary = cl.owner_of(ch)
                assert primary is cl.nodes[0] and broker.classic_node == primary.addr
                _sync_replicas(cl, primary)
                before = len(accepted)
                cl.kill(primary)
                t_kill = time.monotonic()
                stop = asyncio.Event()
                settled = asyncio.Event()
                first_ok: list[float] = []

                async def publisher() -> None:
                    async with httpx.AsyncClient(timeout=10) as c:
                        hdrs = auth(token(SETTINGS, "backend", app, "publish"))
                        n = 0
                        while not stop.is_set():
                            n += 1
                            path = f"/publish/{app}" if n % 3 == 0 else f"/publish/{app}/alice"
                            r = await c.post(srv.url + path, json={"type": "t", "data": n}, headers=hdrs)
                            if r.status_code == 202:
                                accepted.append(r.json()["id"])
                                first_ok.append(time.monotonic())
                                if settled.is_set() and len(accepted) >= mark + 5:
                                    stop.set()  # enough published after the re-route
                            else:
                                assert r.status_code == 503, r.text  # refused while the slot has no primary
                            await asyncio.sleep(0.02)

                mark = 10**9
                task = asyncio.create_task(publisher())
                try:
                    await until(lambda: _count_at_least(accepted, before + 3), 20, "publishes after the failover")
                    assert broker.routes()[ch] == primary.addr  # the stream's channel is still at the dead node
                    gap = len(accepted) - before
                    new_primary = cl.owner_of(ch)
                    t_gate = time.monotonic()
                    gate.set()
                    await until(lambda: _routed_to(broker, ch, new_primary), 15, "re-route after the crash")
                    reroute_s = time.monotonic() - t_gate
                    mark = len(accepted)
                    settled.set()
                    await asyncio.wait_for(task, 20)
                finally:
                    stop.set()
                    gate.set()
                    await asyncio.gather(task, return_exceptions=True)
                while len(got) < len(accepted):
                    ev = await s.next_event(timeout=5)
                    assert ev is not None, "the stream ended during the failover"
                    got.append(ev.id or "")
                assert got == accepted  # each accepted event once, in order, the gap's from history
                assert resyncs() == 2  # the manual failover and the crash each resynced once
                print(f"\ncrash failover: publishes accepted again {first_ok[0] - t_kill:.2f} s after the kill; "
                      f"re-routed {reroute_s:.2f} s after the router was let go; {gap} events of the gap and "
                      f"{len(accepted) - before - gap} after it delivered once, in order")

                # history resume from before the crash, served by the promoted replica
                hdrs = {**auth(token(SETTINGS, "alice", app)), "Last-Event-ID": accepted[1]}
                again = await open_stream(srv.port, headers=hdrs)
                try:
                    first = await again.next_event()
                    assert first is not None and first.id == accepted[2]
                finally:
                    await again.close()

                # the seed's raw PUBLISH still arrives: the classic link left the dead node
                assert broker.classic_node != primary.addr
                live = cl.live_nodes()[0].client()
                try:
                    live.publish(keys.user_channel(app, "alice"), json.dumps({"id": "raw", "type": "r", "data": 0}))
                finally:
                    live.close()
                ev = await s.next_event()
                assert ev is not None and ev.id == "raw"

                async with httpx.AsyncClient() as c:  # DELETE still counts across the control channel
                    r = await c.delete(f"{srv.url}/connections/{app}/alice",
                                       headers=auth(token(SETTINGS, "ops", app, "connections")))
                    assert r.json() == {"closed": 1}
    finally:
        cl.stop()


def _replica_of(cluster: LocalCluster, primary: Node) -> Node:
    c = primary.client()
    try:
        info = c.info("replication")
    finally:
        c.close()
    port = next(int(v["port"]) for k, v in info.items() if k.startswith("slave") and isinstance(v, dict))
    return next(n for n in cluster.nodes if n.port == port)


async def _count_at_least(items: list[str], n: int) -> bool:
    return len(items) >= n


async def _routed_to(broker: RedisClusterBroker, channel: str, node: Node) -> bool:
    return broker.routes().get(channel) == node.addr and await broker.ready()
