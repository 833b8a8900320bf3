"""CORS per CORS_ORIGINS: `*` (the seed's answer, never with credentials) or an explicit list with credentials."""

from __future__ import annotations

from quart import Quart, Response, request

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID"
EXPOSE_HEADERS = "X-Connection-Id"


def init_app(app: Quart, origins: list[str]) -> None:
    wildcard = "*" in origins
    allowed = frozenset(o for o in origins if o != "*")

    def allow_origin(origin: str | None) -> str | None:
        if origin and origin in allowed:
            return origin
        return "*" if wildcard else None

    def decorate(resp: Response, origin: str | None) -> Response:
        value = allow_origin(origin)
        resp.headers.add("Vary", "Origin")
        if value is None:
            return resp
        resp.headers["Access-Control-Allow-Origin"] = value
        resp.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        if value != "*":
            resp.headers["Access-Control-Allow-Credentials"] = "true"
        return resp

    @app.before_request
    async def _preflight() -> Response | None:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            resp = decorate(Response(b"", status=204), request.headers.get("Origin"))
            resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            resp.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            resp.headers["Access-Control-Max-Age"] = "600"
            return resp
        return None

    @app.after_request
    async def _cors(resp: Response) -> Response:
        if "Access-Control-Allow-Methods" in resp.headers:
            return resp  # a preflight, done above
        return decorate(resp, request.headers.get("Origin"))
