"""`python -m bench ceiling`: how many publishes per second one Redis primary takes through the publish script.

An app's history and live channels share one hash slot on Redis Cluster (`{app}` in every key), so one app can
never go faster than one Redis primary runs `quart_sse.broker.redis.PUBLISH_LUA` (seq hash, XADD with `prev`,
XTRIM, PEXPIRE, PUBLISH). Measured on a Redis the harness starts (pinned with `--server-cpu`), its CPU read from
/proc, with one subscriber connection listening on every user's channel (like one instance of the service), in
these modes, each for `--duration` seconds:

- raw, one by one: one connection, each EVALSHA waits for its reply (what a synchronous caller gets);
- raw, pipelined: `--ceiling-conns` connections with `--ceiling-depth` EVALSHAs in flight each (Redis's limit);
- redis-py, one by one / concurrent: the service's own `quart_sse.publisher` (redis-py + hiredis), awaited one
  at a time, then 64 at a time from one process (what one app process can push);
- batch: the Publisher's batch API with `--batch N` events per call, when `quart_sse.publisher` has one (skipped
  with a message until then).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import time
from typing import Any

from bench.clients import CTX
from bench.redis_publish import publish_command, publish_many, publish_script, resp
from bench.server import LOOPBACK, Server, start_redis

HISTORY_SIZE, HISTORY_TTL = 1000, 3600  # the service's defaults
BATCH_NAMES = ("publish_many",)  # Publisher.publish_many(app, events) (docs/publishing.md)


def _subscribe_and_read(port: int, channels: list[str], cpu: str | None) -> None:
    """Child process: one connection subscribed to every channel, read and dropped until the parent kills us."""
    if cpu is not None:
        os.sched_setaffinity(0, {int(c) for c in cpu.split(",")})
    s = socket.create_connection((LOOPBACK, port))
    s.sendall(resp("SUBSCRIBE", *channels))
    while s.recv(1 << 20):
        pass


def _subscriber(port: int, channels: list[str], cpu: str | None) -> mp.process.BaseProcess:
    proc = CTX.Process(target=_subscribe_and_read, args=(port, channels, cpu), daemon=True,
                       name="bench-ceiling-subscriber")
    proc.start()
    time.sleep(0.5)  # subscribed before the first publish
    return proc


async def _raw(port: int, cmds: list[bytes], conns: int, depth: int, duration: float) -> dict[str, Any]:
    per = [cmds[i::conns] for i in range(conns)]
    t = await publish_many(LOOPBACK, port, per, depth, duration)
    lat = sorted(t.latencies)
    return {"ok": t.ok, "errors": t.errors, "seconds": t.seconds,
            "rtt_p50_ms": 1e3 * lat[len(lat) // 2] if lat else float("nan")}


async def _redis_py(port: int, users: list[str], concurrency: int, duration: float) -> dict[str, Any]:
    from quart_sse.publisher import connect

    ok, errors = 0, 0
    async with connect(f"redis://{LOOPBACK}:{port}/0", HISTORY_SIZE, HISTORY_TTL) as pub:
        until = time.monotonic() + duration
        t0 = time.monotonic()

        async def loop(i: int) -> None:
            nonlocal ok, errors
            n = i
            while time.monotonic() < until:
                try:
                    await pub.publish("bench", users[n % len(users)], "bench", {"t": time.time(), "seq": n})
                    ok += 1
                except Exception:  # noqa: BLE001 -- counted, the run goes on
                    errors += 1
                n += concurrency

        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        return {"ok": ok, "errors": {"error": errors} if errors else {}, "seconds": time.monotonic() - t0}


async def _redis_py_batch(port: int, users: list[str], batch: int, concurrency: int,
                          duration: float) -> dict[str, Any]:
    """`Publisher.publish_many(app, events)` with `batch` events (mappings shaped as the HTTP batch body's) per
    call, `concurrency` calls in flight; counts events."""
    from quart_sse.publisher import connect

    ok, errors = 0, 0
    async with connect(f"redis://{LOOPBACK}:{port}/0", HISTORY_SIZE, HISTORY_TTL) as pub:
        until = time.monotonic() + duration
        t0 = time.monotonic()

        async def loop(i: int) -> None:
            nonlocal ok, errors
            n = i * batch
            while time.monotonic() < until:
                events = [{"type": "bench", "data": {"t": time.time(), "seq": n + j},
                           "user": users[(n + j) % len(users)]} for j in range(batch)]
                try:
                    await pub.publish_many("bench", events)  # type: ignore[attr-defined]
                    ok += batch
                except Exception:  # noqa: BLE001 -- counted, the run goes on
                    errors += 1
                n += concurrency * batch

        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        return {"ok": ok, "errors": {"error": errors} if errors else {}, "seconds": time.monotonic() - t0}


def batch_api() -> str | None:
    """The name of `quart_sse.publisher.Publisher`'s batch method, or None while it has none."""
    from quart_sse.publisher import Publisher

    return next((n for n in BATCH_NAMES if callable(getattr(Publisher, n, None))), None)


def _cpu_self() -> float:
    t = os.times()
    return t.user + t.system


def _measure(redis: Server, name: str, coro_fn: Any) -> dict[str, Any]:
    r0, c0, w0 = redis.cpu_seconds(), _cpu_self(), time.monotonic()
    res: dict[str, Any] = asyncio.run(coro_fn())
    r1, c1, w1 = redis.cpu_seconds(), _cpu_self(), time.monotonic()
    wall = w1 - w0
    res.update({"mode": name, "publishes_per_s": res["ok"] / res["seconds"] if res["seconds"] else float("nan"),
                "redis_cpu_pct": 100 * (r1 - r0) / wall, "client_cpu_pct": 100 * (c1 - c0) / wall})
    res["publishes_per_redis_cpu_s"] = res["ok"] / (r1 - r0) if r1 > r0 else float("nan")
    return res


def run_ceiling(duration: float = 5.0, users: int = 1000, conns: int = 8, depth: int = 64, batch: int = 0,
                server_cpu: str | None = None, client_cpu: str | None = None,
                modes: tuple[str, ...] = ("raw1", "rawpipe", "py1", "pyconc")) -> dict[str, Any]:
    """Every mode in turn on one fresh Redis; publishes/s, Redis CPU %, publishes per Redis CPU-second."""
    if client_cpu is not None:
        os.sched_setaffinity(0, {int(c) for c in client_cpu.split(",")})
    names = [f"u{i}" for i in range(users)]
    _, sha = publish_script()
    cmds = [publish_command(sha, "bench", u, "bench", b'{"t":1.0,"seq":%d}' % i, HISTORY_SIZE, HISTORY_TTL)
            for i, u in enumerate(names)]
    redis = start_redis(server_cpu)
    result: dict[str, Any] = {"scenario": "ceiling", "duration": duration, "users": users, "modes": [],
                              "skipped": [], "redis_cpu": server_cpu, "client_cpu": client_cpu,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    sub = _subscriber(redis.port, [f"bench:channel:{u}" for u in names] + ["bench:broadcast"], client_cpu)
    try:
        table = {
            "raw1": ("raw EVALSHA, one by one (1 conn)", lambda: _raw(redis.port, cmds, 1, 1, duration)),
            "rawpipe": (f"raw EVALSHA, pipelined ({conns} conns x {depth})",
                        lambda: _raw(redis.port, cmds, conns, depth, duration)),
            "py1": ("quart_sse.publisher, one by one", lambda: _redis_py(redis.port, names, 1, duration)),
            "pyconc": ("quart_sse.publisher, 64 concurrent", lambda: _redis_py(redis.port, names, 64, duration)),
        }
        for m in modes:
            label, fn = table[m]
            result["modes"].append(_measure(redis, label, fn))
        if batch:
            api = batch_api()
            if api is None:
                result["skipped"].append(f"--batch {batch}: quart_sse.publisher.Publisher has no batch API yet "
                                         f"(looked for {', '.join(BATCH_NAMES)}); measure it once it lands")
            else:
                for conc in (1, 8):
                    result["modes"].append(_measure(
                        redis, f"quart_sse.publisher.{api}, {batch}/call, {conc} in flight",
                        lambda c=conc: _redis_py_batch(redis.port, names, batch, c, duration)))
    finally:
        sub.kill()
        sub.join(5)
        redis.stop()
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"scenario: ceiling (one Redis primary, the publish script, {result['users']} users of one app, "
             f"{result['duration']:.1f} s per mode)   redis cpu: {result['redis_cpu'] or 'any'}   "
             f"client cpu: {result['client_cpu'] or 'any'}",
             f"{'mode':58}{'publishes/s':>14}{'redis CPU %':>13}{'per redis CPU-s':>17}{'client CPU %':>14}"
             f"{'errors':>8}"]
    lines.append("-" * len(lines[-1]))
    for m in result["modes"]:
        lines.append(f"{m['mode']:58}{m['publishes_per_s']:>14.0f}{m['redis_cpu_pct']:>13.1f}"
                     f"{m['publishes_per_redis_cpu_s']:>17.0f}{m['client_cpu_pct']:>14.1f}"
                     f"{sum(m['errors'].values()):>8}")
    lines += [f"note: {s}" for s in result["skipped"]]
    lines.append("note: one subscriber connection listens on every user's channel (each PUBLISH has a receiver)")
    return "\n".join(lines)
