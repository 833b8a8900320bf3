"""Prometheus metrics, one registry per app instance (tests build many apps in one process).

With WORKERS > 1 the server sets PROMETHEUS_MULTIPROC_DIR before the workers import prometheus_client, so every
worker writes its values to shared files and whichever worker answers /metrics reports the sum of all of them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.streams_open = Gauge("sse_streams_open", "Streams open (all workers of this instance)", registry=r,
                                  multiprocess_mode="livesum")
        self.streams_opened = Counter("sse_streams_opened", "Streams opened", registry=r)
        self.streams_refused = Counter("sse_streams_refused", "Streams refused, by reason", ["reason"], registry=r)
        self.events_delivered = Counter("sse_events_delivered", "Events handed to local streams", registry=r)
        self.events_dropped = Counter("sse_events_dropped", "Malformed pub/sub messages dropped", registry=r)
        self.slow_disconnects = Counter("sse_slow_consumer_disconnects",
                                        "Streams closed because their client could not keep up", registry=r)
        self.publishes = Counter("sse_publishes", "Events published through this instance", ["kind"], registry=r)
        self.publish_seconds = Histogram("sse_publish_duration_seconds", "Publish round trip (history + live)",
                                         registry=r, buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .5, 1))
        self.delivery_seconds = Histogram(
            "sse_delivery_latency_seconds", "From publish (history position time) to hand-over to local streams",
            registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.redis_reconnects = Counter("sse_redis_reconnects", "Pub/sub link re-established", registry=r)
        self.replays = Counter("sse_history_replays", "Streams resumed from history", registry=r)
        self.resets = Counter("sse_history_resets", "Streams told to reset: history could not cover the gap",
                              registry=r)
        # presence and its webhooks (docs/presence.md)
        self.presence_changes = Counter("sse_presence_changes", "Presence changes this instance decided, by type",
                                        ["type"], registry=r)
        self.webhooks_sent = Counter("sse_webhooks_sent", "Webhook events the receiver accepted (2xx), by type",
                                     ["type"], registry=r)
        self.webhooks_retried = Counter(
            "sse_webhooks_retried", "Webhook attempts that failed and will be retried, by reason "
            "(status: 5xx/408/429, timeout, connection)", ["reason"], registry=r)
        self.webhooks_failed = Counter(
            "sse_webhooks_failed", "Webhook events given up, by reason (rejected: the receiver answered another "
            "4xx or a 3xx; queue_full: dropped, oldest first, at WEBHOOK_QUEUE_MAX)", ["reason"], registry=r)
        self.webhook_queue_depth = Gauge(
            "sse_webhook_queue_depth", "Webhook events waiting for delivery, all apps, cluster-wide (as this "
            "instance last saw it: take the max across instances, not the sum)", registry=r, multiprocess_mode="max")
        self.webhook_oldest_age = Gauge(
            "sse_webhook_oldest_age_seconds", "Age of the oldest undelivered webhook event, cluster-wide (0: none)",
            registry=r, multiprocess_mode="max")
        self.webhook_delay = Histogram(
            "sse_webhook_delay_seconds", "From a presence change (the event's `at`) to the receiver's 2xx; an offline "
            "includes PRESENCE_GRACE", registry=r, buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 3600))
        for change in ("user.online", "user.offline"):  # every series from the start, at 0
            self.presence_changes.labels(change)
            self.webhooks_sent.labels(change)
        for reason in ("status", "timeout", "connection"):
            self.webhooks_retried.labels(reason)
        for reason in ("rejected", "queue_full"):
            self.webhooks_failed.labels(reason)

    def render(self) -> tuple[bytes, str]:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
