"""`POST /presence/{app}` and `GET /presence/{app}/{user}` over real HTTP, on both brokers: tenant rules
(401, then 400, then 403), limits (10,000 ids, 413), answers, and one Redis round trip per bulk query."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import redis

from quart_sse.settings import Settings
from tests.support import LiveServer, auth, live_server, make_settings, open_stream, token


def _h(settings: Settings, sub: str, app: str, scope: str = "") -> dict[str, str]:
    return auth(token(settings, sub, app, scope))


async def test_tenant_rules_and_errors(server: LiveServer, settings: Settings) -> None:
    body = {"users": ["alice"]}
    async with httpx.AsyncClient(base_url=server.url) as c:
        assert (await c.post("/presence/shop", json=body)).status_code == 401
        assert (await c.get("/presence/shop/alice")).status_code == 401
        bad = await c.post("/presence/shop", json=body, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.headers["WWW-Authenticate"].startswith("Bearer")
        other_app = _h(settings, "ops", "blog", "presence")
        # 400 before 403: what you sent is wrong, whoever you are
        r = await c.post("/presence/sh:op", json=body, headers=other_app)
        assert r.status_code == 400 and r.json()["error"] == "bad_request"
        r = await c.post("/presence/shop", json={"users": ["ok", "no way"]}, headers=other_app)
        assert (r.status_code, r.json()["message"].split(":")[0]) == (400, "users[1]")
        # then 403: a token of app X on app Y, a token without scope for anyone
        assert (await c.post("/presence/shop", json=body, headers=other_app)).status_code == 403
        assert (await c.get("/presence/shop/alice", headers=other_app)).status_code == 403
        plain = _h(settings, "alice", "shop")
        r = await c.post("/presence/shop", json=body, headers=plain)
        assert r.status_code == 403 and "'presence'" in r.json()["message"]
        assert (await c.get("/presence/shop/bob", headers=plain)).status_code == 403
        assert (await c.get("/presence/shop/alice", headers=plain)).json() == {"user": "alice", "online": False}
        for scope in ("presence", "connections", "publish presence"):
            r = await c.post("/presence/shop", json=body, headers=_h(settings, "ops", "shop", scope))
            assert r.status_code == 200 and r.json() == {"online": []}
        assert (await c.get("/presence/shop/alice/x", headers=plain)).status_code == 404
        assert (await c.put("/presence/shop", headers=plain)).status_code == 405


@pytest.mark.parametrize(("payload", "field"), [
    (b"not json", "body"), (b"[]", "body"), (b'{"user": []}', "body"), (b'{"users": "alice"}', "users"),
    (b'{"users": [1]}', "users[0]"), (b'{"users": [""]}', "users[0]"), (b'{"users": [], "x": 1}', "x"),
    ('{"users": ["' + "a" * 129 + '"]}', "users[0]"),
])
async def test_bad_bodies_name_the_field(server: LiveServer, settings: Settings, payload: bytes | str,
                                         field: str) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post("/presence/shop", content=payload, headers=_h(settings, "ops", "shop", "presence"))
    assert r.status_code == 400, r.text
    assert r.json()["message"].startswith(field + ":")


async def test_up_to_10000_ids_of_the_longest_length_then_413(server: LiveServer, settings: Settings) -> None:
    hdrs = _h(settings, "ops", "shop", "presence")
    longest = [f"{i:06d}" + "u" * 122 for i in range(10_000)]  # 128 characters each: ~1.3 MB of JSON
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        r = await c.post("/presence/shop", json={"users": longest}, headers=hdrs)
        assert r.status_code == 200 and r.json() == {"online": []}
        assert (await c.post("/presence/shop", json={"users": []}, headers=hdrs)).json() == {"online": []}
        r = await c.post("/presence/shop", json={"users": [*longest, "one-more"]}, headers=hdrs)
        assert r.status_code == 413 and r.json()["error"] == "too_many_users"
        r = await c.post("/presence/shop", content=b'{"users": ["' + b"a" * 2_000_000 + b'"]}', headers=hdrs)
        assert r.status_code == 413  # over the route's body limit: refused unread
        # every other route keeps MAX_BODY_BYTES
        r = await c.post("/publish/shop/alice", content=b'{"type": "t", "data": "' + b"a" * 70_000 + b'"}',
                         headers=_h(settings, "ops", "shop", "publish"))
        assert r.status_code == 413


async def test_answers_follow_streams(server: LiveServer, settings: Settings) -> None:
    hdrs = _h(settings, "ops", "shop", "presence")
    st = await open_stream(server.port, headers=_h(settings, "alice", "shop"))
    try:
        assert st.status == 200
        async with httpx.AsyncClient(base_url=server.url) as c:
            r = await c.post("/presence/shop", json={"users": ["bob", "alice", "alice", "carol"]}, headers=hdrs)
            assert r.json() == {"online": ["alice"]}
            assert (await c.get("/presence/shop/alice", headers=hdrs)).json() == {"user": "alice", "online": True}
            r = await c.get("/presence/shop/alice", headers=_h(settings, "alice", "shop"))
            assert r.json() == {"user": "alice", "online": True}
            assert (await c.post("/presence/blog", json={"users": ["alice"]},
                                 headers=_h(settings, "ops", "blog", "presence"))).json() == {"online": []}
    finally:
        await st.close()


def _command_calls(r: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def test_bulk_query_is_one_redis_command_whatever_the_count(redis_url: str) -> None:
    """The number of Redis round trips of POST /presence/{app} with 1, 100 and 10,000 ids: one ZMSCORE each."""
    settings = make_settings(redis_url=redis_url)
    async with live_server(settings) as srv:
        svc = srv.services
        await svc.presence.sweeper.stop()  # background traffic off, so that every command counted is the query's
        from quart_sse.tasks import cancel_and_wait

        await cancel_and_wait(svc.registry._heartbeat)
        streams = [await open_stream(srv.port, headers=_h(settings, f"user-{i}", "shop")) for i in range(0, 100, 7)]
        try:
            r = redis.Redis.from_url(redis_url)
            hdrs = _h(settings, "ops", "shop", "presence")
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                await c.post("/presence/shop", json={"users": ["warm-up"]}, headers=hdrs)
                for n in (1, 100, 10_000):
                    users = [f"user-{i}" for i in range(n)]
                    before = _command_calls(r)
                    t0 = time.perf_counter()
                    resp = await c.post("/presence/shop", json={"users": users}, headers=hdrs)
                    took = time.perf_counter() - t0
                    after = _command_calls(r)
                    delta = {k: v - before.get(k, 0) for k, v in after.items()
                             if k not in ("info", "ping") and v != before.get(k, 0)}
                    assert resp.status_code == 200
                    assert resp.json()["online"] == [u for u in users if int(u[5:]) % 7 == 0 and int(u[5:]) < 100]
                    assert delta == {"zmscore": 1}, delta
                    print(f"POST /presence with {n} ids: 1 Redis round trip (ZMSCORE), {took * 1000:.1f} ms")
            r.close()
        finally:
            for s in streams:
                await s.close()
