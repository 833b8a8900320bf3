"""The HTTP routes (README.md: Routes) on both brokers through Quart's test client: health and readiness, JSON 404/405,
the publish body's 400s naming the field, 413, the 401 → 400 → 403 order, CORS both ways, and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from quart.testing import QuartClient

from quart_sse.app import create_app
from quart_sse.settings import Settings
from tests.support import auth, token


@contextlib.asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[QuartClient]:
    app = create_app(settings)
    async with app.test_app() as ta:
        yield cast(QuartClient, ta.test_client())


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[QuartClient]:
    async with client_for(settings) as c:
        yield c


def pub_headers(settings: Settings, app: str = "app1", scope: str = "publish") -> dict[str, str]:
    return auth(token(settings, "backend", app, scope))


async def error_body(resp: Any, status: int) -> dict[str, str]:
    assert resp.status_code == status, (resp.status_code, await resp.get_data())
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.get_json()
    assert set(body) == {"error", "message"} and all(isinstance(v, str) and v for v in body.values())
    return dict(body)


# ------------------------------------------------------------------------------------------------ health
async def test_root_redirects_to_health(client: QuartClient) -> None:
    r = await client.get("/")
    assert r.status_code == 301 and r.headers["Location"].endswith("/health")


async def test_health(client: QuartClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200 and await r.get_json() == {"status": "ok"}


async def test_ready(client: QuartClient, settings: Settings) -> None:
    """Ready once the broker is reachable: at once in-process, as soon as the pub/sub link is up on Redis."""
    deadline = time.monotonic() + 5
    while True:
        r = await client.get("/ready")
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        assert r.status_code == 503 and (await r.get_json())["status"] != "ready"
        await asyncio.sleep(0.02)
    body = await r.get_json()
    assert r.status_code == 200 and body["status"] == "ready"
    assert body["broker"] == ("redis" if settings.redis_dsn else "memory")


async def test_unknown_route_is_json_404(client: QuartClient) -> None:
    for path in ("/nope", "/publish", "/connections", "/sse/nope", "/publish/app1/alice/extra"):
        await error_body(await client.get(path), 404)


async def test_wrong_method_is_json_405(client: QuartClient) -> None:
    for method, path in [("POST", "/health"), ("DELETE", "/ready"), ("GET", "/publish/app1/alice"),
                         ("PUT", "/publish/app1"), ("POST", "/connections/app1"), ("DELETE", "/sse")]:
        r = await client.open(path, method=method)
        await error_body(r, 405)
        assert r.headers.get("Allow"), (method, path)


# ------------------------------------------------------------------------------------------------ publish body
BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("not JSON", b"{not json", "body"),
    ("empty", b"", "body"),
    ("NaN", b'{"type": "t", "data": NaN}', "body"),
    ("a list", b'[{"type": "t"}]', "body"),
    ("a string", b'"t"', "body"),
    ("null", b"null", "body"),
    ("missing type", b'{"data": {}}', "type"),
    ("type a number", b'{"type": 1}', "type"),
    ("type null", b'{"type": null}', "type"),
    ("type a list", b'{"type": ["t"]}', "type"),
    ("type empty", b'{"type": ""}', "type"),
    ("type with LF", b'{"type": "a\\nb"}', "type"),
    ("type with CR", b'{"type": "a\\rb"}', "type"),
    ("type with NUL", b'{"type": "a\\u0000b"}', "type"),
    ("type too long", json.dumps({"type": "t" * 129}).encode(), "type"),
    ("id with CRLF", b'{"type": "t", "id": "1\\r\\nevent: x"}', "id"),
    ("id a number", b'{"type": "t", "id": 5}', "id"),
    ("extra field", b'{"type": "t", "event": "x"}', "event"),
    ("lone surrogate", b'{"type": "t", "data": "\\ud800"}', "body"),
    ("data too large", json.dumps({"type": "t", "data": "x" * 62_000}).encode(), "data"),
    ("data too deep", b'{"type": "t", "data": ' + b"[" * 300 + b"]" * 300 + b"}", "data"),
]


@pytest.mark.parametrize(("raw", "field"), [(b, f) for _, b, f in BAD_BODIES], ids=[n for n, _, _ in BAD_BODIES])
async def test_bad_publish_body_is_400_naming_the_field(client: QuartClient, settings: Settings, raw: bytes,
                                                        field: str) -> None:
    headers = {**pub_headers(settings), "Content-Type": "application/json"}
    body = await error_body(await client.post("/publish/app1/alice", data=raw, headers=headers), 400)
    assert body["message"].startswith(f"{field}:"), body
    if raw.startswith(b"["):
        return  # a JSON array to POST /publish/{app} is a batch: tests/test_publish_batch.py
    body = await error_body(await client.post("/publish/app1", data=raw, headers=headers), 400)
    assert body["message"].startswith(f"{field}:"), body


@pytest.mark.parametrize("path", ["/publish/app1/a:b", "/publish/a*b/alice", "/publish/a%20b",
                                  "/publish/app1/" + "u" * 129])
async def test_bad_path_id_is_400(client: QuartClient, settings: Settings, path: str) -> None:
    await error_body(await client.post(path, json={"type": "t"}, headers=pub_headers(settings)), 400)


async def test_body_over_64_kib_is_413(client: QuartClient, settings: Settings) -> None:
    raw = json.dumps({"type": "t", "data": "x" * (64 * 1024)}).encode()
    body = await error_body(await client.post("/publish/app1/alice", data=raw, headers=pub_headers(settings)), 413)
    assert "65536 bytes" in body["message"] and "MAX_BODY_BYTES" in body["message"], body  # which limit, and its name


async def test_publish_202_with_id(client: QuartClient, settings: Settings) -> None:
    r = await client.post("/publish/app1/alice", json={"type": "greet", "data": {"a": 1}, "id": "e-1"},
                          headers=pub_headers(settings))
    assert r.status_code == 202 and await r.get_json() == {"id": "e-1"}
    r = await client.post("/publish/app1", json={"type": "news"}, headers=pub_headers(settings))
    body = await r.get_json()
    assert r.status_code == 202 and set(body) == {"id"} and isinstance(body["id"], str) and body["id"]
    r2 = await client.post("/publish/app1", json={"type": "news"}, headers=pub_headers(settings))
    assert (await r2.get_json())["id"] != body["id"]  # the service assigns distinct ids


@pytest.mark.parametrize("path", ["/publish/app1/alice", "/publish/app1"])
async def test_an_empty_id_is_no_id(client: QuartClient, settings: Settings, path: str) -> None:
    """A Go struct marshalled without omitempty sends "id": "": the service assigns an id, as for a missing one."""
    ids: list[str] = []
    for body in ({"type": "t", "id": ""}, {"type": "t", "id": "", "data": 1}, [{"type": "t", "id": ""}]):
        if isinstance(body, list) and path.endswith("alice"):
            continue  # a batch goes to POST /publish/{app}
        r = await client.post(path, json=body, headers=pub_headers(settings))
        got = await r.get_json()
        assert r.status_code == 202, got
        ids += got["ids"] if "ids" in got else [got["id"]]
    assert all(ids) and len(set(ids)) == len(ids)  # assigned, and never a duplicate of each other


async def test_refusal_order_401_then_400_then_403(client: QuartClient, settings: Settings) -> None:
    """Who are you, then what you sent, then may you (docs/security.md)."""
    bad_body = {"type": 1}
    other_app = pub_headers(settings, app="app2")
    no_scope = auth(token(settings, "alice", "app1"))
    # no or bad token: 401 whatever else is wrong
    await error_body(await client.post("/publish/a:b/alice", json=bad_body), 401)
    await error_body(await client.post("/publish/app1/alice", json=bad_body,
                                       headers={"Authorization": "Bearer x.y.z"}), 401)
    await error_body(await client.post("/publish/app1/alice", data=b"{", headers={"Authorization": "Basic x"}), 401)
    # a valid token, but the wrong app or no scope: a bad path or body is still a 400
    for headers in (other_app, no_scope):
        await error_body(await client.post("/publish/a:b/alice", json={"type": "t"}, headers=headers), 400)
        await error_body(await client.post("/publish/app1/alice", json=bad_body, headers=headers), 400)
        await error_body(await client.post("/publish/app1", data=b"[]", headers=headers), 400)
        # only a good request is refused for who sent it
        await error_body(await client.post("/publish/app1/alice", json={"type": "t"}, headers=headers), 403)
    # the same order on the connections routes
    await error_body(await client.get("/connections/a:b/alice"), 401)
    await error_body(await client.get("/connections/a:b/alice", headers=other_app), 400)
    await error_body(await client.get("/connections/app1/alice", headers=other_app), 403)


# ------------------------------------------------------------------------------------------------ CORS
async def test_cors_default_is_star_without_credentials(client: QuartClient, settings: Settings) -> None:
    origin = {"Origin": "https://anywhere.test"}
    published = await client.post("/publish/app1/alice", json={"type": "t"},
                                  headers={**origin, **pub_headers(settings)})
    for r in [await client.get("/health", headers=origin),
              await client.get("/nope", headers=origin),  # errors too
              await client.get("/connections/app1/alice", headers=origin),  # 401
              published]:
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in r.headers
        assert "Origin" in r.headers.get_all("Vary") or "Origin" in r.headers.get("Vary", "")
        assert r.headers["Access-Control-Expose-Headers"] == "X-Connection-Id, Idempotent-Replayed, Retry-After"


async def test_cors_preflight(client: QuartClient) -> None:
    r = await client.options("/publish/app1/alice", headers={
        "Origin": "https://anywhere.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    methods = {m.strip() for m in r.headers["Access-Control-Allow-Methods"].split(",")}
    assert {"GET", "POST", "DELETE"} <= methods
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "last-event-id"} <= allowed
    r = await client.options("/sse", headers={"Origin": "https://anywhere.test",
                                              "Access-Control-Request-Method": "GET"})
    assert r.status_code == 204  # no token needed for a preflight


async def test_cors_origin_list_with_credentials(settings_factory: Any) -> None:
    s: Settings = settings_factory(cors_origins="https://a.test,https://b.test")
    async with client_for(s) as c:
        for origin in ("https://a.test", "https://b.test"):
            r = await c.get("/health", headers={"Origin": origin})
            assert r.headers["Access-Control-Allow-Origin"] == origin
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
            assert "X-Connection-Id" in r.headers["Access-Control-Expose-Headers"]
            assert "Origin" in r.headers.get("Vary", "")
            pre = await c.options("/sse", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
            assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == origin
            assert pre.headers["Access-Control-Allow-Credentials"] == "true"
        for headers in ({"Origin": "https://evil.test"}, {"Origin": "https://a.test.evil.test"}, {}):
            r = await c.get("/health", headers=headers)
            assert "Access-Control-Allow-Origin" not in r.headers
            assert "Access-Control-Allow-Credentials" not in r.headers
            assert "Origin" in r.headers.get("Vary", "")  # a cache must not serve a.test's answer to evil.test
            pre = await c.options("/sse", headers={**headers, "Access-Control-Request-Method": "GET"})
            assert "Access-Control-Allow-Origin" not in pre.headers


# ------------------------------------------------------------------------------------------------ metrics
async def test_metrics_is_prometheus_text(client: QuartClient, settings: Settings) -> None:
    await client.post("/publish/app1/alice", json={"type": "t"}, headers=pub_headers(settings))
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = await r.get_data(as_text=True)
    assert "# TYPE sse_streams_open gauge" in text
    assert "# HELP" in text
    published = [ln for ln in text.splitlines() if ln.startswith('sse_publishes_total{kind="user"}')]
    assert published and float(published[0].split()[-1]) == 1.0
