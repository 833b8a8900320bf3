"""Request body limits: MAX_BODY_BYTES for every body, larger ones for the two routes that take many items.

Quart fixes a request's body limit when it builds the request object, before routing (MAX_CONTENT_LENGTH), and
drops a body over it as it arrives; a route cannot raise it afterwards. So a route's larger limit is chosen here,
from the method and the path alone:
- `POST /publish/{app}` (one path segment after `/publish/`): MAX_BATCH_BYTES. That route holds a single event's
  body to MAX_BODY_BYTES itself once it has seen that the body is not a batch;
- `POST /presence/{app}`: `PRESENCE_QUERY_MAX_BYTES`, room for MAX_QUERY_USERS ids of the longest kind.
"""

from __future__ import annotations

from typing import Any

from quart import Request

from .presence.service import MAX_QUERY_USERS

#: `POST /presence/{app}`: MAX_QUERY_USERS ids of 128 characters, each quoted and escaped at worst, and the envelope.
PRESENCE_QUERY_MAX_BYTES = MAX_QUERY_USERS * 136 + 4096


def is_batch_route(method: str, path: str) -> bool:
    """`POST /publish/{app}`: the route that accepts a JSON array of events (blueprints/publish.py)."""
    return method == "POST" and path.startswith("/publish/") and path.count("/") == 2 and len(path) > 9


def is_presence_query(method: str, path: str) -> bool:
    """`POST /presence/{app}` (blueprints/presence.py)."""
    return method == "POST" and path.startswith("/presence/") and path.count("/") == 2


def request_class(max_batch_bytes: int) -> type[Request]:
    """Quart's Request, with a route's larger limit where it has one; every other request keeps the app's limit."""

    class LimitedRequest(Request):
        def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
            if is_batch_route(method, path):  # settings hold MAX_BATCH_BYTES >= MAX_BODY_BYTES
                kwargs["max_content_length"] = max_batch_bytes
            elif is_presence_query(method, path) and kwargs.get("max_content_length") is not None:
                kwargs["max_content_length"] = max(kwargs["max_content_length"], PRESENCE_QUERY_MAX_BYTES)
            super().__init__(method, scheme, path, *args, **kwargs)

    return LimitedRequest
