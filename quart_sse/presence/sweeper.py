"""Every instance's presence loop: sweeps apps (offlines due, users whose instance died) and leases their queued
events for delivery.

An app is visited
- every SWEEP_INTERVAL seconds (every app in the index, on every instance: no leader, since each sweep is one atomic
  script whose effects do not depend on who runs it or how often);
- at once when this instance queued a change of it (an admission that made a user online), or acknowledged one of
  its events (the user's next event can go);
- when the offline this instance scheduled falls due (a timer, so the offline leaves PRESENCE_GRACE after the close
  to within milliseconds rather than to within a tick).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..broker.base import BrokerUnavailable
from ..metrics import Metrics
from ..tasks import cancel_and_wait
from .delivery import Deliverer
from .model import Change
from .state import PresenceState

log = logging.getLogger("quart_sse.presence")

#: Seconds between two visits of every app by one instance: the delay with which a dead instance's users are
#: found once their streams expired, and the fallback for an offline whose instance died during the grace.
SWEEP_INTERVAL = 1.0


class Sweeper:
    def __init__(self, state: PresenceState, deliverer: Deliverer | None, metrics: Metrics,
                 interval: float = SWEEP_INTERVAL) -> None:
        self.state = state
        self.deliverer = deliverer
        self.metrics = metrics
        self.interval = interval
        self._kicked: dict[str, None] = {}  # apps to visit next, in order
        self._wake = asyncio.Event()
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._backlog: dict[str, tuple[int, float | None]] = {}  # app -> (queued events, oldest Unix s)
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="presence-sweeper")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    def kick(self, app: str) -> None:
        """Visit `app` as soon as the loop is free."""
        self._kicked[app] = None
        self._wake.set()

    def at(self, app: str, due: float) -> None:
        """Visit `app` at Unix time `due` (one timer per app: the earliest)."""
        current = self._timers.get(app)
        if current is not None and current[0] <= due:
            return
        if current is not None:
            current[1].cancel()
        loop = asyncio.get_running_loop()
        handle = loop.call_later(max(0.0, due - time.time()) + 0.002, self._fire, app)
        self._timers[app] = (due, handle)

    def _fire(self, app: str) -> None:
        self._timers.pop(app, None)
        self.kick(app)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            if not self._kicked:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_tick - loop.time())):
                        await self._wake.wait()
            self._wake.clear()
            apps, self._kicked = list(self._kicked), {}
            if loop.time() >= next_tick:
                next_tick = loop.time() + self.interval
                try:
                    apps += [a for a in await self.state.apps() if a not in apps]
                except BrokerUnavailable as exc:
                    self._failed(exc)
                self._report()
            for app in apps:
                try:
                    await self.visit(app)
                except BrokerUnavailable as exc:
                    self._failed(exc)
                except Exception:  # the loop every presence change depends on must not die
                    log.exception("presence sweep of app %s failed", app)

    async def visit(self, app: str) -> None:
        sweep = await self.state.sweep(app, time.time())
        if self._failing:
            self._failing = False
            log.info("presence sweeps work again")
        if sweep.changes:
            self.metrics.presence_changes.labels(Change.OFFLINE.value).inc(sweep.changes)
        self.dropped(sweep.dropped)
        if sweep.next_due is not None:
            self.at(app, sweep.next_due)
        self._backlog[app] = (sweep.depth, sweep.oldest)
        if self.deliverer is not None and sweep.depth:
            await self.deliverer.claim(app)
        if sweep.more:
            self.kick(app)

    def dropped(self, n: int) -> None:
        if n:
            self.metrics.webhooks_failed.labels("queue_full").inc(n)
            log.warning("webhook queue full (WEBHOOK_QUEUE_MAX): %d oldest undelivered events dropped", n)

    def _report(self) -> None:
        depth = sum(d for d, _ in self._backlog.values())
        oldest = min((o for _, o in self._backlog.values() if o is not None), default=None)
        self.metrics.webhook_queue_depth.set(depth)
        self.metrics.webhook_oldest_age.set(max(0.0, time.time() - oldest) if oldest is not None else 0.0)

    def _failed(self, exc: Exception) -> None:
        if not self._failing:
            self._failing = True
            log.warning("presence sweep failed (%s); retrying every %.0f s", exc, self.interval)
