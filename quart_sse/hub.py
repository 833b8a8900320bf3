"""Local fan-out: channel -> the streams of this process that listen to it.

The broker hands each message over once; the hub gives the very same `Message` (its frame and its chunk encoded
once) to every stream listening on the channel (`Stream.push`, quart_sse.stream), and one shared timer pings every
stream. The hub keeps the broker subscribed to exactly the channels some local stream listens to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .broker.base import Broker
from .events import PING, Message
from .tasks import cancel_and_wait

if TYPE_CHECKING:
    from .stream import CloseReason, Stream

log = logging.getLogger("quart_sse.hub")


def _confirmed(ready: Awaitable[None]) -> bool:
    return isinstance(ready, asyncio.Future) and ready.done() and not ready.cancelled() and ready.exception() is None


class _Channel:
    __slots__ = ("ready", "subs")

    def __init__(self, ready: Awaitable[None]) -> None:
        self.subs: set[Stream] = set()
        self.ready = ready


class Hub:
    """Maps channels to local subscribers and keeps the broker subscribed to exactly the channels in use."""

    def __init__(self, broker: Broker, ping_interval: float) -> None:
        self.broker = broker
        self.ping_interval = ping_interval
        self._channels: dict[str, _Channel] = {}
        self.subscribers: set[Stream] = set()
        self._ping_task: asyncio.Task[None] | None = None
        self.on_deliver: Callable[[int, Message], None] | None = None

    def start(self) -> None:
        self._ping_task = asyncio.get_running_loop().create_task(self._pinger(), name="hub-pinger")

    async def stop(self) -> None:
        await cancel_and_wait(self._ping_task)

    async def attach(self, sub: Stream, timeout: float = 5.0) -> None:
        """Register `sub` and return once every channel it needs is confirmed upstream."""
        self.subscribers.add(sub)
        waits = []
        for ch in sub.channels:
            state = self._channels.get(ch)
            if state is None:
                state = self._channels[ch] = _Channel(self.broker.subscribe(ch))
            state.subs.add(sub)
            if not _confirmed(state.ready):  # the app's broadcast channel is, after its first stream
                waits.append(state.ready)
        if not waits:
            return
        try:
            # one timeout, the shared confirmations shielded (a stream that gives up must not cancel them); not
            # wait_for(gather(...)): its task, gather and wrappers per stream were a fifth of a storm's subscription
            async with asyncio.timeout(timeout):
                for w in waits:
                    await asyncio.shield(w)
        except BaseException:
            self.detach(sub)
            raise

    def detach(self, sub: Stream) -> None:
        """Synchronous, so it is safe in a cancelled generator's `finally`."""
        self.subscribers.discard(sub)
        for ch in sub.channels:
            state = self._channels.get(ch)
            if state is None:
                continue
            state.subs.discard(sub)
            if not state.subs:
                del self._channels[ch]
                self.broker.unsubscribe(ch)

    def dispatch(self, channel: str, msg: Message) -> None:
        state = self._channels.get(channel)
        if state is None:
            return
        for sub in state.subs:
            sub.push(msg)
        if self.on_deliver is not None:
            self.on_deliver(len(state.subs), msg)

    def close_user(self, app: str, user: str, reason: CloseReason) -> int:
        victims = [s for s in self.subscribers if s.app == app and s.user == user and not s.closed]
        for s in victims:
            s.close(reason)
        return len(victims)

    def close_all(self, reason: CloseReason) -> int:
        victims = [s for s in self.subscribers if not s.closed]
        for s in victims:
            s.close(reason)
        return len(victims)

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    async def _pinger(self) -> None:
        """One timer for every stream: the same ping bytes go to all of them."""
        while True:
            await asyncio.sleep(self.ping_interval)
            for sub in list(self.subscribers):
                sub.push(PING)
