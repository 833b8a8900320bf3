"""Local fan-out: channel -> the streams of this process that listen to it.

The broker hands each message over once; the hub gives the very same `Message` (and its pre-encoded frame) to
every subscriber. A subscriber is a bounded buffer plus at most one waiting future: the stream's generator drains
everything queued into one chunk, so a burst costs one socket write per stream, not one per event.

Direct writes: while a stream's generator is parked (nothing queued, nothing held back, no replay seam open) and
its HTTP/1.x transport is below the high-water mark, `push` writes the frame, in the response's own framing,
straight to the transport. Every byte the generator yielded before parking was already handed to that transport
(the yield-to-write path has no suspension point: see server._TrackedTCPServer.protocol_send), so the order on the
wire is the order of pushes. This skips, per event and stream, a task wake-up, the generator, Quart's send loop,
Hypercorn's ASGI send and h11: the cost that kept Quart + Hypercorn far behind a framework-free server. Anything
else (a slow client, a resync, a replay seam, HTTP/2) takes the queue path, which is bounded as before.

Owned streams: once its generator has handed the connection off (quart_sse.handoff), a stream has no generator to
drain its queue; `flush` does it, called when something is queued and when the transport's buffer drains.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable

from .broker.base import Broker
from .events import PING, Message, Position
from .tasks import cancel_and_wait

log = logging.getLogger("quart_sse.hub")
DIRECT_WRITE_LIMIT = 64 * 1024  # above this many bytes in the transport's buffer, events queue (and bound) instead
_CRLF = b"\r\n"


class Subscriber:
    """One open stream's buffer. Not thread-safe; lives on the event loop."""

    __slots__ = (
        "_bytes",
        "_expiry",
        "_queue",
        "_waiter",
        "after",
        "app",
        "channels",
        "chunked",
        "closed",
        "conn_id",
        "created_at",
        "held",
        "last_pos",
        "max_bytes",
        "max_events",
        "on_close",
        "owned",
        "parked",
        "peer",
        "reason",
        "remote_addr",
        "sink",
        "user",
    )

    def __init__(self, conn_id: str, app: str, user: str, channels: tuple[str, ...], *, remote_addr: str = "",
                 created_at: int = 0, max_events: int = 1000, max_bytes: int = 1 << 20,
                 peer: tuple[str, int] | None = None) -> None:
        self.conn_id = conn_id
        self.app = app
        self.user = user
        self.channels = channels
        self.remote_addr = remote_addr
        self.peer = peer  # the client's socket address: a slow consumer's connection is aborted by it
        self.created_at = created_at
        self._queue: list[Message] = []  # a list, not a deque: appended and drained whole (600 B less per stream)
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.reason = ""
        self.after: Position | None = None  # live copies at or before this position were replayed already
        self.last_pos: Position | None = None  # newest history position delivered (resync point)
        self.held = False  # a resync is fetching what the stream missed: positioned events wait for it
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._expiry: asyncio.TimerHandle | None = None
        self.on_close: Callable[[Subscriber], None] | None = None
        self.sink: asyncio.WriteTransport | None = None  # the client's transport, for direct writes (HTTP/1.x)
        self.chunked = True  # HTTP/1.1 responses are chunked; HTTP/1.0 ones are delimited by the close
        self.parked = False  # the generator waits with nothing queued: direct writes keep the order
        self.owned = False  # the connection was handed off: no generator, `flush` drains the queue

    def direct_to(self, sink: asyncio.WriteTransport | None, chunked: bool) -> None:
        self.sink = sink
        self.chunked = chunked

    def push(self, msg: Message) -> None:
        if self.closed:
            return
        if self.parked and self.after is None and not self.held:
            sink = self.sink
            if sink is not None and sink.get_write_buffer_size() <= DIRECT_WRITE_LIMIT and not sink.is_closing():
                if self.chunked:
                    sink.writelines((msg.chunk_head, msg.frame, _CRLF))
                else:
                    sink.write(msg.frame)
                if msg.pos is not None:
                    self.last_pos = msg.pos
                return
        self.parked = False  # from here on the queue holds the order until the generator has drained it
        q = self._queue
        q.append(msg)
        self._bytes += len(msg.frame)
        if len(q) > self.max_events or self._bytes > self.max_bytes:
            self._queue = []  # nothing more goes out: the connection is aborted (on_close), the client resumes
            self._bytes = 0
            self.close("slow consumer")
            return
        if self.held and msg.pos is not None:
            return
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)
        elif self.owned:
            self.flush()

    def own(self) -> None:
        """The connection is this stream's now (quart_sse.handoff): from here on `flush` drains the queue."""
        self.owned = True
        self.parked = not self._queue
        self.flush()

    def flush(self) -> None:
        """Write what may go out now, as one chunk; when the transport's buffer is full, its `resume_writing`
        calls again."""
        sink = self.sink
        if self.closed or sink is None or sink.is_closing() or sink.get_write_buffer_size() > DIRECT_WRITE_LIMIT:
            return
        if self.pending():
            chunk = self.drain()
            if chunk:
                self._write(chunk)
        self.parked = not self._queue

    def _write(self, chunk: bytes) -> None:
        sink = self.sink
        assert sink is not None
        if self.chunked:
            sink.writelines((b"%x\r\n" % len(chunk), chunk, _CRLF))
        else:
            sink.write(chunk)

    def write_last(self, frame: bytes, grace: float = 5.0) -> None:
        """An owned stream's last bytes, then the end of the response and the connection. A client that does not
        read them within `grace` seconds is cut: `close()` alone would wait for it forever."""
        sink = self.sink
        if sink is None or sink.is_closing():
            return
        if frame:
            self._write(frame)
        if self.chunked:
            sink.write(b"0\r\n\r\n")
        sink.close()
        if sink.get_write_buffer_size():
            asyncio.get_running_loop().call_later(grace, sink.abort)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self.on_close is not None:
            self.on_close(self)

    def expire_at(self, loop_time: float) -> None:
        """End the stream when its token expires: one timer per stream, none per event. The timer runs in an empty
        context: it would otherwise keep the request's context (Quart's request, Hypercorn's connection) alive for
        as long as the stream, after a hand-off too."""
        self._expiry = asyncio.get_running_loop().call_at(loop_time, self.close, "token expired",
                                                          context=contextvars.Context())

    def hold(self) -> None:
        """Keep positioned events back until `release()`: after a Redis outage, the events the stream missed are
        fetched from history and must go out before any live one (a live event drained first would move
        `last_pos` past them and hide them). Pings and position-less events still flow."""
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._queue:  # live copies that arrived after the resync merged its history: drop the duplicates
            self.reorder()
            self._wake()

    def reorder(self) -> None:
        """After a resync pushed missed history: position order, each position once, unpositioned last."""
        seen: set[Position] = set()
        positioned: list[Message] = []
        other: list[Message] = []
        for m in self._queue:
            if m.pos is None:
                other.append(m)
            elif m.pos not in seen and (self.last_pos is None or m.pos > self.last_pos):
                seen.add(m.pos)
                positioned.append(m)
        positioned.sort(key=lambda m: m.pos or (0, 0))
        self._queue = positioned + other
        self._bytes = sum(len(m.frame) for m in self._queue)

    def idle(self) -> bool:
        """Nothing queued, nothing held back, still open: the moment a generator may hand its connection off."""
        return not self._queue and not self.held and not self.closed

    def pending(self) -> bool:
        if self.held:
            return any(m.pos is None for m in self._queue)
        return bool(self._queue)

    async def wait(self) -> None:
        """Until something is queued (and not held back) or the stream is closed."""
        if self.closed or self.pending():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiter = fut
        self.parked = not self._queue  # held-back events are queued: they must go out before anything direct
        try:
            await fut
        finally:
            self._waiter = None
            self.parked = False

    def drain(self) -> bytes:
        """Everything queued, as one chunk; live copies of replayed events are dropped here."""
        q = self._queue
        if self.held:  # during a resync only what carries no position goes out
            self._queue = [m for m in q if m.pos is not None]
            self._bytes = sum(len(m.frame) for m in self._queue)
            q = [m for m in q if m.pos is None]
        else:
            self._queue = []
            self._bytes = 0
        after = self.after
        if after is not None:
            kept = [m for m in q if m.pos is None or m.pos > after]
            if any(m.pos is not None for m in kept):
                self.after = None  # positions only grow from here on
            msgs = kept
        else:
            msgs = q
        if len(msgs) == 1:
            m = msgs[0]
            chunk = m.frame
            if m.pos is not None:
                self.last_pos = m.pos
        else:
            chunk = b"".join([m.frame for m in msgs])
            for m in reversed(msgs):
                if m.pos is not None:
                    self.last_pos = m.pos
                    break
        return chunk if msgs else b""


