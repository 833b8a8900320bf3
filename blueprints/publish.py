"""The HTTP publish API (scope `publish`)."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify, request

from quart_sse.auth import SCOPE_PUBLISH, require_app
from quart_sse.broker.base import BrokerUnavailable
from quart_sse.errors import ApiError, bad_request, unavailable
from quart_sse.events import EventError
from quart_sse.http import check_path_ids, identity, services
from quart_sse.metrics import PublishKind
from quart_sse.publisher import parse_body

bp = Blueprint("publish", __name__)


@bp.post("/publish/<app>/<user>")
async def to_user(app: str, user: str) -> tuple[Response, int]:
    return await _publish(app, user)


@bp.post("/publish/<app>")
async def broadcast(app: str) -> tuple[Response, int]:
    return await _publish(app, None)


async def _publish(app: str, user: str | None) -> tuple[Response, int]:
    ident = identity()  # 401 first
    check_path_ids(app=app, **({"user": user} if user is not None else {}))  # then 400
    raw = await request.get_data(cache=False, as_text=False)
    try:
        req = parse_body(raw)
    except EventError as exc:
        raise ApiError(400, "bad_request", f"{exc.field}: {exc.message}") from None
    require_app(ident, app, SCOPE_PUBLISH)  # then 403 (CONTRACT §3: 401, 400, 403)
    svc = services()
    try:
        with svc.metrics.publish_seconds.time():
            msg = await svc.publisher.publish_request(app, user, req)
    except EventError as exc:
        raise bad_request(f"{exc.field}: {exc.message}") from None
    except BrokerUnavailable:
        raise unavailable("broker unavailable: nothing was published") from None
    svc.metrics.publishes.labels(PublishKind.BROADCAST if user is None else PublishKind.USER).inc()
    return jsonify({"id": msg.id}), 202
