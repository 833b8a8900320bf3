"""Publishes through the service's own publish script (`quart_sse.broker.redis.PUBLISH_LUA`), raw RESP, pipelined.

What one app's events cost Redis, without a Python client in the way: every command is built once, sent `depth`
at a time on each of `conns` connections, and the replies are read with hiredis. Used to write history before a
resume storm (`bench storm`) and to find the ceiling of one Redis primary (`bench ceiling`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import hiredis


def resp(*parts: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def publish_script() -> tuple[str, str]:
    """The service's publish script and its SHA1 (what EVALSHA names)."""
    from quart_sse.broker.redis import PUBLISH_LUA

    return PUBLISH_LUA, hashlib.sha1(PUBLISH_LUA.encode()).hexdigest()


def publish_command(sha: str, app: str, user: str | None, event_type: str, data: bytes, history_size: int,
                    history_ttl_s: int, event_id: str = "") -> bytes:
    """EVALSHA of the publish script exactly as `RedisBroker.publish` calls it (quart_sse.broker.redis.publish_call)."""
    from quart_sse import keys
    from quart_sse.broker.base import Outgoing
    from quart_sse.broker.redis import publish_call
    from quart_sse.broker.seen import MAX_SEEN_IDS

    size = history_size if history_ttl_s > 0 else 0

    def live(a: str, u: str | None) -> str:
        return keys.broadcast_channel(a) if u is None else keys.user_channel(a, u)

    script_keys, args = publish_call(app, [Outgoing(user, event_id or None, event_type, data)], size,
                                     history_ttl_s * 1000, MAX_SEEN_IDS, live)
    return resp("EVALSHA", sha, len(script_keys), *script_keys, *args)


@dataclass
class Tally:
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # per round trip of one window, seconds (sampled)


async def _load(host: str, port: int, script: str) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(resp("SCRIPT", "LOAD", script))
    await writer.drain()
    await reader.readline()
    await reader.readline()
    writer.close()


async def _conn(host: str, port: int, cmds: list[bytes], depth: int, until: float | None, tally: Tally) -> None:
    """One connection: `depth` commands in flight (written together, then all replies read), cycling through
    `cmds` until `until` (monotonic), or through `cmds` once when `until` is None."""
    reader, writer = await asyncio.open_connection(host, port)
    parser = hiredis.Reader()
    i, n = 0, len(cmds)
    try:
        while (until is None and i < n) or (until is not None and time.monotonic() < until):
            batch = [cmds[(i + j) % n] for j in range(depth if until is not None else min(depth, n - i))]
            i += len(batch)
            t0 = time.perf_counter()
            writer.write(b"".join(batch))
            left = len(batch)
            while left:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    left -= 1
                    if isinstance(reply, hiredis.ReplyError):
                        key = str(reply)[:80]
                        tally.errors[key] = tally.errors.get(key, 0) + 1
                    else:
                        tally.ok += 1
            if len(tally.latencies) < 100_000:
                tally.latencies.append(time.perf_counter() - t0)
    finally:
        writer.close()


async def publish_many(host: str, port: int, cmds_per_conn: list[list[bytes]], depth: int,
                       duration: float | None = None) -> Tally:
    """Send each list of commands on its own connection, `depth` in flight each; with `duration`, cycle through
    them for that many seconds (a throughput run) instead of sending each once."""
    script, _ = publish_script()
    await _load(host, port, script)
    tally = Tally()
    t0 = time.monotonic()
    until = t0 + duration if duration is not None else None
    results = await asyncio.gather(*(_conn(host, port, c, depth, until, tally) for c in cmds_per_conn if c),
                                   return_exceptions=True)
    tally.seconds = time.monotonic() - t0
    for r in results:
        if isinstance(r, BaseException):
            key = f"{type(r).__name__}: {r}"[:80]
            tally.errors[key] = tally.errors.get(key, 0) + 1
    return tally


def run_publish_many(host: str, port: int, cmds: list[bytes], conns: int = 4, depth: int = 64) -> dict[str, Any]:
    """Publish `cmds` once, spread round-robin over `conns` connections, in order within each connection."""
    per = [cmds[i::conns] for i in range(conns)]
    tally = asyncio.run(publish_many(host, port, per, depth))
    return {"ok": tally.ok, "errors": tally.errors, "seconds": tally.seconds}
