"""WORKERS=2: two processes share one port and behave as one service; /metrics sums both workers."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import (
    RedisServer,
    ServiceProcess,
    auth,
    free_port,
    make_settings,
    metric_value,
    open_stream,
    service_env,
    token,
)

pytestmark = pytest.mark.slow
SETTINGS = make_settings()


async def test_two_workers_one_service(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    svc = ServiceProcess(free_port(), {"REDIS_URL": redis.url, "WORKERS": "2"}, tmp_path / "svc.log")
    streams = []
    try:
        await svc.wait_ready()
        instances: set[str] = set()
        for _ in range(40):  # a new connection each time: the kernel spreads them over both workers
            async with httpx.AsyncClient(base_url=svc.url) as c:
                instances.add((await c.get("/ready")).json()["instance"])
            if len(instances) == 2:
                break
        assert len(instances) == 2, "both workers should answer"
        streams = [await open_stream(svc.port, headers=auth(token(SETTINGS, "alice", "shop"))) for _ in range(8)]
        assert all(s.status == 200 for s in streams)
        async with httpx.AsyncClient(base_url=svc.url) as c:
            r = await c.post("/publish/shop/alice", json={"type": "t", "data": 1},
                             headers=auth(token(SETTINGS, "b", "shop", "publish")))
            assert r.status_code == 202
            for s in streams:  # whichever worker holds it
                ev = await s.next_event()
                assert ev is not None and ev.id == r.json()["id"]
            metrics = (await c.get("/metrics")).text
            assert metric_value(metrics, "sse_streams_open") == 8  # both workers' streams, from either worker
            assert metric_value(metrics, "sse_events_delivered_total") == 8
        for s in streams:
            await s.close()
        streams = []
        async with httpx.AsyncClient(base_url=svc.url) as c:
            for _ in range(100):
                if metric_value((await c.get("/metrics")).text, "sse_streams_open") == 0:
                    break
                await asyncio.sleep(0.05)
            assert metric_value((await c.get("/metrics")).text, "sse_streams_open") == 0
        assert svc.stop() == 0
        assert "Traceback" not in svc.log()
    finally:
        for s in streams:
            await s.close()
        svc.stop()
        redis.stop()


def test_a_worker_that_fails_at_start_up_logs_its_traceback(tmp_path: Path) -> None:
    """WORKERS=2 and each worker's app factory raises: both tracebacks are logged and the service exits 1 (it used
    to exit 1 without a word: os._exit skips the interpreter's own report)."""
    code = ("import sys, quart_sse.app as a\n"
            "def boom(*_args, **_kw):\n"
            "    raise RuntimeError('injected start-up failure')\n"
            "a.create_app = boom\n"
            "from quart_sse.__main__ import main\n"
            "sys.exit(main(['serve']))\n")
    port = free_port()
    proc = subprocess.run([sys.executable, "-c", code], env=service_env({"APP_PORT": str(port), "WORKERS": "2",
                                                                  "REDIS_URL": "redis://127.0.0.1:1/0"}),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    failed = re.findall(r"worker (\d+) failed", out)
    exited = re.findall(r"worker (\d+) exited with code 1", out)
    assert len(set(failed)) == 2 and set(failed) == set(exited), out
    assert out.count("Traceback (most recent call last)") == 2, out
    assert out.count("RuntimeError: injected start-up failure") == 2, out
