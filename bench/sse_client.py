"""Raw-socket SSE streams and the worker process that holds a share of them.

The client has to outpace the server, so one stream is one `asyncio.Protocol` (no StreamReader, no task), the HTTP
request is written by hand, chunked framing and SSE frames are cut out of a bytearray with `find`, and a received
event costs a couple of slices, one float() and one int().
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.jwt import make_token
from bench.server import raise_nofile

_T_KEY = b'"t":'
_SEQ_KEY = b'"seq":'


class Stats:
    """Counters shared by all streams of one worker; reset when a measurement window opens."""

    __slots__ = ("delivered", "drops", "lat", "other", "pings", "reordered")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """In place: every stream holds a reference to this object."""
        self.delivered = 0
        self.pings = 0
        self.other = 0
        self.reordered = 0
        self.drops = 0
        self.lat = array("d")  # seconds from publish (`t` in the event data) to receipt


class SSEStream(asyncio.Protocol):
    """One GET /sse: sends the request, checks the status, dechunks, counts events and their latency."""

    __slots__ = (
        "body",
        "chunked",
        "closing",
        "count_only",
        "head",
        "last_seq",
        "raw",
        "ready",
        "rem",
        "request",
        "skip",
        "stats",
        "status",
        "tail",
        "transport",
    )

    def __init__(self, stats: Stats, request: bytes, ready: asyncio.Future[None], count_only: bool = False) -> None:
        self.stats = stats
        self.count_only = count_only  # count events (`id: ` lines) in C, parse nothing: no latency, no order check
        self.tail = b""
        self.request = request
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.head: bytearray | None = bytearray()
        self.chunked = False
        self.raw = bytearray()  # undechunked bytes
        self.body = bytearray()  # SSE text not yet cut into frames
        self.rem = 0  # bytes left in the current chunk
        self.skip = 0  # CRLF after a chunk still to skip
        self.last_seq = -1
        self.closing = False
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before headers (status {self.status})"))
        elif not self.closing:
            self.stats.drops += 1

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            head = self.head
            head += data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(head[9:12]) if head[:5] == b"HTTP/" else 0
            if self.status != 200:
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(f"status {self.status}"))
                self.close()
                return
            self.chunked = b"transfer-encoding: chunked" in head[:end].lower()
            data = bytes(head[end + 4:])
            self.head = None
            if not self.ready.done():
                self.ready.set_result(None)
            if not data:
                return
        if self.count_only:
            buf = self.tail + data  # an `id: ` split over two reads is counted once
            self.stats.delivered += buf.count(b"id: ")
            self.tail = buf[-3:]
            return
        if self.chunked:
            self._dechunk(data)
        else:
            self.body += data
        self._frames()

    def _dechunk(self, data: bytes) -> None:
        raw = self.raw
        raw += data
        pos, n, body = 0, len(raw), self.body
        while pos < n:
            if self.rem:
                take = min(self.rem, n - pos)
                body += raw[pos:pos + take]
                pos += take
                self.rem -= take
                if not self.rem:
                    self.skip = 2
            elif self.skip:
                take = min(self.skip, n - pos)
                pos += take
                self.skip -= take
            else:
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(raw[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:  # server ended the stream
                    self.close()
                    self.stats.drops += 1
                    break
                self.rem = size
        del raw[:pos]

    def _frames(self) -> None:
        buf = self.body
        start = 0
        now = 0.0
        stats = self.stats
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            i = buf.find(_T_KEY, start, end)
            if i >= 0:
                if not now:
                    now = time.time()
                j = buf.find(b",", i, end)
                if j < 0:
                    j = buf.find(b"}", i, end)
                stats.lat.append(now - float(buf[i + 4:j]))
                k = buf.find(_SEQ_KEY, j, end)
                if k >= 0:
                    e = buf.find(b"}", k, end)
                    c = buf.find(b",", k, e)
                    seq = int(buf[k + 6:c if c >= 0 else e])
                    if seq <= self.last_seq:
                        stats.reordered += 1
                    self.last_seq = seq
                stats.delivered += 1
            elif buf.find(b"event: ping", start, end) >= 0:
                stats.pings += 1
            else:
                stats.other += 1  # retry:, comments, events without our payload
            start = end + 2
        if start:
            del buf[:start]


def sse_request(host: str, port: int, token: str, user: str, last_id: str | None = None) -> bytes:
    """GET /sse with the user's token; `X-Bench-User` names the user for nchan, which checks no token (our service
    and the baseline ignore the header); `Last-Event-ID` when resuming."""
    resume = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
    return (f"GET /sse HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\nX-Bench-User: {user}\r\n"
            f"{resume}Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n").encode()


@dataclass
class WorkerConfig:
    """One client process's share: `users[i]` is the user of its i-th stream."""

    index: int
    host: str
    port: int
    app: str
    secret: str
    users: list[str]
    connect_concurrency: int = 200
    connect_timeout: float = 15.0
    churn_rate: float = 0.0  # connects/s this worker makes during the window, on users of its own
    churn_hold: float = 1.0
    cpu: str | None = None
    use_uvloop: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class Worker:
    """The asyncio side of a client process; the parent drives it with small commands over a Pipe."""

    def __init__(self, cfg: WorkerConfig, conn: Connection) -> None:
        self.cfg = cfg
        self.conn = conn
        self.stats = Stats()
        self.streams: list[SSEStream] = []
        self.tokens: dict[str, str] = {}
        self.churn_task: asyncio.Task[None] | None = None
        self.churn: dict[str, Any] = {}
        self.cpu0 = 0.0
        self.wall0 = 0.0
        self.throttle: asyncio.Handle | None = None
        from bench.storm_client import StormSide  # the storm's streams (imported here: it builds on this module)

        self.storm = StormSide(self)
        self.storm_stop_after: list[int] = [0] * len(cfg.users)  # storm setup: events each stream reads first

    def _throttle(self) -> None:
        """Block the loop for `read_batch_ms` once per iteration: events pile up in the kernel and each read takes
        many, so the client spends a fraction of the CPU per event (with --count-only) and leaves the cores to the
        server. Latency then includes up to that delay."""
        time.sleep(self.cfg.extra["read_batch_ms"] / 1000)
        self.throttle = asyncio.get_running_loop().call_soon(self._throttle)

    def _token(self, user: str) -> str:
        tok = self.tokens.get(user)
        if tok is None:
            tok = self.tokens[user] = make_token(self.cfg.secret, user, self.cfg.app, ttl=24 * 3600)
        return tok

    async def open_stream(self, user: str, timeout: float) -> SSEStream:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        req = sse_request(self.cfg.host, self.cfg.port, self._token(user), user)
        proto = SSEStream(self.stats, req, ready, bool(self.cfg.extra.get("count_only")))
        try:
            await asyncio.wait_for(loop.create_connection(lambda: proto, self.cfg.host, self.cfg.port), timeout)
            await asyncio.wait_for(ready, timeout)
        except BaseException:
            proto.close()
            raise
        return proto

    async def connect_all(self) -> dict[str, Any]:
        sem = asyncio.Semaphore(self.cfg.connect_concurrency)
        times = array("d")
        reasons: Counter[str] = Counter()
        failed_users: Counter[str] = Counter()

        async def one(user: str) -> None:
            async with sem:
                t0 = time.perf_counter()
                try:
                    proto = await self.open_stream(user, self.cfg.connect_timeout)
                except (TimeoutError, OSError, ConnectionError) as exc:
                    reasons[type(exc).__name__ + (f": {exc}" if str(exc) else "")] += 1
                    failed_users[user] += 1
                    return
                times.append(time.perf_counter() - t0)
                self.streams.append(proto)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(u) for u in self.cfg.users))
        return {"ok": len(self.streams), "failed": sum(failed_users.values()), "seconds": time.perf_counter() - t0,
                "times": times.tobytes(), "reasons": dict(reasons.most_common(5)), "failed_users": dict(failed_users)}

    async def _churn(self) -> None:
        """Open a stream on a fresh user every 1/rate s, hold it `churn_hold` s, close it; never block the pacing."""
        rate, hold = self.cfg.churn_rate, self.cfg.churn_hold
        c = self.churn = {"attempts": 0, "ok": 0, "failed": 0, "closed": 0, "skipped": 0, "times": array("d"),
                          "reasons": Counter()}
        inflight: set[asyncio.Task[None]] = set()
        limit = max(50, int(rate * (hold + self.cfg.connect_timeout)))

        async def one(n: int) -> None:
            t0 = time.perf_counter()
            try:
                proto = await self.open_stream(f"churn{self.cfg.index}-{n}", self.cfg.connect_timeout)
            except (TimeoutError, OSError, ConnectionError) as exc:
                c["failed"] += 1
                c["reasons"][type(exc).__name__] += 1
                return
            c["times"].append(time.perf_counter() - t0)
            c["ok"] += 1
            try:
                await asyncio.sleep(hold * random.uniform(0.5, 1.5))
            finally:
                proto.close()
            c["closed"] += 1

        start, n = time.monotonic(), 0
        try:
            while True:
                n += 1
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                c["attempts"] += 1
                if len(inflight) >= limit:
                    c["skipped"] += 1
                    continue
                task = asyncio.create_task(one(n))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
        finally:
            for task in list(inflight):
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)

    def _cpu(self) -> float:
        t = os.times()
        return t.user + t.system

    async def handle(self, cmd: str | tuple[Any, ...]) -> Any:
        if isinstance(cmd, tuple):
            return await self.storm.handle(cmd)
        if cmd == "connect":
            return await self.connect_all()
        if cmd == "start":
            self.stats.reset()
            self.cpu0, self.wall0 = self._cpu(), time.monotonic()
            if self.cfg.churn_rate > 0:
                self.churn_task = asyncio.create_task(self._churn())
            if self.cfg.extra.get("read_batch_ms"):
                self.throttle = asyncio.get_running_loop().call_soon(self._throttle)
            return {"open": len(self.streams)}
        if cmd == "count":
            return self.stats.delivered
        if cmd == "stop":
            if self.throttle is not None:
                self.throttle.cancel()
                self.throttle = None
            if self.churn_task is not None:
                self.churn_task.cancel()
                await asyncio.gather(self.churn_task, return_exceptions=True)
                self.churn_task = None
            s = self.stats
            churn = dict(self.churn)
            if churn:
                churn["times"] = churn["times"].tobytes()
                churn["reasons"] = dict(churn["reasons"])
            return {"delivered": s.delivered, "pings": s.pings, "other": s.other, "reordered": s.reordered,
                    "drops": s.drops, "lat": s.lat.tobytes(), "cpu": self._cpu() - self.cpu0,
                    "wall": time.monotonic() - self.wall0, "open": len(self.streams) - s.drops, "churn": churn}
        if cmd == "close":
            for proto in self.streams:
                proto.close()
            self.storm.close()
            await asyncio.sleep(0.05)
            return "closed"
        raise ValueError(f"unknown command {cmd!r}")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[str | tuple[Any, ...]] = asyncio.Queue()
        loop.add_reader(self.conn.fileno(), lambda: inbox.put_nowait(self.conn.recv()))
        while True:
            cmd = await inbox.get()
            try:
                reply: Any = await self.handle(cmd)
            except Exception as exc:  # noqa: BLE001 -- report, don't hang the parent
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            # the loop's add_reader made the pipe non-blocking; a reply with latencies is larger than its buffer
            os.set_blocking(self.conn.fileno(), True)
            self.conn.send((cmd, reply))
            if cmd == "close":
                loop.remove_reader(self.conn.fileno())
                return


def worker_main(cfg: WorkerConfig, conn: Connection) -> None:
    """Process entry point: lift the fd limit, pin if asked, run the worker's loop (uvloop when available)."""
    raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it closes us in order
    if cfg.cpu is not None:
        os.sched_setaffinity(0, {int(c) for c in cfg.cpu.split(",")})
    worker = Worker(cfg, conn)
    if cfg.use_uvloop:
        try:
            import uvloop

            uvloop.run(worker.run())
            return
        except ImportError:
            pass
    asyncio.run(worker.run())
