"""The /demo page as served (self-contained, locked down by its CSP) and `POST /demo/token` (debug mode only).
The page's behaviour in a real browser is tests/test_demo_browser.py."""

from __future__ import annotations

import base64
import hashlib
import re
import time

import pytest
from quart import Quart

from quart_sse import __version__
from quart_sse.app import create_app
from quart_sse.auth import verify
from quart_sse.settings import Settings
from tests.support import make_settings


def csp_hash(body: bytes) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'"


async def test_page_is_self_contained_and_pinned_by_its_csp() -> None:
    app = create_app(make_settings(app_mode="production"))  # served in both modes
    async with app.test_app():
        r = await app.test_client().get("/demo")
        html = await r.get_data(as_text=False)
    assert isinstance(html, bytes)
    assert r.status_code == 200 and r.content_type == "text/html; charset=utf-8"
    csp = dict(d.strip().split(" ", 1) for d in r.headers["Content-Security-Policy"].split(";"))
    scripts = re.findall(rb"<script([^>]*)>(.*?)</script>", html, flags=re.S)
    styles = re.findall(rb"<style[^>]*>(.*?)</style>", html, flags=re.S)
    # one inline module script, no src=; the browser client is its one import, same-origin and versioned
    assert len(scripts) == 1 and scripts[0][0] == b' type="module"' and len(styles) == 1
    assert re.findall(rb"\bimport\b[^;]*?from\s+'([^']+)'", scripts[0][1]) == [f"/client.js?v={__version__}".encode()]
    assert csp["script-src"] == "'self' " + csp_hash(scripts[0][1]) and csp["style-src"] == csp_hash(styles[0])
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert r.headers["Referrer-Policy"] == "no-referrer"  # a ?token= in the URL must not leak
    # no external scripts, styles, fonts or images: every URL it names is relative or a data: URL
    for url in re.findall(rb"""(?:src|href|action)\s*=\s*["']([^"']*)""", html):
        assert url.startswith(b"data:") or not re.match(rb"[a-z]+:|//", url), url
    assert not re.search(rb"https?://", html)
    script = scripts[0][1]
    assert b"textContent" in script
    for sink in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write", b"eval("):
        assert sink not in script, f"the page must not turn event data into markup ({sink!r})"
    assert b"connect({" in script and b"getTicket" in script and b"Notification.requestPermission" in script
    assert b"EventSource" not in script  # the client replaces it (docs/clients.md says why)


async def _post_token(app: Quart, body: object) -> tuple[int, dict[str, object]]:
    async with app.test_app():
        r = await app.test_client().post("/demo/token", json=body)
        return r.status_code, await r.get_json()


async def test_demo_token_mints_short_lived_tokens_in_debug() -> None:
    settings: Settings = make_settings(app_mode="debug")
    app = create_app(settings)
    status, body = await _post_token(app, {"app": "demo-app", "user": "alice", "ttl": 120})
    assert status == 201
    assert (body["app"], body["user"], body["expires_in"]) == ("demo-app", "alice", 120)
    async with app.app_context():  # the service's own verifier
        user, publisher = verify(str(body["token"]), settings), verify(str(body["publish_token"]), settings)
    assert (user.app, user.user, user.scopes) == ("demo-app", "alice", frozenset())
    assert (publisher.app, publisher.scopes) == ("demo-app", frozenset({"publish"}))
    assert 110 <= user.exp - time.time() <= 121


@pytest.mark.parametrize("body", [{"app": "demo-app"}, {"app": "a:b", "user": "u"}, {"app": "a", "user": "u",
                                  "ttl": 86_400}, {"app": "a", "user": "u", "ttl": "60"}, ["app", "user"]])
async def test_demo_token_refuses_bad_requests(body: object) -> None:
    status, answer = await _post_token(create_app(make_settings(app_mode="debug")), body)
    assert status == 400 and answer["error"] == "bad_request"


async def test_demo_token_does_not_exist_in_production() -> None:
    app = create_app(make_settings(app_mode="production"))
    assert "/demo/token" not in {r.rule for r in app.url_map.iter_rules()}
    status, answer = await _post_token(app, {"app": "demo-app", "user": "alice"})
    assert status == 404 and answer["error"] == "not_found"
