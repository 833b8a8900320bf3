"""Batch publish and safe retries (docs/publishing.md), on both brokers: `POST /publish/{app}` with a JSON array, its
validation as a whole, its size limits and tenant rules, the Python API, and a publisher that retries every
request three times without any event reaching a stream or history twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as QuartClient
from redis.exceptions import DataError

from quart_sse import keys
from quart_sse.app import create_app
from quart_sse.bodies import is_batch_route
from quart_sse.broker.base import MAX_BATCH_EVENTS, BrokerUnavailable, Outgoing
from quart_sse.broker.redis import PackedConnection, RedisBroker
from quart_sse.broker.seen import SeenIds
from quart_sse.events import EventError, Message
from quart_sse.publisher import Event
from quart_sse.settings import Settings
from tests.support import LiveServer, auth, live_server, open_stream, token
from tests.support_history import until
from tests.support_publish import REPLAYED, read_ids, retried_publishes_reach_each_stream_once

APP = "app1"


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[QuartClient]:
    app = create_app(settings)
    async with app.test_app() as ta:
        yield ta.test_client()


def pub(settings: Settings, app: str = APP, scope: str = "publish") -> dict[str, str]:
    return auth(token(settings, "backend", app, scope))


async def error(resp: Any, status: int) -> str:
    assert resp.status_code == status, (resp.status_code, await resp.get_data())
    body = await resp.get_json()
    assert set(body) == {"error", "message"}, body
    return str(body["message"])


async def head(client: QuartClient) -> Any:
    """The app's newest history position: unchanged means nothing was published."""
    svc = client.app.extensions["quart_sse"]
    return await svc.broker.head(APP, "alice")


# ------------------------------------------------------------------------------------------------ the happy path
async def test_a_batch_reaches_each_stream_in_order_with_its_ids(server: LiveServer) -> None:
    s = server.services.settings
    alice = await open_stream(server.port, headers=auth(token(s, "alice", APP)))
    bob = await open_stream(server.port, headers=auth(token(s, "bob", APP)))
    other = await open_stream(server.port, headers=auth(token(s, "alice", "app2")))
    batch = [{"user": "alice", "type": "t", "data": {"n": 0}, "id": "e0"},
             {"user": "bob", "type": "t", "data": [1]},
             {"type": "news", "data": "to all", "id": "e2"},
             {"user": None, "type": "news", "data": None},
             {"user": "alice", "type": "dm", "data": {"text": "line\nbreak"}, "id": "e4"}]
    try:
        async with httpx.AsyncClient(base_url=server.url) as c:
            r = await c.post(f"/publish/{APP}", json=batch, headers=pub(s))
            assert r.status_code == 202 and REPLAYED not in r.headers, r.text
            body = r.json()
            assert set(body) == {"ids", "duplicates"} and body["duplicates"] == []
            ids = body["ids"]
            assert ids[0] == "e0" and ids[2] == "e2" and ids[4] == "e4" and len(ids) == 5
            for i in (1, 3):  # assigned: consecutive positions, in the batch's order
                assert ids[i] != "" and ids[i] not in ids[:i]
            for user in ("alice", "bob"):
                await c.post(f"/publish/{APP}/{user}", json={"id": f"end-{user}", "type": "end"}, headers=pub(s))
        assert await read_ids(alice, "end-alice") == [ids[0], ids[2], ids[3], ids[4]]
        assert await read_ids(bob, "end-bob") == [ids[1], ids[2], ids[3]]
    finally:
        for st in (alice, bob, other):
            await st.close()
    assert b"e0" not in other.raw and b"to all" not in other.raw  # another app never sees it
    # each event is in history once, in order: a stream resuming after e0 gets the rest of alice's channels
    again = await open_stream(server.port, headers={**auth(token(s, "alice", APP)), "Last-Event-ID": "e0"})
    try:
        assert await read_ids(again, "end-alice") == [ids[2], ids[3], ids[4]]
    finally:
        await again.close()


async def test_a_batch_of_the_maximum_size_is_one_step(client: QuartClient, settings: Settings) -> None:
    batch = [{"user": f"u{i % 37}", "type": "t", "data": {"i": i}, "id": f"id-{i}"} for i in range(MAX_BATCH_EVENTS)]
    r = await client.post(f"/publish/{APP}", json=batch, headers=pub(settings))
    assert r.status_code == 202, await r.get_data()
    body = await r.get_json()
    assert body == {"ids": [f"id-{i}" for i in range(MAX_BATCH_EVENTS)], "duplicates": []}
    replay = await client.app.extensions["quart_sse"].broker.replay(APP, "u5", "id-5")
    assert [m.id for m in replay.messages] == [f"id-{i}" for i in range(42, MAX_BATCH_EVENTS, 37)]
    positions = [m.pos for m in replay.messages]
    assert positions == sorted(positions)


