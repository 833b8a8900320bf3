"""The service's moving parts, built from Settings and wired into the app's lifecycle in one place."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any

import orjson

from .adapter import ServerAdapter, StreamPath
from .auth import TokenCache
from .broker.base import Broker
from .broker.memory import MemoryBroker
from .control import Control
from .events import Message, format_position
from .hub import Hub
from .metrics import Metrics
from .presence.service import Presence
from .publisher import Publisher
from .registry import MemoryRegistry, RedisRegistry, Registry
from .settings import Settings
from .stream import CloseReason, Farewells, Stream, StreamState
from .tickets import MemoryTickets, RedisTickets, TicketStore

log = logging.getLogger("quart_sse")


class Services:
    """Lives in `app.extensions["quart_sse"]`; started in `before_serving`, stopped in `after_serving`.

    `adapter` is the server's (quart_sse.server builds it; see quart_sse.adapter); an app served any other way
    keeps the default one, which is off: every stream then takes the generator path.
    """

    def __init__(self, settings: Settings, adapter: ServerAdapter | None = None) -> None:
        self.settings = settings
        self.adapter = adapter if adapter is not None else ServerAdapter()
        self.instance = uuid.uuid4().hex
        self.metrics = Metrics()
        self.broker: Broker
        self.registry: Registry
        self.tickets: TicketStore
        dsn = settings.redis_dsn
        if dsn:
            from .broker.redis import RedisBroker

            if settings.redis_cluster:  # REDIS_URL names one node of a Redis Cluster: sharded pub/sub, slot routing
                from .broker.cluster import RedisClusterBroker

                rb: RedisBroker = RedisClusterBroker(dsn, self.instance, settings.history_size, settings.history_ttl)
            else:
                rb = RedisBroker(dsn, self.instance, settings.history_size, settings.history_ttl)
            rb.on_drop = self.metrics.events_dropped.inc
            self.broker = rb
            self.presence = Presence(settings, self.metrics, self.instance, rb.redis)
            self.registry = RedisRegistry(rb.redis, settings.registry_ttl, cluster=settings.redis_cluster,
                                          presence=self.presence)
            self.tickets = RedisTickets(rb.redis)
        else:
            self.broker = MemoryBroker(settings.history_size, settings.history_ttl)
            self.presence = Presence(settings, self.metrics, self.instance, None)
            self.registry = MemoryRegistry(self.presence)
            self.tickets = MemoryTickets()
        self.hub = Hub(self.broker, settings.ping_interval)
        self.hub.on_deliver = self._delivered
        self.control = Control(self.broker, self.hub, self.instance)
        self.publisher = Publisher(self.broker)
        self.token_cache = TokenCache()
        self.shutting_down = False
        self.stop_by: float | None = None  # loop time by which a shutdown is over (signal + GRACEFUL_TIMEOUT)
        self._tasks: set[asyncio.Task[None]] = set()
        self.farewells = Farewells(self)
        self._resync: asyncio.Task[None] | None = None
        self._resync_again = False

    def _delivered(self, n: int, msg: Message) -> None:
        """Once per message, not per stream: the count handed to local streams, and publish-to-send latency."""
        self.metrics.events_delivered.inc(n)
        if msg.pos is not None:
            self.metrics.delivery_seconds.observe(max(0.0, time.time() - msg.pos[0] / 1000))

    @property
    def stream_path(self) -> StreamPath:
        """The path HTTP/1.x streams take on this instance (HTTP/2 streams always take the generator's)."""
        if self.adapter.active and self.settings.stream_handoff:
            return StreamPath.HANDED_OFF
        return StreamPath.GENERATOR

    async def start(self) -> None:
        where = f"{self.broker.name} broker at {self._redacted()}" if self.broker.name.startswith("redis") else \
            "in-process broker (no REDIS_URL/REDIS_HOST set: single instance only)"
        log.info("quart-sse %s starting on the %s", self.settings.app_name, where)
        self.adapter.recheck()
        if not self.adapter.attached:
            log.warning("not served by `python -m quart_sse serve` (the supported way to run it): streams take the "
                        "generator path (no hand-off, ~30 KiB more per stream), a client that stops reading is "
                        "closed but not cut, and a shutdown may not say goodbye to streams before the server "
                        "stops waiting for them")
        for path in StreamPath:
            self.metrics.stream_path.labels(path.value).set(1 if path is self.stream_path else 0)
        await self.broker.start(self.hub.dispatch, self.control.handle, self._on_reconnect)
        await self.registry.start()
        await self.presence.start()
        self.hub.start()

    def begin_shutdown(self) -> int:
        """End every stream with a jittered `retry:` so that clients do not all come back in the same second."""
        if self.stop_by is None:  # the first call (the signal) starts GRACEFUL_TIMEOUT
            self.stop_by = asyncio.get_running_loop().time() + self.settings.graceful_timeout
            # the handed-off connections open now, for the server to cut if they outlast it (quart_sse.server)
            self.adapter.follow(stream.sink for stream in self.hub.subscribers
                                if stream.state is StreamState.OWNED and stream.sink is not None)
        self.shutting_down = True
        self.presence.begin_shutdown((self.settings.sse_retry_ms + 10_000) / 1000)  # goodbye_retry_ms(SHUTDOWN) at most
        return self.hub.close_all(CloseReason.SHUTDOWN)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A short background job (an owned stream's goodbye) that shutdown waits for, up to GRACEFUL_TIMEOUT."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Within GRACEFUL_TIMEOUT of the signal, whatever Redis does: a Redis that hangs (rather than refuses)
        would hold each step for its socket timeout (5 s). What a cut step leaves in Redis (registry entries, a
        user's pending offline) expires or is swept by the other instances, as after a crash."""
        self.begin_shutdown()
        stop_by = self.stop_by
        assert stop_by is not None
        loop = asyncio.get_running_loop()

        def left() -> float:
            return max(0.1, stop_by - loop.time())

        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=left())
        if self._resync is not None:
            self._resync.cancel()
        await self.hub.stop()
        for name, step in (("registry", self.registry.stop), ("presence", self.presence.stop)):
            try:
                await asyncio.wait_for(step(), left())
            except TimeoutError:
                log.warning("shutdown: the %s's last Redis calls did not finish within GRACEFUL_TIMEOUT; what they "
                            "leave expires by itself (REGISTRY_TTL)", name)
        await self.broker.close()

    def _redacted(self) -> str:
        from urllib.parse import urlsplit

        u = urlsplit(self.settings.redis_dsn or "")
        return f"{u.scheme}://{u.hostname}:{u.port or 6379}{u.path}"

    # -- after a Redis outage: give every open stream what history holds that it missed --------------------------
    def _on_reconnect(self) -> None:
        """Called by the link right after it resubscribed, before it hands over any message of the new connection:
        every open stream holds its live events back until the resync has put the missed ones in front of them
        (a live event delivered first would move the stream's position past them and hide them)."""
        self.metrics.redis_reconnects.inc()
        if not self.settings.history_enabled:
            return
        for sub in self.hub.subscribers:
            sub.hold()
        if self._resync is None or self._resync.done():
            self._start_resync()
        else:  # a resync that read history before this reconnect may have missed events: run once more after it
            self._resync_again = True

    def _start_resync(self) -> None:
        self._resync_again = False
        self._resync = asyncio.get_running_loop().create_task(self._resync_all(), name="resync")
        self._resync.add_done_callback(self._resync_done)

    def _resync_done(self, task: asyncio.Task[None]) -> None:
        if self._resync_again and not task.cancelled() and not self.shutting_down:
            self._start_resync()
        else:
            for sub in list(self.hub.subscribers):
                sub.release()

    async def _resync_all(self) -> None:
        groups: dict[tuple[str, str], list[Stream]] = defaultdict(list)
        for sub in list(self.hub.subscribers):
            if sub.last_pos is not None and not sub.closed:
                groups[(sub.app, sub.user)].append(sub)
        for (app, user), subs in groups.items():  # one user at a time: one pooled connection (~0.1 ms each)
            await self._resync_user(app, user, subs)
        log.info("resynced %d users from history after the Redis outage", len(groups))

    async def _resync_user(self, app: str, user: str, subs: list[Stream]) -> None:
        since = min(s.last_pos for s in subs if s.last_pos is not None)
        try:
            replay = await self.broker.replay(app, user, format_position(since), known=True)
        except Exception as exc:  # noqa: BLE001 - a failed resync must not take the service down
            log.warning("resync of %s/%s failed: %s", app, user, exc)
            return
        if replay.reset is not None:  # history cannot cover the gap: say so, as a resume would
            self.metrics.resets.inc(len(subs))
            reset = Message.build(None, "reset", orjson.dumps({"reason": replay.reset, "last_event_id": None}), None)
            for sub in subs:
                sub.push(reset)
            return
        for sub in subs:
            _merge_missed(sub, replay.messages)


def _merge_missed(sub: Stream, missed: list[Message]) -> None:
    """Put history the stream missed in front of what is queued, in position order, without duplicates."""
    last = sub.last_pos
    for msg in missed:
        if last is None or (msg.pos is not None and msg.pos > last):
            sub.push(msg)
    sub.reorder()
