"""Request body limits: MAX_BODY_BYTES for every body, MAX_BATCH_BYTES for the one route that takes a batch.

Quart fixes a request's body limit when it builds the request object, before routing (MAX_CONTENT_LENGTH), and
drops a body over it as it arrives; a route cannot raise it afterwards. So the batch route's larger limit is chosen
here, from the method and the path alone: `POST /publish/{app}` (one path segment after `/publish/`). That route
holds a single event's body to MAX_BODY_BYTES itself once it has seen that the body is not a batch.
"""

from __future__ import annotations

from typing import Any

from quart import Request


def is_batch_route(method: str, path: str) -> bool:
    """`POST /publish/{app}`: the route that accepts a JSON array of events (blueprints/publish.py)."""
    return method == "POST" and path.startswith("/publish/") and path.count("/") == 2 and len(path) > 9


def request_class(max_batch_bytes: int) -> type[Request]:
    """Quart's Request, with the batch limit for the batch route; every other request keeps the app's limit."""

    class LimitedRequest(Request):
        def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
            if is_batch_route(method, path):  # settings hold MAX_BATCH_BYTES >= MAX_BODY_BYTES
                kwargs["max_content_length"] = max_batch_bytes
            super().__init__(method, scheme, path, *args, **kwargs)

    return LimitedRequest
