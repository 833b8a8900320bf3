"""CI runs a seconds-long smoke of the load generator (docs/performance.md): every target produces its figures, a small
storm connects and resumes exactly, the Redis ceiling measures; plus the harness's pure parts."""

from __future__ import annotations

import pytest

from bench import smoke


@pytest.mark.slow
def test_bench_smoke_produces_figures() -> None:
    from bench.server import nchan_missing

    result = smoke.run(timeout=150)
    assert result["ok"], f"{result['problems']}\n{result['log'][-2000:]}"
    assert result["exit_code"] == 0
    assert result["ratio_ours_to_baseline"] is not None
    resume = result["storm"]["resume"]["targets"]
    ours = resume["ours"]
    # every resumed stream got exactly the events it missed (1 or 2 of 3), then the live probe
    assert ours["verify"]["exact"] == ours["storm"]["streams"] == 200
    assert ours["verify"]["missed_events"] == sum(3 - (1 + i % 2) for i in range(200))
    assert ours["verify"]["lost_events"] == ours["verify"]["doubled_events"] == 0
    assert [m["ok"] > 0 for m in result["ceiling"]["modes"]] == [True, True, True]
    if nchan_missing() is None:
        assert resume["nchan"]["verify"]["exact"] == 200
        assert "ours/nchan" in result["storm"]["fresh"]["ratios"]
        assert "checks NO JWT" in result["log"]
    else:
        assert "nchan NOT RUN" in result["log"]


def test_count_only_client_counts_events_split_across_reads() -> None:
    """`--count-only`: events are counted by their `id: ` line, also when a read ends inside one."""
    import asyncio

    from bench.sse_client import SSEStream, Stats

    loop = asyncio.new_event_loop()
    try:
        stats = Stats()
        ready: asyncio.Future[None] = loop.create_future()
        s = SSEStream(stats, b"", ready, count_only=True)
        s.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n19\r\nretry: 3000\n: connected\n\n\r\n")
        wire = b"".join(b"%x\r\nid: %d\nevent: t\ndata: {}\n\n\r\n" % (18 + len(str(i)), i) for i in range(100))
        ping = b"event: ping\ndata: {}\n\n"
        wire += b"%x\r\n" % len(ping) + ping + b"\r\n"
        for i in range(0, len(wire), 7):  # every split point, id lines included
            s.data_received(wire[i:i + 7])
        assert ready.done() and stats.delivered == 100
    finally:
        loop.close()


def test_profile_buckets_follow_the_innermost_marker() -> None:
    """A sample in redis-py under registry.admit is registry admission; logging under the handler is log lines;
    a sample with no marker goes to its innermost framework's package."""
    from bench.profile import bucket

    def st(*frames: str) -> list[tuple[str, str, str]]:
        return [(f, path, "1") for f, path in (x.split("@") for x in frames)]

    handler = ("handle_request@/v/site-packages/quart/app.py", "sse@/w/blueprints/stream.py")
    redis_call = "execute@/v/site-packages/redis/client.py"
    assert bucket(st(*handler, "RedisRegistry.admit@/w/quart_sse/registry.py", redis_call)) == "registry admission"
    assert bucket(st(*handler, "Hub.attach@quart_sse/hub.py", redis_call)) == "subscription (hub.attach, pub/sub)"
    assert bucket(st(*handler, "gc_collect_main@libpython3.11.so")) == "GC"
    assert bucket(st(*handler, "info@/usr/lib/python3.11/logging/__init__.py")) == "log lines"
    assert bucket(st(*handler, "authenticate@/w/quart_sse/auth.py", "new@/usr/lib/python3.11/hmac.py")) \
        == "token verification"
    assert bucket(st("run@/v/site-packages/hypercorn/asyncio/tcp_server.py", "send@/v/site-packages/h11/_conn.py")) \
        == "Hypercorn / h11"
    assert bucket(st(*handler, "uuid4@/usr/lib/python3.11/uuid.py")) \
        == "our code, other (stream handler, hand-off, hub)"


def test_nchan_conf_renders_every_placeholder() -> None:
    from pathlib import Path

    from bench.server import render_nchan_conf

    conf = render_nchan_conf(Path("/tmp/x"), 12345, ping_interval=15, backlog=2048, history=1000, nofile=20000)
    assert "@" not in conf.replace("@NAME@", "")
    assert "listen 127.0.0.1:12345 backlog=2048;" in conf
    assert "nchan_channel_id $http_x_bench_user _broadcast;" in conf
    assert "worker_processes 1;" in conf


def test_storm_resume_points_and_kernel_counters() -> None:
    from bench.storm import NETSTAT_KEYS, netstat, stop_after

    assert [stop_after(i, 4) for i in range(7)] == [1, 2, 3, 1, 2, 3, 1]  # every stream misses 1..3 of 4
    counters = netstat()
    assert set(counters) == set(NETSTAT_KEYS) and all(v >= 0 for v in counters.values())
