"""A TCP load balancer for the tests, between real clients and the service: the network a client meets on a bad day.

It forwards each connection to one target port (switchable: a rolling deploy takes an instance out), and can cut
every open connection (a network blip), reset new ones (the network is down), or hold them (a slow path: the
request is read and waits for `release()`). It reads what passes without changing it, and keeps one `Exchange`
per request: which client (the `c` query parameter of the request), its `Last-Event-ID`, and what the service
answered (a stream, a refusal with its `retry:`, another status) or that nothing did.
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
import urllib.parse
from dataclasses import dataclass, field

_REFUSED = re.compile(rb"retry: (\d+)\n: refused ([a-z_]+)\n")
_KEEP = 4096  # response bytes kept per exchange: the head and the first frames


class Mode(enum.Enum):
    PASS = "pass"  # forward to the target
    HOLD = "hold"  # accept and read the request; forward it on release()
    DOWN = "down"  # accept and reset at once (a client sees a network error)


class Outcome(enum.Enum):
    PENDING = "pending"  # no answer yet
    STREAM = "stream"  # 200 text/event-stream, admitted (its first frame is `retry:` then `: connected`)
    REFUSED = "refused"  # 200 text/event-stream, `retry:`, `: refused <code>`, end
    STATUS = "status"  # any other answer (401, 503...)
    UNREACHABLE = "unreachable"  # nothing listened on the target: the client's connection was reset
    RESET = "reset"  # the network was down: reset on arrival


@dataclass
class Exchange:
    """One request through the balancer. Times are epoch seconds (`time.time()`), comparable with the clients'."""

    client: str
    path: str
    last_event_id: str | None
    at: float
    target: int | None = None
    response: bytearray = field(default_factory=bytearray)
    reset: bool = False
    unreachable: bool = False
    vanished: bool = False  # the client side is gone; the service's side is kept open, read and dropped

    @property
    def status(self) -> int | None:
        m = re.match(rb"HTTP/1\.[01] (\d{3})", bytes(self.response))
        return int(m.group(1)) if m else None

    @property
    def outcome(self) -> Outcome:
        if self.reset:
            return Outcome.RESET
        if self.unreachable:
            return Outcome.UNREACHABLE
        status = self.status
        if status is None:
            return Outcome.PENDING
        if status != 200:
            return Outcome.STATUS
        if _REFUSED.search(bytes(self.response)):
            return Outcome.REFUSED
        return Outcome.STREAM if b": connected" in self.response else Outcome.PENDING

    @property
    def refusal(self) -> tuple[str, int] | None:
        """(code, retry ms) of a refusal."""
        m = _REFUSED.search(bytes(self.response))
        return (m.group(2).decode(), int(m.group(1))) if m else None

    def describe(self) -> str:
        what = self.outcome.value
        if self.refusal:
            what += f" {self.refusal[0]} retry={self.refusal[1]}"
        elif self.outcome is Outcome.STATUS:
            what += f" {self.status}"
        return f"{self.at:.3f} {self.client} lei={self.last_event_id} -> :{self.target} {what}"


class Balancer:
    """Listens on 127.0.0.1:`port` and forwards to 127.0.0.1:`target`. Use as an async context manager."""

    def __init__(self, port: int, target: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.target = target
        self.mode = Mode.PASS
        self.exchanges: list[Exchange] = []
        self._released = asyncio.Event()
        self._open: set[asyncio.StreamWriter] = set()  # client sides
        self._up: set[asyncio.StreamWriter] = set()  # service sides
        self._links: list[tuple[Exchange, asyncio.StreamWriter]] = []  # forwarded exchanges and their client sides
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Balancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        self._released.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    # ------------------------------------------------------------------------------------------- what tests do
    def cut(self) -> int:
        """Reset every open connection, both sides (a network blip). Returns how many client connections."""
        n = len(self._open)
        for w in [*self._open, *self._up]:
            w.transport.abort()
        self._open.clear()
        self._up.clear()
        return n

    def vanish(self, client: str) -> int:
        """`client`'s open connections end on its side without a word to the service: the service's side stays
        open, acknowledged, its bytes read and dropped. What the service sees of a client gone behind a proxy (or a
        load balancer, a NAT) that holds its upstream connection until its own time-outs. Returns how many."""
        n = 0
        for ex, client_writer in self._links:
            if ex.client == client and not ex.vanished and not client_writer.transport.is_closing():
                ex.vanished = True
                client_writer.transport.abort()
                n += 1
        return n

    def hold(self) -> None:
        """From now on, requests wait (read, not forwarded) until `release()`."""
        self._released = asyncio.Event()
        self.mode = Mode.HOLD

    def down(self) -> None:
        self.mode = Mode.DOWN

    def release(self, target: int | None = None) -> None:
        """Forward again (to `target` if given), the held requests first."""
        if target is not None:
            self.target = target
        self.mode = Mode.PASS
        self._released.set()

    def of(self, client: str, since: float = 0.0) -> list[Exchange]:
        return [x for x in self.exchanges if x.client == client and x.at >= since]

    def held(self, client: str) -> bool:
        return any(x.client == client and x.target is None and not x.reset for x in self.exchanges)

    def transcript(self, since: float = 0.0) -> str:
        return "\n".join(x.describe() for x in self.exchanges if x.at >= since)

    # ------------------------------------------------------------------------------------------- forwarding
    def _mode(self) -> Mode:
        return self.mode  # read anew after an await (a type checker would keep an earlier test's narrowing)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode is Mode.DOWN:
            writer.transport.abort()
            return
        self._open.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return  # a preconnect that never sent a request, or a cut
            ex = _exchange(head)
            self.exchanges.append(ex)
            if self._mode() is Mode.DOWN:  # it went down while the request came in
                ex.reset = True
                return
            if self.mode is Mode.HOLD:
                await self._released.wait()
            if writer.transport.is_closing():  # cut while held
                ex.reset = True
                return
            ex.target = self.target
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            except OSError:
                ex.unreachable = True
                return
            self._up.add(up_writer)
            self._links.append((ex, writer))
            up_writer.write(head)
            await asyncio.gather(_pipe(reader, up_writer, ex, upstream=True), _pipe(up_reader, writer, ex))
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._open.discard(w)
                    self._up.discard(w)
                    if not w.transport.is_closing():
                        w.close()


def _exchange(head: bytes) -> Exchange:
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else ""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    return Exchange(client=query.get("c", ["?"])[0], path=urllib.parse.urlsplit(path).path,
                    last_event_id=headers.get("last-event-id"), at=time.time())


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, ex: Exchange, upstream: bool = False) -> None:
    """Copy until EOF; then half-close `dst` (or close it when it cannot). A reset on either side ends both.
    The response's first bytes are kept in `ex`. Once `ex` vanished, nothing reaches the service from the client's
    side (not even its end) and what the service sends is read and dropped."""
    try:
        while True:
            data = await src.read(65536)
            if not data:
                break
            if not upstream and len(ex.response) < _KEEP:
                ex.response += data[: _KEEP - len(ex.response)]
            if ex.vanished:
                continue
            dst.write(data)
            try:
                await dst.drain()
            except (ConnectionError, OSError):
                if not ex.vanished:
                    raise
        if ex.vanished:
            return
        if dst.can_write_eof():
            dst.write_eof()
        else:
            dst.close()
    except (ConnectionError, OSError):
        if not ex.vanished:
            dst.transport.abort()
