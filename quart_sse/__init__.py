"""quart-sse: a Server-Sent Events notification service on Quart, Hypercorn and Redis."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from quart import Quart

    from .settings import Settings


def create_app(settings: Settings | None = None) -> Quart:
    from .app import create_app as _create_app

    return _create_app(settings)


__all__ = ["__version__", "create_app"]
