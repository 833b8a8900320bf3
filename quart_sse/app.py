"""The app factory: settings, JWT, blueprints, lifecycle."""

from __future__ import annotations

from quart import Quart

from . import auth, cors, errors
from .logs import setup_logging
from .services import Services
from .settings import Settings, load_settings


def create_app(settings: Settings | None = None) -> Quart:
    settings = settings or load_settings()
    setup_logging(settings)
    app = Quart("quart_sse")
    from blueprints.presence import PresenceRequest

    app.request_class = PresenceRequest  # POST /presence/{app} takes 10,000 ids: a larger body than MAX_BODY_BYTES
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
    services = Services(settings)
    app.extensions["quart_sse"] = services
    auth.init_app(app, settings)
    errors.register(app)
    cors.init_app(app, settings.cors_origin_list)

    from blueprints.connections import bp as connections_bp
    from blueprints.demo import bp as demo_bp
    from blueprints.health import bp as health_bp
    from blueprints.metrics import bp as metrics_bp
    from blueprints.openapi import bp as openapi_bp
    from blueprints.presence import bp as presence_bp
    from blueprints.publish import bp as publish_bp
    from blueprints.stream import bp as stream_bp

    for bp in (health_bp, stream_bp, connections_bp, publish_bp, metrics_bp, demo_bp, openapi_bp, presence_bp):
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
