"""The hand-off over real sockets: a started HTTP/1.x stream owns its connection, and Quart and Hypercorn let go.

Every lifecycle step a stream has (events, the client leaving, the server ending it, shutdown, a client that falls
behind) is run both ways: handed off (the default) and held by the generator to the end (STREAM_HANDOFF=false).
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from quart_sse import transports
from quart_sse.hub import Subscriber
from tests.support import LiveServer, RawStream, auth, live_server, open_stream, token
from tests.support_faults import until

APP = "app1"


@pytest.fixture(params=[True, False], ids=["handoff", "generator"])
async def srv(request: pytest.FixtureRequest, settings_factory: Any) -> AsyncIterator[LiveServer]:
    async with live_server(settings_factory(stream_handoff=request.param)) as s:
        yield s


def _alive(type_name: str) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ == type_name)


async def _stream(srv: LiveServer, user: str = "alice", **kw: Any) -> tuple[RawStream, Subscriber]:
    """A stream, once it has reached its steady state (handed off, or its generator parked)."""
    s = srv.services.settings
    st = await open_stream(srv.port, headers=auth(token(s, user, APP, **kw)))
    assert st.status == 200
    hub = srv.services.hub
    await until(lambda: any(x.user == user for x in hub.subscribers))
    sub = next(x for x in hub.subscribers if x.user == user)
    await until(lambda: sub.owned if s.stream_handoff else sub.parked)
    return st, sub


async def _publish(srv: LiveServer, user: str, i: int, pad: str = "") -> None:
    s = srv.services.settings
    async with httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.post(f"/publish/{APP}/{user}", json={"id": str(i), "type": "t", "data": {"i": i, "pad": pad}},
                         headers=auth(token(s, "backend", APP, "publish")))
        assert r.status_code == 202, r.text


async def _listed(srv: LiveServer, user: str) -> dict[str, Any]:
    s = srv.services.settings
    async with httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.get(f"/connections/{APP}/{user}", headers=auth(token(s, user, APP)))
        listing: dict[str, Any] = r.json()
        return listing


async def test_open_streams_keep_no_request_or_connection_object(srv: LiveServer) -> None:
    """Handed off, a stream keeps none of Quart's request objects nor Hypercorn's connection objects (~30 KiB)."""
    warm, _ = await _stream(srv, "warm-up")  # Redis pool connections opened in a request keep its context: once
    await warm.close()
    await until(lambda: not srv.services.hub.subscribers)
    before = _alive("H11Protocol"), _alive("RequestContext")
    opened = [await _stream(srv, f"u{i}") for i in range(3)]
    try:
        if srv.services.settings.stream_handoff:
            # within 5 s: the tests' plain asyncio loop keeps a cancelled timer, and the context it was set in, until
            # its time (the hub's 5 s attach timeout); uvloop frees it at once
            await until(lambda: _alive("H11Protocol") <= before[0] and _alive("RequestContext") <= before[1], 10, 0.2)
            # the streams' connections are no longer the server's (not `count() == 0`: the live server's own
            # health-check connection stays registered until Hypercorn's keep-alive timeout, 5 s)
            assert all(transports.get(sub.peer) is None and sub.owned for _, sub in opened)
        else:
            assert _alive("RequestContext") == before[1] + 3 and not any(sub.owned for _, sub in opened)
        for i in range(3):
            await _publish(srv, "u1", i)
        got = [await opened[1][0].next_event() for _ in range(3)]
        assert [e.json()["i"] for e in got if e is not None] == [0, 1, 2]
    finally:
        for st, _ in opened:
            await st.close()


async def test_the_client_leaving_frees_the_stream_at_once(srv: LiveServer) -> None:
    st, _ = await _stream(srv)
    assert len(await _listed(srv, "alice")) == 1
    await st.close()
    hub = srv.services.hub
    await until(lambda: not hub.subscribers and hub.channel_count == 0)
    assert srv.services.metrics.streams_open._value.get() == 0
    assert await _listed(srv, "alice") == {}


async def test_a_stream_the_server_ends_says_why_and_ends_the_response(srv: LiveServer) -> None:
    s = srv.services.settings
    st, _ = await _stream(srv)
    async with httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.delete(f"/connections/{APP}/alice", headers=auth(token(s, "ops", APP, "connections")))
        assert r.status_code == 200, r.text
    raw = await st.read_until_closed()  # returns at the terminating zero-size chunk
    assert raw.endswith(b"\n\n") and b": closing disconnected by API\nretry: " in raw
    if s.stream_handoff:  # and the connection is closed (a generator's response leaves it to keep-alive)
        assert await asyncio.wait_for(st.reader.read(), 5) == b""
    assert await _listed(srv, "alice") == {}
    await st.close()


async def test_an_expired_token_ends_the_stream(srv: LiveServer) -> None:
    st, _ = await _stream(srv, ttl=2)
    raw = await st.read_until_closed(timeout=6)
    assert b": closing token expired\n" in raw
    await st.close()


async def test_shutdown_ends_every_stream_with_its_last_bytes(settings_factory: Any) -> None:
    for handoff in (True, False):
        async with live_server(settings_factory(stream_handoff=handoff)) as srv:
            streams = [await _stream(srv, f"u{i}") for i in range(20)]
            srv.services.begin_shutdown()
            if handoff:  # one job ends them all (Services.end_together): no task or wait per stream
                assert len(srv.services._tasks) == 1
            for st, _ in streams:
                raw = await st.read_until_closed()
                assert b": closing shutdown\nretry: " in raw, (handoff, raw)
                await st.close()


async def test_a_client_that_falls_behind_gets_everything_in_order_once_it_reads(srv: LiveServer) -> None:
    """A client that stops reading for a while: the kernel buffers, then the transport, then the bounded queue
    take the events; when it reads again, all of them arrive, in order, once."""
    s = srv.services.settings
    reader, writer = await asyncio.open_connection(sock=await _small_buffer_socket(srv.port))
    tok = token(s, "lagging", APP)
    writer.write(f"GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n".encode())
    await writer.drain()
    st = RawStream(reader, writer, 200, {})
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    hub = srv.services.hub
    await until(lambda: any(x.user == "lagging" for x in hub.subscribers))
    sub = next(x for x in hub.subscribers if x.user == "lagging")
    await until(lambda: sub.owned if s.stream_handoff else sub.parked)
    n, pad = 60, "x" * 8000  # ~480 KiB: more than the kernel's buffers and the transport's high-water mark
    try:
        for i in range(n):
            await _publish(srv, "lagging", i, pad)
        assert sub.pending(), "the queue path was not exercised"
        got = []
        while len(got) < n:
            ev = await st.next_event(timeout=10)
            assert ev is not None
            got.append(ev.json()["i"])
        assert got == list(range(n))
        assert not sub.closed
    finally:
        await st.close()


async def _small_buffer_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_bytes_a_client_sends_after_its_request_are_ignored(srv: LiveServer) -> None:
    st, _ = await _stream(srv)
    try:
        st.writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00garbage" * 100)  # never answered
        await st.writer.drain()
        await _publish(srv, "alice", 7)
        ev = await st.next_event()
        assert ev is not None and ev.json()["i"] == 7
        assert b"HTTP/1.1" not in st.raw
    finally:
        await st.close()


async def test_a_client_closing_its_side_ends_the_stream(srv: LiveServer) -> None:
    st, _ = await _stream(srv)
    st.writer.write_eof()
    await asyncio.wait_for(st.reader.read(), 5)  # the server closes its side too: read() reaches the end
    hub = srv.services.hub
    await until(lambda: not hub.subscribers)
    await st.close()


async def test_http2_streams_share_a_connection_and_keep_their_generators(server: LiveServer) -> None:
    """h2c (prior knowledge): two streams multiplexed on one connection cannot own it; both keep working."""
    s = server.services.settings
    hub = server.services.hub
    async with httpx.AsyncClient(base_url=server.url, http1=False, http2=True, timeout=10) as c, \
            c.stream("GET", "/sse", headers=auth(token(s, "h2a", APP))) as ra, \
            c.stream("GET", "/sse", headers=auth(token(s, "h2b", APP))) as rb:
        assert ra.http_version == rb.http_version == "HTTP/2" and ra.status_code == rb.status_code == 200
        await until(lambda: len(hub.subscribers) == 2 and all(x.parked for x in hub.subscribers))
        assert not any(x.owned for x in hub.subscribers)
        for user, resp in (("h2a", ra), ("h2b", rb)):
            await _publish(server, user, 5)
            text = ""
            async for part in resp.aiter_text():
                text += part
                if '"i":5' in text:
                    break
            assert text.startswith("retry: ") and 'id: 5\nevent: t\ndata: {"i":5,' in text
