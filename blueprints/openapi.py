"""`GET /openapi.json`: an OpenAPI 3.1 description of the HTTP routes (README.md: Routes;
docs/security.md, docs/streams.md).

Built in Python from the settings, so what it says follows the configuration (the cookie name, the body limit,
`POST /demo/token` only in debug mode). tests/test_openapi.py holds it to `app.url_map` both ways and checks
real answers against its schemas.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, jsonify

from blueprints.publish import REPLAYED_HEADER
from quart_sse.bodies import PRESENCE_QUERY_MAX_BYTES
from quart_sse.broker.base import MAX_BATCH_EVENTS
from quart_sse.http import services
from quart_sse.ids import ID_PATTERN
from quart_sse.presence.service import MAX_QUERY_USERS
from quart_sse.settings import Settings

bp = Blueprint("openapi", __name__)

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"$ref": f"#/components/responses/{c}"} for c in codes}


def _path_id(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": _ref("Id")}


APP_PARAM = _path_id("app", "Application id (the token's `iss`).")
USER_PARAM = _path_id("user", "User id (the token's `sub`).")
TOKEN_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {"tokenQuery": []}, {"seedQuery": []}, {"cookie": []}]


def build_spec(settings: Settings) -> dict[str, Any]:
    """The whole document; `/demo/token` is described only where it is routed (debug mode)."""
    connection = {
        "type": "object", "required": ["id", "created_at", "remote_addr", "application", "user"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "created_at": {"type": "integer", "description": "Unix seconds."},
            "remote_addr": {"type": "string"},
            "application": {"type": "object", "required": ["id"], "properties": {"id": _ref("Id")}},
            "user": {"type": "object", "required": ["id"], "properties": {"id": _ref("Id")}},
        },
    }
    schemas: dict[str, Any] = {
        "Id": {"type": "string", "pattern": ID_PATTERN},
        "Error": {"type": "object", "required": ["error", "message"], "properties": {
            "error": {"type": "string", "description": "A stable code: unauthorized, forbidden, bad_request, ..."},
            "message": {"type": "string", "description": "Human-readable text."}}},
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
        "Ready": {"type": "object", "required": ["status"], "properties": {
            "status": {"enum": ["ready", "unavailable"]}, "broker": {"enum": ["memory", "redis"]},
            "streams": {"type": "integer", "minimum": 0}, "instance": {"type": "string"}}},
        "Ticket": {"type": "object", "required": ["ticket", "expires_in"], "additionalProperties": False,
                   "properties": {"ticket": {"type": "string"},
                                  "expires_in": {"type": "integer", "minimum": 1, "maximum": 60}}},
        "Connection": connection,
        "UserConnections": {"type": "object", "additionalProperties": _ref("Connection"),
                            "description": "Connection id → connection."},
        "AppConnections": {"type": "object", "additionalProperties": _ref("UserConnections"),
                           "description": "User id → (connection id → connection)."},
        "Closed": {"type": "object", "required": ["closed"], "additionalProperties": False,
                   "properties": {"closed": {"type": "integer", "minimum": 0}}},
        "PublishBody": {"type": "object", "required": ["type"], "additionalProperties": False, "properties": {
            "type": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\x00-\\x1f\\x7f]+$"},
            "data": {"description": "Any JSON; sent as compact one-line JSON in the event's `data:`."},
            "id": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[^\\x00-\\x1f\\x7f]+$",
                   "description": "Kept as the event's `id:`; omitted, the service assigns one."}}},
        "Published": {"type": "object", "required": ["id"], "additionalProperties": False,
                      "properties": {"id": {"type": "string", "description": "The event's id."}}},
        "BatchEvent": {"type": "object", "required": ["type"], "additionalProperties": False, "properties": {
            "user": {**_ref("Id"), "description": "The user whose streams get the event; omitted or null: every "
                                                  "stream of the app (a broadcast)."},
            "type": {"$ref": "#/components/schemas/PublishBody/properties/type"},
            "data": {"$ref": "#/components/schemas/PublishBody/properties/data"},
            "id": {"$ref": "#/components/schemas/PublishBody/properties/id"}}},
        "BatchBody": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH_EVENTS, "items": _ref("BatchEvent"),
                      "description": "Events for any users of the app and its broadcast, published in this order, "
                                     "validated as a whole (a 400 names `events[i].field` and nothing is published)."},
        "BatchPublished": {"type": "object", "required": ["ids", "duplicates"], "additionalProperties": False,
                           "properties": {
                               "ids": {"type": "array", "items": {"type": "string"},
                                       "description": "Each event's id, in the order of the request."},
                               "duplicates": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                              "description": "Indexes of the events not published again: their id "
                                                             "had been published on their channel within "
                                                             "HISTORY_TTL (a retry)."}}},
        "PresenceQuery": {"type": "object", "required": ["users"], "additionalProperties": False, "properties": {
            "users": {"type": "array", "items": _ref("Id"), "maxItems": MAX_QUERY_USERS,
                      "description": "User ids to ask about; repeats allowed."}}},
        "PresenceOnline": {"type": "object", "required": ["online"], "additionalProperties": False, "properties": {
            "online": {"type": "array", "items": _ref("Id"),
                       "description": "Those online, in the order asked, each once."}}},
        "PresenceUser": {"type": "object", "required": ["user", "online"], "additionalProperties": False,
                         "properties": {"user": _ref("Id"), "online": {"type": "boolean"}}},
    }
    responses = {
        "400": _json(_ref("Error"), "Bad request: a path id or the body is invalid (the message names the field)."),
        "401": {**_json(_ref("Error"), "Missing, invalid or expired token."),
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
        "403": _json(_ref("Error"), "Valid token, wrong application or missing scope."),
        "413": _json(_ref("Error"), f"Request body over {settings.max_body_bytes} bytes (a batch: over "
                                    f"{settings.max_batch_bytes} bytes, MAX_BATCH_BYTES)."),
        "429": _json(_ref("Error"), "MAX_CONNECTIONS_PER_USER streams already open for this user."),
        "503": {**_json(_ref("Error"), "The broker (Redis) is unreachable, or the instance is full or stopping."),
                "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    }
    security_schemes = {
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                   "description": "HS256 by default; claims sub (user), iss (app), exp; optional space-separated "
                                  "scope (publish, connections, presence)."},
        "tokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
        "seedQuery": {"type": "apiKey", "in": "query", "name": "Authorization",
                      "description": "The seed's query parameter: the raw token."},
        "cookie": {"type": "apiKey", "in": "cookie", "name": settings.jwt_cookie_name},
        "ticket": {"type": "apiKey", "in": "query", "name": "ticket",
                   "description": "Single-use, from POST /sse/ticket; GET /sse only."},
    }
    replayed = {REPLAYED_HEADER: {"schema": {"const": "true"}, "description": (
        "Present when nothing of the request was published now: every event carried an id its channel had "
        "already published within HISTORY_TTL (a retry), answered as the first time.")}}
    publish_op = {
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("PublishBody"), "example": {
            "type": "notification", "data": {"title": "Hello"}}}}},
        "responses": {"202": {**_json(_ref("Published"), "Accepted: delivered to the open streams, kept in "
                                                         "history (or, for a retry, accepted before)."),
                              "headers": replayed},
                      **_errors(400, 401, 403, 413, 503)},
        "security": [{"bearer": []}, {"tokenQuery": []}, {"seedQuery": []}, {"cookie": []}],
    }
    broadcast_op = {
        "requestBody": {"required": True, "content": {JSON: {
            "schema": {"oneOf": [_ref("PublishBody"), _ref("BatchBody")]},
            "examples": {
                "broadcast": {"value": {"type": "notification", "data": {"title": "Hello"}}},
                "batch": {"value": [{"user": "alice", "type": "notification", "data": {"n": 1}, "id": "n-1"},
                                    {"type": "news", "data": {"n": 2}, "id": "news-2"}]}}}}},
        "responses": {"202": {**_json({"oneOf": [_ref("Published"), _ref("BatchPublished")]},
                                      "Accepted: a JSON object's one event, or a batch's events, delivered to the "
                                      "open streams and kept in history."),
                              "headers": replayed},
                      **_errors(400, 401, 403, 413, 503)},
        "security": publish_op["security"],
    }
    paths: dict[str, Any] = {
        "/": {"get": {"summary": "Redirect to /health (the seed's)", "operationId": "root", "security": [],
                      "responses": {"301": {"description": "Location: /health"}}}},
        "/health": {"get": {"summary": "Liveness: 200 while the process lives", "operationId": "health",
                            "security": [], "responses": {"200": _json(_ref("Health"), "Alive.")}}},
        "/ready": {"get": {"summary": "Readiness: the broker is reachable", "operationId": "ready", "security": [],
                           "responses": {"200": _json(_ref("Ready"), "Ready."),
                                         "503": _json(_ref("Ready"), "Not ready (broker unreachable or stopping).")}}},
        "/sse": {"get": {
            "summary": "Open the event stream of the token's user (and its app's broadcasts)", "operationId": "stream",
            "parameters": [
                {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "Resume after this id: missed events first, in order, then live ones; `reset` "
                                "event when history cannot cover the gap."},
                {"name": "lastEventId", "in": "query", "required": False, "schema": {"type": "string"},
                 "description": "The same as the header, for clients that cannot set it."}],
            "security": [*TOKEN_AUTH, {"ticket": []}],
            "responses": {
                "200": {"description": "`retry:` then events (`id:`, `event:`, one-line JSON `data:`); "
                                       "`event: ping` without id every PING_INTERVAL seconds.",
                        "headers": {"X-Connection-Id": {"schema": {"type": "string", "format": "uuid"}},
                                    "X-Accel-Buffering": {"schema": {"const": "no"}}},
                        "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                **_errors(401, 429, 503)}}},
        "/sse/ticket": {"post": {
            "summary": "Buy a single-use ticket that opens one stream (header token only, never a cookie)",
            "operationId": "ticket", "security": [{"bearer": []}],
            "responses": {"201": _json(_ref("Ticket"), "The ticket."), **_errors(401, 503)}}},
        "/connections/{app}": {"get": {
            "summary": "Every connection of the app, across instances (scope connections)",
            "operationId": "listApp", "parameters": [APP_PARAM], "security": TOKEN_AUTH,
            "responses": {"200": _json(_ref("AppConnections"), "By user, then by connection id."),
                          **_errors(400, 401, 403, 503)}}},
        "/connections/{app}/{user}": {
            "parameters": [APP_PARAM, USER_PARAM],
            "get": {"summary": "The user's connections (own, or any with scope connections)",
                    "operationId": "listUser", "security": TOKEN_AUTH,
                    "responses": {"200": _json(_ref("UserConnections"), "By connection id."),
                                  **_errors(400, 401, 403, 503)}},
            "delete": {"summary": "Close every stream of the user on every instance (scope connections)",
                       "operationId": "disconnectUser", "security": TOKEN_AUTH,
                       "responses": {"200": _json(_ref("Closed"), "How many streams were closed."),
                                     **_errors(400, 401, 403, 503)}}},
        "/publish/{app}/{user}": {"post": {
            "summary": "Publish an event to every stream of one user (scope publish)", "operationId": "publishUser",
            "parameters": [APP_PARAM, USER_PARAM], **publish_op}},
        "/publish/{app}": {"post": {
            "summary": "Broadcast an event to every stream of the app, or publish a batch (a JSON array of up to "
                       f"{MAX_BATCH_EVENTS} events for any users of the app and its broadcast) (scope publish)",
            "operationId": "broadcast", "parameters": [APP_PARAM], **broadcast_op}},
        "/presence/{app}": {"post": {
            "summary": "Which of these users are online (scope presence or connections); one Redis round trip",
            "description": "Online: from the admission of a user's first stream anywhere until its user.offline "
                           "webhook (PRESENCE_GRACE after its last stream closed). See docs/presence.md.",
            "operationId": "presenceQuery", "parameters": [APP_PARAM], "security": [{"bearer": []},
                                                                                    {"tokenQuery": []},
                                                                                    {"seedQuery": []}],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("PresenceQuery"),
                                                                 "example": {"users": ["alice", "bob"]}}}},
            "responses": {"200": _json(_ref("PresenceOnline"), "The online ones."),
                          "413": _json(_ref("Error"), f"More than {MAX_QUERY_USERS} users, or a body over "
                                                      f"{PRESENCE_QUERY_MAX_BYTES} bytes."),
                          **_errors(400, 401, 403, 503)}}},
        "/presence/{app}/{user}": {"get": {
            "summary": "Whether one user is online (that user, or scope presence or connections)",
            "operationId": "presenceUser", "parameters": [APP_PARAM, USER_PARAM], "security": TOKEN_AUTH,
            "responses": {"200": _json(_ref("PresenceUser"), "The answer."), **_errors(400, 401, 403, 503)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics", "security": [],
                             "responses": {"200": {"description": "Prometheus text exposition format.",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/demo": {"get": {"summary": "Browser demo page (self-contained)", "operationId": "demo", "security": [],
                          "responses": {"200": {"description": "HTML.",
                                                "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/client.js": {"get": {
            "summary": "The browser client (ES module, clients/js in the repository)", "operationId": "clientJs",
            "security": [],
            "parameters": [{"name": "v", "in": "query", "required": False, "schema": {"type": "string"},
                            "description": "The service's version: the answer is then cached for a year "
                                           "(`immutable`); without it (or another value) `no-cache` with an ETag."}],
            "responses": {"200": {"description": "JavaScript.",
                                  "headers": {"ETag": {"schema": {"type": "string"}},
                                              "X-Client-Version": {"schema": {"type": "string"}}},
                                  "content": {"text/javascript": {"schema": {"type": "string"}}}},
                          "304": {"description": "Not modified (If-None-Match matched the ETag)."}}}},
        "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi", "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3.1.",
                                                        "content": {JSON: {"schema": {"type": "object"}}}}}}},
    }
    if settings.debug:
        schemas["DemoTokenRequest"] = {"type": "object", "required": ["app", "user"], "properties": {
            "app": _ref("Id"), "user": _ref("Id"), "ttl": {"type": "integer", "minimum": 1, "maximum": 3600}}}
        schemas["DemoTokens"] = {"type": "object", "required": ["app", "user", "token", "publish_token", "expires_in"],
                                 "properties": {"app": _ref("Id"), "user": _ref("Id"), "token": {"type": "string"},
                                                "publish_token": {"type": "string"},
                                                "expires_in": {"type": "integer"}}}
        paths["/demo/token"] = {"post": {
            "summary": "Debug mode only: mint a short-lived user token and a publish token for the demo",
            "operationId": "demoToken", "security": [],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("DemoTokenRequest")}}},
            "responses": {"201": _json(_ref("DemoTokens"), "The tokens."), **_errors(400)}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "quart-sse", "version": "0.1.0",
                 "description": "Server-Sent Events notification service: streams, publishing, connections."},
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "servers": [{"url": "/"}],
        "security": TOKEN_AUTH,
        "paths": paths,
        "components": {"schemas": schemas, "responses": responses, "securitySchemes": security_schemes},
    }


@bp.get("/openapi.json")
async def openapi() -> Response:
    return jsonify(build_spec(services().settings))
