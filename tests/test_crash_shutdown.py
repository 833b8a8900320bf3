"""Instance crash and graceful shutdown (docs/operations.md, sections 3 and 4), on real service processes and a
real Redis.

A SIGKILLed instance's streams drop out of every listing, the seed's `{app}:client:{user}` hash and the per-user
cap within REGISTRY_TTL; its clients reconnect to a live instance and resume. SIGTERM ends every stream with
`: closing shutdown` and a jittered `retry:`, removes the registry entries and exits within GRACEFUL_TIMEOUT, with
nothing left pending.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from quart_sse import keys
from tests.support import RedisServer, ServiceProcess, auth, free_port, make_settings, open_stream, token
from tests.support_faults import redis_client, registry_keys, until

pytestmark = pytest.mark.slow
SETTINGS = make_settings()
APP = "shop"
TTL = 3
GRACEFUL = 3.0


@pytest.fixture
async def redis_srv(tmp_path: Path) -> AsyncIterator[RedisServer]:
    srv = RedisServer(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _env(redis_srv: RedisServer, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_srv.url, "REGISTRY_TTL": str(TTL), "GRACEFUL_TIMEOUT": str(GRACEFUL),
            "PING_INTERVAL": "1", **extra}


async def test_crashed_instance_is_forgotten_within_registry_ttl(redis_srv: RedisServer, tmp_path: Path) -> None:
    env = _env(redis_srv, MAX_CONNECTIONS_PER_USER="2")
    a, b = (ServiceProcess(free_port(), env, tmp_path / f"{n}.log") for n in "ab")
    r = redis_client(redis_srv.url)
    streams = []
    try:
        await asyncio.gather(a.wait_ready(), b.wait_ready())
        on_a = [await open_stream(a.port, headers=auth(token(SETTINGS, u, APP))) for u in ("carol", "carol", "dave")]
        on_b = await open_stream(b.port, headers=auth(token(SETTINGS, "erin", APP)))
        streams = [*on_a, on_b]
        assert all(s.status == 200 for s in streams)
        ops = auth(token(SETTINGS, "ops", APP, "connections"))
        async with httpx.AsyncClient(base_url=b.url, timeout=5) as http:
            async def users() -> set[str]:
                return set((await http.get(f"/connections/{APP}", headers=ops)).json())

            assert await users() == {"carol", "dave", "erin"}
            # carol holds her cap of 2 (on A): a third stream anywhere is refused
            extra = await open_stream(b.port, headers=auth(token(SETTINGS, "carol", APP)), accept="application/json")
            streams.append(extra)
            assert extra.status == 429
            sent = await http.post(f"/publish/{APP}/carol", json={"type": "t", "data": 1},
                                   headers=auth(token(SETTINGS, "backend", APP, "publish")))
            ev = await on_a[0].next_event()
            assert ev is not None and ev.id == sent.json()["id"]

            a.signal(signal.SIGKILL)
            a.proc.wait(5)
            t_kill = time.monotonic()
            missed = (await http.post(f"/publish/{APP}/carol", json={"type": "t", "data": 2},
                                      headers=auth(token(SETTINGS, "backend", APP, "publish")))).json()["id"]

            async def forgotten() -> bool:
                return await users() == {"erin"} and not r.exists(keys.seed_client_hash(APP, "carol")) \
                    and not r.exists(keys.seed_client_hash(APP, "dave"))

            gone = await until(forgotten, TTL + 1, 0.05)
            assert r.exists(keys.seed_client_hash(APP, "erin")) == 1  # the live instance's entries stay

            # carol reconnects to B and resumes: the dead instance's streams no longer count against her cap
            hdrs = {**auth(token(SETTINGS, "carol", APP)), "Last-Event-ID": sent.json()["id"]}
            again = await open_stream(b.port, headers=hdrs)
            streams.append(again)
            admitted = time.monotonic() - t_kill
            assert again.status == 200, again.raw
            ev = await again.next_event()
            assert ev is not None and (ev.id, ev.json()) == (missed, 2)
            assert r.exists(keys.seed_client_hash(APP, "carol")) == 1
            print(f"\ncrash: dead instance's entries gone {gone:.2f} s after SIGKILL (REGISTRY_TTL={TTL}); "
                  f"carol admitted again on B {admitted:.2f} s after it")
    finally:
        for s in streams:
            await s.close()
        r.close()
        a.stop()
        b.stop()


async def test_sigterm_ends_streams_cleanly_and_exits_in_time(redis_srv: RedisServer, tmp_path: Path) -> None:
    proc = ServiceProcess(free_port(), _env(redis_srv), tmp_path / "svc.log")
    r = redis_client(redis_srv.url)
    streams = []
    try:
        await proc.wait_ready()
        users = [f"u{i}" for i in range(8)]
        streams = [await open_stream(proc.port, headers=auth(token(SETTINGS, u, APP))) for u in users]
        assert all(s.status == 200 for s in streams)
        assert len(registry_keys(r, APP)) == 2 * len(users) + 1  # per-user set + seed hash, each; the app's set

        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        tails = await asyncio.gather(*(s.read_until_closed(timeout=GRACEFUL + 2) for s in streams))
        ended = time.monotonic() - t0
        code = await asyncio.to_thread(proc.proc.wait, GRACEFUL + 5)
        exited = time.monotonic() - t0

        retries = []
        for raw in tails:
            m = re.search(rb": closing shutdown\nretry: (\d+)\n\n$", raw)
            assert m is not None, raw[-200:]  # the very last bytes, after which the chunked body ended cleanly
            retries.append(int(m.group(1)))
        base = SETTINGS.sse_retry_ms
        assert all(base <= x <= base + 10_000 for x in retries)
        assert len(set(retries)) >= len(retries) - 1, retries  # jittered: clients do not all return at once
        assert code == 0
        assert exited < GRACEFUL, f"exited {exited:.2f} s after SIGTERM (GRACEFUL_TIMEOUT={GRACEFUL})"
        assert registry_keys(r, APP) == []
        log = proc.log()
        for bad in ("Task was destroyed but it is pending", "Traceback", "Exception in callback", "ERROR"):
            assert bad not in log, log[-3000:]
        assert log.count("stream closed (shutdown)") == len(users)
        print(f"\nshutdown: {len(users)} streams ended {ended * 1000:.0f} ms after SIGTERM, process exited after "
              f"{exited:.2f} s (GRACEFUL_TIMEOUT={GRACEFUL:.0f}); retry: {min(retries)}..{max(retries)} ms")
    finally:
        for s in streams:
            await s.close()
        r.close()
        proc.stop()
