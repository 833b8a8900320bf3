"""Who is online: `POST /presence/{app}` for up to 10,000 users in one Redis round trip, `GET
/presence/{app}/{user}` for one (docs/presence.md).

Tenant rules as for /connections: 401 (who are you), then 400 (what you sent: path ids, body), then 403 (a token
of another app, or without the `presence` or `connections` scope; a plain token may ask about its own user only).
"""

from __future__ import annotations

import orjson
from quart import Blueprint, Response, jsonify, request

from quart_sse.auth import SCOPE_CONNECTIONS, SCOPE_PRESENCE, Identity, require_app
from quart_sse.errors import ApiError, bad_request, forbidden
from quart_sse.http import check_path_ids, identity, services
from quart_sse.ids import is_valid_id
from quart_sse.presence.service import MAX_QUERY_USERS

bp = Blueprint("presence", __name__)

#: The body limit of POST /presence/{app}, above MAX_BODY_BYTES: 10,000 ids of the longest allowed length (128),
#: quoted, comma-separated, with room for whitespace.


def _may_ask(ident: Identity) -> bool:
    return ident.can(SCOPE_PRESENCE) or ident.can(SCOPE_CONNECTIONS)


@bp.post("/presence/<app>")
async def query(app: str) -> Response:
    """`{"users": [id, ...]}` (1 to 10,000 valid ids; repeats allowed) → `{"online": [...]}`: those online, in the
    order asked, each once."""
    ident = identity()
    check_path_ids(app=app)
    users = _users(await request.get_data(cache=False, as_text=False))
    require_app(ident, app)
    if not _may_ask(ident):
        raise forbidden("asking about other users needs the 'presence' or 'connections' scope")
    online = await services().presence.online(app, users)
    return jsonify({"online": online})


@bp.get("/presence/<app>/<user>")
async def one(app: str, user: str) -> Response:
    """`{"user": id, "online": bool}`; a token without scope may ask about its own user."""
    ident = identity()
    check_path_ids(app=app, user=user)
    require_app(ident, app)
    if ident.user != user and not _may_ask(ident):
        raise forbidden("a token without the 'presence' or 'connections' scope asks only about its own user")
    online = await services().presence.online(app, [user])
    return jsonify({"user": user, "online": bool(online)})


def _users(raw: bytes | str) -> list[str]:
    """The body's ids; 400 naming what is wrong, 413 over MAX_QUERY_USERS."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("body: not valid JSON") from None
    if not isinstance(body, dict) or "users" not in body:
        raise bad_request('body: expected {"users": [user id, ...]}')
    if set(body) != {"users"}:
        raise bad_request(f"{sorted(set(body) - {'users'})[0]}: unknown field")
    users = body["users"]
    if not isinstance(users, list):
        raise bad_request("users: must be a list of user ids")
    if len(users) > MAX_QUERY_USERS:
        raise ApiError(413, "too_many_users", f"users: at most {MAX_QUERY_USERS} per query, got {len(users)}")
    for i, u in enumerate(users):
        if not is_valid_id(u):
            raise bad_request(f"users[{i}]: not a valid id (allowed: ^[A-Za-z0-9._@|+-]{{1,128}}$)")
    return users