class _Channel:
    __slots__ = ("ready", "subs")

    def __init__(self, ready: Awaitable[None]) -> None:
        self.subs: set[Subscriber] = set()
        self.ready = ready


class Hub:
    """Maps channels to local subscribers and keeps the broker subscribed to exactly the channels in use."""

    def __init__(self, broker: Broker, ping_interval: float) -> None:
        self.broker = broker
        self.ping_interval = ping_interval
        self._channels: dict[str, _Channel] = {}
        self.subscribers: set[Subscriber] = set()
        self._ping_task: asyncio.Task[None] | None = None
        self.on_deliver: Callable[[int, Message], None] | None = None

    def start(self) -> None:
        self._ping_task = asyncio.get_running_loop().create_task(self._pinger(), name="hub-pinger")

    async def stop(self) -> None:
        await cancel_and_wait(self._ping_task)

    async def attach(self, sub: Subscriber, timeout: float = 5.0) -> None:
        """Register `sub` and return once every channel it needs is confirmed upstream."""
        self.subscribers.add(sub)
        waits = []
        for ch in sub.channels:
            state = self._channels.get(ch)
            if state is None:
                state = self._channels[ch] = _Channel(self.broker.subscribe(ch))
            state.subs.add(sub)
            waits.append(state.ready)
        try:
            await asyncio.wait_for(asyncio.gather(*[asyncio.shield(w) for w in waits]), timeout)
        except BaseException:
            self.detach(sub)
            raise

    def detach(self, sub: Subscriber) -> None:
        """Synchronous, so it is safe in a cancelled generator's `finally`."""
        self.subscribers.discard(sub)
        for ch in sub.channels:
            state = self._channels.get(ch)
            if state is None:
                continue
            state.subs.discard(sub)
            if not state.subs:
                del self._channels[ch]
                self.broker.unsubscribe(ch)

    def dispatch(self, channel: str, msg: Message) -> None:
        state = self._channels.get(channel)
        if state is None:
            return
        for sub in state.subs:
            sub.push(msg)
        if self.on_deliver is not None:
            self.on_deliver(len(state.subs), msg)

    def close_user(self, app: str, user: str, reason: str) -> int:
        victims = [s for s in self.subscribers if s.app == app and s.user == user and not s.closed]
        for s in victims:
            s.close(reason)
        return len(victims)

    def close_all(self, reason: str) -> int:
        victims = [s for s in self.subscribers if not s.closed]
        for s in victims:
            s.close(reason)
        return len(victims)

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    async def _pinger(self) -> None:
        """One timer for every stream: the same ping bytes go to all of them."""
        while True:
            await asyncio.sleep(self.ping_interval)
            for sub in list(self.subscribers):
                sub.push(PING)
