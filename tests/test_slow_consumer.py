"""Slow consumer (docs/operations.md, section 2): clients that stop reading while others receive a high rate.

The service runs as a real process (quart_sse.server, whose connection handler records each transport so that a
stalled one can be aborted). The stalled clients are raw sockets with a 4 KiB receive buffer that never recv().
Each is cut off once its queue passes QUEUE_MAX_EVENTS / QUEUE_MAX_BYTES, with a log line and the metric
sse_slow_consumer_disconnects; the service's memory stays flat and the reading clients' p99 latency does not move.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import httpx
import pytest

from quart_sse.events import PING, Message
from quart_sse.registry import ConnRecord
from quart_sse.services import Services
from quart_sse.stream import CloseReason, Stream
from tests.support import RawStream, ServiceProcess, auth, free_port, make_settings, open_stream, token
from tests.support_faults import StalledClient, metric, p99, rss_mib, until

SETTINGS = make_settings()
APP = "feed"
READERS = 10
STALLED = 4
PAD = "x" * 8000  # ~8 KiB per event: the stalled sockets fill within a second or two
QUEUE_MAX_EVENTS = 1000
QUEUE_MAX_BYTES = 128 * 1024


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    # a short history: 1,000 events of 8 KiB (the default) would fill up during the test and blur the RSS figures
    env = {"QUEUE_MAX_EVENTS": str(QUEUE_MAX_EVENTS), "QUEUE_MAX_BYTES": str(QUEUE_MAX_BYTES), "PING_INTERVAL": "5",
           "HISTORY_SIZE": "50"}
    proc = ServiceProcess(free_port(), env, tmp_path / "svc.log")
    try:
        await proc.wait_ready()
        yield proc
    finally:
        proc.stop()


class Latencies:
    """Per reader: publish-to-receive seconds of every event, stamped with the phase it was published in."""

    def __init__(self) -> None:
        self.by_phase: dict[str, list[float]] = {}
        self.received = 0
        self.raw: list[tuple[float, float]] = []

    async def read(self, st: RawStream) -> None:
        while True:
            ev = await st.next_event(timeout=30)
            if ev is None:
                return
            now = time.time()
            body = ev.json()
            self.by_phase.setdefault(body["phase"], []).append(now - body["t"])
            self.raw.append((body["t"], now - body["t"]))
            self.received += 1


@pytest.mark.slow
async def test_stalled_clients_are_cut_off_without_hurting_the_others(service: ServiceProcess) -> None:
    pub = auth(token(SETTINGS, "backend", APP, "publish"))
    ops = auth(token(SETTINGS, "ops", APP, "connections"))
    phase = "warmup"
    lat = Latencies()
    readers = [await open_stream(service.port, headers=auth(token(SETTINGS, f"r{i}", APP))) for i in range(READERS)]
    read_tasks = [asyncio.create_task(lat.read(st)) for st in readers]
    stalled: list[StalledClient] = []
    sent = 0
    frame = len(PAD) + 80  # bytes of one event on the wire, about

    async def publisher(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while True:  # as fast as one sequential publisher goes on a shared machine
            r = await http.post(f"/publish/{APP}", json={"type": "tick", "data": {"t": time.time(), "phase": phase,
                                                                                  "pad": PAD}}, headers=pub)
            assert r.status_code == 202, r.text
            sent += 1
            await asyncio.sleep(0.004)

    async with httpx.AsyncClient(base_url=service.url, timeout=10) as http:
        async def slow_listed() -> int:
            listing = (await http.get(f"/connections/{APP}", headers=ops)).json()
            return sum(1 for u in listing if u.startswith("slow"))

        async def cut_off(n: int) -> bool:
            return await metric(http, "sse_slow_consumer_disconnects") >= n

        pub_task = asyncio.create_task(publisher(http))
        try:
            await asyncio.sleep(1.0)
            assert await slow_listed() == 0 and await metric(http, "sse_slow_consumer_disconnects") == 0
            phase = "calm"
            t0, sent0 = time.monotonic(), sent
            await asyncio.sleep(3.0)
            rate = (sent - sent0) / (time.monotonic() - t0)
            rss = [rss_mib(service.proc.pid)]
            cuts: list[float] = []
            absorbed: list[float] = []
            for rnd in range(2):  # twice: memory taken by the first round must not grow in the second
                phase = "stalled"
                sent0 = sent
                for i in range(STALLED):
                    stalled.append(StalledClient(service.port, token(SETTINGS, f"slow{rnd}-{i}", APP)))
                await until(lambda: _gt(slow_listed(), 0), 5, 0.05)
                cuts.append(await until(lambda n=STALLED * (rnd + 1): cut_off(n), 15, 0.1))  # type: ignore[misc]
                absorbed.append((sent - sent0) * frame / 1024)  # KiB sent to each stalled stream before its cut
                await until(lambda: _eq(slow_listed(), 0), 3, 0.1)  # really freed: its registry entry is gone
                await asyncio.sleep(1.0)  # the readers go on under the same load
                rss.append(rss_mib(service.proc.pid))
            phase = "after"
            await asyncio.sleep(0.3)
        finally:
            pub_task.cancel()
            await asyncio.gather(pub_task, return_exceptions=True)
        assert (await http.get("/health")).status_code == 200

    try:
        await until(lambda: lat.received >= (sent - 2) * READERS, 5)  # the readers got everything
        for t in read_tasks:
            t.cancel()
        await asyncio.gather(*read_tasks, return_exceptions=True)
        assert all(s.is_reset() for s in stalled), "a stalled client's connection was not cut"
    finally:
        for s in stalled:
            s.close()
        for st in readers:
            await st.close()

    log = service.log()
    assert log.count("slow consumer disconnected") == 2 * STALLED, log[-3000:]
    assert "(connection aborted)" in log and "Traceback" not in log
    calm, stall = lat.by_phase["calm"], lat.by_phase["stalled"]
    p99_calm, p99_stall = p99(calm), p99(stall)
    print(f"\nslow consumer: {rate:.0f} events/s x {frame / 1024:.1f} KiB to {READERS} readers, {STALLED} stalled "
          f"clients twice; cut after {cuts[0]:.2f} / {cuts[1]:.2f} s, each having been sent ~{max(absorbed):.0f} KiB; "
          f"reader p99 {p99_calm * 1000:.1f} ms calm vs {p99_stall * 1000:.1f} ms with stalled clients "
          f"(n={len(calm)}/{len(stall)}); service RSS {rss[0]:.1f} -> {rss[1]:.1f} -> {rss[2]:.1f} MiB")
    assert p99_stall < max(3 * p99_calm, p99_calm + 0.05), (p99_calm, p99_stall)
    # bounded: kernel (SO_SNDBUF 64 KiB, doubled) + transport (64 KiB) + queue (128 KiB) + the client's window,
    # not the megabytes an autotuned socket would absorb
    assert max(absorbed) < 1024, absorbed
    assert rss[1] - rss[0] < 5 and rss[2] - rss[1] < 2, rss


async def _gt(x: Awaitable[int], n: int) -> bool:
    return await x > n


async def _eq(x: Awaitable[int], n: int) -> bool:
    return await x == n


# ------------------------------------------------------------------------------------------------ the bound itself
def _msg(n: int, size: int = 10) -> Message:
    return Message.build(f"{n}-1", "t", b'"' + b"x" * size + b'"', (n, 1))


@pytest.mark.parametrize(("max_events", "max_bytes", "size"), [(3, 1 << 20, 10), (1000, 1024, 400)])
def test_a_buffer_over_either_bound_closes_the_stream(max_events: int, max_bytes: int, size: int) -> None:
    sub = Stream(ConnRecord("c", "a", "u", ""), ("ch",), max_events=max_events, max_bytes=max_bytes)
    n = 0
    while not sub.closed:
        sub.push(_msg(n, size))
        n += 1
        assert n <= max_events + 1 and (n - 1) * (size + 30) <= max_bytes + size + 30
    assert sub.reason is CloseReason.SLOW_CONSUMER
    assert not sub.pending() and sub.drain() == b""  # the queue is let go at once
    sub.push(_msg(n))  # nothing more is taken
    assert not sub.pending()


def test_held_stream_sends_pings_and_keeps_positioned_events_back() -> None:
    sub = Stream(ConnRecord("c", "a", "u", ""), ("ch",))
    sub.last_pos = (1, 1)
    sub.hold()
    sub.push(_msg(5))
    assert not sub.pending()
    sub.push(PING)
    assert sub.pending() and sub.drain() == PING.frame and sub.last_pos == (1, 1)
    for m in (_msg(3), _msg(5), _msg(4)):  # what the resync found missing, one of them also received live
        sub.push(m)
    sub.reorder()
    sub.release()
    assert sub.drain() == b"".join(_msg(n).frame for n in (3, 4, 5)) and sub.last_pos == (5, 1)


async def test_slow_consumer_close_aborts_its_connection() -> None:
    """A slow consumer's transport is aborted (Stream.close): closing would wait forever on its send buffer."""
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def on_conn(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put(w)

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    server_side = await accepted.get()
    svc = Services(make_settings())
    sub = Stream(ConnRecord("c", "a", "u", ""), ("ch",), services=svc, max_events=1)
    sub.sink = server_side.transport  # type: ignore[assignment]
    try:
        sub.push(_msg(1))
        sub.push(_msg(2))
        assert sub.reason is CloseReason.SLOW_CONSUMER and server_side.transport.is_closing()
        with contextlib.suppress(ConnectionResetError):  # the client sees its connection end (FIN or RST)
            assert await asyncio.wait_for(reader.read(), 2) == b""
        assert svc.metrics.slow_disconnects._value.get() == 1
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        server_side.close()
        server.close()
        await server.wait_closed()
