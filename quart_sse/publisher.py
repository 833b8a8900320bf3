"""The one publish path: the HTTP route, `python -m quart_sse publish` and Python callers all come through here.

    from quart_sse.publisher import connect
    async with connect("redis://localhost:6379/0") as pub:
        await pub.publish("my-app", "alice", "greeting", {"hello": "world"})
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError, field_validator

from .broker.base import Broker
from .events import MAX_ID_LEN, MAX_TYPE_LEN, EventError, Message, check_line, dump_data
from .ids import is_valid_id


class PublishRequest(BaseModel):
    """The body of `POST /publish/...`: `{"type": str, "data": any JSON, "id"?: str}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: StrictStr
    data: Any = None
    id: StrictStr | None = None

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        return check_line("type", v, MAX_TYPE_LEN)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        return None if v is None else check_line("id", v, MAX_ID_LEN)


def parse_body(raw: bytes | str) -> PublishRequest:
    """Strict JSON (no NaN, no lone surrogates, bounded depth) into a PublishRequest; EventError names the field."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventError("body", f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise EventError("body", "must be a JSON object")
    try:
        return PublishRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise EventError(field, msg.split(": ", 1)[-1] if msg.startswith(f"{field}: ") else msg) from None


class Publisher:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def publish(self, app: str, user: str | None, event_type: str, data: Any = None,
                      event_id: str | None = None) -> Message:
        """Validate and publish; `user=None` broadcasts to every stream of `app`. Raises EventError on bad input."""
        if not is_valid_id(app):
            raise EventError("app", "not a valid id")
        if user is not None and not is_valid_id(user):
            raise EventError("user", "not a valid id")
        check_line("type", event_type, MAX_TYPE_LEN)
        if event_id is not None:
            check_line("id", event_id, MAX_ID_LEN)
        return await self.broker.publish(app, user, event_id, event_type, dump_data(data))

    async def publish_request(self, app: str, user: str | None, req: PublishRequest) -> Message:
        return await self.publish(app, user, req.type, req.data, req.id)


@asynccontextmanager
async def connect(redis_url: str, history_size: int = 1000, history_ttl: int = 3600,
                  *, cluster: bool = False) -> AsyncIterator[Publisher]:
    """A publisher for code outside the service, writing history exactly as the service does; `cluster`: the URL
    names one node of a Redis Cluster (REDIS_CLUSTER=true)."""
    from .broker.redis import RedisBroker

    if cluster:
        from .broker.cluster import RedisClusterBroker

        cb = RedisClusterBroker(redis_url, "publisher", history_size, history_ttl)
        try:
            yield Publisher(cb)
        finally:
            await cb.close()  # never started: closes its clients only
        return
    broker = RedisBroker(redis_url, "publisher", history_size, history_ttl)
    try:
        yield Publisher(broker)
    finally:
        await broker.redis.aclose()
        await broker.redis.connection_pool.disconnect()  # aclose() leaves a pool it did not create open
