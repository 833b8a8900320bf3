"""Publish over HTTP (`POST /publish/{app}/{user}`, `POST /publish/{app}`): for Flask views, Celery tasks, scripts.

Needs only httpx and a token with the `publish` scope (`python -m quart_sse token --sub backend --iss APP --scope
publish`); no Redis, no asyncio for the sync `Publisher`. One publisher per process is enough: its connection pool
is shared by every thread (httpx.Client is thread-safe) and keeps connections to the service open.

Each call returns the event's id (the one you gave, or the one the service assigned). An error answer raises
ServiceError with the service's JSON error; a transport failure raises httpx.TransportError (e.g. ConnectError,
TimeoutException). Nothing is retried here: a publish without an `id` sent twice is two events, so retry only
with an `id` of your own (ServiceError.retryable says when a retry can help).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from .errors import ServiceError

#: Application and user ids the service accepts (README, "Routes").
ID_PATTERN = re.compile(r"^[A-Za-z0-9._@|+-]{1,128}$")
DEFAULT_TIMEOUT = 10.0

TokenSource = str | Callable[[], str]


def _segment(name: str, value: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ValueError(f"{name}: not a valid id (allowed: {ID_PATTERN.pattern})")
    # '.' and '..' are valid ids but a URL would drop them as dot segments (RFC 3986 §5.2.4)
    return quote(value, safe="") if value.strip(".") else value.replace(".", "%2E")


def publish_path(app: str, user: str | None) -> str:
    """`/publish/{app}/{user}`, or `/publish/{app}` for a broadcast (user None); ValueError on an invalid id."""
    path = "/publish/" + _segment("app", app)
    return path + "/" + _segment("user", user) if user is not None else path


def publish_body(type: str, data: Any, id: str | None) -> dict[str, Any]:
    """`{"type", "data", "id"?}`; the service checks the rest (400 naming the field)."""
    body: dict[str, Any] = {"type": type, "data": data}
    if id is not None:
        body["id"] = id
    return body


@dataclass(frozen=True, slots=True)
class BatchEvent:
    """One event of `publish_batch`: to `user`, or to every stream of the app when `user` is None."""

    type: str
    data: Any = None
    user: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """`ids[i]` is the id of `events[i]`; `duplicates` the indices the service had already published (the same id
    on the same channel within HISTORY_TTL: answered as the first time, not published again); `batched` False
    when the service has no batch route and the events went one request each."""

    ids: list[str]
    duplicates: list[int]
    batched: bool


def batch_body(events: Sequence[BatchEvent]) -> list[dict[str, Any]]:
    """The JSON array of `POST /publish/{app}`: `{"type", "data", "user"?, "id"?}` per event."""
    if not events:
        raise ValueError("events: a batch holds at least one event")
    out = []
    for ev in events:
        item = publish_body(ev.type, ev.data, ev.id)
        if ev.user is not None:
            _segment("user", ev.user)  # the same check as in a path, before anything is sent
            item["user"] = ev.user
        out.append(item)
    return out


def batch_answer(resp: httpx.Response) -> BatchResult | None:
    """The 202 `{"ids", "duplicates"}` of a batch; None when the service predates batches (it refuses an array
    body with 400 `body: must be a JSON object`); ServiceError otherwise."""
    if resp.status_code == 202:
        body = resp.json()
        return BatchResult([str(i) for i in body["ids"]], [int(i) for i in body.get("duplicates", [])], True)
    err = ServiceError.from_response(resp)
    if err.status == 400 and err.message == NO_BATCH_MESSAGE:
        return None
    raise err


#: What a service without the batch route answers to a JSON array (README, "Routes").
NO_BATCH_MESSAGE = "body: must be a JSON object"


def published_id(resp: httpx.Response) -> str:
    """The id of a 202 answer; ServiceError for anything else."""
    if resp.status_code != 202:
        raise ServiceError.from_response(resp)
    return str(resp.json()["id"])


def _auth(token: TokenSource) -> dict[str, str]:
    value = token() if callable(token) else token
    return {"Authorization": f"Bearer {value}"}


class Publisher:
    """Synchronous publisher: `Publisher(base_url, token)`; use it as a context manager or call `close()`.

    `token` is the token string, or a callable returning the current one (called per request, for rotation).
    `client`: an httpx.Client of your own (its base_url is not used; you close it).
    """

    def __init__(self, base_url: str, token: TokenSource, *, timeout: float = DEFAULT_TIMEOUT,
                 client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._own = client is None
        self._client = client or httpx.Client(timeout=timeout)

    def publish(self, app: str, user: str, type: str, data: Any, id: str | None = None) -> str:
        """Publish to every stream of `user` in `app`; returns the event id."""
        return self._post(publish_path(app, user), publish_body(type, data, id))

    def broadcast(self, app: str, type: str, data: Any, id: str | None = None) -> str:
        """Publish to every stream of `app`; returns the event id."""
        return self._post(publish_path(app, None), publish_body(type, data, id))

    def publish_batch(self, app: str, events: Sequence[BatchEvent]) -> BatchResult:
        """Publish up to the service's batch limit (1,000) of events for any users of `app` and its broadcast in
        one request, validated as a whole (ServiceError 400 naming `events[i].field`: nothing published). A
        service without the batch route gets one request per event instead (`batched` False; not atomic)."""
        body = batch_body(events)
        got = batch_answer(self._client.post(self.base_url + publish_path(app, None), json=body,
                                              headers=_auth(self._token)))
        if got is not None:
            return got
        ids = [self._post(publish_path(app, ev.user), publish_body(ev.type, ev.data, ev.id)) for ev in events]
        return BatchResult(ids, [], False)

    def _post(self, path: str, body: dict[str, Any]) -> str:
        return published_id(self._client.post(self.base_url + path, json=body, headers=_auth(self._token)))

    def close(self) -> None:
        if self._own:
            self._client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher:
    """The same over httpx.AsyncClient: `await pub.publish(...)`; `async with` or `await aclose()`."""

    def __init__(self, base_url: str, token: TokenSource, *, timeout: float = DEFAULT_TIMEOUT,
                 client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._own = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout)

    async def publish(self, app: str, user: str, type: str, data: Any, id: str | None = None) -> str:
        """Publish to every stream of `user` in `app`; returns the event id."""
        return await self._post(publish_path(app, user), publish_body(type, data, id))

    async def broadcast(self, app: str, type: str, data: Any, id: str | None = None) -> str:
        """Publish to every stream of `app`; returns the event id."""
        return await self._post(publish_path(app, None), publish_body(type, data, id))

    async def publish_batch(self, app: str, events: Sequence[BatchEvent]) -> BatchResult:
        """See Publisher.publish_batch."""
        body = batch_body(events)
        got = batch_answer(await self._client.post(self.base_url + publish_path(app, None), json=body,
                                                   headers=_auth(self._token)))
        if got is not None:
            return got
        ids = [await self._post(publish_path(app, ev.user), publish_body(ev.type, ev.data, ev.id)) for ev in events]
        return BatchResult(ids, [], False)

    async def _post(self, path: str, body: dict[str, Any]) -> str:
        resp = await self._client.post(self.base_url + path, json=body, headers=_auth(self._token))
        return published_id(resp)

    async def aclose(self) -> None:
        if self._own:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
