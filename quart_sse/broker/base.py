"""The broker interface: live pub/sub plus bounded history, implemented in-process and on Redis.

The hub calls `subscribe` when a channel gets its first local listener and `unsubscribe` when its last one leaves;
the broker calls back `on_message(channel, message)` once per message, whatever the number of listeners.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..events import Message, Position

#: Events in one publish_many call (one batch request, one script call on Redis).
MAX_BATCH_EVENTS = 1000

OnMessage = Callable[[str, Message], None]
OnControl = Callable[[bytes], Coroutine[Any, Any, None]]
OnReconnect = Callable[[], None]


class BrokerUnavailable(Exception):
    """The broker cannot be reached right now (Redis down); callers answer 503."""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 4x, and a batch builds 1000 of them
class Outgoing:
    """One validated event to publish: `user` None is the app's broadcast; `data` is compact one-line JSON."""

    user: str | None
    id: str | None  # None: the broker assigns the event's position as its id
    type: str
    data: bytes


@dataclass(slots=True)  # not frozen, as Outgoing
class Published:
    """What a publish did with one event: its id, and its position in history (None for a duplicate).

    `duplicate`: the event carried an id already published on the same channel within HISTORY_TTL, so it was not
    published again (safe retries, docs/publishing.md); `id` is that id, as the first publish answered.
    """

    id: str
    pos: Position | None
    duplicate: bool = False


@dataclass(slots=True)
class Replay:
    """What a stream resuming from `Last-Event-ID` is owed: `messages` in publish order, or a reset."""

    messages: list[Message] = field(default_factory=list)
    after: Position | None = None  # the position the client already has (live copies at or before it are dupes)
    reset: str | None = None  # why history cannot cover the gap; None when it can


class Broker(Protocol):
    name: str

    async def start(self, on_message: OnMessage, on_control: OnControl, on_reconnect: OnReconnect) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool: ...

    def subscribe(self, channel: str) -> Awaitable[None]:
        """Start receiving `channel`; the awaitable resolves once the upstream confirmed the subscription."""
        ...

    def unsubscribe(self, channel: str) -> None:
        """Stop receiving `channel` (ordered after any earlier subscribe of the same channel)."""
        ...

    async def publish(self, app: str, user: str | None, event_id: str | None, event_type: str,
                      data: bytes) -> Published:
        """Append to history and publish live, atomically (or nothing, for a duplicate id); the event's final id."""
        ...

    async def publish_many(self, app: str, events: Sequence[Outgoing]) -> list[Published]:
        """`events` (any users of `app` and its broadcast) in their order, each as `publish` would, as one atomic
        step where the broker allows (one script call on Redis): all of them, or none when it fails."""
        ...

    async def replay(self, app: str, user: str, last_id: str, *, known: bool = False) -> Replay:
        """Events after `last_id` for the user and the app's broadcasts; `known`: last_id is a position of ours."""
        ...

    async def head(self, app: str, user: str) -> Position | None:
        """The newest position in the user's and the app's history (resync point after an outage)."""
        ...

    async def publish_control(self, payload: bytes) -> int:
        """Send a control message to every instance; returns how many instances received it."""
        ...

    async def send_reply(self, instance: str, payload: bytes) -> None: ...
