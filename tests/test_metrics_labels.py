"""Labelled metrics have a sample for every known label value at 0 from start-up (docs/operations.md: metrics): a
series that does not exist yet is missing, not 0, so a fresh instance's dashboards and `rate()` showed nothing.

Checked on the registry (every metric family has samples: a labelled metric added later without its values
initialised fails here), over real HTTP on one process, and with WORKERS=2 (prometheus_client's multiprocess
files, summed by whichever worker answers).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from quart_sse.adapter import StreamPath
from quart_sse.metrics import Metrics, PublishKind
from quart_sse.presence.model import Change
from quart_sse.presence.webhooks import FailReason, RetryReason
from quart_sse.stream import RefusalReason
from tests.support import ServiceProcess, free_port, live_server, make_settings
from tests.support import metric_value as metric

#: every labelled metric and the enum its label values come from
LABELLED: dict[str, tuple[str, type[Enum]]] = {
    "sse_publishes_total": ("kind", PublishKind),
    "sse_streams_refused_total": ("reason", RefusalReason),
    "sse_presence_changes_total": ("type", Change),
    "sse_webhooks_sent_total": ("type", Change),
    "sse_webhooks_retried_total": ("reason", RetryReason),
    "sse_webhooks_failed_total": ("reason", FailReason),
}


def _assert_every_label_at_zero(text: str, serving: bool = True) -> None:
    for name, (label, values) in LABELLED.items():
        for value in values:
            assert metric(text, f'{name}{{{label}="{value.value}"}}') == 0, (name, value)
    # the path streams take: both values there, exactly one of them 1 once the instance serves
    paths = [metric(text, f'sse_stream_path{{path="{p.value}"}}') for p in StreamPath]
    assert sorted(paths) == ([0, 1] if serving else [0, 0]), paths


def test_label_values_are_the_documented_ones() -> None:
    assert [v.value for v in PublishKind] == ["user", "broadcast"]
    assert [v.value for v in RefusalReason] == ["unavailable", "too_many_connections", "instance_full",
                                               "shutting_down"]
    assert [v.value for v in StreamPath] == ["handed_off", "generator"]


def test_every_metric_family_has_samples_from_the_start() -> None:
    """No family without a sample: a labelled metric whose values are not initialised would show up empty."""
    body, _ = Metrics().render()
    families = list(text_string_to_metric_families(body.decode()))
    assert families
    empty = [f.name for f in families if not f.samples]
    assert empty == []
    labelled = {f.name for f in families if not f.name.endswith("_created")  # the text format's companions
                for s in f.samples if s.labels and not s.name.endswith("_bucket")}
    assert labelled == {"sse_publishes", "sse_streams_refused", "sse_stream_path", "sse_presence_changes",
                        "sse_webhooks_sent", "sse_webhooks_retried", "sse_webhooks_failed"}, \
        "a new labelled metric: add it to LABELLED"
    _assert_every_label_at_zero(body.decode(), serving=False)


async def test_fresh_instance_serves_zero_samples() -> None:
    async with live_server(make_settings()) as srv, httpx.AsyncClient(base_url=srv.url) as c:
        text = (await c.get("/metrics")).text
    _assert_every_label_at_zero(text)


async def test_fresh_multi_worker_instance_serves_zero_samples(redis_url: str, tmp_path: Path) -> None:
    svc = ServiceProcess(free_port(), {"WORKERS": "2", "REDIS_URL": redis_url}, tmp_path / "svc.log")
    try:
        await svc.wait_ready()
        async with httpx.AsyncClient(base_url=svc.url) as c:
            for _ in range(4):  # whichever worker answers, every label is there
                _assert_every_label_at_zero((await c.get("/metrics")).text)
    finally:
        assert svc.stop() == 0, svc.log()
