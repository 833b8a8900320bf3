"""Resource abuse over real sockets (docs/security.md): slow and idle clients are cut off by Hypercorn's
keep_alive_timeout, oversize headers get 431 at once, bodies are bounded in size and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from quart_sse.app import create_app
from quart_sse.server import hypercorn_config
from tests.support import LiveServer, auth, live_server, make_settings, token

HEAD = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: "


async def _closed_after(port: int, drip: bytes | None, limit: float = 12.0) -> tuple[float, bytes]:
    """Connect, then send `drip` one byte per second (None: send nothing); seconds until the server hung up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    got = b""
    try:
        i = 0
        while time.monotonic() - t0 < limit:
            if drip is not None:
                writer.write(drip[i % len(drip):i % len(drip) + 1])
                i += 1
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
            try:
                chunk = await asyncio.wait_for(reader.read(1024), 1.0)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            got += chunk
        return time.monotonic() - t0, got
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def test_hypercorn_limits_are_configured() -> None:
    cfg = hypercorn_config(make_settings())
    assert cfg.keep_alive_timeout == 5 and cfg.h11_max_incomplete_size == 16 * 1024
    assert create_app(make_settings()).config["MAX_CONTENT_LENGTH"] == 64 * 1024


@pytest.mark.slow
async def test_slow_and_idle_clients_are_cut_off_and_do_not_starve_others() -> None:
    """40 clients dripping header bytes and 10 idle ones: all closed within ~keep_alive_timeout (5 s), and a normal
    request is answered at once meanwhile."""
    s = make_settings()
    async with live_server(s) as srv:
        slow = [asyncio.create_task(_closed_after(srv.port, HEAD + b"a" * 100)) for _ in range(40)]
        idle = [asyncio.create_task(_closed_after(srv.port, None)) for _ in range(10)]
        await asyncio.sleep(1.5)
        async with httpx.AsyncClient(base_url=srv.url) as c:
            t0 = time.monotonic()
            r = await c.get("/health")
            assert r.status_code == 200 and time.monotonic() - t0 < 1.0
        results = await asyncio.gather(*slow, *idle)
    for elapsed, got in results:
        assert 4.0 <= elapsed <= 7.5, elapsed  # keep_alive_timeout, not the 12 s the client would go on for
        assert not got.startswith(b"HTTP/1.1 200")  # never served


async def test_oversize_headers_get_431_at_once() -> None:
    s = make_settings()
    async with live_server(s) as srv:
        for parts in ([HEAD + b"a" * 100_000 + b"\r\n\r\n"],              # far over, in one go
                      [HEAD + b"a" * 20_000, b"a" * 20_000 + b"\r\n\r\n"]):  # over 16 KiB while incomplete
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            try:
                t0 = time.monotonic()
                for p in parts:
                    writer.write(p)
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    await asyncio.sleep(0.1)
                status = await asyncio.wait_for(reader.readline(), 3)
                assert status.split()[1] in (b"431", b"400"), status
                assert time.monotonic() - t0 < 2
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        async with httpx.AsyncClient(base_url=srv.url) as c:  # and the service is fine
            assert (await c.get("/health")).status_code == 200


async def test_bodies_over_64_kib_get_413() -> None:
    s = make_settings()
    async with live_server(s) as srv, httpx.AsyncClient(base_url=srv.url) as c:
        h = auth(token(s, "backend", "app1", "publish"))
        big = b'{"type": "t", "data": "' + b"x" * (70 * 1024) + b'"}'
        r = await c.post("/publish/app1/u", content=big, headers={**h, "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
            for _ in range(70):
                yield b"x" * 1024

        r = await c.post("/publish/app1/u", content=chunks(), headers=h)
        assert r.status_code == 413
        r = await c.post("/publish/app1/u", json={"type": "t", "data": "x" * 1000}, headers=h)
        assert r.status_code == 202


async def test_slow_body_times_out() -> None:
    """A body sent one byte at a time is abandoned after BODY_TIMEOUT (10 s; 1 s here), not waited on forever."""
    s = make_settings()
    app = create_app(s)
    assert app.config["BODY_TIMEOUT"] == 10
    app.config["BODY_TIMEOUT"] = 1
    srv = LiveServer(app, s.app_port)
    await srv.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        tok = token(s, "backend", "app1", "publish")
        writer.write(f"POST /publish/app1/u HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {tok}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode())
        t0 = time.monotonic()

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(20):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.5)

        dripper = asyncio.create_task(drip())
        status = await asyncio.wait_for(reader.readline(), 5)
        dripper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripper
        assert status.split()[1] == b"408", status
        assert time.monotonic() - t0 < 3
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    finally:
        await srv.stop()
