"""Server CPU per published event: single `POST /publish/{app}/{user}` against the batch route.

    .venv/bin/python -m bench.publish_cost --broker redis --mode single --seconds 5
    .venv/bin/python -m bench.publish_cost --broker redis --mode batch --batch 1000 --seconds 5
    .venv/bin/python -m bench.publish_cost --broker redis --mode single --profile /tmp/single.txt

The service runs in its own process pinned to `--server-cpu` (default core 0); the load generator (wrk when it is
installed, `apt-get install wrk`, else this process: keep-alive connections with one request in flight each) and
Redis are pinned to `--client-cpu`. The figure is the
server's own CPU time (utime + stime from /proc) over the window divided by the events it accepted (202), so load on
the other core does not count. `--profile FILE` samples the server with py-spy over the window and writes the
hottest frames (own and cumulative share of the samples) to FILE, plus the raw collapsed stacks beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.jwt import make_token
from bench.server import LOOPBACK, Server, ServerOptions, start_ours, start_redis

SECRET = "bench-secret-bench-secret-bench-secret-0123"
APP = "bench"


@dataclass
class Result:
    requests: int = 0
    events: int = 0
    errors: int = 0
    first_error: str = ""


def _request(path: str, body: bytes, tok: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nAuthorization: Bearer {tok}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length) if length else b""


async def _connection(port: int, make: collections.abc.Callable[[], tuple[bytes, int]], deadline: float,
                      res: Result) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        while time.monotonic() < deadline:
            raw, n = make()
            writer.write(raw)
            status, body = await _read_response(reader)
            res.requests += 1
            if status == 202:
                res.events += n
            else:
                res.errors += 1
                res.first_error = res.first_error or f"{status} {body[:200]!r}"
    finally:
        writer.close()


def _maker(mode: str, batch: int, users: int, with_ids: bool, tok: str) -> collections.abc.Callable[
        [], tuple[bytes, int]]:
    seq = itertools.count()
    run = os.getpid()

    def event(n: int) -> dict[str, object]:
        ev: dict[str, object] = {"type": "t", "data": {"seq": n, "text": "x" * 100}}
        if with_ids:
            ev["id"] = f"r{run}-{n}"
        return ev

    if mode == "single":
        def make() -> tuple[bytes, int]:
            n = next(seq)
            return _request(f"/publish/{APP}/u{n % users}", orjson.dumps(event(n)), tok), 1
    else:
        def make() -> tuple[bytes, int]:
            evs = []
            for _ in range(batch):
                n = next(seq)
                evs.append({"user": f"u{n % users}", **event(n)})
            return _request(f"/publish/{APP}", orjson.dumps(evs), tok), batch
    return make


_LINE = re.compile(r":\d+\)$")


#: Where a sample's own time is spent, by the file of its innermost frame (first match wins).
_PACKAGES = [("event loop, syscalls (uvloop, C)", ("asyncio/runners.py", "uvloop/")),
             ("asyncio in Python (streams, tasks; socket writes)", ("asyncio/",)), ("hypercorn", ("hypercorn/",)),
             ("h11", ("h11/",)),
             ("quart", ("quart/", "flask/")), ("werkzeug", ("werkzeug/",)), ("redis-py", ("redis/",)),
             ("pydantic", ("pydantic",)), ("prometheus_client", ("prometheus_client/",)),
             ("ours (quart_sse, blueprints)", ("quart_sse/", "blueprints/", "redis.py)", "seen.py)", "memory.py)"))]


def _package(frame: str) -> str:
    where = frame[frame.rfind("(") + 1:]
    for name, needles in _PACKAGES:
        if any(n in where for n in needles):
            return name
    return "other (stdlib, ...)"


def _collapsed_summary(raw_path: str, top: int = 150) -> str:
    """py-spy's collapsed stacks to a table of own time by package, then frames by own and cumulative share."""
    own: collections.Counter[str] = collections.Counter()
    cum: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = 0
    with open(raw_path) as fh:
        for line in fh:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [_LINE.sub(")", f) for f in stack.split(";")]  # by function, not by line
            own[frames[-1]] += n
            packages[_package(frames[-1])] += n
            for f in set(frames):
                cum[f] += n
    out = [f"{total} samples", "", "own %  package"]
    out += [f"{100 * n / total:5.1f}  {p}" for p, n in packages.most_common()]
    out += ["", "own %  frame"]
    out += [f"{100 * n / total:5.1f}  {f}" for f, n in own.most_common(top)]
    out += ["", "cum %  frame"]
    out += [f"{100 * n / total:5.1f}  {f}" for f, n in cum.most_common(top)]
    return "\n".join(out)


_WRK_SCRIPT = """
local n, mode, batch, users, ids, token, app = 0, %(mode)s, %(batch)d, %(users)d, %(ids)s, %(token)s, %(app)s
local run = tostring(os.time()) .. tostring(math.random(1000000))
local headers = {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}
local function event(k, with_user)
  local e = '"type":"t","data":{"seq":' .. k .. ',"text":"' .. string.rep("x", 100) .. '"}'
  if ids then e = e .. ',"id":"r' .. run .. '-' .. k .. '"' end
  if with_user then e = e .. ',"user":"u' .. (k %% users) .. '"' end
  return '{' .. e .. '}'
end
request = function()
  if mode == "single" then
    n = n + 1
    return wrk.format("POST", "/publish/" .. app .. "/u" .. (n %% users), headers, event(n, false))
  end
  local parts = {}
  for i = 1, batch do n = n + 1; parts[i] = event(n, true) end
  return wrk.format("POST", "/publish/" .. app, headers, "[" .. table.concat(parts, ",") .. "]")
end
done = function(summary, latency, requests)
  io.write(string.format("WRK %%d %%d\\n", summary.requests, summary.errors.status + summary.errors.read
    + summary.errors.write + summary.errors.connect + summary.errors.timeout))
end
"""


