"""`GET /sse`: one async generator per stream; `POST /sse/ticket`.

The generator owns the stream's life: its first bytes, the replay, the queue path and the last bytes. Its loop waits
on the subscriber's single future, drains everything queued into one chunk and yields it: no per-event task, timer,
queue or `wait_for`. While it waits with nothing queued, the hub writes events straight to the client's transport
(hub.Subscriber.push), so most events never wake it.
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
    sub.on_close = svc.stream_closed
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
    extra = {"app": ident.app, "user": ident.user, "conn": conn_id}
    log.info("stream opened from %s", remote, extra=extra)

    async def body() -> AsyncIterator[bytes]:
        reason = "client left"
        freed = False
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
                    await sub.wait()
                if sub.pending():
                    chunk = sub.drain()
                    if chunk:
                        yield chunk
            reason = sub.reason
            if reason != "slow consumer":  # a slow consumer's connection was aborted (Services.stream_closed)
                # the place is free before the client can see the end: a reconnect at once is admitted
                freed = True
                _free(svc, sub, rec, reason)
                await svc.registry.released(rec)
                yield closing_frame(reason, svc.retry_after_close(reason))
        finally:
            if not freed:
                _free(svc, sub, rec, reason)
            log.info("stream closed (%s) after %.0f s", sub.reason, time.time() - rec.created_at, extra=extra)

    resp = Response(body(), status=200, content_type="text/event-stream", headers={
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Connection-Id": conn_id})
    resp.timeout = None  # no framework time-out may end a healthy stream
    return resp


def _free(svc: Services, sub: Subscriber, rec: ConnRecord, reason: str) -> None:
    """Give a stream's place back: per-user cap, per-process cap, listings. Synchronous (safe in `finally`)."""
    sub.close(reason)
    svc.hub.detach(sub)
    svc.registry.release(rec)
    svc.metrics.streams_open.dec()
