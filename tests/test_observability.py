"""Metrics and logs as an operator sees them: Prometheus names that move, JSON log lines in production."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.support import ServiceProcess, auth, free_port, make_settings, open_stream, token
from tests.support import metric_value as metric

SETTINGS = make_settings()


async def test_metrics_and_production_json_logs(tmp_path: Path) -> None:
    svc = ServiceProcess(free_port(), {"APP_MODE": "production"}, tmp_path / "svc.log")
    try:
        await svc.wait_ready()
        tok = token(SETTINGS, "alice", "shop")
        st = await open_stream(svc.port, f"/sse?token={tok}")
        async with httpx.AsyncClient(base_url=svc.url) as c:
            pub = auth(token(SETTINGS, "backend", "shop", "publish"))
            first = (await c.post("/publish/shop/alice", json={"type": "t", "data": 1}, headers=pub)).json()["id"]
            assert (await st.next_event()) is not None
            await c.post("/publish/shop", json={"type": "news", "data": 2}, headers=pub)
            assert (await st.next_event()) is not None
            resumed = await open_stream(svc.port, headers={**auth(tok), "Last-Event-ID": first})  # a replay
            assert (await resumed.next_event()) is not None
            reset = await open_stream(svc.port, headers={**auth(tok), "Last-Event-ID": "nope"})  # a reset
            ev = await reset.next_event()
            assert ev is not None and ev.event == "reset"
            text = (await c.get("/metrics")).text
            assert metric(text, "sse_streams_open") == 3
            assert metric(text, "sse_streams_opened_total") == 3
            assert metric(text, "sse_events_delivered_total") == 2  # live: one user event, one broadcast, one stream
            assert metric(text, 'sse_publishes_total{kind="user"}') == 1
            assert metric(text, 'sse_publishes_total{kind="broadcast"}') == 1
            assert metric(text, "sse_history_replays_total") == 1
            assert metric(text, "sse_history_resets_total") == 1
            assert metric(text, "sse_delivery_latency_seconds_count") == 2  # once per message, not per stream
            assert "sse_slow_consumer_disconnects_total" in text and "sse_redis_reconnects_total" in text
            for s in (st, resumed, reset):
                await s.close()
    finally:
        svc.stop()
    lines = [line for line in svc.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    opened = [r for r in records if r["msg"].startswith("stream opened")]
    assert len(opened) == 3 and all(r.get("app") == "shop" and r.get("user") == "alice" and r.get("conn")
                                    for r in opened)
    access = [r for r in records if r["logger"] == "hypercorn.access"]
    assert access and any("/publish/shop/alice" in r["msg"] for r in access)
    assert all(tok not in line for line in lines), "a token reached the log"
    assert all("?token=" not in r["msg"] for r in access)
