"""The naive SSE service we measure ourselves against: what the seed did, written the obvious way.

One Redis pub/sub subscription (and so one Redis connection) per stream, an asyncio.Queue per stream, a generator
that awaits the queue and yields a frame, JSON decoded and re-encoded per stream, PyJWT for auth. Same routes and
wire format as the service, so the harness drives both identically. The one addition to the bare loop is the
contract's ping (asyncio.wait_for on the queue), so idle-CPU figures compare like with like.

Run: JWT_SECRET=... REDIS_URL=redis://127.0.0.1:6379/0 python -m hypercorn bench.baseline_app:app --bind 127.0.0.1:8081
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import redis.asyncio as aioredis
from quart import Quart, Response, abort, request

SECRET = os.environ.get("JWT_SECRET", "")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PING_INTERVAL = float(os.environ.get("PING_INTERVAL", "30"))
# redis-py's pool caps at 100 connections by default; the naive design needs one per stream, so lift the cap
# rather than measure an artificial wall at 100 streams.
MAX_REDIS_CONNECTIONS = int(os.environ.get("REDIS_MAX_CONNECTIONS", "100000"))

app = Quart(__name__)
app.config["RESPONSE_TIMEOUT"] = None  # streams are open-ended
redis: aioredis.Redis | None = None


@app.before_serving
async def _open_redis() -> None:
    global redis
    redis = aioredis.from_url(REDIS_URL, max_connections=MAX_REDIS_CONNECTIONS)


@app.after_serving
async def _close_redis() -> None:
    if redis is not None:
        await redis.aclose()


def _claims(scope: str | None = None) -> dict[str, Any]:
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        abort(401)
    try:
        claims: dict[str, Any] = jwt.decode(auth[7:], SECRET, algorithms=["HS256"],
                                            options={"require": ["exp", "sub", "iss"]})
    except jwt.PyJWTError:
        abort(401)
    if scope is not None and claims.get("scope") != scope:
        abort(403)
    return claims


def _frame(raw: bytes) -> bytes:
    event = json.loads(raw)
    data = json.dumps(event.get("data"), separators=(",", ":"))
    return f"id: {event.get('id', '')}\nevent: {event.get('type', 'message')}\ndata: {data}\n\n".encode()


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/sse")
async def sse() -> Response:
    claims = _claims()
    app_name, user = claims["iss"], claims["sub"]
    assert redis is not None
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"{app_name}:channel:{user}", f"{app_name}:broadcast")

    async def pump() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                queue.put_nowait(msg["data"])

    task = asyncio.create_task(pump())

    async def gen() -> AsyncIterator[bytes]:
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), PING_INTERVAL)
                except TimeoutError:
                    yield b"event: ping\ndata: {}\n\n"
                    continue
                yield _frame(msg)
        finally:
            task.cancel()
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    response = Response(gen(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
    response.timeout = None
    return response


@app.post("/publish/<app_name>")
@app.post("/publish/<app_name>/<user>")
async def publish(app_name: str, user: str | None = None) -> tuple[dict[str, str], int]:
    claims = _claims("publish")
    if claims["iss"] != app_name:
        abort(403)
    body = await request.get_json(force=True)
    event = {"id": body.get("id") or uuid.uuid4().hex, "type": body["type"], "data": body.get("data")}
    channel = f"{app_name}:channel:{user}" if user else f"{app_name}:broadcast"
    assert redis is not None
    await redis.publish(channel, json.dumps(event))
    return {"id": event["id"]}, 202
