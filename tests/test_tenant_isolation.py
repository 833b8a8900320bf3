"""Tenant isolation on every route (docs/security.md): nothing reachable across `iss`, and the answer to another
app is the same whether that app exists or not. docs/security.md maps each route to the test proving it.
"""

from __future__ import annotations

from typing import Any

import httpx

from quart_sse.settings import Settings
from tests.support import LiveServer, RawStream, auth, live_server, make_settings, open_stream, token

ALL = "publish connections"


def _answer(r: httpx.Response) -> tuple[int, Any, list[str]]:
    """What a caller can observe: status, body, header names (minus the clock)."""
    return r.status_code, r.json(), sorted(h for h in r.headers if h not in ("date",))


async def _publish(srv: LiveServer, app: str, user: str | None, body: dict[str, Any]) -> httpx.Response:
    s = srv.services.settings
    async with httpx.AsyncClient(base_url=srv.url) as c:
        return await c.post(f"/publish/{app}" + (f"/{user}" if user else ""), json=body,
                            headers=auth(token(s, "backend", app, "publish")))


async def _events_until(st: RawStream, marker: str) -> list[tuple[str | None, str]]:
    """(id, type) of every event up to and including the one typed `marker`."""
    out: list[tuple[str | None, str]] = []
    while True:
        ev = await st.next_event(timeout=5)
        assert ev is not None, f"stream ended before {marker}"
        out.append((ev.id, ev.event))
        if ev.event == marker:
            return out


