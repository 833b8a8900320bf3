"""Request helpers shared by the blueprints."""

from __future__ import annotations

from quart import current_app, request

from .auth import Identity, authenticate
from .errors import bad_request
from .ids import is_valid_id
from .services import Services


def services() -> Services:
    svc: Services = current_app.extensions["quart_sse"]
    return svc


def identity() -> Identity:
    svc = services()
    return authenticate(request, svc.settings, svc.token_cache)


def check_path_ids(**ids: str) -> None:
    """Ids in paths follow the same pattern as in tokens; anything else is a 400 naming the segment."""
    for name, value in ids.items():
        if not is_valid_id(value):
            raise bad_request(f"{name}: not a valid id (allowed: ^[A-Za-z0-9._@|+-]{{1,128}}$)")
