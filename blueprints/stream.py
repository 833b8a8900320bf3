"""`GET /sse` (and `HEAD /sse`), `POST /sse/ticket`: the HTTP side of a stream.

Who the client is (token or ticket), the answer to a refusal, the response's headers; the stream itself (admission,
replay, its generator, its end) is quart_sse.stream's.

A standard EventSource gives up for good on any answer but 200 with `text/event-stream` (WHATWG HTML, "Server-sent
events", §9.2.3: "fail the connection"). So a refusal that passes by itself (`RefusalReason`: the broker is
unreachable, the user or this instance is at its cap, the service is shutting down) answers a request that
accepts `text/event-stream` with 200, a jittered `retry:` and a comment naming the reason, and ends: the
EventSource reconnects by itself after that delay. Other clients get the JSON error with its status and
`Retry-After`. Refusals that cannot pass (401, 403) keep their status: an EventSource stops there, as it should.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from quart import Blueprint, Response, jsonify, request

from quart_sse.auth import Identity, authenticate, seconds_left
from quart_sse.broker.base import BrokerUnavailable
from quart_sse.errors import ApiError, unauthorized
from quart_sse.http import services
from quart_sse.services import Services
from quart_sse.stream import RefusalReason, StreamRefused, open_stream, refusal_retry_ms

bp = Blueprint("stream", __name__)

_STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass events on at once
}


def _stream_headers(**extra: str) -> dict[str, str]:
    """An HTTP/1.x event stream's connection carries nothing else: a request pipelined behind it is never started
    (RFC 9112 §9.6), and its end is the connection's end. HTTP/2 has no such header (RFC 9113 §8.2.2)."""
    headers = {**_STREAM_HEADERS, **extra}
    if request.scope.get("http_version") in ("1.1", "1.0"):
        headers["Connection"] = "close"
    return headers


async def _stream_identity(svc: Services) -> tuple[Identity, Callable[[], Awaitable[None]] | None]:
    """The stream's identity, and for a ticket the step that spends it (once the stream holds its place, so that
    a refused stream's ticket is still good when its EventSource retries)."""
    ticket = request.args.get("ticket")
    if ticket is None or "Authorization" in request.headers or "token" in request.args:
        return authenticate(request, svc.settings, svc.token_cache), None
    try:
        ident = await svc.tickets.peek(ticket)
    except BrokerUnavailable:
        raise StreamRefused(RefusalReason.UNAVAILABLE, "broker unavailable") from None
    if ident is None:
        raise unauthorized("unknown, used or expired ticket")

    async def spend() -> None:
        try:
            spent = await svc.tickets.redeem(ticket)
        except BrokerUnavailable:
            raise StreamRefused(RefusalReason.UNAVAILABLE, "broker unavailable") from None
        if spent is None:  # another request spent it in the meantime
            raise unauthorized("unknown, used or expired ticket")

    return ident, spend


@bp.post("/sse/ticket")
async def ticket() -> tuple[Response, int]:
    """A single-use ticket for `GET /sse?ticket=`; bought with a Bearer header only, never a cookie (CSRF)."""
    svc = services()
    header = request.headers.get("Authorization")
    if header is None:
        raise unauthorized("a ticket is bought with an 'Authorization: Bearer' header")
    ident = authenticate(request, svc.settings, svc.token_cache)
    ttl = int(max(1, min(svc.settings.ticket_ttl, seconds_left(ident, svc.settings.jwt_leeway))))
    tk = await svc.tickets.issue(ident, ttl)  # BrokerUnavailable: 503 (errors.py)
    return jsonify({"ticket": tk, "expires_in": ttl}), 201


@bp.get("/sse")
async def sse() -> Response:
    svc = services()
    try:
        return await _sse(svc)
    except StreamRefused as exc:
        return _refused(svc, exc)


async def _sse(svc: Services) -> Response:
    settings = svc.settings
    ident, spend = await _stream_identity(svc)
    left = seconds_left(ident, settings.jwt_leeway)
    if left <= 0:
        raise unauthorized("token expired")
    if request.method == "HEAD":  # the head a GET would get, and no stream (RFC 9110 §9.3.2)
        return Response(b"", status=200, content_type="text/event-stream", headers=_STREAM_HEADERS)
    last_id = request.headers.get("Last-Event-ID")
    if last_id is None:
        last_id = request.args.get("lastEventId")
    client = request.scope.get("client")
    peer = (str(client[0]), int(client[1])) if client else None
    stream, first = await open_stream(svc, ident, last_id, remote=request.remote_addr or "", peer=peer,
                                      http_version=request.scope.get("http_version"), seconds_left=left,
                                      admitted=spend)
    resp = Response(stream.body(first, handoff=settings.stream_handoff and stream.sink is not None), status=200,
                    content_type="text/event-stream", headers=_stream_headers(**{"X-Connection-Id": stream.conn_id}))
    resp.timeout = None  # no framework time-out may end a healthy stream
    return resp


def accepts_event_stream() -> bool:
    """The request's Accept header names `text/event-stream`, as every EventSource's does (WHATWG). `*/*` (curl)
    does not count: such a client reads the JSON answer better."""
    return any(value == "text/event-stream" and q > 0 for value, q in request.accept_mimetypes)


def _refused(svc: Services, exc: StreamRefused) -> Response:
    svc.metrics.streams_refused.labels(exc.reason.value).inc()
    retry_ms = refusal_retry_ms(exc.reason, svc.settings.sse_retry_ms)
    retry_after = {"Retry-After": str(math.ceil(retry_ms / 1000))}
    if not accepts_event_stream():
        raise ApiError(exc.reason.status, exc.reason.value, exc.message, retry_after)
    body = b"retry: %d\n: refused %s\n\n" % (retry_ms, exc.reason.value.encode())
    return Response(body, status=200, content_type="text/event-stream", headers=_stream_headers(**retry_after))
