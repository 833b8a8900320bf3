"""A body over MAX_BODY_BYTES is answered 413 over a real socket, on every Python, for the client that writes its
whole body before it reads (httpx, any asyncio client): the answer is never lost to a TCP reset
(quart_sse/bodydrain.py explains the race)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest

from quart_sse.app import create_app
from quart_sse.bodydrain import DRAIN_MAX_BYTES, UnreadBodyDrain, declares_body
from tests.support import LiveServer, live_server, make_settings, token

LIMIT = 64 * 1024
OVER = 70  # KiB sent: over the 64 KiB limit


@pytest.fixture
async def srv() -> AsyncIterator[LiveServer]:
    async with live_server(make_settings(log_level="WARNING")) as s:
        yield s


def _head(srv: LiveServer, framing: str) -> bytes:
    tok = token(srv.services.settings, "backend", "app1", "publish")
    return (f"POST /publish/app1/u HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {tok}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status = int((await reader.readline()).split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_client_that_writes_its_whole_body_first_gets_413(srv: LiveServer, framing: str) -> None:
    """Write 70 KiB in 1 KiB pieces, the server running in between, as httpx does, and only then read: every write
    succeeds and the answer is a 413 with the JSON error; the connection even stays usable. Ten times, since the
    reset this guards against is a race."""
    piece = b"x" * 1024
    if framing == "chunked":
        head, tail = _head(srv, "Transfer-Encoding: chunked"), b"0\r\n\r\n"
        pieces = [b"400\r\n" + piece + b"\r\n"] * OVER
    else:
        head, pieces, tail = _head(srv, f"Content-Length: {OVER * 1024}"), [piece] * OVER, b""
    for _ in range(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            writer.write(head)
            for p in pieces:
                writer.write(p)
                await writer.drain()  # an asyncio transport aborts itself if the server has reset the connection
                await asyncio.sleep(0)  # the server runs between the pieces, as it does with any real client
            writer.write(tail)
            await writer.drain()
            status, _, body = await asyncio.wait_for(_read_response(reader), 5)
            assert status == 413, body
            assert json.loads(body)["error"] == "request_entity_too_large"
            writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # the body was read to its end: keep-alive
            assert (await asyncio.wait_for(_read_response(reader), 5))[0] == 200
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_the_413_comes_before_the_body_is_sent(srv: LiveServer) -> None:
    """Content-Length over the limit: the answer is there while the client is still sending (it may stop)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(_head(srv, "Content-Length: 200000") + b"x" * 10_000)
        await writer.drain()
        status, _, body = await asyncio.wait_for(_read_response(reader), 5)
        assert status == 413, body
        writer.write(b"x" * 190_000)  # the rest is still read and discarded, without a reset
        await writer.drain()
        writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await asyncio.wait_for(_read_response(reader), 5))[0] == 200
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_the_drain_is_bounded_in_time() -> None:
    """A client that declares a huge body and stops sending holds its connection for `max_seconds` after the
    413, not forever."""
    s = make_settings(log_level="WARNING")
    app = create_app(s)
    drain = app.asgi_app
    assert isinstance(drain, UnreadBodyDrain)
    assert drain.max_bytes == max(s.max_body_bytes, s.max_batch_bytes) + DRAIN_MAX_BYTES
    drain.max_seconds = 0.5
    srv = LiveServer(app, s.app_port)
    await srv.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(_head(srv, "Content-Length: 100000000") + b"x" * 1000)
        await writer.drain()
        status, _, _ = await asyncio.wait_for(_read_response(reader), 5)
        t0 = time.monotonic()
        assert status == 413
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        assert 0.3 < time.monotonic() - t0 < 3
        writer.close()
    finally:
        await srv.stop()


async def test_the_drain_is_bounded_in_bytes() -> None:
    """Past `max_bytes` of body the server stops reading and closes (the client may see a reset then)."""
    s = make_settings(log_level="WARNING")
    app = create_app(s)
    drain = app.asgi_app
    assert isinstance(drain, UnreadBodyDrain)
    drain.max_bytes = 100_000
    srv = LiveServer(app, s.app_port)
    await srv.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(_head(srv, "Content-Length: 100000000"))
        status, _, _ = await asyncio.wait_for(_read_response(reader), 5)
        assert status == 413
        t0 = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for _ in range(1000):  # 100 MB would take longer than the limit allows
                writer.write(b"x" * 100_000)
                await writer.drain()
        assert time.monotonic() - t0 < 3
        writer.close()
    finally:
        await srv.stop()


def test_which_requests_declare_a_body() -> None:
    def scope(version: str, *headers: tuple[bytes, bytes]) -> dict[str, object]:
        return {"type": "http", "http_version": version, "headers": list(headers)}

    assert declares_body(scope("1.1", (b"content-length", b"10")))
    assert declares_body(scope("1.1", (b"Transfer-Encoding", b"chunked")))
    assert declares_body(scope("1.0", (b"content-length", b"1")))
    assert not declares_body(scope("1.1", (b"content-length", b"0")))
    assert not declares_body(scope("1.1", (b"accept", b"text/event-stream")))  # GET /sse: passes straight through
    assert not declares_body(scope("2", (b"content-length", b"10")))
    assert not declares_body({"type": "websocket", "http_version": "1.1", "headers": []})
