"""The browser client (clients/js, served at /client.js) in real headless Chromium against the real service:
credentials renewed at token expiry with nothing lost, resume across SIGKILL and SIGTERM restarts, 401/403 rules,
refusals that pass, one stream shared by 8 tabs and handed over when the leader tab closes, `reset`, and its
parser held to the Python one (the rules are docs/clients.md).

The application page is tests/data/client_harness.html, served on the service's origin by Playwright; its
credential calls reach tests.support_browser.Credentials, which mints tokens and buys tickets from the service.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Page

from quart_sse.client import AsyncPublisher
from quart_sse.publisher import connect as redis_publisher
from tests.support import (
    RedisServer,
    ServiceProcess,
    auth,
    live_server,
    make_settings,
    metric_value,
    open_stream,
    token,
)
from tests.support_browser import (
    HARNESS_PATH,
    Credentials,
    browser,
    log_of,
    serve_harness,
    wait_events,
    wait_open,
    wait_state,
    watch_errors,
)
from tests.support_faults import until
from tests.support_restart import restart_port

pytestmark = pytest.mark.slow

APP, USER = "shop", "alice"
#: A SIGTERM's closing `retry:` carries up to 10 s of jitter by design (docs/operations.md), then a restart.
RESUME_MS = 30_000


def opens(log: dict[str, Any]) -> list[dict[str, Any]]:
    """The statuses where this tab's stream opened (as leader)."""
    return [s for s in log["statuses"] if s["state"] == "open" and s["leader"]]


async def streams_opened(base: str) -> float:
    async with httpx.AsyncClient() as c:
        return metric_value((await c.get(base + "/metrics")).text, "sse_streams_opened_total")


async def connections(base: str, settings: Any) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"{base}/connections/{APP}/{USER}", headers=auth(token(settings, USER, APP)))
    assert r.status_code == 200, r.text
    listed: dict[str, Any] = r.json()
    return listed


async def test_tokens_expiring_every_5s_lose_nothing_and_cost_one_ticket_per_connection(tmp_path: Path) -> None:
    """Tokens live 5 s, an event every 200 ms for 20 s: all 100 shown, in order, once, across ≥ 3 renewals;
    getTicket was called exactly once per connection, and no renewal was a failure."""
    settings = make_settings(sse_retry_ms=300)
    async with live_server(settings) as srv, browser(tmp_path) as ctx:
        creds = Credentials(srv.url, settings, APP, USER, ttl=5)
        await serve_harness(ctx, creds)
        page = await ctx.new_page()
        errors = watch_errors(page)
        before = await streams_opened(srv.url)
        await page.goto(srv.url + HARNESS_PATH)
        await wait_open(page)
        ids: list[str] = []
        async with AsyncPublisher(srv.url, token(settings, "backend", APP, "publish")) as pub:
            for n in range(100):  # the workload's pace, not a wait for something
                ids.append(await pub.publish(APP, USER, "tick", {"n": n}))
                await asyncio.sleep(0.2)
        await wait_events(page, 100)
        log = await log_of(page)
        assert [e["id"] for e in log["events"]] == ids  # in order, none lost, none twice
        assert [e["data"]["n"] for e in log["events"]] == list(range(100))
        connections_made = len(opens(log))
        assert connections_made >= 4, "at least three renewals in 20 s of 5 s tokens"
        assert log["credentialCalls"] == creds.calls == connections_made  # once per connection
        assert await streams_opened(srv.url) - before == connections_made
        assert not [s for s in log["statuses"] if s["state"] in ("waiting", "error")]  # a renewal is no failure
        assert errors == []


