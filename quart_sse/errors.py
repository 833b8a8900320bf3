"""JSON errors for every failure a client can cause: `{"error": code, "message": text}`."""

from __future__ import annotations

from typing import Any

from quart import Quart, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from .broker.base import BrokerUnavailable

WWW_AUTHENTICATE = 'Bearer realm="quart-sse"'


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": WWW_AUTHENTICATE})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def unavailable(message: str) -> ApiError:
    return ApiError(503, "unavailable", message, {"Retry-After": "2"})


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    resp = jsonify({"error": code, "message": message})
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def register(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        return json_error(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(BrokerUnavailable)
    async def _broker_unavailable(_exc: BrokerUnavailable) -> Response:
        """Redis cannot be reached: 503 with a retry hint (the cause, with its addresses, goes to the log only)."""
        return json_error(503, "unavailable", "broker unavailable", {"Retry-After": "2"})

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Any:
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name or "error"
        if exc.code == 413:  # werkzeug's text names no limit: say which one, and how to change it
            limit = request.max_content_length
            message = f"the request body is over {limit} bytes (MAX_BODY_BYTES; a batch: MAX_BATCH_BYTES)"
        resp = json_error(exc.code or 500, code, message)
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return resp

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        app.logger.exception("unhandled error: %s", exc)
        return json_error(500, "internal_error", "internal error")
