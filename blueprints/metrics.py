"""Prometheus exposition."""

from __future__ import annotations

from quart import Blueprint, Response

from quart_sse.http import services

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
async def metrics() -> Response:
    body, ctype = services().metrics.render()
    return Response(body, content_type=ctype)
