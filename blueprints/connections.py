"""Who is connected: listings in the seed's shape, and the cluster-wide disconnect."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify

from quart_sse.auth import SCOPE_CONNECTIONS, require_app
from quart_sse.errors import forbidden
from quart_sse.http import check_path_ids, identity, services

bp = Blueprint("connections", __name__)


@bp.get("/connections/<app>")
async def list_app(app: str) -> Response:
    ident = identity()
    check_path_ids(app=app)
    require_app(ident, app, SCOPE_CONNECTIONS)
    return jsonify(await services().registry.list_app(app))  # BrokerUnavailable: 503 (errors.py)


@bp.get("/connections/<app>/<user>")
async def list_user(app: str, user: str) -> Response:
    ident = identity()
    check_path_ids(app=app, user=user)
    require_app(ident, app)
    if ident.user != user and not ident.can(SCOPE_CONNECTIONS):
        raise forbidden("a token without the 'connections' scope lists only its own connections")
    return jsonify(await services().registry.list_user(app, user))


@bp.delete("/connections/<app>/<user>")
async def disconnect(app: str, user: str) -> Response:
    ident = identity()
    check_path_ids(app=app, user=user)
    require_app(ident, app, SCOPE_CONNECTIONS)
    closed = await services().control.disconnect_user(app, user)
    return jsonify({"closed": closed})

