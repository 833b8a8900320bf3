"""Helpers for the fault-injection tests (docs/operations.md): polling, metrics, process memory, stalled sockets,
Redis state."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import socket
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx
import psutil
import redis

from quart_sse import keys


async def until(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, step: float = 0.02) -> float:
    """Poll `cond` (sync or async) until it holds; returns the seconds it took. Fails the test at the deadline."""
    t0 = time.monotonic()
    while True:
        got = cond()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s: {getattr(cond, '__name__', cond)}")
        await asyncio.sleep(step)


async def metric(http: httpx.AsyncClient, name: str) -> float:
    """One sample of the service's /metrics (counters: the `_total` sample); 0 when absent.

    Takes a client: a new httpx client builds an SSL context, ~20 ms of CPU that would show up in latencies.
    """
    text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith((name + " ", name + "_total ")):
            return float(line.split()[-1])
    return 0.0


def rss_mib(pid: int | None = None) -> float:
    """Resident memory of a process (this one by default), in MiB."""
    return float(psutil.Process(pid).memory_info().rss) / (1 << 20)


def settled_rss_mib() -> float:
    gc.collect()
    return rss_mib()


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def app_tasks() -> int:
    """Live asyncio tasks of this loop other than the running test's own."""
    me = asyncio.current_task()
    return sum(1 for t in asyncio.all_tasks() if t is not me and not t.done())


def app_task_names() -> list[str]:
    """What app_tasks() counts, by coroutine (for an assertion's message)."""
    me = asyncio.current_task()
    return sorted(getattr(t.get_coro(), "__qualname__", repr(t.get_coro())) for t in asyncio.all_tasks()
                  if t is not me and not t.done())


class StalledClient:
    """Opens a stream over a raw socket with a tiny receive buffer and then never calls recv()."""

    def __init__(self, port: int, tok: str, rcvbuf: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: bounds the window
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET /sse HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {tok}\r\n\r\n".encode())

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def is_reset(self) -> bool:
        """After the test: drain what the kernel holds; True when the server aborted (RST) or closed it."""
        self.sock.settimeout(2)
        try:
            while self.sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def read_to_end(self, timeout: float) -> bytes:
        """Start reading at last: everything until the server closes the connection (or `timeout` s of silence)."""
        self.sock.settimeout(timeout)
        got = bytearray()
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(1 << 16):
                got += chunk
        return bytes(got)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ------------------------------------------------------------------------------------------------ Redis state
def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2)


def client_count(r: redis.Redis) -> int:
    """Connections on the Redis other than the asking one (CLIENT LIST)."""
    me = r.client_id()
    return sum(1 for c in r.client_list() if int(c["id"]) != me)


def pubsub_channels(r: redis.Redis) -> set[str]:
    return {c.decode() if isinstance(c, bytes) else c for c in r.pubsub_channels()}


def registry_keys(r: redis.Redis, app: str) -> list[str]:
    """Registry entries of `app`: the per-user and per-app sets and the seed's client hashes."""
    found = [k.decode() for k in r.scan_iter(match=f"sse:{{{app}}}:u:*")]
    found += [k.decode() for k in r.scan_iter(match=keys.seed_client_hash(app, "*"))]
    if r.exists(keys.app_conns_key(app)):
        found.append(keys.app_conns_key(app))
    return found


def control_channels(r: redis.Redis) -> set[str]:
    return {c for c in pubsub_channels(r) if c == keys.CONTROL_CHANNEL or c.startswith("sse:reply:")}
