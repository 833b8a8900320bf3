"""GET /sse over real HTTP on both brokers: headers, first bytes, wire format, pings, disconnect clean-up."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from quart_sse import keys
from tests.support import LiveServer, auth, open_stream, token


async def _publish(srv: LiveServer, app: str, user: str | None, body: dict[str, object]) -> httpx.Response:
    s = srv.services.settings
    path = f"/publish/{app}" + (f"/{user}" if user else "")
    async with httpx.AsyncClient(base_url=srv.url) as c:
        return await c.post(path, json=body, headers=auth(token(s, "backend", app, "publish")))


async def test_stream_headers_and_first_bytes(server: LiveServer) -> None:
    s = server.services.settings
    st = await open_stream(server.port, headers=auth(token(s, "alice", "app1")))
    try:
        assert st.status == 200
        assert st.headers["content-type"].startswith("text/event-stream")
        assert st.headers["cache-control"] == "no-cache"
        assert st.headers["x-accel-buffering"] == "no"
        assert len(st.headers["x-connection-id"]) == 36
        first = await asyncio.wait_for(st._read_body(), 2)  # before any event
        assert first.startswith(b"retry: 3000\n")
    finally:
        await st.close()


async def test_event_wire_format_is_the_seeds(server: LiveServer) -> None:
    s = server.services.settings
    st = await open_stream(server.port, headers=auth(token(s, "alice", "app1")))
    try:
        r = await _publish(server, "app1", "alice", {"id": "100", "type": "event", "data": {"hello": "world"}})
        assert r.status_code == 202 and r.json() == {"id": "100"}
        ev = await st.next_event()
        assert ev is not None and (ev.id, ev.event, ev.json()) == ("100", "event", {"hello": "world"})
        assert b'id: 100\nevent: event\ndata: {"hello":"world"}\n\n' in st.raw
    finally:
        await st.close()


async def test_ping_has_no_id(settings_factory: object) -> None:
    from tests.support import live_server

    settings = settings_factory(ping_interval=0.2)  # type: ignore[operator]
    async with live_server(settings) as srv:
        st = await open_stream(srv.port, headers=auth(token(settings, "u", "app1")))
        try:
            ev = await st.next_event(skip_ping=False, timeout=3)
            assert ev is not None and ev.event == "ping" and ev.id is None and ev.json() == {}
            assert b"event: ping\ndata: {}\n\n" in st.raw
        finally:
            await st.close()


async def test_disconnect_cleans_up_at_once(server: LiveServer) -> None:
    s = server.services.settings
    hub = server.services.hub
    st = await open_stream(server.port, headers=auth(token(s, "alice", "app1")))
    assert len(hub.subscribers) == 1 and hub.channel_count == 2
    await st.close()
    for _ in range(200):
        if not hub.subscribers and hub.channel_count == 0:
            break
        await asyncio.sleep(0.01)
    assert not hub.subscribers and hub.channel_count == 0
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.get("/connections/app1/alice", headers=auth(token(s, "alice", "app1")))
    assert r.json() == {}
    if s.redis_dsn:
        link = server.services.broker.link
        assert keys.user_channel("app1", "alice") not in link.desired


async def test_stream_outlives_framework_and_server_timeouts(settings_factory: object) -> None:
    """Quart ends a response after RESPONSE_TIMEOUT (60 s by default) and Hypercorn closes a connection it holds
    idle after keep_alive_timeout (5 s): shrink both to 1 s and hold a stream 3 s with nothing on the wire (no
    ping either); it must still be open and deliver."""
    from quart_sse.app import create_app
    from tests.support import LiveServer

    settings = settings_factory(ping_interval=3600)  # type: ignore[operator]
    app = create_app(settings)
    app.config["RESPONSE_TIMEOUT"] = 1  # what the default (60 s) would do, sooner

    def short_keep_alive(cfg: Any) -> None:
        cfg.keep_alive_timeout = 1

    srv = LiveServer(app, settings.app_port, tweak=short_keep_alive)
    await srv.start()
    try:
        st = await open_stream(srv.port, headers=auth(token(settings, "alice", "app1")))
        try:
            await asyncio.sleep(3.0)  # the condition under test is time passing: three times both time-outs
            r = await _publish(srv, "app1", "alice", {"id": "late", "type": "t", "data": 1})
            assert r.status_code == 202
            ev = await st.next_event(timeout=3)
            assert ev is not None and ev.id == "late"
        finally:
            await st.close()
    finally:
        await srv.stop()


async def test_http10_client_gets_unchunked_frames(server: LiveServer) -> None:
    """An HTTP/1.0 response is delimited by the close, not chunked: the hub's direct writes must follow suit."""
    s = server.services.settings
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        tok = token(s, "old", "app1")
        writer.write(f"GET /sse HTTP/1.0\r\nAuthorization: Bearer {tok}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" not in head.lower()
        first = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        assert first.startswith(b"retry: ")
        r = await _publish(server, "app1", "old", {"id": "e1", "type": "t", "data": {"a": 1}})
        assert r.status_code == 202
        frame = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        assert frame == b'id: e1\nevent: t\ndata: {"a":1}\n\n'  # no chunk size line around it
    finally:
        writer.close()
        await writer.wait_closed()
