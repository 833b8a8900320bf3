"""The client side of the `storm` scenario: every stream of a client process connects at the same instant.

A storm stream records what it receives (each event's `seq` and `id:`), so a resumed stream can be checked for
exactly the events it missed, in order, once. Commands come from the parent as tuples (see `StormSide.handle`):

- `("storm-setup", stop_after)`: open one stream per user at the normal pace; stream i reads `stop_after[i]`
  events, then aborts its connection (RST) and keeps the last `id:` it saw: the point it will resume from.
- `("storm-setup-wait",)`: how many setup streams have stopped.
- `("storm-go", t_go, timeout, resume)`: at wall-clock `t_go` (the same instant in every client process), launch
  every connect at once, from pre-built requests (token, and `Last-Event-ID` when `resume`).
- `("storm-count", seq)`: how many storm streams got the event with this `seq`.
- `("storm-verify", rounds, probe_seq)`: per stream, compare the `seq`s received with what it missed.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from array import array
from collections import Counter
from typing import TYPE_CHECKING, Any

from bench.sse_client import SSEStream, Stats, sse_request

if TYPE_CHECKING:
    from bench.sse_client import Worker

_SEQ = b'"seq":'


class StormStream(SSEStream):
    """An SSE stream that keeps every event's `seq`, its last `id:`, reset frames and when its headers came."""

    __slots__ = ("done", "last_id", "resets", "retrans", "seqs", "stop_after", "t_headers")

    def __init__(self, stats: Stats, request: bytes, ready: asyncio.Future[None], stop_after: int = 0) -> None:
        super().__init__(stats, request, ready)
        self.seqs = array("i")
        self.last_id: str | None = None
        self.resets = 0
        self.stop_after = stop_after  # > 0: abort the connection after this many events (setup of a resume storm)
        self.done = False
        self.t_headers = 0.0
        self.retrans = 0  # TCP retransmissions of this connection until its response head (on loopback: drops)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            # a reset is the kernel's answer; a clean end-of-file before any response is a server that closed an
            # accepted connection without answering (Hypercorn's keep-alive timer runs from accept)
            self.ready.set_exception(exc if exc is not None else ConnectionError("closed unanswered"))
        elif not self.closing:
            self.stats.drops += 1

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        had_head = self.head is not None
        super().data_received(data)
        if had_head and self.head is None:
            self.t_headers = time.time()

    def _frames(self) -> None:
        buf = self.body
        start = 0
        while not self.done:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            k = buf.find(_SEQ, start, end)
            if k >= 0:
                e = buf.find(b"}", k, end)
                c = buf.find(b",", k, e)
                self.seqs.append(int(buf[k + 6:c if c >= 0 else e]))
                self.stats.delivered += 1
                if buf.startswith(b"id: ", start):
                    self.last_id = buf[start + 4:buf.find(b"\n", start, end + 1)].decode()
                if self.stop_after and len(self.seqs) >= self.stop_after:
                    self.done = True
                    self.closing = True
                    if self.transport is not None:
                        self.transport.abort()  # RST: gone like a dropped network, not a polite close
            elif buf.find(b"event: reset", start, end) >= 0:
                self.resets += 1
            start = end + 2
        if start:
            del buf[:start]


_TCPI_TOTAL_RETRANS = 100  # offset of tcpi_total_retrans in linux/tcp.h's struct tcp_info


def total_retrans(sock: Any) -> int:
    """Segments this connection retransmitted (SYNs and the request included). On loopback nothing is lost but
    what the server's kernel drops: a full accept queue drops the handshake's last ACK (or the SYN), and the
    client retransmits after 1, 3, 7... s. Per connection, so other users of a shared machine do not count."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return 0
    return int.from_bytes(raw[_TCPI_TOTAL_RETRANS:_TCPI_TOTAL_RETRANS + 4], "little") if len(raw) >= 104 else 0


def failure_kind(exc: BaseException) -> str:
    """The failure classes of the storm table: refused, reset, closed unanswered, timeout, status N, errno."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError) and str(exc):
        return str(exc)  # "closed unanswered", "status 503"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


_IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the port at connect(), for the whole 4-tuple


