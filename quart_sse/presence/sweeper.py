"""Every instance's presence loop: sweeps apps (offlines due, users whose instance died) and leases their queued
events for delivery.

An app is swept (SWEEP_LUA, then a claim when events wait)
- when the next thing can happen in it: the offline this instance scheduled falls due, or the earliest stream
  expiry passes (a dead instance's users), as the last sweep reported it, or a lease that held an event back runs
  out, as the last claim reported it (timers: each to within milliseconds, not to within a tick);
- every SWEEP_INTERVAL seconds, every app in the index, on every instance, as a fallback (changes another instance
  scheduled and could not carry out). No leader: each sweep is one atomic script whose effects do not depend on
  who runs it or how often.
An app's events are claimed without a sweep when this instance queued one (an admission made a user online) or
acknowledged one (the user's next event can go).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

from ..broker.base import BrokerUnavailable
from ..metrics import Metrics
from ..tasks import cancel_and_wait, raise_if_cancelling
from .delivery import Deliverer
from .model import Change
from .state import PresenceState
from .webhooks import FailReason

log = logging.getLogger("quart_sse.presence")

#: Seconds between two visits of every app by one instance: the delay with which a dead instance's users are
#: found once their streams expired, and the fallback for an offline whose instance died during the grace.
SWEEP_INTERVAL = 1.0
#: The shortest pause before a timed sweep.
MIN_PAUSE = 0.05


class Sweeper:
    def __init__(self, state: PresenceState, deliverer: Deliverer | None, metrics: Metrics,
                 interval: float = SWEEP_INTERVAL) -> None:
        self.state = state
        self.deliverer = deliverer
        self.metrics = metrics
        self.interval = interval
        self._kicked: dict[str, bool] = {}  # apps to visit next, in order -> sweep too (else claim only)
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

    def kick(self, app: str, *, sweep: bool = True) -> None:
        """Visit `app` as soon as the loop is free (`sweep`: sweep it, else only claim its events)."""
        self._kicked[app] = sweep or self._kicked.get(app, False)
        self._wake.set()

    def at(self, app: str, when: float) -> None:
        """Sweep `app` at Unix time `when` (one timer per app: the earliest; each sweep sets the next)."""
        current = self._timers.get(app)
        if current is not None and current[0] <= when:
            return
        if current is not None:
            current[1].cancel()
        loop = asyncio.get_running_loop()
        # never sooner than MIN_PAUSE from now: a state that keeps saying "now" must not spin this loop. An empty
        # context: this is often called from a stream's release, and a timer keeps the context it was made in
        # (Quart's request objects) until it fires
        handle = loop.call_later(max(MIN_PAUSE, when - time.time() + 0.002), self._fire, app,
                                 context=contextvars.Context())
        self._timers[app] = (when, handle)

    def _fire(self, app: str) -> None:
        self._timers.pop(app, None)
        self.kick(app)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            raise_if_cancelling()
            if not self._kicked:
                tick = loop.call_at(next_tick, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    tick.cancel()
            self._wake.clear()
            apps, self._kicked = self._kicked, {}
            if loop.time() >= next_tick:
                next_tick = loop.time() + self.interval
                try:
                    apps.update(dict.fromkeys(await self.state.apps(), True))
                except BrokerUnavailable as exc:
                    self._failed(exc)
                raise_if_cancelling()
                self._report()
            for app, sweep in apps.items():
                try:
                    await self.visit(app, sweep=sweep)
                except BrokerUnavailable as exc:
                    self._failed(exc)
                except Exception:  # the loop every presence change depends on must not die
                    log.exception("presence sweep of app %s failed", app)
                raise_if_cancelling()

    async def visit(self, app: str, *, sweep: bool = True) -> None:
        waiting = True
        if sweep:
            swept = await self.state.sweep(app, time.time())
            if self._failing:
                self._failing = False
                log.info("presence sweeps work again")
            if swept.changes:
                self.metrics.presence_changes.labels(Change.OFFLINE.value).inc(swept.changes)
            self.dropped(swept.dropped)
            if swept.next_visit is not None:
                self.at(app, swept.next_visit)
            self._backlog[app] = (swept.depth, swept.oldest)
            waiting = swept.depth > 0
            if swept.more:
                self.kick(app)
        if self.deliverer is not None and waiting:
            held_until = await self.deliverer.claim(app)
            if held_until is not None:
                self.at(app, held_until)

    def dropped(self, n: int) -> None:
        if n:
            self.metrics.webhooks_failed.labels(FailReason.QUEUE_FULL.value).inc(n)
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
