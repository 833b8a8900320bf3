"""Headless Chromium (Debian's, driven by Playwright) for the browser tests, and the page that drives the browser
client (tests/data/client_harness.html) served on the service's own origin.

Chromium is a test dependency like redis-server: missing, these tests fail saying how to install it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from quart_sse.settings import Settings
from tests.support import ROOT, auth, token

try:
    from playwright.async_api import BrowserContext, Page, Route
    from playwright.async_api import async_playwright as _async_playwright
except ImportError:  # pragma: no cover - reported by browser() as a failure, not a skip
    _async_playwright = None  # type: ignore[assignment]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HARNESS = ROOT / "tests" / "data" / "client_harness.html"
HARNESS_PATH = "/__harness__"


def chromium_path() -> str:
    """Debian's Chromium (or CHROMIUM_PATH); Playwright's own browser download is not available here."""
    for candidate in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("Chromium not found: install it (Debian/Ubuntu: apt-get install -y chromium) or set CHROMIUM_PATH; "
                ".ci/run installs it", pytrace=False)


@contextlib.asynccontextmanager
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """A fresh profile in headless Chromium, with the flags this machine's closed network needs."""
    if _async_playwright is None:
        pytest.fail("the playwright package is missing: pip install -r requirements-dev.txt", pytrace=False)
    executable = chromium_path()
    async with _async_playwright() as pw:
        ctx = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield ctx
        finally:
            await ctx.close()


def watch_errors(page: Page) -> list[str]:
    """Uncaught page errors and CSP violations (a page must run under its own strict policy)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}")
            if "Content Security Policy" in msg.text else None)
    return errors


class Credentials:
    """The application's credential endpoint, as the harness page's `getTicket`/`getToken` reach it: a Playwright
    binding that mints a token for (app, user) and, for tickets, buys one from the service (`POST /sse/ticket`).

    `calls` counts every call; `spent_on` lists call numbers answered with the previous, already used ticket
    (a forced 401); `none_on` call numbers answered with no credential. While the service is down the purchase
    raises, and the page's getTicket rejects, as an application's would.
    """

    def __init__(self, base_url: str, settings: Settings, app: str, user: str, ttl: int = 600) -> None:
        self.base_url = base_url
        self.settings = settings
        self.app = app
        self.user = user
        self.ttl = ttl
        self.calls = 0
        self.spent_on: set[int] = set()
        self.last_ticket: str | None = None

    async def __call__(self, source: Any, mode: str) -> str | None:
        self.calls += 1
        tok = token(self.settings, self.user, self.app, ttl=self.ttl)
        if mode == "token":
            return tok
        if self.calls in self.spent_on and self.last_ticket is not None:
            return self.last_ticket
        async with httpx.AsyncClient(timeout=5) as c:
            r = await c.post(self.base_url + "/sse/ticket", headers=auth(tok))
        r.raise_for_status()
        self.last_ticket = str(r.json()["ticket"])
        return self.last_ticket


async def serve_harness(ctx: BrowserContext, credentials: Callable[..., Awaitable[str | None]]) -> None:
    """`<origin>/__harness__?...` answers the harness page on any origin (a page of the application, on the
    service's origin so that it shares Web Locks and BroadcastChannel with its other tabs); `credential(mode)` in
    the page calls `credentials`."""
    html = HARNESS.read_text(encoding="utf-8")

    async def fulfil(route: Route) -> None:
        await route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html)

    await ctx.route(re.compile(re.escape(HARNESS_PATH) + r"(\?.*)?$"), fulfil)
    await ctx.expose_binding("credential", credentials)


async def log_of(page: Page) -> dict[str, Any]:
    """What the harness recorded: events, resets, statuses (with `t`, ms since the epoch), credential calls."""
    got: dict[str, Any] = await page.evaluate("JSON.parse(JSON.stringify(window.log))")
    return got


async def wait_state(page: Page, state: str, timeout_ms: float = 10_000) -> None:
    """Until the page's feed is in `state` (open, waiting, error, ...)."""
    await page.wait_for_function(f"window.feed && window.feed.status.state === {state!r}", timeout=timeout_ms)


async def wait_open(page: Page, timeout_ms: float = 10_000) -> None:
    await wait_state(page, "open", timeout_ms)


async def wait_events(page: Page, n: int, timeout_ms: float = 10_000) -> None:
    await page.wait_for_function(f"window.log && window.log.events.length >= {n}", timeout=timeout_ms)
