"""The service's moving parts, built from Settings and wired into the app's lifecycle in one place."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import defaultdict

from .broker.base import Broker
from .broker.memory import MemoryBroker
from .control import Control
from .events import Message, format_position
from .hub import Hub, Subscriber
from .metrics import Metrics
from .publisher import Publisher
from .registry import MemoryRegistry, RedisRegistry, Registry
from .settings import Settings
from .tickets import MemoryTickets, RedisTickets, TicketStore

log = logging.getLogger("quart_sse")


class Services:
    """Lives in `app.extensions["quart_sse"]`; started in `before_serving`, stopped in `after_serving`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.instance = uuid.uuid4().hex
        self.metrics = Metrics()
        self.broker: Broker
        self.registry: Registry
        self.tickets: TicketStore
        dsn = settings.redis_dsn
        if dsn:
            from .broker.redis import RedisBroker

            rb = RedisBroker(dsn, self.instance, settings.history_size, settings.history_ttl,
                             sharded=settings.redis_cluster)
            rb.on_drop = self.metrics.events_dropped.inc
            self.broker = rb
            self.registry = RedisRegistry(rb.redis, settings.registry_ttl)
            self.tickets = RedisTickets(rb.redis)
        else:
            self.broker = MemoryBroker(settings.history_size, settings.history_ttl)
            self.registry = MemoryRegistry()
            self.tickets = MemoryTickets()
        self.hub = Hub(self.broker, settings.ping_interval)
        self.hub.on_deliver = self._delivered
        self.control = Control(self.broker, self.hub, self.instance)
        self.publisher = Publisher(self.broker)
        self.shutting_down = False
        self._resync: asyncio.Task[None] | None = None

    def _delivered(self, n: int, msg: Message) -> None:
        """Once per message, not per stream: the count handed to local streams, and publish-to-send latency."""
        self.metrics.events_delivered.inc(n)
        if msg.pos is not None:
            self.metrics.delivery_seconds.observe(max(0.0, time.time() - msg.pos[0] / 1000))

    async def start(self) -> None:
        where = f"redis broker at {self._redacted()}" if self.broker.name == "redis" else \
            "in-process broker (no REDIS_URL/REDIS_HOST set: single instance only)"
        log.info("quart-sse %s starting on the %s", self.settings.app_name, where)
        await self.broker.start(self.hub.dispatch, self.control.handle, self._on_reconnect)
        await self.registry.start()
        self.hub.start()

    def begin_shutdown(self) -> int:
        """End every stream with a jittered `retry:` so that clients do not all come back in the same second."""
        self.shutting_down = True
        return self.hub.close_all("shutdown")

    async def stop(self) -> None:
        self.begin_shutdown()
        if self._resync is not None:
            self._resync.cancel()
        await self.hub.stop()
        await self.registry.stop()
        await self.broker.close()

    def retry_after_close(self, reason: str) -> int:
        base = self.settings.sse_retry_ms
        if reason == "shutdown":
            return base + random.randint(0, 10_000)
        return base + random.randint(0, base)

    def _redacted(self) -> str:
        from urllib.parse import urlsplit

        u = urlsplit(self.settings.redis_dsn or "")
        return f"{u.scheme}://{u.hostname}:{u.port or 6379}{u.path}"

    # -- after a Redis outage: give every open stream what history holds that it missed --------------------------
    def _on_reconnect(self) -> None:
        self.metrics.redis_reconnects.inc()
        if self.settings.history_enabled and (self._resync is None or self._resync.done()):
            self._resync = asyncio.get_running_loop().create_task(self._resync_all(), name="resync")

    async def _resync_all(self) -> None:
        groups: dict[tuple[str, str], list[Subscriber]] = defaultdict(list)
        for sub in list(self.hub.subscribers):
            if sub.last_pos is not None and not sub.closed:
                groups[(sub.app, sub.user)].append(sub)
        for (app, user), subs in groups.items():
            since = min(s.last_pos for s in subs if s.last_pos is not None)
            try:
                replay = await self.broker.replay(app, user, format_position(since), known=True)
            except Exception as exc:  # noqa: BLE001 - a failed resync must not take the service down
                log.warning("resync of %s/%s failed: %s", app, user, exc)
                continue
            if replay.reset is not None:
                continue
            for sub in subs:
                _merge_missed(sub, replay.messages)
        log.info("resynced %d users from history after the Redis outage", len(groups))


def _merge_missed(sub: Subscriber, missed: list[Message]) -> None:
    """Put history the stream missed in front of what is queued, in position order, without duplicates."""
    last = sub.last_pos
    for msg in missed:
        if last is None or (msg.pos is not None and msg.pos > last):
            sub.push(msg)
    sub.reorder()