def _client_socket(worker: int, j: int) -> socket.socket:
    """A non-blocking socket bound to its own loopback source address (127.<10+worker>.x.y, port chosen at
    connect). From one source address, connect() searches the ephemeral range (28k ports here) for a free port,
    slower and slower as it fills with this storm's and earlier runs' TIME_WAIT sockets: 19,000 connects took
    6-10 s instead of 1 s, a spread that is the client's, not the server's."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.{10 + worker % 200}.{j // 200 % 250}.{1 + j % 200}", 0))
    except OSError:
        pass  # not Linux, or no such address: the plain ephemeral search
    return sock


class StormSide:
    """A client process's storm streams and the commands that drive them."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.setup: list[StormStream] = []
        self.last_ids: list[str | None] = []
        self.streams: list[StormStream] = []
        self.order: list[int] = []  # index into cfg.users of each storm stream in `streams`

    async def _open(self, proto: StormStream, timeout: float) -> tuple[float, str | None]:
        """Connect and wait for the response head; (time the connect was issued, failure kind or None)."""
        loop = asyncio.get_running_loop()
        cfg = self.w.cfg
        t0 = time.time()
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: proto, cfg.host, cfg.port)
                await proto.ready
        except (OSError, TimeoutError, ConnectionError) as exc:
            proto.close()
            return t0, failure_kind(exc)
        return t0, None

    async def _setup(self, stop_after: list[int]) -> dict[str, Any]:
        cfg = self.w.cfg
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(cfg.connect_concurrency)
        fails: Counter[str] = Counter()

        async def one(user: str, k: int) -> StormStream:
            proto = StormStream(self.w.stats, sse_request(cfg.host, cfg.port, self.w._token(user), user),
                                loop.create_future(), stop_after=k)
            async with sem:
                _, fail = await self._open(proto, cfg.connect_timeout)
            if fail:
                fails[fail] += 1
            return proto

        self.setup = list(await asyncio.gather(*(one(u, k) for u, k in zip(cfg.users, stop_after, strict=True))))
        return {"ok": sum(p.status == 200 for p in self.setup), "failed": dict(fails)}

    async def _finish(self, sock: socket.socket, t0: float, proto: StormStream,
                      timeout: float) -> tuple[float, str | None]:
        """The rest of a connect launched by `_go`: wait for the handshake, hand the socket to the loop (which
        sends the request), wait for the response head."""
        loop = asyncio.get_running_loop()
        cfg = self.w.cfg
        try:
            async with asyncio.timeout(max(0.1, t0 + timeout - time.time())):
                await loop.sock_connect(sock, (cfg.host, cfg.port))  # EALREADY: waits for the handshake
                await loop.create_connection(lambda: proto, sock=sock)
                await proto.ready
        except (OSError, TimeoutError, ConnectionError) as exc:
            proto.close()
            sock.close()
            return t0, failure_kind(exc)
        if proto.transport is not None:
            proto.retrans = total_retrans(proto.transport.get_extra_info("socket"))
        return t0, None

    async def _go(self, t_go: float, timeout: float, resume: bool) -> dict[str, Any]:
        cfg = self.w.cfg
        loop = asyncio.get_running_loop()
        if resume:
            self.last_ids = [p.last_id for p in self.setup]
        # everything a connect needs is built before the go: tokens, request bytes, protocol objects
        protos = [StormStream(self.w.stats, sse_request(cfg.host, cfg.port, self.w._token(u), u,
                                                        self.last_ids[i] if resume else None),
                              loop.create_future())
                  for i, u in enumerate(cfg.users)]
        self.setup = []
        socks = [_client_socket(self.w.cfg.index, j) for j in range(len(protos))]
        addr = (cfg.host, cfg.port)
        await asyncio.sleep(max(0.0, t_go - time.time()))
        # every SYN leaves in one tight loop of non-blocking connect()s (~10 µs each); the loop takes over after
        starts = []
        for sock in socks:
            starts.append(time.time())
            sock.connect_ex(addr)
        tasks = [loop.create_task(self._finish(sock, t0, p, timeout))
                 for sock, t0, p in zip(socks, starts, protos, strict=True)]
        results = await asyncio.gather(*tasks)
        fails: Counter[str] = Counter(f for _, f in results if f)
        ok = [i for i, (_, f) in enumerate(results) if f is None]
        lat = array("d", (protos[i].t_headers - results[i][0] for i in ok))
        self.streams = [protos[i] for i in ok]
        self.order = ok
        retrans = [protos[i].retrans for i in ok]
        return {"ok": len(ok), "failed": dict(fails), "lat": lat.tobytes(),
                "retrans_streams": sum(r > 0 for r in retrans), "retrans_total": sum(retrans),
                "first_connect": min((t for t, _ in results), default=t_go),
                "last_connect": max((t for t, _ in results), default=t_go),
                "last_headers": max((protos[i].t_headers for i in ok), default=t_go)}

    def _verify(self, rounds: int, probe: int, resume: bool) -> dict[str, Any]:
        """Each storm stream's `seq`s against what it missed (`stop_after`+1 .. rounds) and the probe."""
        out: Counter[str] = Counter()
        examples: list[str] = []
        users = self.w.cfg.users
        for proto, i in zip(self.streams, self.order, strict=True):
            if resume and self.last_ids[i] is None:
                out["no_resume_point"] += 1  # its setup connection failed: nothing to resume from
                continue
            got = list(proto.seqs)
            missed = list(range(self.w.storm_stop_after[i] + 1, rounds + 1)) if resume else []
            want = [*missed, probe]
            out["missed_events"] += len(missed)
            if got == want:
                out["exact"] += 1
                continue
            lost = len(set(want) - set(got))
            doubled = len(got) - len(set(got))
            out["lost_events"] += lost
            out["doubled_events"] += doubled
            out["streams_wrong"] += 1
            if not lost and not doubled:
                out["streams_out_of_order"] += 1
            out["resets"] += proto.resets
            if len(examples) < 3:
                examples.append(f"{users[i]} (resumed from {self.last_ids[i] if resume else None!r}): "
                                f"want {want}, got {got}")
        return {**out, "examples": examples}

    async def handle(self, cmd: tuple[Any, ...]) -> Any:
        name = cmd[0]
        if name == "storm-setup":
            self.w.storm_stop_after = cmd[1]
            return await self._setup(cmd[1])
        if name == "storm-setup-wait":
            return sum(p.done for p in self.setup)
        if name == "storm-go":
            return await self._go(cmd[1], cmd[2], cmd[3])
        if name == "storm-count":
            return sum(cmd[1] in p.seqs for p in self.streams)
        if name == "storm-verify":
            return self._verify(cmd[1], cmd[2], cmd[3])
        raise ValueError(f"unknown storm command {name!r}")

    def close(self) -> None:
        for proto in self.streams + self.setup:
            proto.close()