async def test_resumes_across_sigkill_then_sigterm_restart(tmp_path: Path) -> None:
    """The service (on Redis, which keeps history) is SIGKILLed, restarted, then SIGTERMed and restarted, with
    events published while it was down: the page shows every event once, in order."""
    redis = RedisServer(tmp_path)
    redis.start()
    port = restart_port()  # not free_port(): see tests/support_restart.py
    env = {"REDIS_URL": redis.url, "SSE_RETRY_MS": "300"}
    settings = make_settings()
    procs = [ServiceProcess(port, env, tmp_path / "service-1.log")]
    ids: list[str] = []

    async def publish_http(n: int) -> None:
        async with AsyncPublisher(procs[-1].url, token(settings, "backend", APP, "publish")) as pub:
            ids.append(await pub.publish(APP, USER, "tick", {"n": n}))

    async def publish_while_down(n: int) -> None:  # straight to Redis with history, the service being down
        async with redis_publisher(redis.url) as pub:
            ids.append((await pub.publish(APP, USER, "tick", {"n": n})).id or "")

    try:
        await procs[0].wait_ready()
        async with browser(tmp_path) as ctx:
            await serve_harness(ctx, Credentials(procs[0].url, settings, APP, USER))
            page = await ctx.new_page()
            errors = watch_errors(page)
            await page.goto(procs[0].url + HARNESS_PATH)
            await wait_open(page)
            for n in range(3):
                await publish_http(n)
            await wait_events(page, 3)

            procs[0].signal(signal.SIGKILL)
            await asyncio.to_thread(procs[0].proc.wait)
            for n in range(3, 6):
                await publish_while_down(n)
            procs.append(ServiceProcess(port, env, tmp_path / "service-2.log"))
            await procs[1].wait_ready()
            await wait_events(page, 6, RESUME_MS)
            await publish_http(6)
            await wait_events(page, 7)

            await asyncio.to_thread(procs[1].stop)  # SIGTERM: `: closing shutdown` with a jittered retry
            for n in range(7, 10):
                await publish_while_down(n)
            procs.append(ServiceProcess(port, env, tmp_path / "service-3.log"))
            await procs[2].wait_ready()
            await wait_events(page, 10, RESUME_MS)
            await publish_http(10)
            await wait_events(page, 11)

            log = await log_of(page)
            assert [e["id"] for e in log["events"]] == ids
            assert [e["data"]["n"] for e in log["events"]] == list(range(11))
            waits = [s for s in log["statuses"] if s["state"] == "waiting"]
            assert any(s["reason"] == "closed" and s["message"] == "shutdown" for s in waits)  # the SIGTERM
            assert any(s["reason"] in ("network", "credentials") for s in waits)  # the SIGKILL, the downtime
            assert log["resets"] == [] and len(opens(log)) == 3
            assert errors == []
    finally:
        for p in procs:
            await asyncio.to_thread(p.stop)
        redis.stop()


