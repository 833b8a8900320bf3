"""CI runs a seconds-long smoke of the load generator (issue 6): both targets produce their figures."""

from __future__ import annotations

import pytest

from bench import smoke

pytestmark = pytest.mark.slow


def test_bench_smoke_produces_figures() -> None:
    result = smoke.run(timeout=90)
    assert result["ok"], f"{result['problems']}\n{result['log'][-2000:]}"
    assert result["exit_code"] == 0
    assert result["ratio_ours_to_baseline"] is not None


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
