"""Broker-level history: what `publish` keeps and what `replay` owes a resuming stream, on both brokers.

Both brokers must agree exactly: history is the last HISTORY_SIZE events of each channel (a user's, the app's
broadcast) younger than HISTORY_TTL; a Last-Event-ID resumes after the most recent event with that id; anything
history cannot cover is a reset, never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from quart_sse import keys
from quart_sse.broker.base import Broker, BrokerUnavailable, Published, Replay
from quart_sse.broker.memory import MemoryBroker
from quart_sse.broker.redis import RedisBroker
from quart_sse.broker.seen import MAX_SEEN_IDS
from quart_sse.events import Message, format_position
from quart_sse.publisher import Publisher, connect
from tests.support import ROOT, service_env
from tests.support_history import until

APP = "app1"


@dataclass
class Rig:
    """A broker plus what it delivered live (the hub's `on_message` callback)."""

    broker: Broker
    live: list[tuple[str, Message]] = field(default_factory=list)

    async def listen(self, *channels: str) -> None:
        await asyncio.gather(*[self.broker.subscribe(ch) for ch in channels])

    async def pub(self, user: str | None, event_id: str | None = None, event_type: str = "t",
                  data: bytes = b"{}") -> Published:
        return await self.broker.publish(APP, user, event_id, event_type, data)

    async def wait_live(self, n: int, timeout: float = 5.0) -> None:
        assert await until(lambda: len(self.live) >= n, timeout), f"{len(self.live)} live messages, expected {n}"


MakeRig = Callable[..., Awaitable[Rig]]


async def _no_control(payload: bytes) -> None:
    return None


@pytest.fixture
async def make_rig(broker_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[MakeRig]:
    url = request.getfixturevalue("redis_url") if broker_kind == "redis" else None
    made: list[Broker] = []

    async def make(size: int = 5, ttl: int = 3600, max_seen_ids: int = MAX_SEEN_IDS) -> Rig:
        broker: Broker = RedisBroker(url, f"t{len(made)}", size, ttl, max_seen_ids=max_seen_ids) if url else \
            MemoryBroker(size, ttl, max_seen_ids=max_seen_ids)
        made.append(broker)
        rig = Rig(broker)
        await broker.start(lambda ch, m: rig.live.append((ch, m)), _no_control, lambda: None)
        return rig

    yield make
    for b in made:
        await b.close()


def ids(replay: Replay) -> list[str | None]:
    assert replay.reset is None, replay.reset
    return [m.id for m in replay.messages]


# ------------------------------------------------------------------------------------------------ publish
async def test_publish_keeps_history_and_delivers_live_with_the_same_id_and_position(make_rig: MakeRig) -> None:
    rig = await make_rig()
    await rig.listen(keys.user_channel(APP, "alice"), keys.broadcast_channel(APP))
    first = await rig.pub("alice", "e0")
    m1 = await rig.pub("alice", None, "greeting", b'{"hello":"world"}')
    m2 = await rig.pub(None, "b1", "news", b"[1,2]")
    await rig.wait_live(3)
    assert [(ch, m.id, m.pos) for ch, m in rig.live] == [
        (keys.user_channel(APP, "alice"), "e0", first.pos),
        (keys.user_channel(APP, "alice"), m1.id, m1.pos),
        (keys.broadcast_channel(APP), "b1", m2.pos)]
    wire = b"id: " + m1.id.encode() + b'\nevent: greeting\ndata: {"hello":"world"}\n\n'
    assert rig.live[1][1].frame == wire
    replay = await rig.broker.replay(APP, "alice", "e0")
    assert [(m.id, m.type, m.data, m.pos) for m in replay.messages] == [
        (m1.id, "greeting", b'{"hello":"world"}', m1.pos), ("b1", "news", b"[1,2]", m2.pos)]


async def test_assigned_ids_are_increasing_positions_shared_by_the_apps_channels(make_rig: MakeRig) -> None:
    rig = await make_rig()
    msgs = [await rig.pub(u) for u in ("alice", None, "bob", "alice", None)]
    for m in msgs:
        assert m.pos is not None and m.id == format_position(m.pos)
    positions = [m.pos for m in msgs if m.pos is not None]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    kept = await rig.pub("alice", "my-id")
    assert kept.id == "my-id" and kept.pos is not None and kept.pos > positions[-1]


# ------------------------------------------------------------------------------------------------ replay
async def test_replay_is_the_users_and_the_apps_broadcasts_in_publish_order(make_rig: MakeRig) -> None:
    rig = await make_rig(size=50)
    start = await rig.pub("alice", "start")
    plan = ["alice", None, "bob", None, "alice", "alice", None, "bob"]
    msgs = [await rig.pub(u, None if i % 2 else f"p{i}") for i, u in enumerate(plan)]
    await rig.broker.publish("other-app", "alice", "x", "t", b"{}")  # another app: never replayed
    await rig.broker.publish("other-app", None, "y", "t", b"{}")
    expected = [m.id for u, m in zip(plan, msgs, strict=True) if u != "bob"]
    assert ids(await rig.broker.replay(APP, "alice", start.id or "")) == expected
    # from a broadcast id: the rest of both channels
    assert ids(await rig.broker.replay(APP, "alice", msgs[3].id or "")) == expected[3:]
    assert ids(await rig.broker.replay(APP, "bob", msgs[3].id or "")) == [msgs[6].id, msgs[7].id]
    # up to date: nothing owed, no reset
    up_to_date = await rig.broker.replay(APP, "alice", msgs[6].id or "")
    assert up_to_date.reset is None and up_to_date.messages == [] and up_to_date.after == msgs[6].pos


async def test_replay_after_is_the_newest_replayed_position(make_rig: MakeRig) -> None:
    """The stream drops live copies at or before `after`: it must cover what the replay itself delivered."""
    rig = await make_rig()
    a = await rig.pub("alice")
    await rig.pub(None)
    c = await rig.pub("alice")
    replay = await rig.broker.replay(APP, "alice", a.id or "")
    assert replay.after == c.pos


async def test_publisher_ids_resume_after_the_most_recent_event_with_that_id(make_rig: MakeRig) -> None:
    """An id reused on the other channel is another event (only the same channel deduplicates); a resume is after
    the most recent event with the id."""
    rig = await make_rig(size=20)
    for eid, user in [("a", "alice"), ("b", None), ("c", "alice"), ("a", None), ("d", None)]:
        assert not (await rig.pub(user, eid)).duplicate
    assert ids(await rig.broker.replay(APP, "alice", "a")) == ["d"]
    assert ids(await rig.broker.replay(APP, "alice", "b")) == ["c", "a", "d"]
    assert ids(await rig.broker.replay(APP, "bob", "a")) == ["d"]  # bob only sees the broadcast "a"
    assert (await rig.broker.replay(APP, "bob", "c")).reset == "unknown id"  # alice's id is not bob's


async def test_without_deduplication_a_reused_id_resumes_after_the_most_recent(make_rig: MakeRig) -> None:
    """The replay rule itself, with the seen-ids index off (max_seen_ids=0): the same id twice on one channel."""
    rig = await make_rig(size=20, max_seen_ids=0)
    for eid, user in [("a", "alice"), ("b", None), ("a", "alice"), ("c", "alice"), ("a", None), ("d", None)]:
        assert not (await rig.pub(user, eid)).duplicate
    assert ids(await rig.broker.replay(APP, "alice", "a")) == ["d"]
    assert ids(await rig.broker.replay(APP, "alice", "b")) == ["a", "c", "a", "d"]


async def test_a_publisher_id_equal_to_an_assigned_id_resumes_after_the_newer_event(make_rig: MakeRig) -> None:
    rig = await make_rig()
    first = await rig.pub("alice")
    again = await rig.pub("alice", first.id)  # a publisher reusing the string of an assigned id
    last = await rig.pub(None)
    assert ids(await rig.broker.replay(APP, "alice", first.id or "")) == [last.id]
    assert again.pos is not None


async def test_a_publisher_id_shaped_like_a_future_position_is_found(make_rig: MakeRig) -> None:
    rig = await make_rig()
    e0 = await rig.pub("alice")
    assert e0.pos is not None
    odd = f"{e0.pos[0] + 10**7}-1"
    await rig.pub("alice", odd)
    after = [await rig.pub("alice"), await rig.pub(None)]
    assert ids(await rig.broker.replay(APP, "alice", odd)) == [m.id for m in after]


@pytest.mark.parametrize("last_id", [
    "nope", "", " ", "-", "1-", "-1", "0-0", "1-1", "99999999999999999999999-1", "1-99999999999999999999999",
    "é\u2028", "x" * 256, "x" * 257, "9" * 5000, "1700000000000-1" + "0" * 30])
async def test_an_id_history_does_not_hold_is_a_reset_never_an_error(make_rig: MakeRig, last_id: str) -> None:
    rig = await make_rig()
    await rig.pub("alice", "known")
    await rig.pub(None)
    replay = await rig.broker.replay(APP, "alice", last_id)
    assert replay.reset == "unknown id" and replay.messages == [] and replay.after is None


async def test_a_256_character_publisher_id_resumes(make_rig: MakeRig) -> None:
    rig = await make_rig()
    long_id = "L" * 256
    await rig.pub("alice", long_id)
    nxt = await rig.pub("alice")
    assert ids(await rig.broker.replay(APP, "alice", long_id)) == [nxt.id]


# ------------------------------------------------------------------------------------------------ bounds
async def test_size_bound_is_the_last_size_events_of_the_channel(make_rig: MakeRig) -> None:
    rig = await make_rig(size=5)
    msgs = [await rig.pub("alice", f"e{i}") for i in range(8)]
    # e3..e7 are the last five: resuming from e3 is covered (four missed), from e2 it is not
    assert ids(await rig.broker.replay(APP, "alice", "e3")) == ["e4", "e5", "e6", "e7"]
    assert ids(await rig.broker.replay(APP, "alice", msgs[3].id or "")) == ["e4", "e5", "e6", "e7"]
    for gone in ("e0", "e2"):
        assert (await rig.broker.replay(APP, "alice", gone)).reset is not None
    # far past the bound, with Redis' MAXLEN ~ physically trimming too
    for i in range(8, 260):
        await rig.pub("alice", f"e{i}")
    assert ids(await rig.broker.replay(APP, "alice", "e255")) == ["e256", "e257", "e258", "e259"]
    assert (await rig.broker.replay(APP, "alice", "e254")).reset is not None
    assert (await rig.broker.replay(APP, "alice", "e100")).reset is not None


async def test_more_missed_events_than_history_holds_in_the_other_channel_is_a_reset(make_rig: MakeRig) -> None:
    rig = await make_rig(size=5)
    await rig.pub("alice", "mine")
    bcasts = [await rig.pub(None, f"b{i}") for i in range(5)]
    assert ids(await rig.broker.replay(APP, "alice", "mine")) == [m.id for m in bcasts]  # exactly the bound
    await rig.pub(None, "b5")  # b0 leaves the broadcast history: "mine" no longer covers the gap
    replay = await rig.broker.replay(APP, "alice", "mine")
    assert replay.reset == "history trimmed" and replay.messages == []
    # and the other way round: a broadcast id, more user events than the user's history holds
    await rig.pub(None, "anchor")
    for i in range(6):
        await rig.pub("alice", f"u{i}")
    assert (await rig.broker.replay(APP, "alice", "anchor")).reset == "history trimmed"
    assert ids(await rig.broker.replay(APP, "bob", "anchor")) == []


async def test_age_bound_events_older_than_the_ttl_cannot_be_resumed_from(make_rig: MakeRig) -> None:
    rig = await make_rig(size=50, ttl=1)
    old = await rig.pub("alice", "old")
    nxt = await rig.pub("alice")
    assert ids(await rig.broker.replay(APP, "alice", "old")) == [nxt.id]  # young: covered
    assert old.pos is not None
    deadline = time.monotonic() + 5
    replay = await rig.broker.replay(APP, "alice", "old")
    while replay.reset is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        replay = await rig.broker.replay(APP, "alice", "old")
    age_ms = time.time() * 1000 - old.pos[0]
    assert replay.reset is not None, "never expired"
    assert age_ms >= 1000 - 5, f"expired after {age_ms:.0f} ms, before HISTORY_TTL"
    fresh = await rig.pub("alice", "fresh")
    last = await rig.pub(None)
    assert ids(await rig.broker.replay(APP, "alice", "fresh")) == [last.id]
    assert fresh.pos is not None


@pytest.mark.parametrize(("size", "ttl"), [(0, 3600), (5, 0)])
async def test_history_off_publishes_live_only(make_rig: MakeRig, size: int, ttl: int) -> None:
    rig = await make_rig(size=size, ttl=ttl)
    await rig.listen(keys.user_channel(APP, "alice"))
    m = await rig.pub("alice")
    await rig.pub("alice", "given")
    assert m.pos is not None and m.id == format_position(m.pos)
    await rig.wait_live(2)
    assert [x.id for _, x in rig.live] == [m.id, "given"]
    for last in (m.id or "", "given"):
        assert (await rig.broker.replay(APP, "alice", last)).reset == "history is off"
    if isinstance(rig.broker, RedisBroker):
        assert await rig.broker.redis.exists(keys.history_key(APP, "alice")) == 0


async def test_resync_from_a_known_position(make_rig: MakeRig) -> None:
    """After a Redis outage the service replays from each stream's last position, which may be any position."""
    rig = await make_rig(size=5)
    a = await rig.pub("alice")
    b = await rig.pub(None)
    c = await rig.pub("bob")
    assert a.pos and c.pos
    assert ids(await rig.broker.replay(APP, "alice", format_position(a.pos), known=True)) == [b.id]
    assert ids(await rig.broker.replay(APP, "alice", format_position(c.pos), known=True)) == []
    for _ in range(6):
        await rig.pub("alice")
    assert (await rig.broker.replay(APP, "alice", format_position(a.pos), known=True)).reset is not None


# ------------------------------------------------------------------------------------------------ Redis only
@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def redis_brokers(url: str, n: int, size: int = 1000, ttl: int = 3600) -> AsyncIterator[list[RedisBroker]]:
    brokers = [RedisBroker(url, f"x{i}", size, ttl) for i in range(n)]
    try:
        yield brokers
    finally:
        for b in brokers:
            await b.close()


async def test_redis_keeps_history_bounded_and_expiring(redis_url: str, redis_client: aioredis.Redis) -> None:
    async with redis_brokers(redis_url, 1, size=5, ttl=60) as (b,):
        for _ in range(400):
            await b.publish(APP, "alice", None, "t", b"{}")
        key = keys.history_key(APP, "alice")
        assert 5 <= await redis_client.xlen(key) <= 5 + 200  # MAXLEN ~ trims whole nodes
        assert 0 < await redis_client.pttl(key) <= 60_000


async def test_redis_detects_a_gap_trimmed_by_a_publisher_with_a_smaller_history(redis_url: str) -> None:
    """Streams trimmed behind the replaying instance's back (another HISTORY_SIZE, an operator's XTRIM): reset."""
    async with redis_brokers(redis_url, 2) as (small, big):
        small._size = 3
        anchor = await big.publish(APP, "alice", "anchor", "t", b"{}")
        for _ in range(250):
            await small.publish(APP, None, None, "t", b"{}")  # MAXLEN ~ 3: physically trims the broadcasts
        assert anchor.pos
        assert (await big.replay(APP, "alice", "anchor")).reset == "history trimmed"
        assert (await big.replay(APP, "alice", format_position(anchor.pos), known=True)).reset == "history trimmed"
        await big.redis.xtrim(keys.history_key(APP, None), maxlen=0)  # an operator empties it: nothing newer owed
        assert ids(await big.replay(APP, "alice", "anchor")) == []


async def test_redis_publish_is_one_atomic_script(redis_url: str, redis_client: aioredis.Redis) -> None:
    """Concurrent publishers on separate connections: live order == position order == history order."""
    live: list[tuple[str, Message]] = []
    async with redis_brokers(redis_url, 5) as (listener, *pubs):
        await listener.start(lambda ch, m: live.append((ch, m)), _no_control, lambda: None)
        await asyncio.gather(listener.subscribe(keys.user_channel(APP, "alice")),
                             listener.subscribe(keys.broadcast_channel(APP)))
        await redis_client.config_resetstat()

        async def burst(b: RedisBroker, k: int) -> None:
            for i in range(60):
                await b.publish(APP, "alice" if (i + k) % 3 else None, f"{k}:{i}" if i % 2 else None, "t", b"{}")

        await asyncio.gather(*[burst(b, k) for k, b in enumerate(pubs)])
        n = 60 * len(pubs)
        await until(lambda: len(live) >= n)
        stats = await redis_client.info("commandstats")
        assert len(live) == n
        positions = [m.pos for _, m in live]
        assert all(p is not None for p in positions) and positions == sorted(positions)  # type: ignore[type-var]
        hist: list[Any] = [*cast(Any, await redis_client.xrange(keys.history_key(APP, "alice"))),
                           *cast(Any, await redis_client.xrange(keys.history_key(APP, None)))]
        hist.sort(key=lambda e: tuple(int(x) for x in e[0].split(b"-")))
        assert [(e[0].decode(), e[1][b"id"].decode()) for e in hist] == \
            [(format_position(m.pos), m.id) for _, m in live if m.pos]
        # one round trip per publish: a script call each, no separate XADD/PUBLISH from the clients
        calls = sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
        assert calls == n
        # a failing script publishes nothing live: the history key of the wrong type makes XADD fail first
        await redis_client.set(keys.history_key(APP, "bob"), "not a stream")
        await listener.subscribe(keys.user_channel(APP, "bob"))
        with pytest.raises(BrokerUnavailable):
            await pubs[0].publish(APP, "bob", "lost", "t", b"{}")
        await pubs[0].publish(APP, None, "sentinel", "t", b"{}")
        await until(lambda: live[-1][1].id == "sentinel")
        assert live[-1][1].id == "sentinel" and all(m.id != "lost" for _, m in live)


async def test_python_api_and_cli_publish_write_history(redis_url: str) -> None:
    async with connect(redis_url, 5, 60) as pub:
        assert isinstance(pub, Publisher)
        first = await pub.publish(APP, "alice", "t", {"n": 1}, "api-1")
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "quart_sse", "publish", "--app", APP, "--user", "alice", "--type", "t",
         "--id", "cli-1", '{"n": 2}'],
        env=service_env({"REDIS_URL": redis_url, "HISTORY_SIZE": "5"}), cwd=ROOT, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    async with redis_brokers(redis_url, 1, size=5) as (b,):
        replay = await b.replay(APP, "alice", first.id or "")
        assert [(m.id, m.data) for m in replay.messages] == [("cli-1", b'{"n":2}')]


async def test_memory_broker_forgets_channels_whose_history_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every user who ever got an event must not keep a history entry for good: once a channel's newest event is
    older than HISTORY_TTL, the channel is forgotten (the next publish anywhere sweeps it)."""
    now = [1_000_000.0]
    monkeypatch.setattr("quart_sse.broker.memory.time.time", lambda: now[0])
    broker = MemoryBroker(history_size=10, history_ttl=60)
    for i in range(500):
        await broker.publish("shop", f"u{i}", None, "t", b"1")
    assert len(broker._history) == 500
    now[0] += 30
    await broker.publish("shop", "u7", None, "t", b"2")  # u7 is fresh again
    now[0] += 31  # the other 499 are 61 s old now, u7's newest 31 s
    await broker.publish("shop", "late", None, "t", b"3")
    assert set(broker._history) == {keys.history_key("shop", "u7"), keys.history_key("shop", "late")}
    replay = await broker.replay("shop", "u3", "1000000000-4")
    assert replay.reset == "unknown id"  # a resume into forgotten history is a reset, as when it is trimmed