async def test_401_gets_one_fresh_ticket_then_an_error_and_403_stops(tmp_path: Path) -> None:
    """A spent ticket (401) is answered with exactly one new ticket and the stream goes on, nothing lost; two
    401s in a row end in status `error`; a 403 ends in `error` at once. Neither retries afterwards."""
    settings = make_settings(sse_retry_ms=300)
    async with live_server(settings) as srv, browser(tmp_path) as ctx:
        creds = Credentials(srv.url, settings, APP, USER)
        creds.spent_on = {2, 4, 5}  # the 2nd credential: a spent ticket (401); later, two in a row
        await serve_harness(ctx, creds)
        page = await ctx.new_page()
        codes: list[int] = []
        page.on("response", lambda r: codes.append(r.status) if urlsplit(r.url).path == "/sse" else None)
        await page.goto(srv.url + HARNESS_PATH + "?share=0")
        await wait_open(page)
        ids: list[str] = []
        admin = token(settings, "ops", APP, "connections")
        async with AsyncPublisher(srv.url, token(settings, "backend", APP, "publish")) as pub, \
                httpx.AsyncClient(base_url=srv.url) as http:
            ids.append(await pub.publish(APP, USER, "tick", {"n": 0}))
            await wait_events(page, 1)
            # the service ends the stream (`: closing disconnected by API`): the next ticket is a spent one
            assert (await http.delete(f"/connections/{APP}/{USER}", headers=auth(admin))).json() == {"closed": 1}
            ids.append(await pub.publish(APP, USER, "tick", {"n": 1}))  # in the gap: comes from history
            await page.wait_for_function("window.log.statuses.filter(s => s.state === 'open').length === 2")
            ids.append(await pub.publish(APP, USER, "tick", {"n": 2}))
            await wait_events(page, 3)
            log = await log_of(page)
            assert [e["id"] for e in log["events"]] == ids
            assert codes == [200, 401, 200] and creds.calls == 3  # one fresh ticket for the 401, no more
            assert not [s for s in log["statuses"] if s["state"] == "error"]

            # two spent tickets in a row: 401, one fresh credential, 401 again → error, and it stays there
            assert (await http.delete(f"/connections/{APP}/{USER}", headers=auth(admin))).json() == {"closed": 1}
            await wait_state(page, "error")
            status = (await log_of(page))["statuses"][-1]
            assert (status["state"], status["httpStatus"], status["error"]) == ("error", 401, "unauthorized")
            assert codes == [200, 401, 200, 401, 401] and creds.calls == 5
            await asyncio.sleep(2)  # the absence of a retry loop: 6x the retry the service announced
            assert codes == [200, 401, 200, 401, 401] and creds.calls == 5

        # 403: a stream URL the service forbids to this user (another user's connections; the real route's 403)
        forbidden_page = await ctx.new_page()
        requests: list[str] = []
        forbidden_page.on("request", lambda r: requests.append(r.url)
                          if urlsplit(r.url).path.startswith("/connections/") else None)
        await forbidden_page.goto(srv.url + HARNESS_PATH + f"?share=0&auth=token&url=/connections/{APP}/bob")
        await wait_state(forbidden_page, "error")
        log = await log_of(forbidden_page)
        assert [s["state"] for s in log["statuses"]] == ["connecting", "error"]
        assert (log["statuses"][-1]["httpStatus"], log["statuses"][-1]["error"]) == (403, "forbidden")
        await asyncio.sleep(2)
        assert len(requests) == 1 and log["credentialCalls"] == 1 == (await log_of(forbidden_page))["credentialCalls"]


async def test_refusal_that_passes_is_retried_until_it_clears(tmp_path: Path) -> None:
    """MAX_CONNECTIONS_PER_USER=1 and another stream holds the place: the client is refused (429 with
    Retry-After, or a `: refused` stream), waits the service's delay plus jitter, and opens by itself once the
    place is free. (The growth of the delay over repeated refusals: test_client_python.py, backoff tables.)"""
    settings = make_settings(sse_retry_ms=200, max_connections_per_user=1)
    async with live_server(settings) as srv, browser(tmp_path) as ctx:
        await serve_harness(ctx, Credentials(srv.url, settings, APP, USER))
        holder = await open_stream(srv.port, headers=auth(token(settings, USER, APP)))
        assert holder.status == 200
        page = await ctx.new_page()
        await page.goto(srv.url + HARNESS_PATH + "?share=0")
        await wait_state(page, "waiting")
        log = await log_of(page)
        wait = next(s for s in log["statuses"] if s["state"] == "waiting")
        assert wait["reason"] in ("http", "refused") and wait["attempt"] == 1, wait
        assert wait.get("httpStatus") == 429 or wait.get("error") == "too_many_connections", wait
        assert not opens(log)
        await holder.close()
        await wait_open(page, 20_000)  # at the end of that wait (at most 1.5 times the service's delay)
        async with AsyncPublisher(srv.url, token(settings, "backend", APP, "publish")) as pub:
            event_id = await pub.publish(APP, USER, "tick", {"n": 0})
        await wait_events(page, 1)
        assert [e["id"] for e in (await log_of(page))["events"]] == [event_id]


