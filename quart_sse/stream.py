"""One event stream from its request to its end: the hub's subscriber, its connection's protocol, its lifecycle.

A `Stream` goes through these states (`StreamState`), each named where the code moves it:

    OPENING ─► REPLAYING ─► LIVE ─┬─────────► CLOSING ─► CLOSED
    (admit,     (first bytes  (the generator  │  (last bytes)  (freed: hub, registry, caps)
     subscribe)  and replay)   holds it)     │
                                   └─► OWNED ─┘
                                  (the stream owns its connection; the hub writes to it)

- While OPENING it is admitted (per-process and per-user caps, the registry), subscribed and its replay fetched;
  a refusal that passes by itself raises `StreamRefused` (the blueprint turns it into an answer a browser's
  EventSource retries).
- REPLAYING and LIVE are Quart's response generator (`body`): it sends the first bytes and the replay, then
  waits on one future and drains everything queued into one chunk per wake-up. While it waits with nothing
  queued (parked), the hub writes each event straight to an HTTP/1.x transport (`push`).
- OWNED: on plain HTTP/1.x the generator hands the connection off as soon as it is idle and returns; Quart and
  Hypercorn let go of it (quart_sse.adapter), and from then on this object is the transport's protocol: it hears
  the client leave, and flushes what queued while the client's socket was full when it drains.
- Every end goes through `close(reason)` with a `CloseReason`. A server-ended stream says goodbye (a comment naming
  the reason and a jittered `retry:`) once its place is free everywhere, so that a client coming back at once is
  admitted on any instance; a client that left or was cut gets nothing more.

From the stream's start its connection's reads are the stream's (an event stream's client has nothing more to
say; a pipelined request would never be answered): `data_received` drops them, `eof_received` ends the stream.
Until the hand-off the write-flow callbacks are passed on to Hypercorn's protocol, which still writes.

HTTP/2 (streams share a connection), the Quart test client and an adapter that is off keep the generator for the
stream's whole life, without direct writes.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from . import keys
from .adapter import HIGH_WATER, Peer
from .auth import Identity
from .broker.base import BrokerUnavailable, Replay
from .events import Message, Position, closing_frame, reset_frame, retry_frame
from .registry import ConnRecord
from .tasks import raise_if_cancelling

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger("quart_sse.stream")
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class StreamState(enum.Enum):
    OPENING = "opening"
    REPLAYING = "replaying"
    LIVE = "live"
    OWNED = "owned"
    CLOSING = "closing"
    CLOSED = "closed"


class CloseReason(enum.Enum):
    """Why a stream ended; the value is the reason on the wire (`: closing <reason>`, docs/streams.md)."""

    CLIENT_LEFT = "client left"
    SLOW_CONSUMER = "slow consumer"
    TOKEN_EXPIRED = "token expired"
    DISCONNECTED = "disconnected by API"
    SHUTDOWN = "shutdown"

    @property
    def says_goodbye(self) -> bool:
        """The server ended the stream: its client gets a closing comment and a `retry:`."""
        return self not in (CloseReason.CLIENT_LEFT, CloseReason.SLOW_CONSUMER)


class RefusalReason(enum.Enum):
    """A refusal of `GET /sse` that passes by itself (docs/streams.md): the value is the JSON `error` code, the
    `: refused <code>` comment an EventSource-accepting request gets instead, and the metric's label."""

    UNAVAILABLE = "unavailable"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    INSTANCE_FULL = "instance_full"
    SHUTTING_DOWN = "shutting_down"

    @property
    def status(self) -> int:
        return 429 if self is RefusalReason.TOO_MANY_CONNECTIONS else 503


class StreamRefused(Exception):
    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def goodbye_retry_ms(reason: CloseReason, base_ms: int) -> int:
    """The `retry:` of a server-ended stream: jittered, so that clients do not all come back in the same second;
    a shutdown spreads them over 10 s more (the instances of a rolling deploy come back one after another)."""
    if reason is CloseReason.SHUTDOWN:
        return base_ms + random.randint(0, 10_000)
    return base_ms + random.randint(0, base_ms)


