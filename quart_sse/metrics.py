"""Prometheus metrics, one registry per app instance (tests build many apps in one process).

With WORKERS > 1 the server sets PROMETHEUS_MULTIPROC_DIR before the workers import prometheus_client, so every
worker writes its values to shared files and whichever worker answers /metrics reports the sum of all of them.

Every label value of a labelled metric is an enum member below, and each has its sample, at 0, from start-up: a
labelled series that does not exist yet is not 0 but missing, so a fresh instance's dashboards and `rate()` /
`increase()` would show nothing (and miss the first increment) until it happened once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from enum import Enum, StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from .adapter import StreamPath
from .presence.model import Change
from .presence.webhooks import FailReason, RetryReason
from .stream import RefusalReason


class PublishKind(StrEnum):
    """`sse_publishes_total{kind}`: whom a publish through this instance was for."""

    USER = "user"  # POST /publish/{app}/{user}
    BROADCAST = "broadcast"  # POST /publish/{app}


def init_labels(metric: Counter | Gauge, values: Iterable[Enum]) -> None:
    """A sample at 0 for each known label value (`labels()` without a change creates the child at 0)."""
    for value in values:
        metric.labels(value.value)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.streams_open = Gauge("sse_streams_open", "Streams open (all workers of this instance)", registry=r,
                                  multiprocess_mode="livesum")
        self.streams_opened = Counter("sse_streams_opened", "Streams opened", registry=r)
        self.stream_path = Gauge(
            "sse_stream_path", "1 for the path HTTP/1.x streams take on this instance: handed_off (the stream owns "
            "its connection) or generator (Quart's response generator holds it)", ["path"], registry=r,
            multiprocess_mode="max")
        self.handoffs = Counter("sse_stream_handoffs", "Streams that took their connection over from the server",
                                registry=r)
        self.streams_refused = Counter("sse_streams_refused", "Streams refused, by reason", ["reason"], registry=r)
        self.events_delivered = Counter("sse_events_delivered", "Events handed to local streams", registry=r)
        self.events_dropped = Counter("sse_events_dropped", "Malformed pub/sub messages dropped", registry=r)
        self.slow_disconnects = Counter("sse_slow_consumer_disconnects",
                                        "Streams closed because their client could not keep up", registry=r)
        self.publishes = Counter("sse_publishes", "Events published through this instance", ["kind"], registry=r)
        self.publish_seconds = Histogram("sse_publish_duration_seconds", "Publish round trip (history + live)",
                                         registry=r, buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .5, 1))
        # children bound once, not looked up per request
        self.published_user = self.publishes.labels(PublishKind.USER.value)
        self.published_broadcast = self.publishes.labels(PublishKind.BROADCAST.value)
        self.publish_duplicates = Counter(
            "sse_publish_duplicates", "Events not published again: their id was already published on the channel "
            "within HISTORY_TTL (a retried publish)", registry=r)
        self.publish_batches = Counter("sse_publish_batches", "Batch publish requests accepted", registry=r)
        self.publish_batch_seconds = Histogram(
            "sse_publish_batch_duration_seconds", "Batch publish round trip (every event's history + live)",
            registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
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
        init_labels(self.presence_changes, Change)
        init_labels(self.webhooks_sent, Change)
        init_labels(self.webhooks_retried, RetryReason)
        init_labels(self.webhooks_failed, FailReason)
        init_labels(self.streams_refused, RefusalReason)
        init_labels(self.stream_path, StreamPath)
        init_labels(self.publishes, PublishKind)

    def render(self) -> tuple[bytes, str]:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