# ------------------------------------------------------------------------------------------------ validation
OK = {"type": "t", "data": 1}
BAD_BATCHES: list[tuple[str, Any, str]] = [
    ("not JSON", b"[{not json", "body:"),
    ("NaN", b'[{"type": "t", "data": NaN}]', "body:"),
    ("empty", [], "events:"),
    ("too many", [OK] * (MAX_BATCH_EVENTS + 1), "events:"),
    ("not an object", [OK, OK, "t"], "events[2]:"),
    ("a nested list", [[OK]], "events[0]:"),
    ("missing type", [OK, {"data": 1}], "events[1].type:"),
    ("type a number", [{"type": 5}], "events[0].type:"),
    ("type with LF", [OK, OK, OK, {"type": "a\nb"}], "events[3].type:"),
    ("type empty", [{"type": ""}], "events[0].type:"),
    ("id with CRLF", [OK, {"type": "t", "id": "1\r\nevent: x"}], "events[1].id:"),
    ("id a number", [{"type": "t", "id": 7}], "events[0].id:"),
    ("user with a colon", [OK] * 17 + [{"type": "t", "user": "a:b"}], "events[17].user:"),
    ("user a number", [{"type": "t", "user": 1}], "events[0].user:"),
    ("user too long", [{"type": "t", "user": "u" * 129}], "events[0].user:"),
    ("extra field", [OK, {"type": "t", "event": "x"}], "events[1].event:"),
    ("data too large", [OK, {"type": "t", "data": "x" * 62_000}], "events[1].data:"),
    ("data too deep", b'[{"type": "t"}, {"type": "t", "data": ' + b"[" * 300 + b"]" * 300 + b"}]", "events[1].data:"),
]


@pytest.mark.parametrize(("body", "prefix"), [(b, p) for _, b, p in BAD_BATCHES], ids=[n for n, _, _ in BAD_BATCHES])
async def test_a_bad_batch_is_400_naming_index_and_field_and_nothing_is_published(
        client: QuartClient, settings: Settings, body: Any, prefix: str) -> None:
    before = await head(client)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**pub(settings), "Content-Type": "application/json"}
    message = await error(await client.post(f"/publish/{APP}", data=raw, headers=headers), 400)
    assert message.startswith(prefix), message
    assert await head(client) == before  # the valid events before the bad one were not published either


async def test_the_first_error_is_named(client: QuartClient, settings: Settings) -> None:
    batch = [OK, {"type": "t", "user": "a b"}, {"type": ""}]
    message = await error(await client.post(f"/publish/{APP}", json=batch, headers=pub(settings)), 400)
    assert message.startswith("events[1].user: not a valid id"), message


async def test_a_json_array_to_a_users_route_is_400(client: QuartClient, settings: Settings) -> None:
    message = await error(await client.post(f"/publish/{APP}/alice", json=[OK], headers=pub(settings)), 400)
    assert message.startswith("body: must be a JSON object") and "POST /publish/{app}" in message


# ------------------------------------------------------------------------------------------------ limits
@pytest.fixture
async def small_limits(settings_factory: Any) -> AsyncIterator[QuartClient]:
    s: Settings = settings_factory(max_body_bytes=4096, max_batch_bytes=64 * 1024)
    app = create_app(s)
    async with app.test_app() as ta:
        yield ta.test_client()


