"""The publisher process: paces publishes at a fixed rate, by raw Redis PUBLISH or by HTTP POST /publish.

Each event's data is `{"t": time.time() at send, "seq": n}` so the receiving side can compute latency without a
clock exchange (same machine) and spot re-ordering. It runs in its own process so its CPU never competes with the
stream readers' event loops, and reports its own CPU so a saturated publisher is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench.jwt import make_token

TICK = 0.005  # pacing granularity: publishes due in one tick go out in one write


@dataclass
class PublisherConfig:
    """`users=None` broadcasts to the app; otherwise publish n goes to users[n % len(users)]."""

    mode: str  # "redis" | "http"
    host: str
    port: int  # the Redis port or the server's HTTP port
    app: str
    secret: str
    users: list[str] | None
    rate: float  # publishes per second, total
    duration: float
    conns: int = 8  # concurrent keep-alive connections in HTTP mode
    cpu: str | None = None


def _data(seq: int) -> bytes:
    return b'{"t":%.6f,"seq":%d}' % (time.time(), seq)


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class Publisher:
    def __init__(self, cfg: PublisherConfig) -> None:
        self.cfg = cfg
        nusers = len(cfg.users) if cfg.users else 1
        self.per_user = [0] * nusers  # successful publishes per user (for expected deliveries)
        self.errors: dict[str, int] = {}
        self.sent = 0

    def _error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    async def run_redis(self) -> None:
        cfg = self.cfg
        reader, writer = await asyncio.open_connection(cfg.host, cfg.port)
        users = cfg.users
        chans = [f"{cfg.app}:channel:{u}".encode() for u in users] if users else [f"{cfg.app}:broadcast".encode()]
        pending: deque[int] = deque()  # user index per PUBLISH not yet answered, in order
        drained = asyncio.Event()
        sent_target = [-1]  # set to the final count once pacing ends, so the reader knows when it is done

        async def read_replies() -> None:
            while True:
                line = await reader.readline()
                if not line:
                    drained.set()
                    return
                u = pending.popleft()
                if line[:1] == b":":
                    self.per_user[u] += 1
                else:
                    self._error(line.decode(errors="replace").strip()[:80])
                if self.sent == sent_target[0] and not pending:
                    drained.set()

        rtask = asyncio.create_task(read_replies())
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < cfg.duration:
            due = int(elapsed * cfg.rate) + 1
            if due > self.sent:
                batch = []
                for n in range(self.sent, due):
                    u = n % len(chans)
                    msg = b'{"id":"%d","type":"bench","data":%s}' % (n, _data(n))
                    batch.append(_resp(b"PUBLISH", chans[u], msg))
                    pending.append(u)
                self.sent = due
                writer.write(b"".join(batch))
                await writer.drain()
            await asyncio.sleep(TICK)
        sent_target[0] = self.sent
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), 5)
        rtask.cancel()
        writer.close()

    async def run_http(self) -> None:
        cfg = self.cfg
        token = make_token(cfg.secret, "bench-publisher", cfg.app, scope="publish", ttl=24 * 3600)
        users = cfg.users
        paths = [f"/publish/{cfg.app}/{u}".encode() for u in users] if users else [f"/publish/{cfg.app}".encode()]
        head = (f"Host: {cfg.host}:{cfg.port}\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: application/json\r\n").encode()
        t0 = time.monotonic()
        end = t0 + cfg.duration

        async def conn_loop() -> None:
            reader, writer = await asyncio.open_connection(cfg.host, cfg.port)
            try:
                while True:
                    n = self.sent
                    when = t0 + n / cfg.rate
                    if when >= end:
                        return
                    self.sent += 1
                    delay = when - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    u = n % len(paths)
                    body = b'{"type":"bench","data":%s}' % _data(n)
                    writer.write(b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"
                                 % (paths[u], head, len(body), body))
                    status, close = await self._http_response(reader)
                    if status in (200, 201, 202):  # nchan: 201 (had subscribers) or 202
                        self.per_user[u] += 1
                    else:
                        self._error(f"HTTP {status}")
                    if close:  # Hypercorn ends a keep-alive connection after 1,000 requests (keep_alive_max_requests)
                        writer.close()
                        reader, writer = await asyncio.open_connection(cfg.host, cfg.port)
            finally:
                writer.close()

        results = await asyncio.gather(*(conn_loop() for _ in range(cfg.conns)), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                self._error(f"{type(r).__name__}: {r}")

    @staticmethod
    async def _http_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
        """(status, whether the server closes the connection after this response)."""
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        low = head.lower()
        i = low.find(b"content-length:")
        if i >= 0:
            length = int(low[i + 15:low.find(b"\r\n", i)])
            await reader.readexactly(length)
        elif b"transfer-encoding: chunked" in low:
            await reader.readuntil(b"0\r\n\r\n")
        return status, b"connection: close" in low

    async def run(self) -> dict[str, Any]:
        c0, w0 = os.times(), time.monotonic()
        try:
            await (self.run_redis() if self.cfg.mode == "redis" else self.run_http())
        except OSError as exc:
            self._error(f"{type(exc).__name__}: {exc}")
        c1 = os.times()
        wall = time.monotonic() - w0
        ok = sum(self.per_user)
        return {"sent": self.sent, "ok": ok, "per_user": self.per_user, "errors": self.errors, "wall": wall,
                "rate": ok / self.cfg.duration if self.cfg.duration else 0.0,
                "cpu": (c1.user + c1.system) - (c0.user + c0.system)}


def publisher_main(cfg: PublisherConfig, conn: Connection) -> None:
    """Process entry point: wait for "go", publish for the configured duration, send the tally back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if cfg.cpu is not None:
        os.sched_setaffinity(0, {int(c) for c in cfg.cpu.split(",")})
    conn.recv()
    try:
        import uvloop

        result = uvloop.run(Publisher(cfg).run())
    except ImportError:
        result = asyncio.run(Publisher(cfg).run())
    conn.send(result)
