"""The HTTP publish API (scope `publish`): one event to a user or to the app's broadcast, or a batch of events.

`POST /publish/{app}/{user}` and `POST /publish/{app}` with a JSON object publish one event; `POST /publish/{app}`
with a JSON array publishes a batch (up to MAX_BATCH_EVENTS events for any users of the app and its broadcast,
body up to MAX_BATCH_BYTES). An event whose id its channel already published within HISTORY_TTL is answered as the
first time and not published again; `Idempotent-Replayed: true` marks an answer in which nothing was new
(docs/publishing.md).
"""

from __future__ import annotations

import time

import orjson
from quart import Blueprint, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from quart_sse.auth import SCOPE_PUBLISH, Identity, require_app
from quart_sse.broker.base import BrokerUnavailable, Outgoing, Published
from quart_sse.errors import bad_request, unavailable
from quart_sse.events import EventError
from quart_sse.http import check_path_ids, identity, services
from quart_sse.metrics import Metrics
from quart_sse.publisher import parse_batch, parse_body

bp = Blueprint("publish", __name__)

#: The header that says an answer is a replay: every event of the request had been published before (Stripe's
#: name for the same thing); a batch names its duplicates in `duplicates` too.
REPLAYED_HEADER = "Idempotent-Replayed"
JSON = "application/json"


@bp.post("/publish/<app>/<user>")
async def to_user(app: str, user: str) -> Response:
    ident = identity()  # 401 first
    check_path_ids(app=app, user=user)  # then 400
    raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    return await _publish_one(ident, app, user, raw)


@bp.post("/publish/<app>")
async def to_app(app: str) -> Response:
    """A JSON object broadcasts one event; a JSON array is a batch (its body may be up to MAX_BATCH_BYTES: see
    quart_sse.bodies, which picks the limit before the body is read)."""
    ident = identity()
    check_path_ids(app=app)
    raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    if raw.lstrip()[:1] == b"[":
        return await _publish_batch(ident, app, raw)
    if len(raw) > services().settings.max_body_bytes:
        raise RequestEntityTooLarge()
    return await _publish_one(ident, app, None, raw)


async def _publish_one(ident: Identity, app: str, user: str | None, raw: bytes) -> Response:
    try:
        req = parse_body(raw)
    except EventError as exc:
        raise bad_request(str(exc)) from None
    require_app(ident, app, SCOPE_PUBLISH)  # then 403 (401, 400, 403: docs/security.md)
    svc = services()
    started = time.perf_counter()
    try:
        res = await svc.publisher.publish_request(app, user, req)
    except EventError as exc:
        raise bad_request(str(exc)) from None
    except BrokerUnavailable:
        raise unavailable("broker unavailable: nothing was published") from None
    svc.metrics.publish_seconds.observe(time.perf_counter() - started)
    _count(svc.metrics, [Outgoing(user, req.id, req.type, b"")], [res])
    resp = Response(orjson.dumps({"id": res.id}), 202, content_type=JSON)
    if res.duplicate:
        resp.headers[REPLAYED_HEADER] = "true"
    return resp


async def _publish_batch(ident: Identity, app: str, raw: bytes) -> Response:
    try:
        events = parse_batch(raw)
    except EventError as exc:
        raise bad_request(str(exc)) from None
    require_app(ident, app, SCOPE_PUBLISH)
    svc = services()
    started = time.perf_counter()
    try:
        results = await svc.publisher.publish_checked(app, events)
    except BrokerUnavailable:
        raise unavailable("broker unavailable: nothing of the batch was published, or, if the connection to "
                          "Redis was lost, maybe all of it: retry with the same ids") from None
    svc.metrics.publish_batch_seconds.observe(time.perf_counter() - started)
    svc.metrics.publish_batches.inc()
    _count(svc.metrics, events, results)
    duplicates = [i for i, res in enumerate(results) if res.duplicate]
    resp = Response(orjson.dumps({"ids": [res.id for res in results], "duplicates": duplicates}), 202,
                    content_type=JSON)
    if len(duplicates) == len(results):
        resp.headers[REPLAYED_HEADER] = "true"
    return resp


def _count(m: Metrics, events: list[Outgoing], results: list[Published]) -> None:
    users = broadcasts = duplicates = 0
    for ev, res in zip(events, results, strict=True):
        if res.duplicate:
            duplicates += 1
        elif ev.user is None:
            broadcasts += 1
        else:
            users += 1
    if users:
        m.published_user.inc(users)
    if broadcasts:
        m.published_broadcast.inc(broadcasts)
    if duplicates:
        m.publish_duplicates.inc(duplicates)
