"""Liveness and readiness."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify, redirect

from quart_sse.http import services

bp = Blueprint("health", __name__)


@bp.get("/")
async def root() -> Response:
    return redirect("/health", code=301)  # type: ignore[return-value]


@bp.get("/health")
async def health() -> Response:
    """200 while the process lives, whatever Redis does (the seed's route)."""
    return jsonify({"status": "ok"})


@bp.get("/ready")
async def ready() -> tuple[Response, int]:
    svc = services()
    ok = await svc.broker.ready() and not svc.shutting_down
    body = {"status": "ready" if ok else "unavailable", "broker": svc.broker.name,
            "streams": len(svc.hub.subscribers), "instance": svc.instance,
            # which path HTTP/1.x streams take here (docs/internals.md); a broken coupling to the server shows
            "stream_path": svc.stream_path.value}
    return jsonify(body), 200 if ok else 503