async def test_size_limits(small_limits: QuartClient) -> None:
    c = small_limits
    s = c.app.extensions["quart_sse"].settings
    event = {"type": "t", "data": "x" * 900}
    under = json.dumps([event] * 60).encode()  # ~56 KiB: over MAX_BODY_BYTES, under MAX_BATCH_BYTES
    assert 4096 < len(under) < 64 * 1024
    r = await c.post(f"/publish/{APP}", data=under, headers=pub(s))
    assert r.status_code == 202 and len((await r.get_json())["ids"]) == 60
    over = json.dumps([event] * 80).encode()
    assert len(over) > 64 * 1024
    await error(await c.post(f"/publish/{APP}", data=over, headers=pub(s)), 413)
    # one event keeps MAX_BODY_BYTES, to a user's route and to the broadcast route alike
    big_one = json.dumps({"type": "t", "data": "x" * 5000}).encode()
    await error(await c.post(f"/publish/{APP}/alice", data=big_one, headers=pub(s)), 413)
    await error(await c.post(f"/publish/{APP}", data=big_one, headers=pub(s)), 413)
    await error(await c.post(f"/publish/{APP}", data=b"   " + big_one, headers=pub(s)), 413)
    # and so does every other request: the larger limit is chosen for POST /publish/{app} alone
    assert is_batch_route("POST", f"/publish/{APP}")
    for method, path in [("PUT", f"/publish/{APP}"), ("POST", f"/publish/{APP}/alice"), ("POST", "/publish/"),
                         ("POST", f"/publish/{APP}/"), ("POST", "/sse/ticket"), ("POST", "/demo/token")]:
        assert not is_batch_route(method, path), (method, path)


