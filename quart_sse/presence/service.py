"""Presence, assembled: the state (Redis or in-process), the webhook queue and its delivery, the sweeper; and what
the registry tells it (the registry's admit, release and heartbeat are where every stream's presence is decided).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis.asyncio as aioredis

from ..metrics import Metrics
from ..settings import Settings
from .delivery import Deliverer
from .model import Change
from .outbox import MemoryOutbox, Outbox, RedisOutbox
from .state import MemoryPresenceState, PresenceState, RedisPresenceState
from .sweeper import Sweeper
from .webhooks import parse_targets, url_for

#: Most user ids one POST /presence/{app} may ask about.
MAX_QUERY_USERS = 10_000


class Presence:
    """Lives in `Services.presence`. Without WEBHOOK_URL it keeps the state (for GET/POST /presence) and sends
    nothing."""

    def __init__(self, settings: Settings, metrics: Metrics, instance: str, redis: aioredis.Redis | None) -> None:
        self.metrics = metrics
        self.targets = parse_targets(settings.webhook_url)
        self.grace = settings.presence_grace
        self.queue_max = settings.webhook_queue_max
        self._shutdown_extra = 0.0
        self.outbox: Outbox
        self.state: PresenceState
        self.memory: MemoryPresenceState | None = None
        self.redis_state: RedisPresenceState | None = None
        if redis is not None:
            self.outbox = RedisOutbox(redis)
            self.redis_state = self.state = RedisPresenceState(redis, settings.registry_ttl, self.grace,
                                                               self.queue_max, self.queued)
        else:
            outbox = MemoryOutbox()
            self.outbox = outbox
            self.memory = self.state = MemoryPresenceState(outbox, self.grace, self.queue_max, self.queued)
        self.deliverer: Deliverer | None = None
        if self.targets:
            secret = settings.webhook_secret.get_secret_value().encode() if settings.webhook_secret else b""
            self.deliverer = Deliverer(
                self.outbox, self.targets, secret, consumer=instance, timeout=settings.webhook_timeout,
                retry_max=settings.webhook_retry_max, concurrency=settings.webhook_concurrency, metrics=metrics,
                on_done=self._acknowledged, lease=settings.registry_ttl)
        self.sweeper = Sweeper(self.state, self.deliverer, metrics)

    async def start(self) -> None:
        if self.deliverer is not None:
            await self.deliverer.start()
        self.sweeper.start()

    async def stop(self) -> None:
        await self.sweeper.stop()
        if self.deliverer is not None:
            await self.deliverer.stop()

    def begin_shutdown(self, reconnect_within: float) -> None:
        """The server is ending every stream and told their clients to come back within `reconnect_within`
        seconds: their offlines wait that much longer than PRESENCE_GRACE, so that a restart does not flap."""
        self._shutdown_extra = reconnect_within

    async def online(self, app: str, users: Sequence[str]) -> list[str]:
        """Those of `users` online now (in the order given, each once): one Redis round trip."""
        return await self.state.online(app, users)

    # -- what the registry tells presence (quart_sse.registry.PresenceLink / MemoryPresenceLink) ---------------
    def queued(self, app: str) -> bool:
        """Whether the app's changes go to the webhook queue (it has a WEBHOOK_URL)."""
        return url_for(self.targets, app) is not None

    def release_delay(self) -> float:
        return self.grace + self._shutdown_extra

    def changed(self, app: str, changes: int, dropped: int) -> None:
        """An admission or a heartbeat made users online (and may have dropped old events at the cap)."""
        if changes:
            self.metrics.presence_changes.labels(Change.ONLINE.value).inc(changes)
            if self.deliverer is not None:
                self.sweeper.kick(app, sweep=False)
        self.sweeper.dropped(dropped)

    def scheduled(self, app: str, due: float) -> None:
        """A user's last stream closed: its offline is due at Unix time `due`."""
        self.sweeper.at(app, due)

    async def index(self, *apps: str, force: bool = False) -> None:
        if self.redis_state is not None:
            await self.redis_state.index(*apps, force=force)

    def admitted(self, app: str, user: str) -> None:
        """In-process registry: a stream of `user` opened."""
        assert self.memory is not None
        changes, dropped = self.memory.admitted(app, user)
        self.changed(app, changes, dropped)

    def released(self, app: str, user: str) -> None:
        """In-process registry: the last stream of `user` closed."""
        assert self.memory is not None
        due = time.time() + self.release_delay()
        self.memory.released(app, user, due)
        self.scheduled(app, due)

    def _acknowledged(self, app: str) -> None:
        self.sweeper.kick(app, sweep=False)
