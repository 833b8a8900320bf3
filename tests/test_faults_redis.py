"""Redis outage (docs/operations.md, section 1): a real redis-server is SIGKILLed for 5 s while events are published.

Open streams stay open and keep pinging, /ready turns 503 and back, the one pub/sub link comes back with backoff and
jitter and resubscribes every channel within 2 s of Redis returning, every stream gets what the restarted Redis's
history holds that it missed (exactly once, in order), and nothing leaks: tasks, Redis connections, memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from quart_sse import keys
from quart_sse.events import parse_position
from quart_sse.publisher import connect
from tests.support import LiveServer, RawStream, RedisServer, auth, live_server, make_settings, open_stream, token
from tests.support_faults import (
    app_task_names,
    app_tasks,
    client_count,
    pubsub_channels,
    redis_client,
    settled_rss_mib,
    until,
)

pytestmark = pytest.mark.slow
OUTAGE = 5.0
# (app, user) of each open stream; "quiet" gets its first event ever only during the outage
STREAMS = [("shop", "alice"), ("shop", "alice"), ("shop", "bob"), ("fresh", "carol"), ("quiet", "dave")]
TARGETS: list[tuple[str, str | None]] = [("shop", "alice"), ("shop", "bob"), ("shop", None), ("fresh", "carol"),
                                         ("fresh", None)]


@dataclass
class Reader:
    stream: RawStream
    app: str
    user: str
    ids: list[str] = field(default_factory=list)
    pings: list[float] = field(default_factory=list)
    ended: bool = False

    async def run(self) -> None:
        while True:
            ev = await self.stream.next_event(timeout=30, skip_ping=False)
            if ev is None:
                self.ended = True
                return
            if ev.event == "ping":
                self.pings.append(time.monotonic())
            else:
                assert ev.id is not None, ev
                self.ids.append(ev.id)


@dataclass
class Published:
    app: str
    user: str | None
    id: str
    link_up: bool


def owed(reader: Reader, published: list[Published]) -> list[str]:
    """What a stream must get: its user's events and its app's broadcasts, in position order."""
    mine = [p for p in published if p.app == reader.app and p.user in (reader.user, None)]
    mine.sort(key=lambda p: parse_position(p.id) or (0, 0))
    return [p.id for p in mine]


@pytest.fixture
async def rig(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisServer, LiveServer]]:
    redis_srv = RedisServer(tmp_path)
    redis_srv.start()
    history = getattr(request, "param", 1000)
    s = make_settings(redis_url=redis_srv.url, ping_interval=0.5, registry_ttl=3, history_size=history)
    try:
        async with live_server(s) as srv:
            yield redis_srv, srv
    finally:
        redis_srv.stop()


async def test_redis_outage_streams_survive_resubscribe_and_resync(rig: tuple[RedisServer, LiveServer]) -> None:
    redis_srv, srv = rig
    svc = srv.services
    s = svc.settings
    link = svc.broker.link
    connects: list[float] = []  # the link's connection attempts (its backoff at work), counted here
    counted_connect = link._connect

    async def counting_connect() -> Any:
        connects.append(time.monotonic())
        return await counted_connect()

    link._connect = counting_connect
    pub_tok = token(s, "backend", "shop", "publish")
    published: list[Published] = []
    paused = asyncio.Event()  # set: the HTTP publisher holds off
    refused = 0
    refused_after_return = 0
    redis_back = False  # publishes started after Redis returned must all succeed (stale pooled connections)

    # Connection: close: the task counts below compare the service's tasks, and a kept-alive connection of this
    # client has a task in the server (two of them once the publisher and a probe overlapped)
    async with httpx.AsyncClient(base_url=srv.url, timeout=10, headers={"Connection": "close"}) as http:
        async def post(app: str, user: str | None, n: int) -> None:
            nonlocal refused, refused_after_return
            up, back = link.connected, redis_back
            r = await http.post(f"/publish/{app}" + (f"/{user}" if user else ""), json={"type": "t", "data": n},
                                headers=auth(token(s, "backend", app, "publish") if app != "shop" else pub_tok))
            if r.status_code == 202:
                published.append(Published(app, user, r.json()["id"], up))
            else:
                assert r.status_code == 503, r.text  # never a 500 while Redis is away
                refused += 1
                refused_after_return += back

        async def publisher() -> None:
            n = 0
            while True:
                if paused.is_set():
                    await asyncio.sleep(0.01)
                    continue
                app, user = TARGETS[n % len(TARGETS)]
                await post(app, user, n)
                n += 1
                await asyncio.sleep(0.01)

        await post("shop", "alice", -1)  # so that "shop" has a history head before its streams open
        published.clear()
        readers = [Reader(await open_stream(srv.port, headers=auth(token(s, u, a))), a, u) for a, u in STREAMS]
        assert all(r.stream.status == 200 for r in readers)
        read_tasks = [asyncio.create_task(r.run()) for r in readers]
        pub_task = asyncio.create_task(publisher())
        r = redis_client(redis_srv.url)
        try:
            await asyncio.sleep(1.0)
            paused.set()
            await asyncio.sleep(0.1)  # no publish in flight when Redis dies: each one is either in history or 503
            await until(lambda: all(rd.ids == owed(rd, published) for rd in readers), 5)
            tasks_before, names_before = app_tasks(), app_task_names()
            conns_before = client_count(r)
            rss_before = settled_rss_mib()
            r.close()

            # ---- the outage
            redis_srv.kill()
            t_kill = time.monotonic()
            paused.clear()
            ready_503 = await until(lambda: _ready(http, 503), 5)
            await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - t_kill)))
            assert refused > 0, "publishing during the outage should have been refused with 503"
            assert not any(rd.ended for rd in readers), "a stream ended during the Redis outage"
            for rd in readers:  # kept pinging: PING_INTERVAL=0.5 over a 5 s outage
                assert sum(1 for t in rd.pings if t > t_kill) >= int(OUTAGE / s.ping_interval) - 2, rd.pings

            # ---- Redis returns, empty. Hold the link back until a burst is in the restarted Redis's history, so
            # that those events can only reach the streams through the resync (no race with a fast reconnect).
            paused.set()
            gate = asyncio.Event()
            real_connect = link._connect

            async def gated_connect() -> object:
                await gate.wait()
                return await real_connect()

            link._connect = gated_connect
            redis_srv.start()
            t_up = time.monotonic()
            redis_back = True
            async with connect(redis_srv.url) as direct:
                for app, user in [*TARGETS, ("quiet", "dave"), ("quiet", None)]:
                    for i in range(3):
                        up = link.connected
                        m = await direct.publish(app, user, "burst", i)
                        assert m.id is not None
                        published.append(Published(app, user, m.id, up))
            burst_s = time.monotonic() - t_up
            gate.set()
            link._connect = real_connect
            assert not any(p.link_up for p in published[-21:]), "the burst should precede the link's return"
            paused.clear()

            r = redis_client(redis_srv.url)
            wanted = {ch for a, u in STREAMS for ch in (keys.user_channel(a, u), keys.broadcast_channel(a))}
            await until(lambda: link.connected and wanted <= pubsub_channels(r), 3, 0.005)
            resubscribed = time.monotonic() - t_up  # the link's own backoff decides this (the burst took ms)
            ready_200 = await until(lambda: _ready(http, 200), 5)
            assert resubscribed < 2.0, f"channels resubscribed {resubscribed:.2f} s after Redis returned"

            # the registry is rewritten by the heartbeat (Redis came back empty)
            listing = await until(lambda: _listed(http, s, readers), 3)
            assert r.exists(keys.seed_client_hash("shop", "alice")) == 1

            await asyncio.sleep(1.0)  # live publishing again
            paused.set()
            await asyncio.sleep(0.1)
            with contextlib.suppress(AssertionError):
                await until(lambda: all(len(rd.ids) >= len(owed(rd, published)) for rd in readers), 5)
            for rd in readers:
                assert len(rd.ids) == len(set(rd.ids)), f"duplicates on {rd.user}'s stream"
                missing = [i for i in owed(rd, published) if i not in rd.ids]
                assert not missing, f"{rd.app}/{rd.user} missed {len(missing)} events: {missing[:10]}"
                assert rd.ids == owed(rd, published), f"{rd.app}/{rd.user}: events out of order"
            assert refused_after_return == 0, "a publish failed after Redis had returned"
            assert svc.metrics.redis_reconnects._value.get() == 1

            # ---- nothing leaked
            with contextlib.suppress(AssertionError):
                await until(lambda: app_tasks() == tasks_before, 3)
            assert app_tasks() == tasks_before, f"{names_before} -> {app_task_names()}"
            subscribed = [c for c in r.client_list() if int(c.get("sub", 0)) + int(c.get("psub", 0)) > 0]
            assert len(subscribed) == 1, subscribed  # exactly the one pub/sub link, the dead one is gone
            conns_after = client_count(r)
            assert conns_after <= max(conns_before, 4), (conns_before, conns_after)
            rss_after = settled_rss_mib()
            assert rss_after - rss_before < 15, (rss_before, rss_after)
            attempts = len(connects)
            assert 3 <= attempts <= 15, f"{attempts} connection attempts in a {OUTAGE:.0f} s outage (backoff?)"
            print(f"\nredis outage: /ready 503 after {ready_503:.2f} s; burst {burst_s * 1000:.0f} ms; "
                  f"resubscribed {resubscribed:.2f} s after Redis returned; /ready 200 after {ready_200:.2f} s; "
                  f"registry rewritten after {listing:.2f} s; {attempts} link attempts; "
                  f"{sum(len(rd.ids) for rd in readers)} events received, {refused} publishes refused; tasks "
                  f"{tasks_before}->{app_tasks()}; redis clients {conns_before}->{conns_after}; "
                  f"RSS {rss_before:.1f}->{rss_after:.1f} MiB")
        finally:
            r.close()
            pub_task.cancel()
            for t in read_tasks:
                t.cancel()
            await asyncio.gather(pub_task, *read_tasks, return_exceptions=True)
            for rd in readers:
                await rd.stream.close()


async def test_live_event_during_resync_does_not_hide_missed_ones(rig: tuple[RedisServer, LiveServer]) -> None:
    """The resync reads history while live events flow again: a live event must wait for the missed ones.

    The resync's history read is held open (a gate in front of the real call) while a live event arrives, which is
    the window in which, without the hold, the stream would send the live event, move its position past the missed
    one, and the resync would then drop the missed one as already seen.
    """
    redis_srv, srv = rig
    svc = srv.services
    s = svc.settings
    link = svc.broker.link
    pub = auth(token(s, "backend", "shop", "publish"))
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
        assert (await http.post("/publish/shop/alice", json={"type": "t", "data": "before"}, headers=pub)).status_code \
            == 202
        st = await open_stream(srv.port, headers=auth(token(s, "alice", "shop")))
        try:
            redis_srv.kill()
            await until(lambda: not link.connected, 5)
            link_gate, replay_gate, in_replay = asyncio.Event(), asyncio.Event(), asyncio.Event()
            real_connect, real_replay = link._connect, svc.broker.replay

            async def gated_connect() -> object:
                await link_gate.wait()
                return await real_connect()

            async def gated_replay(*args: object, **kw: object) -> object:
                if kw.get("known"):  # the resync's read, not a client's resume
                    in_replay.set()
                    await replay_gate.wait()
                return await real_replay(*args, **kw)

            link._connect = gated_connect
            svc.broker.replay = gated_replay
            redis_srv.start()
            async with connect(redis_srv.url) as direct:
                missed = await direct.publish("shop", "alice", "t", "missed")  # while the link is down
            link_gate.set()
            await until(in_replay.is_set, 5)
            delivered = svc.metrics.events_delivered._value.get()
            r = await http.post("/publish/shop/alice", json={"type": "t", "data": "live"}, headers=pub)
            assert r.status_code == 202, r.text
            live_id = r.json()["id"]
            await until(lambda: svc.metrics.events_delivered._value.get() > delivered, 3)  # handed to the stream
            await asyncio.sleep(0.1)  # time for the stream to send it (wrong: the missed one must go first)
            replay_gate.set()
            got = [await st.next_event(timeout=3) for _ in range(2)]
            assert [(e.id, e.json()) for e in got if e] == [(missed.id, "missed"), (live_id, "live")]
            link._connect, svc.broker.replay = real_connect, real_replay
        finally:
            await st.close()


@pytest.mark.parametrize("rig", [3], indirect=True)  # HISTORY_SIZE=3
async def test_outage_longer_than_history_ends_in_a_reset(rig: tuple[RedisServer, LiveServer]) -> None:
    """More was published while the link was down than history holds: the stream is told (event: reset, no id),
    exactly as a resume that history cannot cover, then gets the live events."""
    redis_srv, srv = rig
    svc = srv.services
    s = svc.settings
    link = svc.broker.link
    st = await open_stream(srv.port, headers=auth(token(s, "alice", "shop")))
    try:
        redis_srv.kill()
        await until(lambda: not link.connected, 5)
        gate = asyncio.Event()
        real_connect = link._connect

        async def gated_connect() -> object:
            await gate.wait()
            return await real_connect()

        link._connect = gated_connect
        redis_srv.start()
        async with connect(redis_srv.url, history_size=3) as direct:
            for i in range(6):
                await direct.publish("shop", "alice", "t", i)
        gate.set()
        link._connect = real_connect
        ev = await st.next_event(timeout=5)
        assert ev is not None and ev.event == "reset" and ev.id is None, ev
        assert ev.json()["reason"] == "history trimmed"
        async with httpx.AsyncClient(base_url=srv.url) as http:
            r = await http.post("/publish/shop/alice", json={"type": "t", "data": "live"},
                                headers=auth(token(s, "backend", "shop", "publish")))
        ev = await st.next_event(timeout=3)
        assert ev is not None and (ev.id, ev.json()) == (r.json()["id"], "live")
        assert svc.metrics.resets._value.get() == 1
    finally:
        await st.close()


async def _ready(http: httpx.AsyncClient, status: int) -> bool:
    return (await http.get("/ready")).status_code == status


async def _listed(http: httpx.AsyncClient, s: object, readers: list[Reader]) -> bool:
    want = {rd.stream.headers["x-connection-id"] for rd in readers if rd.app == "shop"}
    got = (await http.get("/connections/shop", headers=auth(token(s, "ops", "shop", "connections")))).json()  # type: ignore[arg-type]
    return {c for conns in got.values() for c in conns} == want
