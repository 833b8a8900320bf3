"""`GET /client.js`: the browser client (clients/js/index.js, shipped in the package as quart_sse/static/client.js).

Two URLs, two cache policies (docs/clients.md, "Loading the client"):
- `/client.js?v=<version>` with the service's version: `Cache-Control: public, max-age=31536000, immutable`. A
  version's client never changes, so a page that names the version never asks again; after an upgrade its URL
  changes with the version.
- `/client.js` (or another `v`): `Cache-Control: no-cache` with a strong ETag of the content, so a browser
  revalidates every time (304 while unchanged) and never runs a stale client. A page built against an older
  version still gets the current client, never cached for long.
Both carry `X-Client-Version`. The CORS headers of every route apply (a cross-origin `<script type="module">`
needs them).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from quart import Blueprint, Response, request

from quart_sse import __version__

bp = Blueprint("client", __name__)
SOURCE = Path(__file__).resolve().parent.parent / "quart_sse" / "static" / "client.js"
LONG_CACHE = "public, max-age=31536000, immutable"


@lru_cache(maxsize=4)
def _load(mtime_ns: int) -> tuple[bytes, str]:
    """The file and its strong ETag (sha256 prefix of the bytes), re-read when the file changes."""
    body = SOURCE.read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def versioned_url() -> str:
    """The long-cached URL of this version's client, e.g. `/client.js?v=0.1.0`."""
    return f"/client.js?v={__version__}"


@bp.get("/client.js")
async def client_js() -> Response:
    body, etag = _load(SOURCE.stat().st_mtime_ns)
    headers = {"ETag": etag, "X-Client-Version": __version__, "X-Content-Type-Options": "nosniff",
               "Cache-Control": LONG_CACHE if request.args.get("v") == __version__ else "no-cache"}
    # If-None-Match compares weakly (RFC 9110 §13.1.2): a W/ prefix a proxy may add still matches
    if etag in {t.strip().removeprefix("W/") for t in request.headers.get("If-None-Match", "").split(",")}:
        return Response(b"", status=304, headers=headers)
    return Response(body, content_type="text/javascript; charset=utf-8", headers=headers)