def _wrk(args: argparse.Namespace, server: Server, tok: str, seconds: float) -> Result:
    """wrk (C, epoll) as the load generator: the server, not the client, must be the one busy."""
    import json
    import tempfile

    script = _WRK_SCRIPT % {"mode": json.dumps(args.mode), "batch": args.batch, "users": args.users,
                            "ids": "true" if args.ids else "false", "token": json.dumps(tok), "app": json.dumps(APP)}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{args.conns}", f"-d{max(1, round(seconds))}s", "-s", fh.name,
                              f"http://{LOOPBACK}:{server.port}"], capture_output=True, text=True, check=True,
                             timeout=seconds + 30).stdout
    finally:
        os.unlink(fh.name)
    line = next(ln for ln in out.splitlines() if ln.startswith("WRK "))
    requests, errors = map(int, line.split()[1:])
    per = 1 if args.mode == "single" else args.batch
    return Result(requests=requests, events=(requests - errors) * per, errors=errors,
                  first_error="see wrk" if errors else "")


async def _load(args: argparse.Namespace, server: Server,
                redis: Server | None) -> tuple[Result, float, float, float]:
    tok = make_token(SECRET, "backend", APP, scope="publish")
    make = _maker(args.mode, args.batch, args.users, args.ids, tok)
    warm = Result()
    await asyncio.gather(*[_connection(server.port, make, time.monotonic() + 1.0, warm)
                           for _ in range(args.conns)])
    if warm.errors:
        raise SystemExit(f"warm-up failed: {warm.first_error}")
    res = Result()
    profiler = None
    if args.profile:
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        argv = [spy, "record", "-p", str(server.pid), "-r", "500", "-d", str(int(args.seconds)), "-f", "raw",
                "-o", args.profile + ".raw", "--nonblocking"]
        with open(args.profile + ".log", "w") as log:  # noqa: ASYNC230 - before the measured window
            profiler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)  # noqa: ASYNC220 - idem
        await asyncio.sleep(0.5)
    redis0 = redis.cpu_seconds() if redis else 0.0
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    if args.client == "wrk":
        res = await asyncio.to_thread(_wrk, args, server, tok, args.seconds)
    else:
        await asyncio.gather(*[_connection(server.port, make, t0 + args.seconds, res) for _ in range(args.conns)])
    cpu1, t1 = server.cpu_seconds(), time.monotonic()
    redis_cpu = redis.cpu_seconds() - redis0 if redis else 0.0
    if profiler is not None:
        await asyncio.to_thread(profiler.wait, 30)
    return res, cpu1 - cpu0, t1 - t0, redis_cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.publish_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--broker", choices=["memory", "redis"], default="redis")
    ap.add_argument("--mode", choices=["single", "batch"], default="single")
    ap.add_argument("--batch", type=int, default=1000, help="events per batch request")
    ap.add_argument("--users", type=int, default=100, help="events go to users u0..u<N-1> in turn")
    ap.add_argument("--ids", action="store_true", help="every event carries a publisher id (deduplicated)")
    ap.add_argument("--conns", type=int, default=4, help="keep-alive connections, one request in flight each")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--client", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python")
    ap.add_argument("--server-cpu", default="0")
    ap.add_argument("--client-cpu", default="1")
    ap.add_argument("--profile", help="write a py-spy profile summary of the server here")
    ap.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for the service")
    args = ap.parse_args(argv)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {int(args.client_cpu)})
    redis = start_redis(args.client_cpu) if args.broker == "redis" else None
    extra = dict(e.split("=", 1) for e in args.env)
    opts = ServerOptions(secret=SECRET, cpu=args.server_cpu, extra_env={"APP_MODE": "production", **extra})
    server = start_ours(opts, f"redis://{LOOPBACK}:{redis.port}/0" if redis else None)
    try:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            run = asyncio.run  # type: ignore[assignment]  # the same call, without uvloop's loop_factory
        res, cpu, wall, redis_cpu = run(_load(args, server, redis))
    finally:
        server.stop()
        if redis is not None:
            redis.stop()
    per_event_us = 1e6 * cpu / res.events if res.events else float("nan")
    print(f"broker={args.broker} mode={args.mode} batch={args.batch if args.mode == 'batch' else 1} "
          f"ids={args.ids} conns={args.conns}")
    print(f"  {res.requests} requests, {res.events} events accepted, {res.errors} errors in {wall:.1f} s"
          + (f" (first: {res.first_error})" if res.errors else ""))
    print(f"  server CPU {cpu:.2f} s ({100 * cpu / wall:.0f} % of a core): {per_event_us:.1f} µs per event, "
          f"{res.events / cpu if cpu else float('nan'):,.0f} events per server CPU-second, "
          f"{1e6 * cpu / max(res.requests, 1):.1f} µs per request")
    if redis is not None and res.events:
        print(f"  redis CPU {redis_cpu:.2f} s: {1e6 * redis_cpu / res.events:.1f} µs per event (the publish script, "
              "pub/sub, the connection)")
    if args.profile:
        Path(args.profile).write_text(_collapsed_summary(args.profile + ".raw"))
        print(f"  profile: {args.profile} (raw stacks: {args.profile}.raw)")
    return 0 if not res.errors else 1


if __name__ == "__main__":
    sys.exit(main())
