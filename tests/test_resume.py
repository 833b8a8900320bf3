"""Resume over real HTTP, on both brokers: Last-Event-ID (header or ?lastEventId=), reset, the seam between replay
and live under full-speed publishing, `retry:`, token expiry, and raw `PUBLISH` being live only."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse

from quart_sse import keys
from quart_sse.events import Message
from quart_sse.settings import Settings
from tests.support import LiveServer, RawStream, SseEvent, auth, live_server, open_stream, token

APP = "app1"


async def publish(srv: LiveServer, user: str | None, body: dict[str, Any]) -> str:
    """Through the HTTP route (it writes history); returns the event id the service answered."""
    s = srv.services.settings
    async with httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.post(f"/publish/{APP}" + (f"/{user}" if user else ""), json=body,
                         headers=auth(token(s, "backend", APP, "publish")))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def stream(srv: LiveServer, user: str, last_id: str | None = None, *, query: bool = False,
                 extra: dict[str, str] | None = None) -> RawStream:
    headers = auth(token(srv.services.settings, user, APP))
    path = "/sse"
    if last_id is not None and query:
        path += "?lastEventId=" + quote(last_id, safe="")
    elif last_id is not None:
        headers["Last-Event-ID"] = last_id
    headers.update(extra or {})
    st = await open_stream(srv.port, path, headers)
    assert st.status == 200, st.raw
    return st


async def events(st: RawStream, n: int, timeout: float = 5.0) -> list[SseEvent]:
    out: list[SseEvent] = []
    for _ in range(n):
        ev = await st.next_event(timeout)
        assert ev is not None, f"stream ended after {out}"
        out.append(ev)
    return out


def assert_reset_first(st: RawStream, ev: SseEvent) -> None:
    """`event: reset`, a JSON object as data, and no `id:` line (it must not move the client's Last-Event-ID)."""
    assert ev.event == "reset" and ev.id is None
    assert isinstance(ev.json(), dict)
    before, sep, _ = bytes(st.raw).partition(b"event: reset\n")
    assert sep and before.endswith(b"\n\n") and b"id:" not in before, "an id line or an event before the reset"


# ------------------------------------------------------------------------------------------------ resume
async def test_last_event_id_header_replays_what_was_missed_then_live(server: LiveServer) -> None:
    first = await publish(server, "alice", {"id": "e1", "type": "t", "data": {"n": 1}})
    missed = [await publish(server, None, {"type": "news", "data": {"n": 2}}),
              await publish(server, "alice", {"type": "t", "data": {"n": 3}})]
    await publish(server, "bob", {"type": "t", "data": {"n": 0}})  # not alice's
    st = await stream(server, "alice", first)
    try:
        got = await events(st, 2)
        assert [(e.id, e.event, e.json()) for e in got] == [(missed[0], "news", {"n": 2}), (missed[1], "t", {"n": 3})]
        live = await publish(server, "alice", {"id": "e4", "type": "t", "data": {"n": 4}})
        ev = await st.next_event()
        assert ev is not None and (ev.id, ev.json()) == (live, {"n": 4}) == ("e4", {"n": 4})
        assert bytes(st.raw).startswith(b"retry: ")
        assert b'id: e4\nevent: t\ndata: {"n":4}\n\n' in st.raw
    finally:
        await st.close()


async def test_last_event_id_query_parameter_resumes_and_the_header_wins(server: LiveServer) -> None:
    odd = "a|b+c@d.e"  # an id that needs URL-encoding
    await publish(server, "alice", {"id": odd, "type": "t", "data": 1})
    nxt = await publish(server, None, {"type": "t", "data": 2})
    st = await stream(server, "alice", odd, query=True)
    try:
        assert [e.id for e in await events(st, 1)] == [nxt]
    finally:
        await st.close()
    st = await open_stream(server.port, "/sse?lastEventId=garbage",
                           {**auth(token(server.services.settings, "alice", APP)), "Last-Event-ID": odd})
    try:
        assert [e.id for e in await events(st, 1)] == [nxt]
    finally:
        await st.close()


async def test_resume_with_httpx_sse_end_to_end(server: LiveServer) -> None:
    """A real client library over real HTTP: it sees the replay, then the live events, ids intact."""
    ids = [await publish(server, "alice", {"id": f"h{i}", "type": "t", "data": {"i": i}}) for i in range(3)]
    ids.append(await publish(server, None, {"type": "bcast", "data": {"i": 3}}))
    headers = {**auth(token(server.services.settings, "alice", APP)), "Last-Event-ID": "h0"}
    got: list[tuple[str, str, Any]] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client, \
            aconnect_sse(client, "GET", "/sse", headers=headers) as source:
        assert source.response.status_code == 200
        retry = None
        async for sse in source.aiter_sse():
            retry = retry or sse.retry
            if not sse.data:  # the opening `retry:` block: a browser dispatches nothing for it
                continue
            got.append((sse.id, sse.event, sse.json()))
            if len(got) == 3:
                ids.append(await publish(server, "alice", {"type": "t", "data": {"i": 4}}))
            if len(got) == 4:
                break
    assert retry == server.services.settings.sse_retry_ms
    assert got == [("h1", "t", {"i": 1}), ("h2", "t", {"i": 2}), (ids[3], "bcast", {"i": 3}), (ids[4], "t", {"i": 4})]


# ------------------------------------------------------------------------------------------------ reset
@pytest.mark.parametrize("last_id", ["never-published", "1-1", "garbage\u00e9", "-", "x" * 257, "y" * 6000])
async def test_an_unknown_garbage_or_oversized_id_starts_with_a_reset(server: LiveServer, last_id: str) -> None:
    await publish(server, "alice", {"id": "known", "type": "t", "data": 0})
    st = await stream(server, "alice", last_id, query=len(last_id) > 300)
    try:
        ev = await st.next_event()
        assert ev is not None
        assert_reset_first(st, ev)
        live = await publish(server, "alice", {"type": "t", "data": 1})
        ev = await st.next_event()
        assert ev is not None and ev.id == live
    finally:
        await st.close()


async def test_trimmed_history_resets_and_so_does_the_next_reconnect(settings_factory: Any) -> None:
    settings: Settings = settings_factory(history_size=3)
    async with live_server(settings) as srv:
        first = await publish(srv, "alice", {"type": "t", "data": 0})
        for i in range(2):
            await publish(srv, "alice", {"type": "t", "data": i})
        for i in range(4):  # the broadcast channel overflows: alice's own history alone is not enough
            await publish(srv, None, {"type": "t", "data": i})
        for _ in range(2):  # a client that reconnects before any live event gets another reset
            st = await stream(srv, "alice", first)
            try:
                ev = await st.next_event()
                assert ev is not None
                assert_reset_first(st, ev)
                assert ev.json()["reason"] == "history trimmed"
            finally:
                await st.close()


async def test_expired_history_resets(settings_factory: Any) -> None:
    settings: Settings = settings_factory(history_ttl=1)
    async with live_server(settings) as srv:
        old = await publish(srv, "alice", {"type": "t", "data": 0})
        broker = srv.services.broker
        for _ in range(100):  # until the broker itself says it is gone (HISTORY_TTL=1)
            if (await broker.replay(APP, "alice", old)).reset is not None:
                break
            await asyncio.sleep(0.05)
        st = await stream(srv, "alice", old)
        try:
            ev = await st.next_event()
            assert ev is not None
            assert_reset_first(st, ev)
        finally:
            await st.close()


async def test_history_off_resets_every_resume(settings_factory: Any) -> None:
    settings: Settings = settings_factory(history_size=0)
    async with live_server(settings) as srv:
        eid = await publish(srv, "alice", {"type": "t", "data": 0})
        st = await stream(srv, "alice", eid)
        try:
            ev = await st.next_event()
            assert ev is not None
            assert_reset_first(st, ev)
            assert ev.json()["reason"] == "history is off"
            live = await publish(srv, "alice", {"type": "t", "data": 1})
            ev = await st.next_event()
            assert ev is not None and ev.id == live
        finally:
            await st.close()


# ------------------------------------------------------------------------------------------------ the seam
async def test_reconnects_under_full_speed_publishing_see_each_event_exactly_once_in_order(
        settings_factory: Any) -> None:
    """A publisher task never pauses while three clients reconnect again and again with their last seen id."""
    settings: Settings = settings_factory(history_size=20_000)
    rnd = random.Random(7)
    users = ["u0", "u1", "u2"]
    async with live_server(settings) as srv:
        pub = srv.services.publisher
        published: list[tuple[str | None, Message]] = []
        stop = asyncio.Event()

        async def publisher() -> None:
            i = 0
            while not stop.is_set():
                target = rnd.choice([*users, None])
                msg = await pub.publish(APP, target, "t", {"i": i}, f"p{i}" if i % 3 == 0 else None)
                published.append((target, msg))
                i += 1
                await asyncio.sleep(0)  # the in-process broker never yields on its own

        seen: dict[str, list[str]] = {u: [] for u in users}
        reconnects_while_publishing = 0

        async def client(user: str) -> None:
            nonlocal reconnects_while_publishing
            crnd = random.Random(user)
            for _ in range(12):
                last = seen[user][-1] if seen[user] else None
                st = await stream(srv, user, last)
                reconnects_while_publishing += last is not None
                try:
                    for _ in range(crnd.randint(1, 40)):
                        ev = await st.next_event(10)
                        if ev is None:  # e.g. closed as a slow consumer: just resume
                            break
                        assert ev.event == "t", f"{user}: unexpected {ev}"
                        assert ev.id is not None
                        seen[user].append(ev.id)
                finally:
                    await st.close()

        task = asyncio.get_running_loop().create_task(publisher())
        try:
            await asyncio.gather(*[client(u) for u in users])
        finally:
            stop.set()
            await task
        assert reconnects_while_publishing >= 30 and len(published) >= 300
        for user in users:  # catch up on what was published since, then compare
            expected = [m.id for t, m in published if t in (user, None)]
            start = expected.index(seen[user][0])
            st = await stream(srv, user, seen[user][-1])
            try:
                while len(seen[user]) < len(expected) - start:
                    ev = await st.next_event(10)
                    assert ev is not None and ev.id is not None
                    seen[user].append(ev.id)
            finally:
                await st.close()
            assert seen[user] == expected[start:], f"{user}: gap, duplicate or disorder"


# ------------------------------------------------------------------------------------------------ retry, expiry
async def test_every_stream_announces_retry_before_its_first_event(settings_factory: Any) -> None:
    settings: Settings = settings_factory(sse_retry_ms=1234)
    async with live_server(settings) as srv:
        eid = await publish(srv, "alice", {"type": "t", "data": 0})
        await publish(srv, "alice", {"type": "t", "data": 1})
        for last in (None, eid, "unknown"):  # fresh, replaying, reset
            st = await stream(srv, "alice", last)
            try:
                first = await asyncio.wait_for(st._read_body(), 5)
                assert first.startswith(b"retry: 1234\n"), first
                st.raw += first
                st._buf += first
                if last is not None:
                    ev = await st.next_event()
                    assert ev is not None and st.retry == 1234
            finally:
                await st.close()


async def _ends_at_exp(srv: LiveServer, user: str, ttl: int, leeway: int) -> None:
    tok = token(srv.services.settings, user, APP, ttl=ttl)
    exp = float(jwt.decode(tok, options={"verify_signature": False})["exp"]) + leeway
    st = await open_stream(srv.port, "/sse", auth(tok))
    try:
        await asyncio.sleep(max(0.0, exp - 0.4 - time.time()))
        eid = await publish(srv, user, {"type": "t", "data": "still open"})
        ev = await st.next_event()
        assert ev is not None and ev.id == eid, "the stream ended before exp"
        raw = await st.read_until_closed(timeout=exp + 3 - time.time())
        ended = time.time()
    finally:
        await st.close()
    assert exp - 0.05 <= ended <= exp + 1.0, f"ended {ended - exp:+.2f} s from exp + leeway"
    assert b": closing token expired\nretry: " in raw


async def test_the_stream_ends_when_its_token_expires_and_not_before(server: LiveServer) -> None:
    await _ends_at_exp(server, "alice", ttl=2, leeway=0)


@pytest.mark.parametrize("broker_kind", ["memory"], indirect=False)
async def test_jwt_leeway_extends_the_stream_past_exp(settings_factory: Any) -> None:
    settings: Settings = settings_factory(jwt_leeway=1)
    async with live_server(settings) as srv:
        await _ends_at_exp(srv, "alice", ttl=1, leeway=1)


# ------------------------------------------------------------------------------------------------ raw PUBLISH
async def test_raw_redis_publish_is_live_only(redis_url: str) -> None:
    from tests.support import make_settings

    settings = make_settings(redis_url=redis_url)
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with live_server(settings) as srv:
            before = await publish(srv, "alice", {"type": "t", "data": 0})
            st = await stream(srv, "alice")
            try:
                raw_body = json.dumps({"id": "raw-1", "type": "seed", "data": {"from": "redis-cli"}})
                assert await client.publish(keys.user_channel(APP, "alice"), raw_body) == 1
                ev = await st.next_event()
                assert ev is not None and (ev.id, ev.event, ev.json()) == ("raw-1", "seed", {"from": "redis-cli"})
            finally:
                await st.close()
            after = await publish(srv, "alice", {"type": "t", "data": 1})
            st = await stream(srv, "alice", before)  # the raw event is not in history: not replayed
            try:
                assert [e.id for e in await events(st, 1)] == [after]
            finally:
                await st.close()
            st = await stream(srv, "alice", "raw-1")  # nor can a client resume from it
            try:
                ev = await st.next_event()
                assert ev is not None
                assert_reset_first(st, ev)
            finally:
                await st.close()
            entries: Any = await client.xrange(keys.history_key(APP, "alice"))
            assert [e[1][b"id"] for e in entries] == [before.encode(), after.encode()]
    finally:
        await client.aclose()
