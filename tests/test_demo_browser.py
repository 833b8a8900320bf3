"""The /demo page in real headless Chromium (Debian's, driven by Playwright): it shows events as they arrive,
reconnects by itself when the service restarts and resumes without losing what was published meanwhile, shows a
`reset` distinctly when history cannot cover the gap, mints tokens and sends a test notification.

Chromium is a test dependency like redis-server: missing, these tests fail saying how to install it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from quart_sse.publisher import connect
from tests.support import RedisServer, ServiceProcess, auth, free_port, live_server, make_settings, token
from tests.support_browser import browser, watch_errors

pytestmark = pytest.mark.slow

APP, USER = "demo-app", "alice"
#: Time for a reconnect after a restart: the shutdown's `retry:` carries up to 10 s of jitter by design.
RESUME_MS = 25_000


async def rows(page: Page) -> list[dict[str, Any]]:
    """The events the page shows, as (type, id, data) read back from the DOM."""
    out = []
    for li in await page.locator("#events li.event").all():
        out.append({"type": await li.locator(".ev-type").text_content(),
                    "id": await li.locator(".ev-id").text_content(),
                    "data": await li.locator(".ev-data").text_content(),
                    "reset": "reset" in (await li.get_attribute("class") or "")})
    return out


async def publish_http(base: str, tok: str, data: Any, user: str | None = USER) -> str:
    async with httpx.AsyncClient(base_url=base) as c:
        r = await c.post(f"/publish/{APP}" + (f"/{user}" if user else ""), headers=auth(tok),
                         json={"type": "notification", "data": data})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def test_page_resumes_after_service_restart_without_losing_events(tmp_path: Path) -> None:
    """Redis keeps history across the restart: what was published while the service was down arrives after it."""
    redis = RedisServer(tmp_path)
    redis.start()
    port = free_port()
    env = {"REDIS_URL": redis.url, "APP_MODE": "debug", "SSE_RETRY_MS": "300"}
    settings = make_settings()
    user_tok, pub_tok = token(settings, USER, APP), token(settings, "backend", APP, "publish")
    procs = [ServiceProcess(port, env, tmp_path / "service-1.log")]
    try:
        await procs[0].wait_ready()
        async with browser(tmp_path) as ctx:
            page = await ctx.new_page()
            errors = watch_errors(page)
            await page.goto(f"{procs[0].url}/demo?token={user_tok}")
            state = page.locator("#state")
            await expect(state).to_have_text("open")
            assert "token=" not in page.url  # taken out of the address bar once read
            await expect(page.locator("#identity")).to_contain_text(f"app {APP} · user {USER}")

            ids = [await publish_http(procs[0].url, pub_tok, {"n": 1, "html": "<b>not markup</b>"})]
            await expect(page.locator("#events li.event")).to_have_count(1)
            first = (await rows(page))[0]
            assert first == {"type": "notification", "id": ids[0], "reset": False,
                             "data": json.dumps({"n": 1, "html": "<b>not markup</b>"}, separators=(",", ":"))}
            assert await page.locator("#events b").count() == 0  # shown as text, never parsed as HTML

            await asyncio.to_thread(procs[0].stop)  # SIGTERM: streams end, the process exits
            await expect(state).not_to_have_text("open")
            async with connect(redis.url) as pub:  # the Python publisher, straight to Redis, service down
                ids.append((await pub.publish(APP, USER, "notification", {"n": 2})).id or "")
                ids.append((await pub.publish(APP, None, "notification", {"n": 3})).id or "")  # a broadcast

            procs.append(ServiceProcess(port, env, tmp_path / "service-2.log"))
            await procs[1].wait_ready()
            await expect(state).to_have_text("open", timeout=RESUME_MS)
            await expect(page.locator("#events li.event")).to_have_count(3)
            ids.append(await publish_http(procs[1].url, pub_tok, {"n": 4}))
            await expect(page.locator("#events li.event")).to_have_count(4)

            shown = await rows(page)
            assert [json.loads(r["data"])["n"] for r in shown] == [1, 2, 3, 4]  # in order, none lost, no duplicate
            assert [r["id"] for r in shown] == ids
            assert not any(r["reset"] for r in shown)
            assert int(await page.locator("#reconnects").text_content() or "0") >= 1
            assert await page.locator("#last-id").text_content() == ids[-1]
            assert errors == []
    finally:
        for p in procs:
            await asyncio.to_thread(p.stop)
        redis.stop()


async def test_page_mints_sends_notifies_and_shows_reset(tmp_path: Path) -> None:
    """Debug mode, in-process broker: mint, send a test notification, browser Notification, then a restart
    loses the in-process history and the page shows the `reset` distinctly before the live events."""
    settings = make_settings(app_mode="debug", sse_retry_ms=300)
    async with browser(tmp_path) as ctx:
        async with live_server(settings) as srv:
            await ctx.grant_permissions(["notifications"], origin=srv.url)
            page = await ctx.new_page()
            errors = watch_errors(page)
            await page.goto(f"{srv.url}/demo?types=notification,alpha")
            state = page.locator("#state")
            await expect(state).to_have_text("idle")
            await expect(page.locator("#types")).to_have_value("notification alpha")
            await page.fill("#mint-app", APP)
            await page.fill("#mint-user", USER)
            await page.click("#mint")
            await expect(state).to_have_text("open")
            await expect(page.locator("#pub-user")).to_have_value(USER)
            await page.click("#notify-enable")
            await expect(page.locator("#notify-state")).to_have_text("granted")

            await page.fill("#pub-type", "greeting")  # not in the listened types: the page adds it
            await page.fill("#pub-data", '{"hello": "world"}')
            await page.click("#send")
            await expect(page.locator("#send-status")).to_contain_text("202")
            await expect(page.locator("#events li.event")).to_have_count(1)
            sent = (await rows(page))[0]
            assert (sent["type"], json.loads(sent["data"]), sent["reset"]) == ("greeting", {"hello": "world"}, False)
            await expect(page.locator("#notify-count")).to_have_text("1")
        # the in-process broker's history goes with the process: the page's Last-Event-ID is unknown afterwards
        await expect(state).not_to_have_text("open")
        async with live_server(settings) as srv:
            await expect(state).to_have_text("open", timeout=RESUME_MS)
            await expect(page.locator("#events li.reset")).to_have_count(1)
            await publish_http(srv.url, token(settings, "backend", APP, "publish"), {"after": "reset"})
            await expect(page.locator("#events li.event")).to_have_count(3)
            shown = await rows(page)
            assert [(r["type"], r["reset"]) for r in shown] == [("greeting", False), ("reset", True),
                                                                 ("notification", False)]
            assert json.loads(shown[1]["data"])["reason"] == "unknown id" and shown[1]["id"] == "(no id)"
            assert await page.locator("#events li.reset").evaluate(
                "li => getComputedStyle(li).backgroundColor") != await page.locator(
                "#events li.event:not(.reset)").first.evaluate("li => getComputedStyle(li).backgroundColor")
            await page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            assert errors == []
