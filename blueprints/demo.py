"""`GET /demo`: a static page (placeholder until the demo lands)."""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response

bp = Blueprint("demo", __name__)
PAGE = Path(__file__).resolve().parent.parent / "quart_sse" / "static" / "demo.html"


@bp.get("/demo")
async def demo() -> Response:
    return Response(PAGE.read_bytes(), content_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})
