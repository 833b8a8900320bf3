"""`GET /demo`: a browser page; `POST /demo/token` (debug mode only) mints tokens for it.

The page carries its CSS and its own script inline, and imports the browser client as a same-origin module
(`/client.js?v=<version>`, blueprints/client.py). The Content-Security-Policy pins the inline script and style by
hash and allows scripts from this origin only ('self': modules must be served as JavaScript, and every other
route answers JSON, text or an event stream, which a browser refuses to run as a module); it may only talk to this
origin. `Referrer-Policy: no-referrer` keeps a `?token=` in its URL from leaking to anything it links to.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from quart import Blueprint, Response, jsonify, request
from quart.blueprints import BlueprintSetupState

from blueprints.client import versioned_url
from quart_sse.auth import SCOPE_PUBLISH, mint
from quart_sse.errors import bad_request
from quart_sse.http import services
from quart_sse.ids import is_valid_id

bp = Blueprint("demo", __name__)
PAGE = Path(__file__).resolve().parent.parent / "quart_sse" / "static" / "demo.html"
#: Tokens minted for the demo live 15 minutes unless asked for less (at most an hour).
DEMO_TOKEN_TTL = 900
DEMO_TOKEN_MAX_TTL = 3600


@lru_cache(maxsize=4)
def _page(mtime_ns: int) -> tuple[bytes, str]:
    """The page and its CSP (sha256 of every inline <script> and <style>), recomputed when the file changes."""
    html = PAGE.read_bytes().replace(b"__CLIENT_URL__", versioned_url().encode())

    def hashes(tag: bytes) -> str:
        bodies = re.findall(rb"<" + tag + rb"[^>]*>(.*?)</" + tag + rb">", html, flags=re.S)
        found = [f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in bodies]
        return " ".join(found) or "'none'"

    csp = (f"default-src 'none'; script-src 'self' {hashes(b'script')}; style-src {hashes(b'style')}; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


@bp.get("/demo")
async def demo() -> Response:
    html, csp = _page(PAGE.stat().st_mtime_ns)
    return Response(html, content_type="text/html; charset=utf-8", headers={
        "Cache-Control": "no-cache", "Content-Security-Policy": csp, "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"})


async def demo_token() -> tuple[Response, int]:
    """Debug only: a short-lived user token and a publish token for `{"app": ..., "user": ..., "ttl"?: s}`."""
    body: Any = await request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise bad_request("body: must be a JSON object {\"app\": ..., \"user\": ...}")
    app, user = _id_field(body, "app"), _id_field(body, "user")
    ttl = body.get("ttl", DEMO_TOKEN_TTL)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= DEMO_TOKEN_MAX_TTL:
        raise bad_request(f"ttl: must be an integer from 1 to {DEMO_TOKEN_MAX_TTL}")
    settings = services().settings
    try:
        token = mint(settings, user, app, "", ttl)
        publish_token = mint(settings, user, app, SCOPE_PUBLISH, ttl)
    except ValueError as exc:  # e.g. an RS*/ES* deployment: the service holds no signing key
        raise bad_request(str(exc)) from None
    return jsonify({"app": app, "user": user, "token": token, "publish_token": publish_token,
                    "expires_in": ttl}), 201


def _id_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not is_valid_id(value):
        raise bad_request(f"{name}: not a valid id (allowed: ^[A-Za-z0-9._@|+-]{{1,128}}$)")
    return value


def _register_debug_routes(state: BlueprintSetupState) -> None:
    """The minting route exists only in debug mode: in production it is not routed at all (404)."""
    if state.app.extensions["quart_sse"].settings.debug:
        state.add_url_rule("/demo/token", view_func=demo_token, methods=["POST"])


bp.record(_register_debug_routes)