def _cross_app_requests(target: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [("GET", f"/connections/{target}", None),
            ("GET", f"/connections/{target}/bob", None),
            ("DELETE", f"/connections/{target}/bob", None),
            ("POST", f"/publish/{target}/bob", {"type": "intrusion", "data": 1}),
            ("POST", f"/publish/{target}", {"type": "intrusion", "data": 1})]


async def test_another_app_is_403_and_indistinguishable_from_none(server: LiveServer) -> None:
    """An app1 token holding every scope gets the same 403 for app2 (live, with a stream and history) and for an
    app that never existed; app2's stream sees nothing of it."""
    s = server.services.settings
    bob2 = await open_stream(server.port, headers=auth(token(s, "bob", "app2")))
    try:
        assert (await _publish(server, "app2", "bob", {"id": "h1", "type": "history", "data": 1})).status_code == 202
        assert (await bob2.next_event()) is not None
        intruder = auth(token(s, "mallory", "app1", ALL))
        async with httpx.AsyncClient(base_url=server.url) as c:
            for (method, path, body), (_, ghost_path, _) in zip(_cross_app_requests("app2"),
                                                               _cross_app_requests("ghost-app"), strict=True):
                live = await c.request(method, path, json=body, headers=intruder)
                ghost = await c.request(method, ghost_path, json=body, headers=intruder)
                assert live.status_code == 403, (method, path, live.text)
                assert _answer(live) == _answer(ghost), (method, path)
        assert len(server.services.hub.subscribers) == 1  # the DELETE closed nothing
        assert (await _publish(server, "app2", "bob", {"type": "marker", "data": 0})).status_code == 202
        assert [t for _, t in await _events_until(bob2, "marker")] == ["marker"]
        assert b"intrusion" not in bob2.raw
    finally:
        await bob2.close()


async def test_same_app_other_user_needs_the_scope(server: LiveServer) -> None:
    s = server.services.settings
    bob = await open_stream(server.port, headers=auth(token(s, "bob", "app1")))
    try:
        alice = auth(token(s, "alice", "app1"))  # no scope
        async with httpx.AsyncClient(base_url=server.url) as c:
            for method, user, body in (("GET", "bob", None), ("GET", "nobody", None),
                                       ("DELETE", "bob", None), ("DELETE", "nobody", None)):
                r = await c.request(method, f"/connections/app1/{user}", json=body, headers=alice)
                assert r.status_code == 403, (method, user)
            live = await c.get("/connections/app1/bob", headers=alice)
            ghost = await c.get("/connections/app1/nobody", headers=alice)
            assert _answer(live) == _answer(ghost)
            for path in ("/publish/app1/bob", "/publish/app1"):
                r = await c.post(path, json={"type": "x"}, headers=alice)
                assert r.status_code == 403
            own = await c.get("/connections/app1/alice", headers=alice)
            assert own.status_code == 200 and own.json() == {}
            listed = await c.get("/connections/app1/bob", headers=auth(token(s, "ops", "app1", "connections")))
            assert list(listed.json()) == [bob.headers["x-connection-id"]]
    finally:
        await bob.close()


async def test_each_stream_sees_only_its_own_channels(server: LiveServer) -> None:
    """Same user id in two apps, two users in one app: every event lands exactly where it was addressed."""
    s = server.services.settings
    names = [("app1", "alice"), ("app1", "bob"), ("app2", "alice")]
    streams = {n: await open_stream(server.port, headers=auth(token(s, n[1], n[0]))) for n in names}
    try:
        for app, user, typ in (("app1", "alice", "a1-alice"), ("app1", None, "a1-all"),
                               ("app2", "alice", "a2-alice"), ("app2", None, "a2-all"), ("app1", "bob", "a1-bob")):
            assert (await _publish(server, app, user, {"type": typ, "data": {}})).status_code == 202
        for app in ("app1", "app2"):
            assert (await _publish(server, app, None, {"type": "end", "data": {}})).status_code == 202
        got = {n: [t for _, t in await _events_until(st, "end")] for n, st in streams.items()}
        assert got == {("app1", "alice"): ["a1-alice", "a1-all", "end"],
                       ("app1", "bob"): ["a1-all", "a1-bob", "end"],
                       ("app2", "alice"): ["a2-alice", "a2-all", "end"]}
    finally:
        for st in streams.values():
            await st.close()


async def test_resume_cannot_reach_another_apps_history(server: LiveServer) -> None:
    """A Last-Event-ID naming app2's event gives app1's client the same reset as an id that never existed."""
    s = server.services.settings
    assert (await _publish(server, "app2", "alice", {"id": "evt-7", "type": "secret", "data": 1})).status_code == 202
    assert (await _publish(server, "app2", "alice", {"type": "secret", "data": 2})).status_code == 202
    assert (await _publish(server, "app2", None, {"type": "secret", "data": 3})).status_code == 202
    firsts = []
    for last_id in ("evt-7", "never-was"):
        st = await open_stream(server.port, headers={**auth(token(s, "alice", "app1")), "Last-Event-ID": last_id})
        try:
            ev = await st.next_event()
            assert ev is not None and ev.event == "reset" and ev.id is None
            firsts.append(ev.json()["reason"])
            assert b"secret" not in st.raw
        finally:
            await st.close()
    assert firsts == ["unknown id", "unknown id"]


async def test_disconnect_stays_inside_the_app(server: LiveServer) -> None:
    s = server.services.settings
    bob1 = await open_stream(server.port, headers=auth(token(s, "bob", "app1")))
    bob2 = await open_stream(server.port, headers=auth(token(s, "bob", "app2")))
    try:
        async with httpx.AsyncClient(base_url=server.url) as c:
            r = await c.delete("/connections/app1/bob", headers=auth(token(s, "ops", "app1", "connections")))
        assert r.status_code == 200 and r.json() == {"closed": 1}
        assert b": closing" in await bob1.read_until_closed()
        assert (await _publish(server, "app2", "bob", {"type": "still-here", "data": 1})).status_code == 202
        ev = await bob2.next_event()
        assert ev is not None and ev.event == "still-here"
    finally:
        await bob1.close()
        await bob2.close()


async def test_ids_cannot_name_another_tenants_keys(server: LiveServer) -> None:
    """`:` and the glob/hash-tag characters are not in the id pattern, so no id can splice into another key name."""
    s = server.services.settings
    ops = auth(token(s, "ops", "app1", ALL))
    async with httpx.AsyncClient(base_url=server.url) as c:
        for path in ("/connections/app1:channel:bob", "/connections/app1/bob:x", "/connections/app%7B2%7D",
                     "/connections/app1/%2A", "/publish/app1:broadcast"):
            method = "POST" if path.startswith("/publish") else "GET"
            r = await c.request(method, path, json={"type": "x"}, headers=ops)
            assert r.status_code == 400, (path, r.status_code, r.text)
        for sub, iss in (("bob", "app2:channel"), ("bob:x", "app1"), ("*", "app1"), ("bob", "{app1}")):
            r = await c.get("/connections/app1/bob", headers=auth(_raw_token(s, sub, iss)))
            assert r.status_code == 401


def _raw_token(s: Settings, sub: str, iss: str) -> str:
    """`mint` refuses bad ids; an attacker's issuer would not."""
    from tests.support_security import claims, sign

    return sign(claims(sub, iss), s.jwt_secret.get_secret_value())


async def test_public_routes_leak_no_tenant_data(server: LiveServer) -> None:
    s = server.services.settings
    st = await open_stream(server.port, headers=auth(token(s, "someone-secret", "tenant-secret")))
    try:
        async with httpx.AsyncClient(base_url=server.url) as c:
            for path in ("/", "/health", "/ready", "/metrics", "/demo", "/openapi.json"):
                r = await c.get(path)
                assert r.status_code in (200, 301), path
                assert "tenant-secret" not in r.text and "someone-secret" not in r.text, path
    finally:
        await st.close()


async def test_demo_token_minting_is_not_routed_in_production() -> None:
    """`POST /demo/token` mints tokens for any app: a debug convenience that production must not have."""
    s = make_settings(app_mode="production")
    async with live_server(s) as srv, httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.post("/demo/token", json={"app": "app1", "user": "alice"})
        assert r.status_code == 404
