"""Three real service processes on one real redis-server behave as one service (docs/scaling.md)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support import RedisServer, ServiceProcess, auth, free_port, make_settings, open_stream, token

pytestmark = pytest.mark.slow
SETTINGS = make_settings()  # for minting tokens with the tests' secret


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, list[ServiceProcess]]]:
    redis = RedisServer(tmp_path)
    redis.start()
    env = {"REDIS_URL": redis.url, "REGISTRY_TTL": "3", "PING_INTERVAL": "1", "GRACEFUL_TIMEOUT": "2"}
    procs = [ServiceProcess(free_port(), env, tmp_path / f"svc{i}.log") for i in range(3)]
    try:
        await asyncio.gather(*(p.wait_ready() for p in procs))
        yield redis, procs
    finally:
        for p in procs:
            p.stop()
        redis.stop()


async def _publish(url: str, app: str, user: str | None, body: dict[str, object]) -> dict[str, object]:
    path = f"/publish/{app}" + (f"/{user}" if user else "")
    async with httpx.AsyncClient(base_url=url) as c:
        r = await c.post(path, json=body, headers=auth(token(SETTINGS, "backend", app, "publish")))
        assert r.status_code == 202, r.text
        result: dict[str, object] = r.json()
        return result


async def test_three_instances_behave_as_one(cluster: tuple[RedisServer, list[ServiceProcess]]) -> None:
    _, procs = cluster
    app = "shop"
    streams = [await open_stream(p.port, headers=auth(token(SETTINGS, "alice", app))) for p in procs]
    try:
        assert all(s.status == 200 for s in streams)
        # a publish on any instance reaches the streams on all of them, broadcasts too
        for i, p in enumerate(procs):
            sent = await _publish(p.url, app, "alice", {"type": "t", "data": {"from": i}})
            for s in streams:
                ev = await s.next_event()
                assert ev is not None and ev.id == sent["id"] and ev.json() == {"from": i}
        sent = await _publish(procs[1].url, app, None, {"type": "news", "data": 1})
        for s in streams:
            ev = await s.next_event()
            assert ev is not None and (ev.event, ev.id) == ("news", sent["id"])

        # every instance lists every connection
        ids = {s.headers["x-connection-id"] for s in streams}
        async with httpx.AsyncClient() as c:
            for p in procs:
                r = await c.get(f"{p.url}/connections/{app}", headers=auth(token(SETTINGS, "ops", app, "connections")))
                assert set(r.json()["alice"]) == ids

            # DELETE on one instance closes the streams on all of them
            r = await c.delete(f"{procs[2].url}/connections/{app}/alice",
                               headers=auth(token(SETTINGS, "ops", app, "connections")))
            assert r.json() == {"closed": 3}
        for s in streams:
            assert await s.next_event(timeout=5) is None  # the stream ended
    finally:
        for s in streams:
            await s.close()


async def test_client_moves_between_instances_without_gap(
        cluster: tuple[RedisServer, list[ServiceProcess]]) -> None:
    """Published continuously; the client hops A -> B -> C resuming with its last id: every event exactly once."""
    _, procs = cluster
    app, user = "shop", "bob"
    stop = asyncio.Event()
    published: list[str] = []

    async def publisher() -> None:
        async with httpx.AsyncClient() as c:
            n = 0
            while not stop.is_set():
                p = procs[n % 3]
                r = await c.post(f"{p.url}/publish/{app}" + ("" if n % 4 == 0 else f"/{user}"),
                                 json={"type": "seq", "data": n}, headers=auth(token(SETTINGS, "b", app, "publish")))
                assert r.status_code == 202
                published.append(r.json()["id"])
                n += 1
                await asyncio.sleep(0.003)

    seen: list[str] = []
    first = await open_stream(procs[0].port, headers=auth(token(SETTINGS, user, app)))  # before the first publish
    task = asyncio.create_task(publisher())
    try:
        last: str | None = None
        for hop in range(6):
            hdrs = auth(token(SETTINGS, user, app))
            if last is not None:
                hdrs["Last-Event-ID"] = last
            s = first if hop == 0 else await open_stream(procs[hop % 3].port, headers=hdrs)
            try:
                deadline = time.monotonic() + 0.4
                while time.monotonic() < deadline:
                    ev = await s.next_event(timeout=2)
                    assert ev is not None and ev.event == "seq", ev
                    seen.append(ev.id or "")
                    last = ev.id
            finally:
                await s.close()
        stop.set()
        await task
        # drain what was published after the last hop
        s = await open_stream(procs[0].port, headers={**auth(token(SETTINGS, user, app)), "Last-Event-ID": last or ""})
        try:
            while len(seen) < len(published):
                ev = await s.next_event(timeout=3)
                assert ev is not None
                seen.append(ev.id or "")
        finally:
            await s.close()
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
    assert seen == published  # exactly once, in publish order, across 6 hops between instances


async def test_crashed_instance_entries_expire(cluster: tuple[RedisServer, list[ServiceProcess]], ) -> None:
    redis, procs = cluster
    app = "shop"
    s = await open_stream(procs[0].port, headers=auth(token(SETTINGS, "carol", app)))
    assert s.status == 200
    import redis as redis_lib

    r = redis_lib.Redis.from_url(redis.url)
    try:
        assert r.exists(f"{app}:client:carol") == 1
        procs[0].signal(signal.SIGKILL)
        t0 = time.monotonic()
        async with httpx.AsyncClient() as c:
            while True:
                listing = (await c.get(f"{procs[1].url}/connections/{app}",
                                       headers=auth(token(SETTINGS, "ops", app, "connections")))).json()
                if "carol" not in listing and not r.exists(f"{app}:client:carol"):
                    break
                assert time.monotonic() - t0 < 3 + 1.5, "entries of a dead instance outlived REGISTRY_TTL"
                await asyncio.sleep(0.1)
        # the client reconnects to a live instance
        s2 = await open_stream(procs[1].port, headers=auth(token(SETTINGS, "carol", app)))
        assert s2.status == 200
        await s2.close()
    finally:
        r.close()
        await s.close()
