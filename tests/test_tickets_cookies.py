"""Browser auth without long-lived tokens in URLs (docs/security.md): tickets, cookies, the per-user cap for both,
and no token or ticket in any log line or in Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from typing import Any

import httpx
import redis.asyncio as aioredis

from quart_sse.settings import Settings
from tests.support import LiveServer, auth, live_server, make_settings, open_stream, refusal, token
from tests.support_faults import until
from tests.support_security import capture_logs, client_for


async def _ticket(srv: LiveServer, tok: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.post("/sse/ticket", headers=auth(tok))
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def _publish(srv: LiveServer, app: str, user: str, body: dict[str, Any]) -> None:
    s = srv.services.settings
    async with httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.post(f"/publish/{app}/{user}", json=body, headers=auth(token(s, "backend", app, "publish")))
    assert r.status_code == 202, r.text


def _is_401(status: int, headers: dict[str, str], body: bytes) -> bool:
    return status == 401 and headers.get("www-authenticate", "").startswith("Bearer") and \
        json.loads(body)["error"] == "unauthorized"


async def test_ticket_opens_one_stream_once(server: LiveServer) -> None:
    s = server.services.settings
    body = await _ticket(server, token(s, "grace", "app1"))
    assert set(body) == {"ticket", "expires_in"} and isinstance(body["ticket"], str)
    assert isinstance(body["expires_in"], int) and 1 <= body["expires_in"] <= 60
    path = "/sse?ticket=" + urllib.parse.quote(body["ticket"])
    st = await open_stream(server.port, path)
    try:
        assert st.status == 200
        await _publish(server, "app1", "grace", {"type": "hello", "data": 1})
        ev = await st.next_event()
        assert ev is not None and ev.event == "hello"  # the ticket's identity: app1/grace
        again = await open_stream(server.port, path)
        assert _is_401(again.status, again.headers, bytes(again.raw))  # single use
        await again.close()
    finally:
        await st.close()


async def test_ticket_is_bought_with_a_bearer_header_only(server: LiveServer) -> None:
    s = server.services.settings
    tok = token(s, "grace", "app1")
    cookie = {"Cookie": f"{s.jwt_cookie_name}={tok}"}
    async with httpx.AsyncClient(base_url=server.url) as c:
        for kw in ({"headers": cookie}, {"params": {"token": tok}}, {"params": {"Authorization": tok}},
                   {"headers": {"Authorization": f"Basic {tok}"}}, {}):
            r = await c.post("/sse/ticket", **kw)  # type: ignore[arg-type]
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", (kw, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")


async def test_ticket_expires(settings_factory: Any) -> None:
    s: Settings = settings_factory(ticket_ttl=1)
    async with live_server(s) as srv:
        body = await _ticket(srv, token(s, "grace", "app1"))
        assert body["expires_in"] == 1
        await asyncio.sleep(1.3)  # the expiry is the behaviour under test: time has to pass
        st = await open_stream(srv.port, "/sse?ticket=" + urllib.parse.quote(body["ticket"]))
        assert _is_401(st.status, st.headers, bytes(st.raw))
        await st.close()


async def test_ticket_works_on_another_instance_sharing_redis(redis_url: str) -> None:
    sa, sb = make_settings(redis_url=redis_url), make_settings(redis_url=redis_url)
    async with live_server(sa) as a, live_server(sb) as b:
        body = await _ticket(a, token(sa, "grace", "app1"))
        path = "/sse?ticket=" + urllib.parse.quote(body["ticket"])
        st = await open_stream(b.port, path)
        try:
            assert st.status == 200
            await _publish(a, "app1", "grace", {"type": "cross", "data": {}})
            ev = await st.next_event()
            assert ev is not None and ev.event == "cross"
            again = await open_stream(a.port, path)
            assert _is_401(again.status, again.headers, bytes(again.raw))
            await again.close()
        finally:
            await st.close()


async def test_ticket_stream_ends_at_the_buying_tokens_exp(server: LiveServer) -> None:
    s = server.services.settings
    body = await _ticket(server, token(s, "grace", "app1", ttl=2))
    assert body["expires_in"] <= 2  # a ticket never outlives its token
    t0 = time.monotonic()
    st = await open_stream(server.port, "/sse?ticket=" + urllib.parse.quote(body["ticket"]))
    try:
        assert st.status == 200
        raw = await st.read_until_closed(timeout=6)
        assert b": closing token expired" in raw
        assert time.monotonic() - t0 < 3.5
    finally:
        await st.close()


# --------------------------------------------------------------------------------------------------- cookies
async def test_cookie_authenticates_gets(server: LiveServer) -> None:
    s = server.services.settings
    cookie = {"Cookie": f"{s.jwt_cookie_name}={token(s, 'frank', 'app1')}"}
    st = await open_stream(server.port, headers=cookie)
    try:
        assert st.status == 200
        async with httpx.AsyncClient(base_url=server.url) as c:
            r = await c.get("/connections/app1/frank", headers=cookie)
        assert r.status_code == 200 and len(r.json()) == 1
    finally:
        await st.close()


async def test_cookie_name_is_a_setting() -> None:
    s = make_settings(jwt_cookie_name="sse_auth")
    async with live_server(s) as srv, httpx.AsyncClient(base_url=srv.url) as c:
        tok = token(s, "frank", "app1")
        r = await c.get("/connections/app1/frank", headers={"Cookie": f"sse_auth={tok}"})
        assert r.status_code == 200
        r = await c.get("/connections/app1/frank", headers={"Cookie": f"access_token_cookie={tok}"})
        assert r.status_code == 401


async def test_cookie_never_authorises_a_change(server: LiveServer) -> None:
    """A browser sends cookies with cross-site requests: publish, disconnect and tickets need a header or query."""
    s = server.services.settings
    tok = token(s, "admin", "app1", "publish connections")
    cookie = {"Cookie": f"{s.jwt_cookie_name}={tok}"}
    async with httpx.AsyncClient(base_url=server.url) as c:
        for method, path in (("POST", "/publish/app1/frank"), ("POST", "/publish/app1"),
                             ("DELETE", "/connections/app1/frank"), ("POST", "/sse/ticket")):
            r = await c.request(method, path, headers={**cookie, "Content-Type": "text/plain"},
                                content=b'{"type": "csrf", "data": 1}' if method == "POST" else None)
            assert r.status_code == 401, (method, path, r.text)
        r = await c.post("/publish/app1/frank", json={"type": "ok"}, headers=auth(tok))  # the header still works
        assert r.status_code == 202


async def test_user_cap_counts_tickets_cookies_and_tokens(settings_factory: Any) -> None:
    s: Settings = settings_factory(max_connections_per_user=2)
    async with live_server(s) as srv:
        tok = token(s, "capped", "app1")
        body = await _ticket(srv, tok)
        opened = [await open_stream(srv.port, "/sse?ticket=" + urllib.parse.quote(body["ticket"])),
                  await open_stream(srv.port, headers={"Cookie": f"{s.jwt_cookie_name}={tok}"})]
        try:
            assert [st.status for st in opened] == [200, 200]
            body = await _ticket(srv, tok)
            path = "/sse?ticket=" + urllib.parse.quote(body["ticket"])
            as_json = "application/json"
            over = [await open_stream(srv.port, path, accept=as_json),
                    await open_stream(srv.port, headers={"Cookie": f"{s.jwt_cookie_name}={tok}"}, accept=as_json),
                    await open_stream(srv.port, f"/sse?token={tok}", accept=as_json)]
            assert [st.status for st in over] == [429, 429, 429]
            refused = await open_stream(srv.port, path)  # an EventSource's request with the same ticket
            assert refusal(refused) is not None
            for st in [*over, refused]:
                await st.close()
            # a refused stream did not spend its ticket: the EventSource's retry (the same URL) gets in once the
            # cap frees, and the ticket is spent then
            await opened.pop().close()
            await until(lambda: len(srv.services.hub.subscribers) == 1)
            again = await open_stream(srv.port, path)
            opened.append(again)
            assert again.status == 200 and refusal(again) is None
            spent = await open_stream(srv.port, path, accept=as_json)
            assert spent.status == 401
            await spent.close()
        finally:
            for st in opened:
                await st.close()


# --------------------------------------------------------------------------------------------------- secrecy
async def _redis_dump(url: str) -> bytes:
    """Every key and value in the database, as one blob to search."""
    r: Any = aioredis.Redis.from_url(url)
    out = bytearray()
    try:
        async for key in r.scan_iter(count=1000):
            out += key + b"\n"
            kind = (await r.type(key)).decode()
            if kind == "string":
                out += await r.get(key) or b""
            elif kind == "hash":
                for k, v in (await r.hgetall(key)).items():
                    out += k + b"=" + v + b"\n"
            elif kind == "zset":
                out += b" ".join(m for m, _ in await r.zrange(key, 0, -1, withscores=True))
            elif kind == "set":
                out += b" ".join(await r.smembers(key))
            elif kind == "stream":
                for _, fields in await r.xrange(key):
                    out += b" ".join(k + b"=" + v for k, v in fields.items())
            out += b"\n"
    finally:
        await r.aclose()
    return bytes(out)


async def test_tokens_and_tickets_never_logged_nor_stored(redis_url: str) -> None:
    s = make_settings(redis_url=redis_url, log_level="DEBUG")
    async with live_server(s) as srv:
        secrets: list[str] = []
        with capture_logs() as logs:
            tok_q, tok_a, tok_c = (token(s, u, "app1") for u in ("q", "a", "c"))
            ticket = (await _ticket(srv, token(s, "t", "app1")))["ticket"]
            bad = token(s, "x", "app1", ttl=-60)
            secrets += [tok_q, tok_a, tok_c, ticket, bad]
            streams = [await open_stream(srv.port, f"/sse?token={tok_q}"),
                       await open_stream(srv.port, f"/sse?Authorization={tok_a}"),
                       await open_stream(srv.port, headers={"Cookie": f"{s.jwt_cookie_name}={tok_c}"}),
                       await open_stream(srv.port, f"/sse?ticket={urllib.parse.quote(ticket)}")]
            refused = [await open_stream(srv.port, f"/sse?ticket={urllib.parse.quote(ticket)}"),  # used
                       await open_stream(srv.port, f"/sse?token={bad}")]  # expired
            try:
                assert [st.status for st in streams] == [200, 200, 200, 200]
                assert [st.status for st in refused] == [401, 401]
                async with httpx.AsyncClient(base_url=srv.url) as c:
                    listing = (await c.get("/connections/app1", headers=auth(token(s, "ops", "app1",
                                                                                    "connections")))).text
                assert set(json.loads(listing)) == {"q", "a", "c", "t"}
                stored = await _redis_dump(redis_url)
                assert b"app1" in stored  # the registry is there, and holds nothing secret
            finally:
                for st in streams + refused:
                    await st.close()
        assert any("stream opened" in line for line in logs.lines)  # the capture does see the service's lines
        assert any('"GET /sse ' in line for line in logs.lines)  # and Hypercorn's access log, path only
        assert any('"POST /sse/ticket ' in line for line in logs.lines)
    for secret in secrets:
        for blob in (logs.text, listing):
            assert secret not in blob and secret[-20:] not in blob
        assert secret.encode() not in stored and secret[-20:].encode() not in stored


# --------------------------------------------------------------------------------------------------- CORS
async def test_cors_credentials_only_for_listed_origins() -> None:
    """A cookie is only useful cross-origin where CORS allows credentials: exactly the listed origins, never `*`."""
    for origins in ("https://app.example", "*,https://app.example"):
        s = make_settings(cors_origins=origins)
        async with client_for(s) as (_, client):
            tok = token(s, "frank", "app1")
            for origin in ("https://app.example", "https://evil.example", None):
                h = {"Cookie": f"{s.jwt_cookie_name}={tok}", **({"Origin": origin} if origin else {})}
                for r in (await client.get("/connections/app1/frank", headers=h),
                          await client.get("/nope", headers=h),
                          await client.post("/publish/app1/frank", headers=h, json={"type": "t"})):
                    assert "Origin" in r.headers.get_all("Vary"), r.headers
                    acao = r.headers.get("Access-Control-Allow-Origin")
                    if origin == "https://app.example":
                        assert acao == origin and r.headers["Access-Control-Allow-Credentials"] == "true"
                    else:
                        assert acao == ("*" if origins.startswith("*") else None)
                        assert "Access-Control-Allow-Credentials" not in r.headers
                pre = await client.options("/sse/ticket", headers={
                    **({"Origin": origin} if origin else {}), "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization"})
                assert pre.status_code == 204 and "Origin" in pre.headers.get_all("Vary")
                assert "POST" in pre.headers["Access-Control-Allow-Methods"]
                assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
                if origin == "https://app.example":
                    assert pre.headers["Access-Control-Allow-Origin"] == origin
                    assert pre.headers["Access-Control-Allow-Credentials"] == "true"
                else:
                    assert "Access-Control-Allow-Credentials" not in pre.headers
