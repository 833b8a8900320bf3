"""The browser client as shipped: `GET /client.js` (cache policy, ETag, version), one source for npm and for the
service, one version everywhere, the package's metadata and declarations; and its parser and backoff held to the
Python ones in real Chromium."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blueprints.client import LONG_CACHE, SOURCE
from quart_sse import __version__
from quart_sse.app import create_app
from quart_sse.client.retry import backoff_ms
from quart_sse.client.sse import SseComment, SseEvent, SseItem, SseParser, SseRetry
from tests.support import ROOT, live_server, make_settings
from tests.support_browser import browser

PACKAGE = ROOT / "clients" / "js"


def test_the_service_serves_the_npm_package_file() -> None:
    assert SOURCE.read_bytes() == (PACKAGE / "index.js").read_bytes(), \
        "quart_sse/static/client.js must be a copy of clients/js/index.js (cp clients/js/index.js " \
        "quart_sse/static/client.js)"


def test_one_version_everywhere() -> None:
    package = json.loads((PACKAGE / "package.json").read_text())
    assert package["version"] == __version__
    assert f"export const VERSION = '{__version__}';" in (PACKAGE / "index.js").read_text()
    assert package["name"] == "@quart-sse/client" and package["type"] == "module"
    assert package["exports"]["."] == {"types": "./index.d.ts", "default": "./index.js"}
    assert set(package["files"]) == {"index.js", "index.d.ts", "README.md"}
    assert all((PACKAGE / f).is_file() for f in package["files"])
    assert not package.get("dependencies"), "the browser client has no runtime dependency"


def test_docs_name_the_current_versioned_url() -> None:
    for doc in (ROOT / "README.md", ROOT / "docs" / "clients.md", PACKAGE / "README.md"):
        named = set(re.findall(r"client\.js\?v=([0-9][^'\s)`\"]*)", doc.read_text()))
        assert named == {__version__}, f"{doc} names /client.js?v={named}, the version is {__version__}"


def test_declarations_cover_every_export() -> None:
    js = (PACKAGE / "index.js").read_text()
    dts = (PACKAGE / "index.d.ts").read_text()
    exported = set(re.findall(r"^export (?:const|function|class) (\w+)", js, flags=re.M))
    declared = set(re.findall(r"^export declare (?:const|function|class) (\w+)", dts, flags=re.M))
    assert exported == declared == {"VERSION", "SseParser", "backoffMs", "CloseReason", "connect"}
    for option in re.findall(r"^\s{2}(\w+)\?:", dts.split("export interface ConnectOptions", 1)[1].split("}\n", 1)[0],
                             flags=re.M):
        assert f"o.{option}" in js or f"'{option}'" in js, f"ConnectOptions.{option} is declared but not read"


@pytest.mark.parametrize(("query", "cache"), [("", "no-cache"), (f"?v={__version__}", LONG_CACHE),
                                              ("?v=0.0.0-old", "no-cache")])
async def test_client_js_cache_policy_and_etag(query: str, cache: str) -> None:
    app = create_app(make_settings())
    async with app.test_app():
        client = app.test_client()
        r = await client.get("/client.js" + query, headers={"Origin": "https://shop.example"})
        body = await r.get_data(as_text=False)
        assert r.status_code == 200 and body == SOURCE.read_bytes()
        assert r.content_type == "text/javascript; charset=utf-8"
        assert r.headers["Cache-Control"] == cache
        assert r.headers["X-Client-Version"] == __version__ and r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Access-Control-Allow-Origin"] == "*"  # a cross-origin <script type="module"> may load it
        etag = r.headers["ETag"]
        again = await client.get("/client.js" + query, headers={"If-None-Match": f'W/{etag}, "other"'})
        assert again.status_code == 304 and await again.get_data(as_text=False) == b""
        assert again.headers["ETag"] == etag and again.headers["Cache-Control"] == cache
        changed = await client.get("/client.js" + query, headers={"If-None-Match": '"stale"'})
        assert changed.status_code == 200


# ------------------------------------------------------------------------------------------------ JS = Python
def _python_items(chunks: list[str]) -> list[dict[str, Any]]:
    parser = SseParser()
    items: list[SseItem] = []
    for c in chunks:
        items += parser.feed(c.encode())
    out: list[dict[str, Any]] = []
    for it in items:
        if isinstance(it, SseEvent):
            out.append({"kind": "event", "type": it.type, "data": it.data, "id": it.id})
        elif isinstance(it, SseComment):
            out.append({"kind": "comment", "text": it.text})
        elif isinstance(it, SseRetry):
            out.append({"kind": "retry", "ms": it.ms})
    return out


def _random_streams(n: int, seed: int = 14) -> list[list[str]]:
    rng = random.Random(seed)
    pieces = ["data", "data:", "data: x", "event: t", "event:", "id: 1", "id", "retry: 5", "retry: x", ":", ": c",
              "closing token expired", "é", "\u2028", " ", "::"]
    streams = []
    for _ in range(n):
        text = "".join(rng.choice(pieces) + rng.choice(["\n", "\r", "\r\n", "\n\n", "", "\r\r"])
                       for _ in range(rng.randint(1, 12)))
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 4)))
        streams.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return streams


async def test_js_parser_and_backoff_match_python(tmp_path: Path) -> None:
    streams = [["retry: 300\n: connected\n\nid: 1-0\nevent: n\ndata: {\"a\":1}\n\n"],
               ["data: a\r", "\ndata: b\r", "\r: closing shutdown\r\nretry: 9\r\n\r\n"], *_random_streams(300)]
    settings = make_settings()
    async with live_server(settings) as srv, browser(tmp_path) as ctx:
        page = await ctx.new_page()
        await page.goto(srv.url + "/health")
        got = await page.evaluate("""async (streams) => {
            const m = await import('/client.js');
            const parsed = streams.map((chunks) => {
                const p = new m.SseParser();
                return chunks.flatMap((c) => p.push(c));
            });
            const backoff = [];
            for (const r of [0, 0.25, 0.999]) {
                for (let n = 1; n <= 12; n++) backoff.push(m.backoffMs(300, n, 30000, () => r));
            }
            return { parsed, backoff, version: m.VERSION };
        }""", streams)
    assert got["version"] == __version__
    for chunks, js in zip(streams, got["parsed"], strict=True):
        assert js == _python_items(chunks), chunks
    assert got["backoff"] == [backoff_ms(300, n, 30000, _fixed(r)) for r in (0, 0.25, 0.999) for n in range(1, 13)]


def _fixed(value: float) -> Callable[[], float]:
    """A random() that always answers `value`."""
    return lambda: value
