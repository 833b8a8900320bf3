"""`GET /sse`: one async generator per stream; `POST /sse/ticket`.

The generator starts the stream: its first bytes and the replay. Then, on plain HTTP/1.x, it hands the connection
off (quart_sse.handoff) and returns, so that Quart's request and Hypercorn's connection objects do not live as long
as the stream; from there the hub writes events to the transport. Where it cannot (HTTP/2, TLS, the test client,
STREAM_HANDOFF=false) the generator owns the stream's whole life: its loop waits on the subscriber's single future,
drains everything queued into one chunk and yields it (no per-event task, timer, queue or `wait_for`), while the hub
writes events straight to an HTTP/1.x transport as long as nothing is queued (hub.Subscriber.push).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from quart import Blueprint, Response, jsonify, request

from quart_sse import keys, transports
from quart_sse.auth import Identity, authenticate, seconds_left
from quart_sse.broker.base import BrokerUnavailable, Replay
from quart_sse.errors import ApiError, unauthorized, unavailable
from quart_sse.events import closing_frame, reset_frame, retry_frame
from quart_sse.handoff import OwnedStream
from quart_sse.http import services
from quart_sse.hub import Subscriber
from quart_sse.registry import ConnRecord
from quart_sse.services import Services

bp = Blueprint("stream", __name__)
log = logging.getLogger("quart_sse.stream")


async def _stream_identity(svc: Services) -> Identity:
    ticket = request.args.get("ticket")
    if ticket is not None and "Authorization" not in request.headers and "token" not in request.args:
        try:
            ident = await svc.tickets.redeem(ticket)
        except BrokerUnavailable:
            raise unavailable("broker unavailable") from None
        if ident is None:
            raise unauthorized("unknown, used or expired ticket")
        return ident
    return authenticate(request, svc.settings, svc.token_cache)


@bp.post("/sse/ticket")
async def ticket() -> tuple[Response, int]:
    """A single-use ticket for `GET /sse?ticket=`; bought with a Bearer header only, never a cookie (CSRF)."""
    svc = services()
    header = request.headers.get("Authorization")
    if header is None:
        raise unauthorized("a ticket is bought with an 'Authorization: Bearer' header")
    ident = authenticate(request, svc.settings, svc.token_cache)
    ttl = int(max(1, min(svc.settings.ticket_ttl, seconds_left(ident, svc.settings.jwt_leeway))))
    try:
        tk = await svc.tickets.issue(ident, ttl)
    except BrokerUnavailable:
        raise unavailable("broker unavailable") from None
    return jsonify({"ticket": tk, "expires_in": ttl}), 201


@bp.get("/sse")
async def sse() -> Response:
    svc = services()
    settings = svc.settings
    ident = await _stream_identity(svc)
    left = seconds_left(ident, settings.jwt_leeway)
    if left <= 0:
        raise unauthorized("token expired")
    if svc.shutting_down:
        raise unavailable("shutting down")
    if settings.max_connections and len(svc.hub.subscribers) >= settings.max_connections:
        svc.metrics.streams_refused.labels("instance_full").inc()
        raise ApiError(503, "instance_full", "this instance holds its maximum of streams", {"Retry-After": "5"})
    last_id = request.headers.get("Last-Event-ID")
    if last_id is None:
        last_id = request.args.get("lastEventId")

    conn_id = str(uuid.uuid4())
    remote = request.remote_addr or ""
    client = request.scope.get("client")
    peer = (str(client[0]), int(client[1])) if client else None
    rec = ConnRecord(conn_id, ident.app, ident.user, remote)
    try:
        admitted = await svc.registry.admit(rec, settings.max_connections_per_user)
    except BrokerUnavailable:
        svc.metrics.streams_refused.labels("broker_unavailable").inc()
        raise unavailable("broker unavailable") from None
    if not admitted:
        svc.metrics.streams_refused.labels("user_cap").inc()
        raise ApiError(429, "too_many_connections",
                       f"at most {settings.max_connections_per_user} streams per user", {"Retry-After": "5"})

    sub = Subscriber(conn_id, ident.app, ident.user,
                     (keys.user_channel(ident.app, ident.user), keys.broadcast_channel(ident.app)),
                     remote_addr=remote, created_at=rec.created_at,
                     max_events=settings.queue_max_events, max_bytes=settings.queue_max_bytes, peer=peer)
    stream = _Stream(svc, sub, rec)
    sub.on_close = stream.on_close
    version = request.scope.get("http_version")
    if version in ("1.1", "1.0"):  # HTTP/2 multiplexes streams on one transport: always the queue path there
        sub.direct_to(transports.get(peer), chunked=version == "1.1")
    replay: Replay | None = None
    try:
        await svc.hub.attach(sub)  # live events queue up from here on, so the replay below leaves no gap
        if last_id is not None:
            replay = await svc.broker.replay(ident.app, ident.user, last_id)
            sub.after = replay.after
        if settings.history_enabled:  # (0, 0) when the app has no history yet: a resync then replays it all
            sub.last_pos = (replay.after if replay and replay.reset is None else None) or \
                await svc.broker.head(ident.app, ident.user) or (0, 0)
    except (TimeoutError, BrokerUnavailable, asyncio.CancelledError) as exc:
        svc.hub.detach(sub)
        svc.registry.release(rec)
        if isinstance(exc, asyncio.CancelledError):
            raise
        svc.metrics.streams_refused.labels("broker_unavailable").inc()
        raise unavailable("broker unavailable") from None
    sub.expire_at(asyncio.get_running_loop().time() + left)
    svc.metrics.streams_opened.inc()
    svc.metrics.streams_open.inc()
    log.info("stream opened from %s", remote, extra=stream.log_extra())
    owner = OwnedStream(sub, stream.ended) if settings.stream_handoff and sub.sink is not None else None

    async def body() -> AsyncIterator[bytes]:
        handed = False
        try:
            first = retry_frame(settings.sse_retry_ms)
            if replay is not None:
                if replay.reset is not None:
                    svc.metrics.resets.inc()
                    first += reset_frame(replay.reset, last_id[:256] if last_id else None)
                else:
                    svc.metrics.replays.inc()
                    first += b"".join([m.frame for m in replay.messages])
                    if replay.messages and replay.messages[-1].pos is not None:
                        sub.last_pos = replay.messages[-1].pos
            yield first
            while True:
                if not sub.pending():
                    if sub.closed:
                        break
                    # all yielded bytes are in the transport: the connection can be the stream's alone from here
                    if owner is not None and sub.idle() and transports.hand_off(peer, owner):
                        handed = True
                        sub.own()
                        return
                    await sub.wait()
                if sub.pending():
                    chunk = sub.drain()
                    if chunk:
                        yield chunk
            if sub.reason != "slow consumer":  # a slow consumer's connection was aborted (Services.stream_closed)
                yield await stream.last_words(sub.reason)
        finally:
            if not handed:
                stream.ended()

    resp = Response(body(), status=200, content_type="text/event-stream", headers={
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Connection-Id": conn_id})
    resp.timeout = None  # no framework time-out may end a healthy stream
    return resp


class _Stream:
    """A stream's place (hub, registry, metrics) and its last words, for its generator and, once the connection
    is handed off (quart_sse.handoff), for the connection's protocol. `free` acts once, `ended` is called once."""

    __slots__ = ("freed", "rec", "sub", "svc")

    def __init__(self, svc: Services, sub: Subscriber, rec: ConnRecord) -> None:
        self.svc = svc
        self.sub = sub
        self.rec = rec
        self.freed = False

    def log_extra(self) -> dict[str, str]:
        return {"app": self.sub.app, "user": self.sub.user, "conn": self.sub.conn_id}

    def free(self) -> None:
        """Give the stream's place back: per-user cap, per-process cap, listings. Synchronous (safe in `finally`)."""
        if self.freed:
            return
        self.freed = True
        sub = self.sub
        sub.close("client left")  # no-op unless the client left first
        self.svc.hub.detach(sub)
        self.svc.registry.release(self.rec)
        self.svc.metrics.streams_open.dec()

    async def last_words(self, reason: str) -> bytes:
        """The closing frame, once the place is free everywhere: a client reconnecting at once is admitted."""
        self.free()
        await self.svc.registry.released(self.rec)
        return closing_frame(reason, self.svc.retry_after_close(reason))

    def ended(self) -> None:
        self.free()
        log.info("stream closed (%s) after %.0f s", self.sub.reason, time.time() - self.rec.created_at,
                 extra=self.log_extra())

    def on_close(self, sub: Subscriber) -> None:
        """The subscriber's `on_close`. A handed-off stream that the server ends says goodbye through
        `Services.end_together` (a generator does it in its loop); one whose client left or was cut has nothing
        more to send."""
        self.svc.stream_closed(sub)
        if sub.owned and sub.reason not in ("client left", "slow consumer"):
            self.svc.end_together(self)

    def say_goodbye(self) -> None:
        """The last bytes now; the place was freed and its release awaited by `Services.end_together`."""
        reason = self.sub.reason
        self.sub.write_last(closing_frame(reason, self.svc.retry_after_close(reason)))
