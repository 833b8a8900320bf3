"""CORS per CORS_ORIGINS: `*` (the seed's answer, never with credentials) or an explicit list with credentials."""

from __future__ import annotations

from quart import Quart, Response, request

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
#: Request headers a cross-origin page may send (the preflight's answer). Besides the API's own (Authorization,
#: Content-Type) these are what EventSource clients that are not the browser's own put on a stream request, each a
#: non-safelisted header (Fetch §2.2.2) that makes the browser ask first:
#: - Last-Event-ID: every client on reconnect (npm `eventsource`, Azure/fetch-event-source);
#: - Cache-Control (`no-cache`) and Accept: the npm `eventsource` package up to v2 (its Node code, bundled for a
#:   browser by browserify/webpack shims) and XHR-based polyfills (Accept is only safelisted for short values);
#: - X-Requested-With: polyfills and the HTTP helpers (jQuery, Angular) that pages wrap them in.
#: `*` would not do: it never covers Authorization, and it means nothing to a request with credentials.
ALLOW_HEADERS = "Accept, Authorization, Cache-Control, Content-Type, Last-Event-ID, X-Requested-With"
#: what a page may read of an answer: the stream's id, whether a publish was a retried one (docs/publishing.md), and
#: how long to wait after a refusal
EXPOSE_HEADERS = "X-Connection-Id, Idempotent-Replayed, Retry-After"


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
