"""A Flask app whose view notifies a user through quart-sse, with the synchronous HTTP publisher.

    pip install flask            # quart_sse.client itself needs only httpx; run from the repository
    export QUART_SSE_URL=http://localhost:8080
    export QUART_SSE_TOKEN=$(python -m quart_sse token --sub backend --iss shop --scope publish --ttl 86400)
    flask --app docs/examples/flask_app.py run --port 5000

    curl -X POST -H 'Content-Type: application/json' -d '{"item": "book"}' http://localhost:5000/orders/alice

Every open stream of user `alice` of app `shop` (browser tabs, `curl -N .../sse`) gets an `order.created` event.
No Redis, no asyncio: `Publisher` is plain httpx; one per process, shared by every thread of the server.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import httpx
from flask import Flask, jsonify, request

from quart_sse.client import Publisher, ServiceError

APP_ID = "shop"


def create_app(publisher: Publisher | None = None) -> Flask:
    app = Flask(__name__)
    notify = publisher or Publisher(os.environ["QUART_SSE_URL"], os.environ["QUART_SSE_TOKEN"])

    @app.post("/orders/<user>")
    def create_order(user: str) -> Any:
        body = request.get_json(silent=True)
        # the body's fields, then ours: a client never chooses the order's id or user
        order = {**(body if isinstance(body, dict) else {}), "id": uuid.uuid4().hex[:8], "user": user}
        # ... save the order ...
        try:
            # an id of our own makes a retry of this call safe where the service deduplicates by id
            event_id = notify.publish(APP_ID, user, "order.created", order, id=f"order-{order['id']}")
        except ValueError as exc:  # refused before sending (an invalid user id): nothing to retry
            return jsonify(error="bad_request", message=str(exc)), 400
        except ServiceError as exc:  # the service refused: the order stands, the notification did not go out
            app.logger.warning("notification not sent: %s", exc)
            return jsonify(order=order, notified=False, error=exc.code), 201
        except httpx.TransportError as exc:  # the service is unreachable
            app.logger.warning("notification not sent: %r", exc)
            return jsonify(order=order, notified=False, error="unreachable"), 201
        return jsonify(order=order, notified=True, event_id=event_id), 201

    return app


if __name__ == "__main__":
    create_app().run(port=int(os.environ.get("PORT", "5000")))