def refusal_retry_ms(reason: RefusalReason, base_ms: int) -> int:
    """The `retry:` of a refused stream. A user at the cap waits longer: a dead instance's streams stop counting
    only within REGISTRY_TTL."""
    floor = max(base_ms, 1000)
    if reason is RefusalReason.TOO_MANY_CONNECTIONS:
        return 2 * floor + random.randint(0, 3 * floor)
    return floor + random.randint(0, 2 * floor)


class Stream(asyncio.Protocol):
    """One open stream. Not thread-safe; lives on the event loop. `services` is None only in unit tests."""

    __slots__ = (
        "_bytes",
        "_expiry",
        "_queue",
        "_upstream",
        "_waiter",
        "after",
        "channels",
        "chunked",
        "freed",
        "held",
        "last_pos",
        "max_bytes",
        "max_events",
        "parked",
        "peer",
        "reason",
        "rec",
        "services",
        "sink",
        "state",
    )

    def __init__(self, rec: ConnRecord, channels: tuple[str, ...], *, services: Services | None = None,
                 max_events: int = 1000, max_bytes: int = 1 << 20, peer: Peer | None = None) -> None:
        self.rec = rec
        self.channels = channels
        self.services = services
        self.peer = peer  # the client's socket address: its connection is found by it (quart_sse.adapter)
        self.state = StreamState.OPENING
        self.reason: CloseReason | None = None  # set once, by `close`
        self.freed = False  # its place (hub, registry, caps) was given back
        self._queue: list[Message] = []  # a list, not a deque: appended and drained whole (600 B less per stream)
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self.after: Position | None = None  # live copies at or before this position were replayed already
        self.last_pos: Position | None = None  # newest history position delivered (resync point)
        self.held = False  # a resync is fetching what the stream missed: positioned events wait for it
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._expiry: asyncio.TimerHandle | None = None
        self.sink: asyncio.WriteTransport | None = None  # the client's transport, for direct writes (HTTP/1.x)
        self.chunked = True  # HTTP/1.1 responses are chunked; HTTP/1.0 ones are delimited by the close
        self.parked = False  # nothing queued and the generator waits (or the stream owns its socket): write direct
        self._upstream: asyncio.BaseProtocol | None = None  # Hypercorn's protocol, until the hand-off

    @property
    def app(self) -> str:
        return self.rec.app

    @property
    def user(self) -> str:
        return self.rec.user

    @property
    def conn_id(self) -> str:
        return self.rec.id

    @property
    def closed(self) -> bool:
        return self.reason is not None

    def log_extra(self) -> dict[str, str]:
        return {"app": self.rec.app, "user": self.rec.user, "conn": self.rec.id}

    # -- the hub's side: events in ----------------------------------------------------------------------------
    def push(self, msg: Message) -> None:
        """One event for this stream (the hub calls it once per stream; `msg` is shared by all of them).

        Parked with room in the socket: one `write` of the message's pre-joined bytes (the same buffer for every
        stream; no `writelines`, whose missing `pause_writing` on CPython 3.12.0-3.12.8 and 3.13.0-3.13.1,
        gh-127655, would leave an owned stream waiting for a `resume_writing` that never comes). Otherwise it
        queues, bounded: a client over the bounds is cut (it resumes from history when it comes back).
        """
        if self.reason is not None:
            return
        if self.parked and self.after is None and not self.held:
            sink = self.sink
            if sink is not None and sink.get_write_buffer_size() <= HIGH_WATER and not sink.is_closing():
                sink.write(msg.chunk if self.chunked else msg.frame)
                if msg.pos is not None:
                    self.last_pos = msg.pos
                return
        self.parked = False  # from here on the queue holds the order until it is drained
        q = self._queue
        q.append(msg)
        self._bytes += len(msg.frame)
        if len(q) > self.max_events or self._bytes > self.max_bytes:
            self._queue = []  # nothing more goes out: the connection is aborted, the client resumes
            self._bytes = 0
            self.close(CloseReason.SLOW_CONSUMER)
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
        elif self.state is StreamState.OWNED:
            self.flush()

    def flush(self) -> None:
        """An owned stream writes what may go out now, as one chunk; when the socket's buffer is full, its
        `resume_writing` calls again."""
        sink = self.sink
        if self.reason is not None or sink is None or sink.is_closing() or \
                sink.get_write_buffer_size() > HIGH_WATER:
            return
        self._send_queued()
        self.parked = not self._queue

    def _send_queued(self) -> None:
        if self.pending():
            chunk = self.drain()
            if chunk:
                self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        """One `write` per chunk: chunked framing joined here (once per flush, not per event or stream)."""
        assert self.sink is not None
        self.sink.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk)

    # -- held back during a resync after a Redis outage ---------------------------------------------------------
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

    # -- the generator's side: events out ---------------------------------------------------------------------
    def idle(self) -> bool:
        """Nothing queued, nothing held back, still open: the moment a generator may hand its connection off."""
        return not self._queue and not self.held and self.reason is None

    def pending(self) -> bool:
        if self.held:
            return any(m.pos is None for m in self._queue)
        return bool(self._queue)

    async def wait(self) -> None:
        """Until something is queued (and not held back) or the stream is closed."""
        if self.reason is not None or self.pending():
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
        if not msgs:
            return b""
        for m in reversed(msgs):
            if m.pos is not None:
                self.last_pos = m.pos
                break
        return msgs[0].frame if len(msgs) == 1 else b"".join([m.frame for m in msgs])

    async def body(self, first: bytes, handoff: bool) -> AsyncIterator[bytes]:
        """Quart's response body: the first bytes, then events until the stream ends or, with `handoff`, until
        the connection is the stream's (then it returns and Quart and Hypercorn let go of the connection)."""
        handed = False
        try:
            yield first
            if self.state is StreamState.REPLAYING:
                self.state = StreamState.LIVE
            while True:
                if not self.pending():
                    if self.reason is not None:
                        break
                    # every byte yielded so far is in the transport (adapter.TrackedTCPServer.protocol_send): from
                    # here the connection can be the stream's alone
                    if handoff and self.idle() and self._hand_off():
                        handed = True
                        return
                    await self.wait()
                if self.pending():
                    chunk = self.drain()
                    if chunk:
                        yield chunk
            if self.reason is not None and self.reason.says_goodbye:
                yield await self._last_words()
        finally:
            if not handed:
                self.end()

    def take_connection(self, svc: Services, chunked: bool) -> None:
        """From now on the connection's reads are this stream's, and the hub may write to it directly; nothing
        changes when the adapter cannot (HTTP/2, the test client, the adapter off)."""
        taken = svc.adapter.take_reads(self.peer, self)
        if taken is not None:
            self.sink, self._upstream = taken
            self.chunked = chunked

    def _hand_off(self) -> bool:
        svc = self.services
        if svc is None or not svc.adapter.hand_off(self.peer):
            return False
        svc.metrics.handoffs.inc()
        self.own()
        return True

    def own(self) -> None:
        """The connection is this stream's from now on: the hub writes to it, `flush` drains the queue."""
        self._upstream = None
        self.state = StreamState.OWNED
        self.parked = not self._queue
        self.flush()

    # -- the connection's side (asyncio.Protocol) -------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """An event stream's client has nothing more to say; whatever it sends (a pipelined request that would
        never be answered) is dropped."""

    def eof_received(self) -> bool:
        self.close(CloseReason.CLIENT_LEFT)
        return False  # the client closed its side: close ours, `connection_lost` follows

    def pause_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.pause_writing()

    def resume_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.resume_writing()
        else:
            self.flush()  # what queued while the client's buffer was full goes out now

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(CloseReason.CLIENT_LEFT)  # no-op when the stream ended before
        upstream = self._upstream
        if upstream is not None:  # Hypercorn's writer and read loop learn it too; the generator ends the stream
            self._upstream = None
            upstream.connection_lost(exc)
        else:  # owned: nobody else will
            self.end()
            if self.services is not None:
                self.services.adapter.let_go()

    # -- the end ----------------------------------------------------------------------------------------------
    def close(self, reason: CloseReason) -> None:
        """End the stream, once, for any reason. The generator (or, for an owned stream, the connection or the
        services' farewells) finishes the job: last bytes, then `end()`."""
        if self.reason is not None:
            return
        self.reason = reason
        owned = self.state is StreamState.OWNED
        self.state = StreamState.CLOSING
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        svc = self.services
        if svc is None:
            return
        if reason is CloseReason.SLOW_CONSUMER:
            self._cut()
        if owned and reason.says_goodbye:  # no generator to say it
            svc.farewells.add(self)
        # otherwise the generator ends the stream, or for an owned one `connection_lost` (the client left: its
        # transport closes itself; it was cut: aborted). Not here: `push` may be inside the hub's loop over streams

    def _cut(self) -> None:
        """A client that cannot keep up: its connection is aborted. Closing it would wait on a send buffer that
        never drains, and a generator would stay stuck in a write the client never reads."""
        svc = self.services
        assert svc is not None
        svc.metrics.slow_disconnects.inc()
        sink = self.sink
        if sink is not None:
            sink.abort()
        else:  # not ours to cut (HTTP/2, the adapter off): its place at least is given back at once
            asyncio.get_running_loop().call_soon(self.free)
        log.warning("slow consumer disconnected: over %d events or %d bytes queued (connection %s)",
                    self.max_events, self.max_bytes, "aborted" if sink is not None else "not ours, closed",
                    extra=self.log_extra())

    def free(self) -> None:
        """Give the stream's place back: per-user cap, per-process cap, listings. Once; synchronous."""
        if self.freed:
            return
        self.freed = True
        if self.reason is None:
            self.close(CloseReason.CLIENT_LEFT)
        svc = self.services
        if svc is not None:
            svc.hub.detach(self)
            svc.registry.release(self.rec)
            svc.metrics.streams_open.dec()

    def end(self) -> None:
        """The stream is over: freed, and its end logged."""
        if self.state is StreamState.CLOSED:
            return
        self.free()
        self.state = StreamState.CLOSED
        log.info("stream closed (%s) after %.0f s", self.reason.value if self.reason else "?",
                 time.time() - self.rec.created_at, extra=self.log_extra())

    async def _last_words(self) -> bytes:
        """The closing frame, once the place is free everywhere: a client reconnecting at once is admitted."""
        svc = self.services
        assert svc is not None and self.reason is not None
        self.end()
        await svc.registry.released(self.rec)
        return closing_frame(self.reason.value, goodbye_retry_ms(self.reason, svc.settings.sse_retry_ms))

    def say_goodbye(self) -> None:
        """An owned stream's last bytes; its place was freed and the release awaited (`Farewells`)."""
        svc = self.services
        if svc is not None and self.reason is not None:
            sink = self.sink
            if sink is not None and not sink.is_closing():
                # what was queued before the end (the client was behind) goes out first, as the generator path
                # sends it: the client may still read it within write_last's grace
                self._send_queued()
            self.write_last(closing_frame(self.reason.value, goodbye_retry_ms(self.reason, svc.settings.sse_retry_ms)))

    def write_last(self, frame: bytes, grace: float = 5.0) -> None:
        """`frame`, the end of the response and the connection; a client not reading them within `grace` s is cut:
        `close()` alone would wait for it forever."""
        sink = self.sink
        if sink is None or sink.is_closing():
            return
        self._write(frame)
        if self.chunked:
            sink.write(_LAST_CHUNK)
        sink.close()
        if sink.get_write_buffer_size():
            asyncio.get_running_loop().call_later(grace, sink.abort)

    def expire_at(self, loop_time: float) -> None:
        """End the stream when its token expires: one timer per stream, none per event. The timer runs in an empty
        context: it would otherwise keep the request's context (Quart's request, Hypercorn's connection) alive for
        as long as the stream, after a hand-off too."""
        self._expiry = asyncio.get_running_loop().call_at(loop_time, self.close, CloseReason.TOKEN_EXPIRED,
                                                          context=contextvars.Context())


class Farewells:
    """Owned streams the server ends (disconnect, token expiry, shutdown): those ended in the same loop iteration
    are freed at once, their registry releases awaited once (at most 1 s), then each writes its last bytes.

    One job for all: a task and a wait per stream took seconds for the 15,000 streams of a shutdown."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._batch: list[Stream] = []

    def add(self, stream: Stream) -> None:
        self._batch.append(stream)
        if len(self._batch) == 1:
            self._services.spawn(self._say_all())

    async def _say_all(self) -> None:
        await asyncio.sleep(0)  # the rest of this iteration's streams join the batch
        batch, self._batch = self._batch, []
        for stream in batch:
            stream.end()
        await self._services.registry.released(*(stream.rec for stream in batch))
        for stream in batch:
            stream.say_goodbye()


# -- opening ------------------------------------------------------------------------------------------------------
async def open_stream(svc: Services, ident: Identity, last_id: str | None, *, remote: str, peer: Peer | None,
                      http_version: str | None, seconds_left: float,
                      admitted: Callable[[], Awaitable[None]] | None = None) -> tuple[Stream, bytes]:
    """Admit, subscribe and fetch the replay of a new stream; returns it and its first bytes.

    Raises `StreamRefused` for what passes by itself (shutting down, this instance full, the user's cap, the
    broker unreachable); nothing is left behind then. `admitted` runs once the stream holds its place (a ticket is
    spent there: a refused stream's ticket stays good for the retry); it may raise, and the place is given back.
    """
    settings = svc.settings
    if svc.shutting_down:
        raise StreamRefused(RefusalReason.SHUTTING_DOWN, "the service is shutting down")
    if settings.max_connections and len(svc.hub.subscribers) >= settings.max_connections:
        raise StreamRefused(RefusalReason.INSTANCE_FULL, "this instance holds its maximum of streams")
    rec = ConnRecord(str(uuid.uuid4()), ident.app, ident.user, remote)
    try:
        ok = await svc.registry.admit(rec, settings.max_connections_per_user)
    except BrokerUnavailable:
        raise StreamRefused(RefusalReason.UNAVAILABLE, "broker unavailable") from None
    if not ok:
        raise StreamRefused(RefusalReason.TOO_MANY_CONNECTIONS,
                            f"at most {settings.max_connections_per_user} streams per user")
    stream = Stream(rec, (keys.user_channel(ident.app, ident.user), keys.broadcast_channel(ident.app)),
                    services=svc, max_events=settings.queue_max_events, max_bytes=settings.queue_max_bytes,
                    peer=peer)
    svc.metrics.streams_open.inc()  # from here on `free()` counts it out, whatever happens
    replay: Replay | None = None
    try:
        if admitted is not None:
            await admitted()
        if http_version in ("1.1", "1.0"):  # HTTP/2 multiplexes streams on one connection: never ours to touch
            stream.take_connection(svc, http_version == "1.1")
        await svc.hub.attach(stream)  # live events queue up from here on, so the replay below leaves no gap
        if last_id is not None:
            replay = await svc.broker.replay(ident.app, ident.user, last_id)
            stream.after = replay.after
        if settings.history_enabled:  # (0, 0) when the app has no history yet: a resync then replays it all
            stream.last_pos = (replay.after if replay and replay.reset is None else None) or \
                await svc.broker.head(ident.app, ident.user) or (0, 0)
    except BaseException as exc:
        stream.free()
        if isinstance(exc, TimeoutError | BrokerUnavailable):
            raise StreamRefused(RefusalReason.UNAVAILABLE, "broker unavailable") from None
        raise
    if svc.shutting_down:  # the shutdown began while this stream was being admitted
        stream.free()
        raise StreamRefused(RefusalReason.SHUTTING_DOWN, "the service is shutting down")
    try:
        # the client may have left while this stream was admitted (Quart cancels the request then), and on Python
        # 3.11 a Redis call's wait_for can swallow that cancellation (CPython gh-86296): the stream would live on,
        # parked, with nobody to end it
        raise_if_cancelling()
    except asyncio.CancelledError:
        stream.free()
        raise
    stream.expire_at(asyncio.get_running_loop().time() + seconds_left)
    stream.state = StreamState.REPLAYING
    svc.metrics.streams_opened.inc()
    log.info("stream opened from %s", remote, extra=stream.log_extra())
    return stream, _first_bytes(svc, stream, replay, last_id)


def _first_bytes(svc: Services, stream: Stream, replay: Replay | None, last_id: str | None) -> bytes:
    first = retry_frame(svc.settings.sse_retry_ms)
    if replay is None:
        return first
    if replay.reset is not None:
        svc.metrics.resets.inc()
        return first + reset_frame(replay.reset, last_id[:256] if last_id else None)
    svc.metrics.replays.inc()
    if replay.messages and replay.messages[-1].pos is not None:
        stream.last_pos = replay.messages[-1].pos
    return first + b"".join([m.frame for m in replay.messages])
