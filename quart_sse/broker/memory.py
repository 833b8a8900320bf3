"""The in-process broker: one process, no Redis; the same semantics as the Redis broker (history included)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Sequence

from .. import keys
from ..events import Message, Position
from .base import OnControl, OnMessage, OnReconnect, Outgoing, Published, Replay
from .history import MAX_LAST_EVENT_ID, as_position, covered
from .seen import MAX_SEEN_IDS, SeenIds


class _History:
    """A bounded, time-limited log of one channel; remembers the newest position it has trimmed."""

    __slots__ = ("entries", "trimmed")

    def __init__(self) -> None:
        self.entries: deque[Message] = deque()
        self.trimmed: Position = (0, 0)


class MemoryBroker:
    name = "memory"

    def __init__(self, history_size: int, history_ttl: int, *, max_seen_ids: int = MAX_SEEN_IDS) -> None:
        self._size = history_size if history_ttl > 0 else 0  # either setting at 0 turns history off
        self._ttl_ms = history_ttl * 1000
        self._seen = SeenIds(self._ttl_ms, max_seen_ids)  # safe retries: HISTORY_TTL is the window, history or not
        self._channels: set[str] = set()
        self._history: dict[str, _History] = {}
        self._seq: dict[str, tuple[int, int]] = {}
        self._on_message: OnMessage | None = None
        self._on_control: OnControl | None = None

    async def start(self, on_message: OnMessage, on_control: OnControl, on_reconnect: OnReconnect) -> None:
        self._on_message = on_message
        self._on_control = on_control

    async def close(self) -> None:
        self._channels.clear()

    async def ready(self) -> bool:
        return True

    def subscribe(self, channel: str) -> Awaitable[None]:
        self._channels.add(channel)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    def _now_ms(self, app: str) -> int:
        """The app's clock: wall time in ms, never behind its newest position (as Redis does with its TIME)."""
        return max(int(time.time() * 1000), self._seq.get(app, (0, 0))[0])

    def _next_pos(self, app: str) -> Position:
        pos = (self._now_ms(app), self._seq.get(app, (0, 0))[1] + 1)
        self._seq[app] = pos
        return pos

    def _trim(self, hist: _History, now_ms: int) -> None:
        entries = hist.entries
        while entries and (len(entries) > self._size or
                           (self._ttl_ms and entries[0].pos and entries[0].pos[0] < now_ms - self._ttl_ms)):
            gone = entries.popleft()
            if gone.pos:
                hist.trimmed = gone.pos

    def _evict(self, now_ms: int) -> None:
        """Forget channels whose newest event is older than HISTORY_TTL (so all of theirs are): without it, every
        user who ever got an event would keep a history entry for good. Amortised O(1): oldest first."""
        if not self._ttl_ms:
            return
        hists = self._history
        while hists:
            key = next(iter(hists))
            entries = hists[key].entries
            newest = entries[-1].pos if entries else None
            if newest is not None and newest[0] >= now_ms - self._ttl_ms:
                return
            del hists[key]

    async def publish(self, app: str, user: str | None, event_id: str | None, event_type: str,
                      data: bytes) -> Published:
        return self._publish(app, Outgoing(user, event_id, event_type, data))

    async def publish_many(self, app: str, events: Sequence[Outgoing]) -> list[Published]:
        return [self._publish(app, ev) for ev in events]  # no await in between: one atomic step, as on Redis

    def _publish(self, app: str, ev: Outgoing) -> Published:
        key = keys.history_key(app, ev.user)  # names the channel in both indexes
        seen = self._seen
        if ev.id is not None and seen.enabled and seen.seen(key, ev.id, self._now_ms(app)):
            return Published(ev.id, None, duplicate=True)
        pos = self._next_pos(app)
        msg = Message.build(ev.id if ev.id is not None else f"{pos[0]}-{pos[1]}", ev.type, ev.data, pos)
        if self._size:
            hist = self._history.pop(key, None) or _History()
            self._history[key] = hist  # the dict stays in order of each channel's newest event
            hist.entries.append(msg)
            self._trim(hist, pos[0])
            self._evict(pos[0])
        if ev.id is not None and seen.enabled:
            seen.add(key, ev.id, pos[0])
        channel = keys.broadcast_channel(app) if ev.user is None else keys.user_channel(app, ev.user)
        if channel in self._channels and self._on_message is not None:
            self._on_message(channel, msg)
        assert msg.id is not None
        return Published(msg.id, pos)

    def _find(self, hist: _History | None, last_id: str) -> Position | None:
        """The most recent event with that id. No early stop at a position-shaped id: a publisher's id may look
        like a position without being the event's own."""
        if hist is None:
            return None
        for msg in reversed(hist.entries):
            if msg.id == last_id:
                return msg.pos
        return None

    async def replay(self, app: str, user: str, last_id: str, *, known: bool = False) -> Replay:
        if not self._size:
            return Replay(reset="history is off")
        if len(last_id) > MAX_LAST_EVENT_ID:
            return Replay(reset="unknown id")
        now_ms = int(time.time() * 1000)
        u_hist = self._history.get(keys.history_key(app, user))
        b_hist = self._history.get(keys.history_key(app, None))
        for h in (u_hist, b_hist):
            if h is not None:
                self._trim(h, now_ms)
        pos = as_position(last_id)
        if known and pos is not None:
            found = [pos]
        else:
            found = [p for p in (self._find(u_hist, last_id), self._find(b_hist, last_id)) if p]
        if not found:
            return Replay(reset="unknown id")
        after = max(found)
        if any(h is not None and h.trimmed > after for h in (u_hist, b_hist)):
            return Replay(reset="history trimmed")
        user_msgs = [m for m in u_hist.entries if m.pos and m.pos > after] if u_hist else []
        b_msgs = [m for m in b_hist.entries if m.pos and m.pos > after] if b_hist else []
        return covered(after, user_msgs, b_msgs)

    async def head(self, app: str, user: str) -> Position | None:
        return self._seq.get(app)

    async def publish_control(self, payload: bytes) -> int:
        if self._on_control is not None:
            await self._on_control(payload)
        return 1

    async def send_reply(self, instance: str, payload: bytes) -> None:
        if self._on_control is not None:
            await self._on_control(payload)