async def test_a_chunked_batch_over_the_limit_is_413(settings_factory: Any) -> None:
    """Without a Content-Length the limit holds as the body arrives (the server may answer before it is all sent,
    so the client is a raw socket that reads the answer whatever happened to its writes)."""
    s: Settings = settings_factory(max_body_bytes=4096, max_batch_bytes=16 * 1024)
    async with live_server(s) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        head = (f"POST /publish/{APP} HTTP/1.1\r\nHost: x\r\nAuthorization: {pub(s)['Authorization']}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        parts = [b"["] + [json.dumps({"type": "t", "data": "x" * 900}).encode() + b"," for _ in range(40)] + \
            [b'{"type": "t"}]']
        try:
            writer.write(head.encode())
            for part in parts:
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass  # answered and closed before the body was all sent
        status = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert status.split()[1] == b"413", status
        assert await srv.services.broker.head(APP, "alice") is None


# ------------------------------------------------------------------------------------------------ tenant rules
async def test_refusal_order_401_then_400_then_403(client: QuartClient, settings: Settings) -> None:
    bad = [{"type": ""}]
    good = [OK]
    assert (await client.post(f"/publish/{APP}", json=bad)).status_code == 401  # no token, bad body: 401 first
    r = await client.post(f"/publish/{APP}", json=good, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    # a cookie never authorises a publish (cross-site requests carry cookies)
    cookie = {"Cookie": f"{settings.jwt_cookie_name}={token(settings, 'backend', APP, 'publish')}"}
    assert (await client.post(f"/publish/{APP}", json=good, headers=cookie)).status_code == 401
    await error(await client.post("/publish/a:b", json=good, headers=pub(settings)), 400)  # bad path id
    other_app = pub(settings, "app2")
    await error(await client.post(f"/publish/{APP}", json=bad, headers=other_app), 400)  # 400 before 403
    await error(await client.post(f"/publish/{APP}", json=good, headers=other_app), 403)  # another app's token
    no_scope = auth(token(settings, "backend", APP))
    message = await error(await client.post(f"/publish/{APP}", json=good, headers=no_scope), 403)
    assert "publish" in message
    users_own = auth(token(settings, "alice", APP))  # a user's token cannot publish, even to itself
    await error(await client.post(f"/publish/{APP}", json=[{"user": "alice", "type": "t"}], headers=users_own), 403)
    assert await head(client) is None


# ------------------------------------------------------------------------------------------------ safe retries
@pytest.mark.parametrize("concurrent", [False, True], ids=["one-after-another", "racing"])
async def test_a_publisher_retrying_every_request_three_times_publishes_each_event_once(
        server: LiveServer, concurrent: bool) -> None:
    await retried_publishes_reach_each_stream_once(server.url, server.port, server.services.settings, APP,
                                                   concurrent=concurrent)


async def test_an_event_without_an_id_is_published_each_time(client: QuartClient, settings: Settings) -> None:
    """Nothing identifies a retry of an event without an id: documented, and so it is published again."""
    answers = [await (await client.post(f"/publish/{APP}/alice", json=OK, headers=pub(settings))).get_json()
               for _ in range(2)]
    assert answers[0]["id"] != answers[1]["id"]
    r = await client.post(f"/publish/{APP}", json=[OK, OK], headers=pub(settings))
    body = await r.get_json()
    assert body["duplicates"] == [] and len(set(body["ids"])) == 2


async def test_a_partial_retry_names_its_duplicates(client: QuartClient, settings: Settings) -> None:
    first = [{"user": "alice", "type": "t", "id": "a"}, {"type": "t", "id": "b"}]
    r = await client.post(f"/publish/{APP}", json=first, headers=pub(settings))
    assert await r.get_json() == {"ids": ["a", "b"], "duplicates": []}
    second = [{"user": "bob", "type": "t", "id": "a"}, {"type": "t", "id": "b"}, {"user": "alice", "type": "t",
                                                                                   "id": "a"}]
    r = await client.post(f"/publish/{APP}", json=second, headers=pub(settings))
    assert await r.get_json() == {"ids": ["a", "b", "a"], "duplicates": [1, 2]}
    assert REPLAYED not in r.headers  # bob's "a" was new: not a replay as a whole
    metrics = await (await client.get("/metrics")).get_data(as_text=True)
    assert "sse_publish_duplicates_total 2.0" in metrics and "sse_publish_batches_total 2.0" in metrics


@pytest.mark.parametrize(("size", "ttl", "deduplicated"), [(0, 3600, True), (5, 0, False)])
async def test_retries_with_history_off(settings_factory: Any, size: int, ttl: int, deduplicated: bool) -> None:
    """HISTORY_SIZE=0: ids are still remembered for HISTORY_TTL (retries stay safe); HISTORY_TTL=0: no window."""
    s: Settings = settings_factory(history_size=size, history_ttl=ttl)
    app = create_app(s)
    async with app.test_app() as ta:
        c = ta.test_client()
        answers = []
        for _ in range(2):
            r = await c.post(f"/publish/{APP}/alice", json={"type": "t", "id": "x"}, headers=pub(s))
            answers.append((await r.get_json(), r.headers.get(REPLAYED)))
        assert answers == [({"id": "x"}, None), ({"id": "x"}, "true" if deduplicated else None)]


async def test_the_window_is_history_ttl(settings_factory: Any) -> None:
    """Once HISTORY_TTL has passed, the same id is a new event again."""
    s: Settings = settings_factory(history_ttl=1)
    app = create_app(s)
    async with app.test_app() as ta:
        c = ta.test_client()
        first = await c.post(f"/publish/{APP}/alice", json={"type": "t", "id": "x"}, headers=pub(s))
        again = await c.post(f"/publish/{APP}/alice", json={"type": "t", "id": "x"}, headers=pub(s))
        assert REPLAYED not in first.headers and again.headers.get(REPLAYED) == "true"
        await asyncio.sleep(1.1)  # the window itself is what is tested: nothing to await but the clock
        later = await c.post(f"/publish/{APP}/alice", json={"type": "t", "id": "x"}, headers=pub(s))
        assert REPLAYED not in later.headers


# ------------------------------------------------------------------------------------------------ Python API
async def test_publish_many_from_python(server: LiveServer) -> None:
    publisher = server.services.publisher
    s = server.services.settings
    st = await open_stream(server.port, headers=auth(token(s, "alice", APP)))
    try:
        res = await publisher.publish_many(APP, [Event("t", {"n": 1}, user="alice", id="p1"),
                                                 {"type": "news", "data": 2},
                                                 Event("t", 3, user="bob")])
        assert res[0].id == "p1" and not any(r.duplicate for r in res)
        positions = [r.pos for r in res if r.pos is not None]
        assert len(positions) == 3 and positions == sorted(positions)
        again = await publisher.publish_many(APP, [Event("t", {"n": 1}, user="alice", id="p1")])
        assert again[0].duplicate and again[0].id == "p1" and again[0].pos is None
        assert await publisher.publish_many(APP, []) == []
        with pytest.raises(EventError) as exc:
            await publisher.publish_many(APP, [Event("t"), Event("a\nb")])
        assert exc.value.field == "events[1].type"
        with pytest.raises(EventError) as exc:
            await publisher.publish_many(APP, [Event("t", user="x y")])
        assert exc.value.field == "events[0].user"
        with pytest.raises(EventError) as exc:
            await publisher.publish_many(APP, [Event("t", data={1, 2})])
        assert exc.value.field == "events[0].data"
        with pytest.raises(EventError) as exc:
            await publisher.publish_many(APP, [Event("t")] * (MAX_BATCH_EVENTS + 1))
        assert exc.value.field == "events"
        with pytest.raises(EventError) as exc:
            await publisher.publish_many("a:b", [Event("t")])
        assert exc.value.field == "app"
        await publisher.publish(APP, "alice", "end", None, "end-alice")
        assert await read_ids(st, "end-alice") == ["p1", res[1].id]
    finally:
        await st.close()


async def test_history_keys_of_the_seen_ids_expire(settings_factory: Any, broker_kind: str) -> None:
    if broker_kind != "redis":
        pytest.skip("Redis keys")
    s: Settings = settings_factory(history_ttl=60)
    async with live_server(s) as srv:
        await srv.services.publisher.publish_many(APP, [Event("t", user="alice", id="k1"), Event("t", id="k2")])
        redis = srv.services.broker.redis
        for user, member in (("alice", b"k1"), (None, b"k2")):
            key = keys.seen_key(APP, user)
            assert await redis.type(key) == b"zset" and await redis.zrange(key, 0, -1) == [member]
            assert 0 < await redis.pttl(key) <= 60_000


# ------------------------------------------------------------------------------------------------ Redis: one step
@contextlib.asynccontextmanager
async def redis_rig(url: str, **kw: Any) -> AsyncIterator[tuple[RedisBroker, aioredis.Redis, list[Message]]]:
    """A broker listening to alice's, bob's and the broadcast channel, a plain client, and what arrived live."""
    broker = RedisBroker(url, "rig", 1000, 3600, **kw)
    live: list[Message] = []

    async def no_control(payload: bytes) -> None:
        return None

    await broker.start(lambda ch, m: live.append(m), no_control, lambda: None)
    await asyncio.gather(*[broker.subscribe(keys.user_channel(APP, u)) for u in ("alice", "bob")],
                         broker.subscribe(keys.broadcast_channel(APP)))
    client = aioredis.Redis.from_url(url)
    try:
        yield broker, client, live
    finally:
        await client.aclose()
        await broker.close()


async def script_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def outgoing(n: int, users: int = 50, prefix: str = "e") -> list[Outgoing]:
    return [Outgoing(None if i % 7 == 0 else f"u{i % users}", f"{prefix}{i}", "t", b'{"i":%d}' % i) for i in range(n)]


async def test_redis_a_batch_is_one_script_call(redis_url: str) -> None:
    async with redis_rig(redis_url) as (broker, client, _):
        await broker.publish_many(APP, outgoing(1))  # loads the script
        await client.config_resetstat()
        res = await broker.publish_many(APP, outgoing(MAX_BATCH_EVENTS, prefix="f"))
        assert await script_calls(client) == 1
        positions = [r.pos for r in res if r.pos is not None]
        assert len(positions) == MAX_BATCH_EVENTS and positions == sorted(positions)
        assert [p[1] for p in positions] == list(range(positions[0][1], positions[0][1] + MAX_BATCH_EVENTS))


async def test_redis_a_batch_is_all_or_nothing(redis_url: str) -> None:
    """A key of the wrong type anywhere in the batch: refused before its first write, nothing live, nothing kept."""
    async with redis_rig(redis_url) as (broker, client, live):
        await broker.publish_many(APP, [Outgoing("alice", "before", "t", b"0")])
        await until_live(live, 1)
        seq_before = await client.hgetall(keys.seq_key(APP))
        for bad in (keys.history_key(APP, "u30"), keys.seen_key(APP, None)):
            await client.set(bad, "not ours")
            with pytest.raises(BrokerUnavailable):
                await broker.publish_many(APP, outgoing(100))
            await client.delete(bad)
        assert await client.hgetall(keys.seq_key(APP)) == seq_before
        assert await client.exists(keys.history_key(APP, "u1"), keys.seen_key(APP, "u1")) == 0
        res = await broker.publish_many(APP, [Outgoing("alice", "after", "t", b"1")])
        await until_live(live, 2)
        assert [m.id for m in live] == ["before", "after"] and not res[0].duplicate


async def until_live(live: list[Message], n: int) -> None:
    assert await until(lambda: len(live) >= n), f"{len(live)} live messages, expected {n}"


async def test_redis_concurrent_single_publishes_share_script_calls(redis_url: str) -> None:
    async with redis_rig(redis_url) as (broker, client, live):
        await broker.publish(APP, "alice", None, "t", b"0")  # loads the script
        await client.config_resetstat()
        res = await asyncio.gather(*[broker.publish(APP, "alice" if i % 2 else "bob", f"c{i}", "t", b"%d" % i)
                                     for i in range(200)])
        assert [r.id for r in res] == [f"c{i}" for i in range(200)] and not any(r.duplicate for r in res)
        assert await script_calls(client) < 200  # they went together (one call per loop iteration and app)
        await until_live(live, 201)
        assert [m.id for m in live[1:]] == [f"c{i}" for i in range(200)]  # in their order of arrival
        # a culprit in a group fails alone: the others of its loop iteration are published
        await client.set(keys.history_key(APP, "bob"), "not ours")
        outcome = await asyncio.gather(*[broker.publish(APP, "alice" if i % 2 else "bob", f"d{i}", "t", b"1")
                                         for i in range(6)], return_exceptions=True)
        assert [isinstance(o, BrokerUnavailable) for o in outcome] == [True, False] * 3
        await until_live(live, 204)
        assert [m.id for m in live[201:]] == ["d1", "d3", "d5"]


async def test_redis_seen_ids_are_bounded_per_channel(redis_url: str) -> None:
    async with redis_rig(redis_url, max_seen_ids=5) as (broker, client, _):
        for i in range(20):
            await broker.publish(APP, "alice", f"s{i}", "t", b"0")
        key = keys.seen_key(APP, "alice")
        assert await client.zrange(key, 0, -1) == [f"s{i}".encode() for i in range(15, 20)]
        assert (await broker.publish(APP, "alice", "s19", "t", b"0")).duplicate
        assert not (await broker.publish(APP, "alice", "s0", "t", b"0")).duplicate  # forgotten: the newest 5 only


# ------------------------------------------------------------------------------------------------ the in-process index
def test_seen_ids_window_and_bounds() -> None:
    seen = SeenIds(window_ms=1000, max_ids=3)
    seen.add("c", "a", 10_000)
    assert seen.seen("c", "a", 10_999) and seen.seen("c", "a", 11_000) and not seen.seen("c", "a", 11_001)
    assert not seen.seen("other", "a", 10_000)
    for i, t in enumerate((10_100, 10_200, 10_300)):
        seen.add("c", f"x{i}", t)
    assert not seen.seen("c", "a", 10_300)  # the oldest of 4 went: at most 3 per channel
    assert all(seen.seen("c", f"x{i}", 10_300) for i in range(3))
    seen.add("d", "y", 11_300)  # c's newest (10_300) is still in the window
    assert len(seen) == 2 and seen.seen("c", "x2", 11_300)
    seen.add("d", "z", 11_301)  # now it has left: c is forgotten whole
    assert len(seen) == 1 and not seen.seen("c", "x2", 11_301)
    assert not SeenIds(0).enabled and not SeenIds(1000, 0).enabled and SeenIds(1000).enabled


def test_packed_connection_packs_as_redis_py_does() -> None:
    ours, theirs = PackedConnection(), aioredis.Connection()
    for args in [("EVALSHA", "ab" * 20, 3, b"k", "é", 1.5, b"\x00\xff", 10**20), ("CLIENT SETINFO", "LIB-NAME", "x"),
                 (b"CONFIG GET", b"maxmemory"), ("SET", "k", memoryview(b"v"))]:
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args)), args
    for bad in (None, True):  # what hiredis does not take gets redis-py's own error
        with pytest.raises(DataError):
            ours.pack_command("SET", "k", bad)


async def test_redis_a_history_ahead_of_the_sequence_does_not_block_publishing(redis_url: str) -> None:
    """The app's sequence hash lost while its history streams live (an operator's DEL, an eviction): XADD would
    refuse every position at or below the stream's newest; the script moves past it instead, before any write."""
    async with redis_rig(redis_url) as (broker, client, live):
        first = await broker.publish_many(APP, [Outgoing("alice", "h1", "t", b"1"), Outgoing(None, "h2", "t", b"2")])
        assert first[1].pos is not None
        await client.delete(keys.seq_key(APP))
        ahead = f"{first[1].pos[0] + 60_000}-1"  # a minute ahead of the clock, as a lost sequence can leave it
        await client.xadd(keys.history_key(APP, None), {"id": "h2b", "type": "t", "data": "0", "prev": "x"}, id=ahead)
        again = await broker.publish_many(APP, [Outgoing("alice", "h3", "t", b"3"), Outgoing(None, "h4", "t", b"4")])
        assert again[0].pos is not None and again[1].pos is not None
        assert again[0].pos > (first[1].pos[0] + 60_000, 1) and again[1].pos > again[0].pos
        await until_live(live, 4)
        assert [m.id for m in live] == ["h1", "h2", "h3", "h4"]
        assert [m.id for m in (await broker.replay(APP, "alice", "h1")).messages] == ["h2", "h2b", "h3", "h4"]
