"""Verified tokens are remembered (a backend's publish token is decoded once), never past their exp."""

from __future__ import annotations

import asyncio

from quart_sse.app import create_app
from quart_sse.auth import Identity, TokenCache
from tests.support import auth, make_settings, token


def test_cache_forgets_expired_and_is_bounded() -> None:
    cache = TokenCache(size=2)
    live = Identity("a", "u", frozenset(), exp=2**31)
    dead = Identity("a", "u", frozenset(), exp=1)
    cache.put("t1", live)
    cache.put("t2", dead)
    assert cache.get("t1", 0) is live
    assert cache.get("t2", 0) is None and cache.get("t2", 0) is None  # expired: refused and dropped
    cache.put("t3", live)
    cache.put("t4", live)  # over the bound: the oldest goes
    assert cache.get("t1", 0) is None and cache.get("t4", 0) is live


async def test_a_cached_token_is_refused_once_it_expires() -> None:
    settings = make_settings()
    app = create_app(settings)
    async with app.test_app() as ta:
        client = ta.test_client()
        tok = token(settings, "backend", "shop", "publish", ttl=2)
        r = await client.post("/publish/shop/alice", json={"type": "t", "data": 1}, headers=auth(tok))
        assert r.status_code == 202
        assert app.extensions["quart_sse"].token_cache.get(tok, 0) is not None  # remembered
        bad = tok[:-2] + ("AA" if not tok.endswith("AA") else "BB")  # same claims, broken signature
        r = await client.post("/publish/shop/alice", json={"type": "t", "data": 1}, headers=auth(bad))
        assert r.status_code == 401
        await asyncio.sleep(2.1)  # the condition under test is the token's exp passing
        r = await client.post("/publish/shop/alice", json={"type": "t", "data": 1}, headers=auth(tok))
        assert r.status_code == 401