async def test_eight_tabs_share_one_stream_and_a_new_leader_takes_over(tmp_path: Path) -> None:
    """8 tabs of one origin over HTTP/1.1 (6 connections per host at most): one stream in /connections, every
    tab gets every event; closing the leader tab, another takes over within 2 s and no tab misses or repeats."""
    settings = make_settings(sse_retry_ms=300)
    async with live_server(settings) as srv, browser(tmp_path) as ctx:
        creds = Credentials(srv.url, settings, APP, USER)
        await serve_harness(ctx, creds)
        pages: list[Page] = []
        for _ in range(8):
            page = await ctx.new_page()
            await page.goto(srv.url + HARNESS_PATH)
            pages.append(page)
        for page in pages:
            await wait_open(page)  # the leader's stream, or a follower's mirror of it
        leaders = [p for p in pages if await p.evaluate("window.feed.leader")]
        assert len(leaders) == 1
        listed = await connections(srv.url, settings)
        assert len(listed) == 1, listed
        assert await streams_opened(srv.url) == 1 and creds.calls == 1

        ids: list[str] = []
        async with AsyncPublisher(srv.url, token(settings, "backend", APP, "publish")) as pub:
            for n in range(5):
                ids.append(await pub.publish(APP, USER, "tick", {"n": n}))
            for page in pages:
                await wait_events(page, 5)

            async def keep_publishing() -> None:  # one event every 100 ms across the hand-over
                for n in range(5, 35):
                    ids.append(await pub.publish(APP, USER, "tick", {"n": n}))
                    await asyncio.sleep(0.1)

            publishing = asyncio.create_task(keep_publishing())
            await asyncio.sleep(0.5)
            closed_at = time.time() * 1000
            await leaders[0].close()
            rest = [p for p in pages if p is not leaders[0]]
            holder: list[Page] = []

            async def taken_over() -> bool:
                for page in rest:
                    if await page.evaluate("window.feed.leader && window.feed.status.state === 'open'"):
                        holder.append(page)
                        return True
                return False

            await until(taken_over, timeout=10)
            new_leader = holder[0]
            await publishing

        opened_at = opens(await log_of(new_leader))[0]["t"]
        takeover_ms = opened_at - closed_at
        print(f"\ntakeover: the new leader's stream was open {takeover_ms:.0f} ms after the leader tab closed")
        assert takeover_ms < 2000
        for page in rest:
            await wait_events(page, len(ids))
            log = await log_of(page)
            assert [e["id"] for e in log["events"]] == ids  # every tab: none missed, none twice, in order
        await until(lambda: _one_stream(srv.url, settings), timeout=10)
        assert creds.calls == 2  # one credential per connection: the first leader's and the new one's


async def _one_stream(base: str, settings: Any) -> bool:
    return len(await connections(base, settings)) == 1


async def test_reset_reaches_on_reset_and_types_filter(tmp_path: Path) -> None:
    """Resuming from an id history does not know: the `reset` reaches onReset (not onEvent); `types` limits
    onEvent to the listed types, without declaring each one beforehand."""
    settings = make_settings()
    async with live_server(settings) as srv, browser(tmp_path) as ctx:
        await serve_harness(ctx, Credentials(srv.url, settings, APP, USER))
        page = await ctx.new_page()
        await page.goto(srv.url + HARNESS_PATH + "?share=0&lastEventId=999-0-unknown&types=tick,news")
        await page.wait_for_function("window.log.resets.length === 1")
        await wait_open(page)
        async with AsyncPublisher(srv.url, token(settings, "backend", APP, "publish")) as pub:
            skipped = await pub.publish(APP, USER, "other", {"n": 0})
            wanted = [await pub.publish(APP, USER, "tick", {"n": 1}), await pub.broadcast(APP, "news", {"n": 2})]
        await wait_events(page, 2)
        log = await log_of(page)
        assert log["resets"] == [{"reason": "unknown id", "last_event_id": "999-0-unknown"}]
        assert [(e["type"], e["id"]) for e in log["events"]] == [("tick", wanted[0]), ("news", wanted[1])]
        assert await page.evaluate("window.feed.lastEventId") == wanted[1] != skipped
