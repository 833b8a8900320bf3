"""The one publish path: the HTTP routes, `python -m quart_sse publish` and Python callers all come through here.

    from quart_sse.publisher import Event, connect
    async with connect("redis://localhost:6379/0") as pub:
        await pub.publish("my-app", "alice", "greeting", {"hello": "world"}, event_id="greeting-42")
        await pub.publish_many("my-app", [Event("news", {"n": 1}), Event("dm", {"text": "hi"}, user="bob")])

Every event is validated before anything is published; a batch is validated as a whole (an EventError names the
event's index and field, `events[17].type`) and published in its order, in one atomic step. An event carrying an id
its channel already published within HISTORY_TTL is not published again (`Published.duplicate`): retrying a
publish that timed out is safe (docs/publishing.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, StrictStr, StringConstraints, TypeAdapter, ValidationError, field_validator

from .broker.base import MAX_BATCH_EVENTS, Broker, Outgoing, Published
from .events import MAX_ID_LEN, MAX_TYPE_LEN, EventError, check_line, dump_data
from .ids import ID_PATTERN, is_valid_id

__all__ = ["MAX_BATCH_EVENTS", "Event", "Published", "Publisher", "connect", "parse_batch", "parse_body"]


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
        # "" is no id, as in a raw message (docs/wire.md): a Go struct marshalled without omitempty sends it
        return None if not v else check_line("id", v, MAX_ID_LEN)


class BatchItem(PublishRequest):
    """One event of a batch (`POST /publish/{app}` with a JSON array): the single body plus `user`; without
    `user` (or with null) the event is a broadcast to every stream of the app."""

    # checked by pydantic-core itself: a Python validator per event was 10 % of a batch's server CPU
    user: Annotated[StrictStr, StringConstraints(pattern=ID_PATTERN)] | None = None


_BATCH = TypeAdapter(list[BatchItem])


@dataclass(frozen=True, slots=True)
class Event:
    """One event for `Publisher.publish_many`: `user` None broadcasts to every stream of the app; `id` None lets
    the service assign the event's position as its id (such an event is never a duplicate)."""

    type: str
    data: Any = None
    user: str | None = None
    id: str | None = None


def _loads(raw: bytes | str) -> Any:
    """Strict JSON: no NaN, no lone surrogates, bounded depth."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventError("body", f"not valid JSON: {exc}") from None


def _first_error(exc: ValidationError, where: str = "") -> EventError:
    """Pydantic's first error as an EventError naming the field: `type`, or `events[17].type` in a batch."""
    err = exc.errors()[0]
    loc = list(err["loc"])
    if where and loc and isinstance(loc[0], int):
        index = loc.pop(0)
        prefix = f"{where}[{index}]"
        if not loc:
            return EventError(prefix, "must be a JSON object")
    else:
        prefix = ""
    name = ".".join(str(p) for p in loc)
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "string_pattern_mismatch":  # the only pattern: an id's
        msg = f"not a valid id (allowed: {ID_PATTERN})"
    if name and msg.startswith(f"{name}: "):
        msg = msg[len(name) + 2:]
    field = ".".join(p for p in (prefix, name) if p) or where or "body"
    return EventError(field, msg)


def parse_body(raw: bytes | str) -> PublishRequest:
    """One event's body into a PublishRequest; EventError names the field."""
    body = _loads(raw)
    if not isinstance(body, dict):
        hint = " (a JSON array of events is a batch: POST /publish/{app})" if isinstance(body, list) else ""
        raise EventError("body", "must be a JSON object" + hint)
    try:
        return PublishRequest.model_validate(body)
    except ValidationError as exc:
        raise _first_error(exc) from None


def parse_batch(raw: bytes | str) -> list[Outgoing]:
    """A batch body (a JSON array of 1 to MAX_BATCH_EVENTS events) into validated events, in their order."""
    body = _loads(raw)
    if not isinstance(body, list):
        raise EventError("body", "a batch must be a JSON array of events")
    if not body:
        raise EventError("events", "a batch holds at least one event")
    return check_batch(body)


def check_batch(items: Sequence[Any]) -> list[Outgoing]:
    """Validate every event (mappings shaped as the batch body's, or `Event`s) before any is published; the first
    error is an EventError naming `events[i].field`. At most MAX_BATCH_EVENTS."""
    if len(items) > MAX_BATCH_EVENTS:
        raise EventError("events", f"at most {MAX_BATCH_EVENTS} events per batch, got {len(items)}")
    plain = [{"type": it.type, "data": it.data, "user": it.user, "id": it.id} if isinstance(it, Event) else it
             for it in items]
    try:
        checked = _BATCH.validate_python(plain)
    except ValidationError as exc:
        raise _first_error(exc, "events") from None
    out = []
    for i, it in enumerate(checked):
        try:
            data = dump_data(it.data)
        except EventError as exc:
            raise EventError(f"events[{i}].data", exc.message) from None
        out.append(Outgoing(it.user, it.id, it.type, data))
    return out


class Publisher:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def publish(self, app: str, user: str | None, event_type: str, data: Any = None,
                      event_id: str | None = None) -> Published:
        """Validate and publish; `user=None` broadcasts to every stream of `app`. Raises EventError on bad input,
        BrokerUnavailable when Redis cannot be reached (nothing published, or, after a lost connection, maybe:
        retry with the same `event_id` and it is published at most once)."""
        if not is_valid_id(app):
            raise EventError("app", "not a valid id")
        if user is not None and not is_valid_id(user):
            raise EventError("user", "not a valid id")
        check_line("type", event_type, MAX_TYPE_LEN)
        if event_id == "":  # no id, as on the HTTP route (docs/wire.md)
            event_id = None
        if event_id is not None:
            check_line("id", event_id, MAX_ID_LEN)
        return await self.broker.publish(app, user, event_id, event_type, dump_data(data))

    async def publish_request(self, app: str, user: str | None, req: PublishRequest) -> Published:
        return await self.publish(app, user, req.type, req.data, req.id)

    async def publish_many(self, app: str, events: Sequence[Event | Mapping[str, Any]]) -> list[Published]:
        """Publish up to MAX_BATCH_EVENTS events for any users of `app` and its broadcast, in their order, in one
        atomic step (one script call on Redis, one round trip); one `Published` per event, in the same order.

        `events` are `Event`s or mappings shaped as the HTTP batch body's (`{"type", "data"?, "user"?, "id"?}`).
        Raises EventError naming `events[i].field` before anything is published, BrokerUnavailable as `publish`.
        """
        if not is_valid_id(app):
            raise EventError("app", "not a valid id")
        if not events:
            return []
        return await self.broker.publish_many(app, check_batch(events))

    async def publish_checked(self, app: str, events: Sequence[Outgoing]) -> list[Published]:
        """Events already validated by `parse_batch`/`check_batch` (the HTTP route)."""
        return await self.broker.publish_many(app, events)


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
