"""The app factory: settings, JWT, blueprints, lifecycle."""

from __future__ import annotations

from quart import Quart

from . import auth, bodies, cors, errors
from .adapter import ServerAdapter
from .bodydrain import DRAIN_MAX_BYTES, UnreadBodyDrain
from .logs import setup_logging
from .services import Services
from .settings import Settings, load_settings


def create_app(settings: Settings | None = None, adapter: ServerAdapter | None = None) -> Quart:
    """The app; `adapter` is the server's (quart_sse.server), None when something else serves the app."""
    settings = settings or load_settings()
    setup_logging(settings)
    app = Quart("quart_sse")
    # no 308 HTML redirect from `/publish//u` to `/publish/u` (another route, another app): an empty segment is a 404
    app.url_map.merge_slashes = False
    app.config.update(
        RESPONSE_TIMEOUT=None,  # Quart would end every response (streams included) after 60 s
        BODY_TIMEOUT=10,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        JSON_SORT_KEYS=False,
        PROVIDE_AUTOMATIC_OPTIONS=True,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the seed's field order
    app.request_class = bodies.request_class(settings.max_batch_bytes)  # larger limits on two routes (bodies.py)
    # an answer given before the body was read (413 above all) reaches the client instead of a TCP reset
    app.asgi_app = UnreadBodyDrain(  # type: ignore[method-assign,assignment]
        app.asgi_app, max(settings.max_body_bytes, settings.max_batch_bytes) + DRAIN_MAX_BYTES)
    services = Services(settings, adapter)
    app.extensions["quart_sse"] = services
    auth.init_app(app, settings)
    errors.register(app)
    cors.init_app(app, settings.cors_origin_list)

    from blueprints.client import bp as client_bp
    from blueprints.connections import bp as connections_bp
    from blueprints.demo import bp as demo_bp
    from blueprints.health import bp as health_bp
    from blueprints.metrics import bp as metrics_bp
    from blueprints.openapi import bp as openapi_bp
    from blueprints.presence import bp as presence_bp
    from blueprints.publish import bp as publish_bp
    from blueprints.stream import bp as stream_bp

    for bp in (health_bp, stream_bp, connections_bp, publish_bp, metrics_bp, demo_bp, openapi_bp,
               client_bp, presence_bp):
        app.register_blueprint(bp)

    @app.before_serving
    async def _start() -> None:
        await services.start()

    @app.after_serving
    async def _stop() -> None:
        await services.stop()

    return app


def services_of(app: Quart) -> Services:
    svc: Services = app.extensions["quart_sse"]
    return svc
