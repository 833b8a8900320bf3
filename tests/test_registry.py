"""The Redis registry's heartbeat re-writes what a Redis restart lost, in one script call per app."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from quart_sse.registry import ConnRecord, RedisRegistry


@pytest.mark.parametrize("cluster", [False, True])  # True: seed hashes refreshed outside the script
async def test_refresh_rewrites_after_data_loss(redis_url: str, cluster: bool) -> None:
    r = aioredis.Redis.from_url(redis_url)
    reg = RedisRegistry(r, ttl=30, cluster=cluster)
    try:
        recs = [ConnRecord(f"c{i}", "shop", user, "127.0.0.1") for i, user in enumerate(["alice", "alice", "bob"])]
        for rec in recs:
            assert await reg.admit(rec, cap=0)
        before_app = await reg.list_app("shop")
        await r.flushall()  # what a Redis restart without persistence does
        assert await reg.list_app("shop") == {}
        await reg.refresh()
        assert await reg.list_app("shop") == before_app
        assert set(await reg.list_user("shop", "alice")) == {"c0", "c1"}
        for user in ("alice", "bob"):
            h = await r.hgetall(f"shop:client:{user}")
            assert h == {b"application_id": b"shop", b"user_id": user.encode(),
                         b"channel_id": f"shop:channel:{user}".encode()}
            assert 0 < await r.ttl(f"shop:client:{user}") <= 30
        assert 0 < await r.ttl("sse:{shop}:conns") <= 30
        reg.release(recs[2])
        await reg.drain()
        assert await r.exists("shop:client:bob") == 0  # bob's last stream: the seed hash goes
    finally:
        await r.aclose()


@pytest.mark.slow
async def test_refresh_of_many_streams_is_cheap(redis_url: str) -> None:
    """19,000 streams of one app: one beat takes a few script calls, not 100,000 commands."""
    r = aioredis.Redis.from_url(redis_url)
    reg = RedisRegistry(r, ttl=30)
    try:
        for i in range(19_000):
            rec = ConnRecord(f"c{i}", "big", f"u{i}", "127.0.0.1")
            reg.local[rec.id] = rec  # as if admitted
        t0 = time.process_time()
        await reg.refresh()
        cpu = time.process_time() - t0
        assert await r.zcard("sse:{big}:conns") == 19_000
        assert await r.exists("big:client:u18999") == 1
        print(f"refresh of 19,000 streams: {cpu * 1000:.0f} ms of this process's CPU")
        assert cpu < 1.0  # every 10 s: under 10 % of a core even on a slow machine (measured ~0.1 s)
    finally:
        await r.aclose()


async def test_releases_of_one_moment_go_to_redis_together(redis_url: str) -> None:
    """A shutdown or a DELETE ends thousands of streams at once: one batch (pipelined script calls), awaited once,
    with each user's seed hash gone with its last stream and the others' kept."""
    r = aioredis.Redis.from_url(redis_url)
    reg = RedisRegistry(r, ttl=30)
    try:
        recs = [ConnRecord(f"c{i}", "shop", f"u{i % 300}", "127.0.0.1") for i in range(2500)]
        for rec in recs:
            assert await reg.admit(rec, cap=0)
        await r.script_flush()  # as after a Redis restart: the batch's EVALSHA fails, each falls back to loading it
        for rec in recs[:2400]:  # the last 100 streams, kept, belong to u0..u99
            reg.release(rec)
        assert len(set(reg._releasing.values())) == 1
        await reg.released(recs[0])
        assert not reg._releasing
        assert await r.zcard("sse:{shop}:conns") == 100
        assert set(await reg.list_app("shop")) == {f"u{i % 300}" for i in range(2400, 2500)}
        assert await r.exists("shop:client:u0") == 1 and await r.exists("shop:client:u100") == 0
        reg.release(recs[2400])  # a later moment: a batch of its own
        await reg.drain()
        assert await r.zcard("sse:{shop}:conns") == 99
    finally:
        await r.aclose()


async def test_a_user_at_the_cap_is_admitted_while_the_release_of_its_last_stream_is_on_its_way(
        redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    reg = RedisRegistry(r, ttl=30)
    try:
        old = ConnRecord("old", "shop", "carol", "127.0.0.1")
        assert await reg.admit(old, cap=1)
        for i in range(20):
            reg.release(old)  # the client left; the release has not reached Redis yet
            new = ConnRecord(f"new{i}", "shop", "carol", "127.0.0.1")
            assert await reg.admit(new, cap=1), f"round {i}: the pending release counted against the cap"
            old = new
        assert set(await reg.list_user("shop", "carol")) == {"new19"}
    finally:
        await r.aclose()


@pytest.mark.parametrize("cluster", [False, True])
async def test_a_release_during_a_heartbeat_is_not_undone(redis_url: str, cluster: bool) -> None:
    """The heartbeat re-writes the entries it listed; a stream released while that re-write is on its way must not
    come back (it would be listed and count against its user's cap for REGISTRY_TTL). The refresh is held on its
    way to Redis here, so that the release could reach Redis first: the order a busy pool may give them.
    This is what left registry keys behind in tests/test_churn.py about once in five runs."""
    r = aioredis.Redis.from_url(redis_url)
    reg = RedisRegistry(r, ttl=30, cluster=cluster)
    try:
        gone, stays = ConnRecord("c0", "shop", "alice", "127.0.0.1"), ConnRecord("c1", "shop", "bob", "127.0.0.1")
        assert await reg.admit(gone, cap=0) and await reg.admit(stays, cap=0)
        gate = asyncio.Event()
        real_refresh = reg._refresh

        async def held_refresh(**kw: Any) -> Any:
            await gate.wait()
            return await real_refresh(**kw)

        reg._refresh = held_refresh  # type: ignore[assignment]
        beat = asyncio.create_task(reg.refresh())
        await asyncio.sleep(0.05)  # the beat has listed both entries and is on its way
        reg.release(gone)
        await asyncio.sleep(0.1)  # the release, left alone, reaches Redis now
        gate.set()
        await beat
        await reg.drain()
        assert set(await reg.list_app("shop")) == {"bob"}
        assert await r.exists("shop:client:alice") == 0 and await r.exists("sse:{shop}:u:alice") == 0
        assert await r.exists("shop:client:bob") == 1
    finally:
        await r.aclose()


@pytest.mark.parametrize("cluster", [False, True])
@pytest.mark.parametrize("moment", ["waiting", "answered"])
async def test_an_admission_whose_request_is_cancelled_leaves_nothing(redis_url: str, cluster: bool,
                                                                      moment: str) -> None:
    """The client leaves while its stream is admitted, and Quart cancels the request. "waiting": the cancel comes
    while the admission is on its way to Redis. "answered": it comes after Redis admitted the stream, in the same
    loop iteration, before the request resumed (the await then raises although the place is held); that one left
    an entry listed, counted against the user's cap and online until REGISTRY_TTL (found by CI: 40 clients that
    half-closed after `GET /sse`, on the generator path, one stream listed)."""
    r = aioredis.Redis.from_url(redis_url)
    reg = RedisRegistry(r, ttl=30, cluster=cluster)
    try:
        rec = ConnRecord("c1", "shop", "dora", "127.0.0.1")
        task = asyncio.create_task(reg.admit(rec, cap=1))
        if moment == "answered":
            answer = reg._admitted

            def then_cancel(a: Any, reply: list[Any]) -> None:  # Redis's reply is in: the client leaves now
                answer(a, reply)
                task.cancel()

            reg._admitted = then_cancel  # type: ignore[method-assign]
        else:
            await asyncio.sleep(0)  # the admission is queued for this iteration's pipeline
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the admission's own task ends, then the release goes
            await reg.drain()
            if not reg._admitting_tasks and not reg._releasing:
                break
            await asyncio.sleep(0.01)
        assert await reg.list_user("shop", "dora") == {}
        assert await r.zcard("sse:{shop}:conns") == 0
        assert not reg.local
        assert await reg.admit(ConnRecord("c2", "shop", "dora", "127.0.0.1"), cap=1)  # the cap is free
    finally:
        await r.aclose()
