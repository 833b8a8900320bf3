"""`subscribe(...)`: an async iterator over a user's stream that reconnects and resumes by itself.

For backend consumers and tests. The rules are the browser client's (docs/clients.md), from quart_sse.client.retry:
credentials are asked for before every connection; a 401 gets one fresh token, then ServiceError; a 403 (or another
4xx that cannot pass) raises at once; 429, 503, a `: refused` stream, a broken connection are retried after the
service's `retry:` with exponential backoff and jitter; `: closing token expired` reconnects at once with a fresh
token and `Last-Event-ID`, so nothing is lost and nothing repeats.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from .errors import ClientError, NoCredentials, ServiceError
from .retry import CloseReason, Reconnect, Retry, Stop, StreamEnd, WaitReason
from .sse import SseComment, SseEvent, SseParser, SseRetry

TokenGetter = Callable[[], "str | Awaitable[str | None] | None"]
DEFAULT_IDLE_TIMEOUT = 90.0  # seconds without a byte (3 times the default PING_INTERVAL) before reconnecting
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Event:
    """One event: `type`, `id` (None for an event published without one), `data` (parsed JSON; the text when it
    is not JSON) and `raw` (the `data:` text). A `reset` (history could not cover the gap) has type `reset`
    and no id: see `is_reset`."""

    type: str
    id: str | None
    data: Any
    raw: str

    @property
    def is_reset(self) -> bool:
        return self.type == "reset" and self.id is None


class State(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    WAITING = "waiting"
    ERROR = "error"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Status:
    """What the subscription is doing: `retry_in` seconds and `reason` while WAITING; `http_status`, `error`
    and `message` describe the last refusal."""

    state: State
    attempt: int = 0
    retry_in: float | None = None
    reason: WaitReason | None = None
    http_status: int | None = None
    error: str | None = None
    message: str | None = None


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class Subscription:
    """The iterator `subscribe()` returns. Also an async context manager; `aclose()` ends it.

    `last_event_id`: the id of the last event received (resume point); `connections`: streams opened so far;
    `status`: the current Status.
    """

    def __init__(self, base_url: str, get_token: TokenGetter, last_event_id: str | None = None, *,
                 path: str = "/sse", types: Iterable[str] | None = None, retry_ms: int = 3000,
                 max_retry_ms: int = 30000, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 on_status: Callable[[Status], None] | None = None, client: httpx.AsyncClient | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.url = base_url.rstrip("/") + path
        self.last_event_id = last_event_id
        self.connections = 0
        self.status = Status(State.CONNECTING)
        self._get_token = get_token
        self._types = frozenset(types) if types is not None else None
        self._policy = Reconnect(retry_ms, max_retry_ms, rand)
        self._idle_timeout = idle_timeout
        self._on_status = on_status
        self._client = client
        self._gen = self._events()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _set(self, status: Status) -> None:
        self.status = status
        if self._on_status is not None:
            self._on_status(status)

    def _wanted(self, ev: SseEvent) -> bool:
        if ev.type == "reset" and ev.id is None:
            return True
        return ev.type in self._types if self._types is not None else ev.type != "ping"

    async def _credential(self) -> str | None:
        got = self._get_token()
        if inspect.isawaitable(got):
            got = await got
        return got

    async def _events(self) -> AsyncGenerator[Event, None]:
        client = self._client or httpx.AsyncClient()
        try:
            while True:
                policy = self._policy
                self._set(Status(State.CONNECTING, attempt=policy.failures + 1))
                try:
                    token = await self._credential()
                except Exception as exc:  # noqa: BLE001 - the application's token source failed: retry it later
                    await self._wait(policy.after_error(WaitReason.CREDENTIALS), message=repr(exc))
                    continue
                if not token:
                    self._set(Status(State.ERROR, error="no_credentials", message="get_token gave no token"))
                    raise NoCredentials("get_token gave no token")
                headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache",
                           "Authorization": f"Bearer {token}"}
                if self.last_event_id is not None:
                    headers["Last-Event-ID"] = self.last_event_id
                timeout = httpx.Timeout(CONNECT_TIMEOUT, read=self._idle_timeout or None)
                decision: Retry | Stop
                refusal: ServiceError | None = None
                end: StreamEnd | None = None
                try:
                    async with client.stream("GET", self.url, headers=headers, timeout=timeout) as resp:
                        ctype = resp.headers.get("content-type", "").split(";")[0].strip()
                        if resp.status_code == 200 and ctype == "text/event-stream":
                            end = StreamEnd()
                            async for ev in self._read(resp, end):
                                yield ev
                            decision = policy.after_stream(end)
                        else:
                            await resp.aread()
                            refusal = ServiceError.from_response(resp)
                            decision = policy.after_status(resp.status_code, refusal.retry_after)
                except httpx.TransportError as exc:
                    decision = policy.after_error(WaitReason.NETWORK)
                    await self._wait(decision, message=repr(exc))
                    continue
                if isinstance(decision, Stop):
                    assert refusal is not None
                    self._set(Status(State.ERROR, http_status=refusal.status, error=refusal.code,
                                     message=refusal.message))
                    raise refusal
                if end is not None:  # the service's word on how the stream ended, for the status
                    await self._wait(decision, error=end.refused,
                                     message=end.closing_text)
                else:
                    await self._wait(decision, refusal)
        finally:
            if self.status.state is not State.ERROR:
                self._set(Status(State.CLOSED))
            if self._client is None:
                await client.aclose()

    async def _read(self, resp: httpx.Response, end: StreamEnd) -> AsyncGenerator[Event, None]:
        """The events of one stream; `end` records how it ended. A broken connection or the idle timeout ends
        it quietly (the caller reconnects)."""
        parser = SseParser()
        try:
            async for chunk in resp.aiter_bytes():
                for item in parser.feed(chunk):
                    if isinstance(item, SseRetry):
                        end.retry_ms = item.ms
                    elif isinstance(item, SseComment):
                        text = item.text
                        if text == "connected":
                            self._opened(end)
                        elif text.startswith("closing "):
                            end.closing, end.closing_text = CloseReason.parse(text[8:]), text[8:]
                        elif text.startswith("refused "):
                            end.refused = text[8:]
                    else:
                        self._opened(end)
                        if item.id:
                            self.last_event_id = item.id
                        if self._wanted(item):
                            yield Event(item.type, item.id or None, _parse(item.data), item.data)
        except httpx.ReadTimeout:
            end.idle = True
        except httpx.TransportError:
            pass  # the connection broke: `end` has no closing, the caller backs off and resumes

    def _opened(self, end: StreamEnd) -> None:
        if not end.opened:
            end.opened = True
            self.connections += 1
            self._policy.opened(end.retry_ms)
            self._set(Status(State.OPEN))

    async def _wait(self, decision: Retry, refusal: ServiceError | None = None, *, error: str | None = None,
                    message: str | None = None) -> None:
        if decision.delay_ms <= 0:
            return
        self._set(Status(State.WAITING, attempt=self._policy.failures, retry_in=decision.delay_ms / 1000,
                         reason=decision.reason, http_status=refusal.status if refusal else None,
                         error=refusal.code if refusal else error,
                         message=refusal.message if refusal else message))
        await asyncio.sleep(decision.delay_ms / 1000)


def subscribe(base_url: str, get_token: TokenGetter, last_event_id: str | None = None, *, path: str = "/sse",
              types: Iterable[str] | None = None, retry_ms: int = 3000, max_retry_ms: int = 30000,
              idle_timeout: float = DEFAULT_IDLE_TIMEOUT, on_status: Callable[[Status], None] | None = None,
              client: httpx.AsyncClient | None = None) -> Subscription:
    """Iterate over the events of the stream of `get_token()`'s user, for ever: it reconnects and resumes by
    itself, and raises only when it cannot go on (ServiceError: 401 twice, 403, another 4xx; NoCredentials).

        async with subscribe("http://localhost:8080", get_token) as feed:
            async for event in feed:          # Event(type, id, data, raw); event.is_reset: refetch your state
                handle(event)

    `get_token()` (sync or async) returns a token for `Authorization: Bearer`, and is called before every
    connection. `last_event_id`: resume after this id. `types`: only these event types (default: all but
    `ping`; `reset` always comes). `retry_ms`: the first delay until the service sends `retry:`; `max_retry_ms`:
    the backoff's cap (jitter adds up to half). `idle_timeout`: seconds without a byte before reconnecting (keep
    it above the service's PING_INTERVAL; 0: never). `on_status(Status)`: every state change.
    `client`: an httpx.AsyncClient of your own (you close it).
    """
    return Subscription(base_url, get_token, last_event_id, path=path, types=types, retry_ms=retry_ms,
                        max_retry_ms=max_retry_ms, idle_timeout=idle_timeout, on_status=on_status, client=client)


__all__ = ["ClientError", "Event", "State", "Status", "Subscription", "subscribe"]
