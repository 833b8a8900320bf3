"""The disconnect API and the connection limits (docs/operations.md, sections 5 and 6), across two service processes on
one Redis.

DELETE /connections/{app}/{user} closes the user's streams on every instance through the control channel and
answers how many. MAX_CONNECTIONS_PER_USER holds across instances (429), MAX_CONNECTIONS per process (503), both as
JSON for a client that asks for JSON, and for an EventSource (which stops for good on any non-200 answer) 200 with
a jittered `retry:` and `: refused <code>`; a stream that ends gives its place back before its client can see the
end, so reconnecting at once works.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from quart_sse import keys
from tests.support import (
    RawStream,
    RedisServer,
    ServiceProcess,
    auth,
    free_port,
    make_settings,
    open_stream,
    refusal,
    token,
)
from tests.support_faults import redis_client, until

pytestmark = pytest.mark.slow
SETTINGS = make_settings()
APP = "shop"
CAP_USER = 2
CAP_PROCESS = 4


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, ServiceProcess, ServiceProcess]]:
    """A (MAX_CONNECTIONS=4) and B (no per-process cap), both MAX_CONNECTIONS_PER_USER=2, on one Redis."""
    redis_srv = RedisServer(tmp_path)
    redis_srv.start()
    env = {"REDIS_URL": redis_srv.url, "MAX_CONNECTIONS_PER_USER": str(CAP_USER), "GRACEFUL_TIMEOUT": "2",
           "PING_INTERVAL": "5"}
    a = ServiceProcess(free_port(), {**env, "MAX_CONNECTIONS": str(CAP_PROCESS)}, tmp_path / "a.log")
    b = ServiceProcess(free_port(), env, tmp_path / "b.log")
    try:
        await asyncio.gather(a.wait_ready(), b.wait_ready())
        yield redis_srv, a, b
    finally:
        a.stop()
        b.stop()
        redis_srv.stop()


class Streams:
    """Every stream a test opens, closed at the end whatever happens."""

    def __init__(self) -> None:
        self.all: list[RawStream] = []

    async def open(self, proc: ServiceProcess, user: str, accept: str = "text/event-stream") -> RawStream:
        st = await open_stream(proc.port, headers=auth(token(SETTINGS, user, APP)), accept=accept)
        self.all.append(st)
        return st

    async def close(self) -> None:
        for st in self.all:
            await st.close()


@pytest.fixture
async def streams() -> AsyncIterator[Streams]:
    s = Streams()
    try:
        yield s
    finally:
        await s.close()


def _error(st: RawStream) -> str:
    assert st.headers["content-type"].startswith("application/json"), st.headers
    body = orjson.loads(bytes(st.raw))
    assert set(body) == {"error", "message"}, body
    return str(body["error"])


async def test_disconnect_closes_the_users_streams_on_every_instance(
        pair: tuple[RedisServer, ServiceProcess, ServiceProcess], streams: Streams) -> None:
    redis_srv, a, b = pair
    alice = [await streams.open(a, "alice"), await streams.open(b, "alice")]
    bob = await streams.open(a, "bob")
    assert all(s.status == 200 for s in [*alice, bob])
    ops = auth(token(SETTINGS, "ops", APP, "connections"))
    r = redis_client(redis_srv.url)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            # only the `connections` scope may disconnect
            denied = await http.delete(f"{b.url}/connections/{APP}/alice", headers=auth(token(SETTINGS, "alice", APP)))
            assert denied.status_code == 403 and denied.json()["error"] == "forbidden"
            t0 = time.monotonic()
            resp = await http.delete(f"{b.url}/connections/{APP}/alice", headers=ops)
            answered = time.monotonic() - t0
            assert resp.status_code == 200 and resp.json() == {"closed": 2}
            for st in alice:  # each ends with the reason, then the chunked body ends
                raw = await st.read_until_closed(timeout=3)
                assert raw.endswith(b"\n\n") and b": closing disconnected by API\nretry: " in raw
            assert (await http.get(f"{a.url}/connections/{APP}", headers=ops)).json().keys() == {"bob"}
            assert not r.exists(keys.seed_client_hash(APP, "alice"))
            # bob's stream is untouched
            sent = await http.post(f"{a.url}/publish/{APP}", json={"type": "t", "data": 1},
                                   headers=auth(token(SETTINGS, "backend", APP, "publish")))
            ev = await bob.next_event()
            assert ev is not None and ev.id == sent.json()["id"]
            # nobody left to close: 0, from either instance
            again = await http.delete(f"{a.url}/connections/{APP}/alice", headers=ops)
            assert again.json() == {"closed": 0}
            print(f"\ndisconnect: DELETE closed 2 streams on 2 instances, answered in {answered * 1000:.0f} ms")
    finally:
        r.close()


async def test_per_user_cap_holds_across_instances(
        pair: tuple[RedisServer, ServiceProcess, ServiceProcess], streams: Streams) -> None:
    _, a, b = pair
    assert (await streams.open(a, "alice")).status == 200
    assert (await streams.open(b, "alice")).status == 200
    for proc in (a, b):
        over = await streams.open(proc, "alice", accept="application/json")
        assert over.status == 429 and _error(over) == "too_many_connections"
        assert over.headers.get("retry-after")
        refused = refusal(await streams.open(proc, "alice"))  # an EventSource: retried, never given up
        assert refused is not None and refused[0] == "too_many_connections" and refused[1] >= 2000, refused
    assert (await streams.open(b, "bob")).status == 200  # another user is not affected


async def test_per_process_cap(pair: tuple[RedisServer, ServiceProcess, ServiceProcess], streams: Streams) -> None:
    _, a, b = pair
    held = [await streams.open(a, f"u{i}") for i in range(CAP_PROCESS)]
    assert all(s.status == 200 for s in held)
    full = await streams.open(a, "late", accept="application/json")
    assert full.status == 503 and _error(full) == "instance_full"
    refused = refusal(await streams.open(a, "late"))
    assert refused is not None and refused[0] == "instance_full", refused
    assert (await streams.open(b, "late")).status == 200  # the other instance has room
    # a client leaving frees its place at once: close and reopen, many times, never a 503
    for i in range(20):
        await held[i % CAP_PROCESS].close()
        st = await streams.open(a, f"u{i % CAP_PROCESS}")
        assert st.status == 200, f"round {i}: {st.status} {bytes(st.raw)!r}"
        held[i % CAP_PROCESS] = st


async def test_a_stream_the_server_ends_frees_its_place_at_once(
        pair: tuple[RedisServer, ServiceProcess, ServiceProcess], streams: Streams) -> None:
    _, a, b = pair
    ops = auth(token(SETTINGS, "ops", APP, "connections"))
    async with httpx.AsyncClient(timeout=5) as http:
        # server-ended (disconnect): each client reconnects the moment it sees its stream end, on either instance
        for rnd in range(5):
            held = [await streams.open(a, "alice"), await streams.open(b, "alice")]
            assert [s.status for s in held] == [200, 200]
            resp = await http.delete(f"{a.url}/connections/{APP}/alice", headers=ops)
            assert resp.json() == {"closed": 2}

            async def come_back(st: RawStream, to: ServiceProcess) -> int:
                await st.read_until_closed(timeout=3)
                return (await streams.open(to, "alice")).status

            statuses = await asyncio.gather(come_back(held[0], b), come_back(held[1], a))
            assert list(statuses) == [200, 200], f"round {rnd}: reconnecting at once was refused"
            resp = await http.delete(f"{a.url}/connections/{APP}/alice", headers=ops)
            assert resp.json() == {"closed": 2}
            await until(lambda: _listed_none(http, a.url, ops), 3)


async def test_a_client_that_leaves_can_come_back_at_once(
        pair: tuple[RedisServer, ServiceProcess, ServiceProcess], streams: Streams) -> None:
    """The client closes its socket and reconnects to the same instance at once, at its cap: the release of the old
    stream may still be on its way to Redis, and must not count."""
    _, a, b = pair
    held = [await streams.open(a, "carol"), await streams.open(b, "carol")]
    for i in range(30):
        await held[0].close()
        held[0] = await streams.open(a, "carol")
        assert held[0].status == 200, f"round {i}: {held[0].status} {bytes(held[0].raw)!r}"


async def _listed_none(http: httpx.AsyncClient, url: str, ops: dict[str, str]) -> bool:
    return "alice" not in (await http.get(f"{url}/connections/{APP}", headers=ops)).json()
