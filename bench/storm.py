"""The `storm` scenario: N clients connect at the same instant, fresh or resuming with `Last-Event-ID`.

A deploy or a crash sends every browser back within seconds; that storm, not the steady state, is what overloads a
notification service. Per target (ours, the baseline, nchan; one fresh server each) and variant:

- fresh: N streams (one user each) connect at once with pre-built tokens;
- resume: the N streams first connect at the normal pace; stream i reads 1 + i mod (rounds-1) events of the
  `rounds` published to its user, then drops its connection (RST); the remaining events are published while it is
  away; then all N reconnect at once, each with the `Last-Event-ID` it saw, and each must get exactly the events
  it missed, in order, once.

Then one broadcast probe must reach every stream (it is live). Figures: new streams per server CPU-second (server
CPU from the go until 1 s after the last answer), time until all are live, connect latency p50/p99, failures by
kind, the kernel's listen-queue counters (system-wide), RSS. `profile_dir`: py-spy records our server meanwhile.
"""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.clients import ClientPool, split_streams
from bench.jwt import make_token
from bench.publisher import Publisher
from bench.redis_publish import publish_command, publish_script, run_publish_many
from bench.scenarios import (
    NCHAN_NOTE,
    VERIFIES,
    Env,
    Params,
    _dist_ms,
    _start_target,
    add_ratios,
    make_env,
)
from bench.server import LOOPBACK, Server, ServerOptions, raise_nofile, redis_url_port
from bench.sse_client import WorkerConfig

VARIANTS = ("fresh", "resume")
# kernel counters of the listen queue (system-wide: other users of this machine add to them)
NETSTAT_KEYS = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies", "SyncookiesSent",
                "TCPAbortOnData", "TCPTimeouts")
HISTORY_SIZE = 1000  # ours' default HISTORY_SIZE; nchan keeps as many messages per channel


def netstat() -> dict[str, int]:
    """TcpExt counters from /proc/net/netstat (what `nstat` reads)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    out: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            out.update(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
    return {k: out.get(k, 0) for k in NETSTAT_KEYS}


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def stop_after(user_index: int, rounds: int) -> int:
    """Events stream i reads before it drops: 1 .. rounds-1, so every stream misses 1 .. rounds-1 events."""
    return 1 + user_index % max(1, rounds - 1)


async def _http_publish_all(port: int, token: str, items: list[tuple[bytes, bytes]], conns: int) -> dict[str, Any]:
    """POST each (path, body) once over `conns` keep-alive connections; a user's items stay in order when all of
    one round is sent before the next (the caller's job)."""
    head = (f"Host: {LOOPBACK}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\n").encode()
    nxt = [0]
    ok = [0]
    errors: Counter[str] = Counter()

    async def conn() -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            while nxt[0] < len(items):
                path, body = items[nxt[0]]
                nxt[0] += 1
                writer.write(b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (path, head, len(body), body))
                status, close = await Publisher._http_response(reader)
                if status in (200, 201, 202):
                    ok[0] += 1
                else:
                    errors[f"HTTP {status}"] += 1
                if close:  # Hypercorn: 1,000 requests per keep-alive connection
                    writer.close()
                    reader, writer = await asyncio.open_connection(LOOPBACK, port)
        finally:
            writer.close()

    for r in await asyncio.gather(*(conn() for _ in range(conns)), return_exceptions=True):
        if isinstance(r, BaseException):
            errors[f"{type(r).__name__}: {r}"[:80]] += 1
    return {"ok": ok[0], "errors": dict(errors)}


def _event(seq: int) -> bytes:
    return b'{"t":%.6f,"seq":%d}' % (time.time(), seq)


class _Target:
    """One target's server and how events reach it (the setup rounds and the probe)."""

    def __init__(self, name: str, server: Server, env: Env, app: str) -> None:
        self.name = name
        self.server = server
        self.env = env
        self.app = app
        self.token = make_token(env.opts.secret, "bench-publisher", app, scope="publish", ttl=24 * 3600)
        # ours writes history through its own publish script straight to Redis (fast, what the HTTP route and the
        # Python publisher run); nchan and the baseline take HTTP
        self.via_script = name == "ours" and env.ours_redis

    def publish_via(self) -> str:
        if self.name == "nchan":
            return "HTTP (nchan pub)"
        if self.via_script:
            return "Lua script+HTTP"
        return "HTTP POST"

    def publish_round(self, users: list[str], seq: int) -> dict[str, Any]:
        if self.via_script:
            assert self.env.redis_url is not None
            host, port = redis_url_port(self.env.redis_url)
            _, sha = publish_script()
            cmds = [publish_command(sha, self.app, u, "bench", _event(seq), HISTORY_SIZE, 3600) for u in users]
            return run_publish_many(host, port, cmds, conns=4, depth=64)
        items = [(f"/publish/{self.app}/{u}".encode(), b'{"type":"bench","data":%s}' % _event(seq)) for u in users]
        return asyncio.run(_http_publish_all(self.server.port, self.token, items, conns=16))

    def probe(self, seq: int) -> dict[str, Any]:
        body = b'{"type":"bench","data":%s}' % _event(seq)
        return asyncio.run(_http_publish_all(self.server.port, self.token, [(f"/publish/{self.app}".encode(), body)],
                                             conns=1))


def _start_profile(pid: int, out: Path, native: bool) -> subprocess.Popen[bytes]:
    argv = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate", "250",
            "--format", "raw", "--output", str(out), "--subprocesses", "--full-filenames"]
    argv += ["--native"] if native else ["--nonblocking"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    return proc


def _stop_profile(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace")[-500:]


def run_storm_target(target: str, variant: str, p: Params, env: Env) -> dict[str, Any]:
    """Start `target` fresh, run one storm on it, stop it."""
    resume = variant == "resume"
    server = _start_target(target, env)
    uses_redis = target == "baseline" or (target == "ours" and env.ours_redis)
    redis = env.redis if uses_redis else None
    tgt = _Target(target, server, env, p.app)
    pool: ClientPool | None = None
    out: dict[str, Any] = {"target": target, "variant": variant, "verifies": VERIFIES[target],
                           "publish_via": tgt.publish_via(),
                           "broker": "nchan (memory)" if target == "nchan" else "redis" if uses_redis else "memory"}
    try:
        time.sleep(0.3)
        n = p.streams
        users = [f"u{i}" for i in range(n)]
        k = p.clients or max(2, math.ceil(n / 4000))
        out["clients"] = k
        shares = split_streams(users, k)
        cfgs = [WorkerConfig(i, LOOPBACK, server.port, p.app, env.opts.secret, share, p.connect_concurrency,
                             p.connect_timeout, 0.0, 1.0, p.client_cpu, p.use_uvloop, {})
                for i, share in enumerate(shares)]
        pool = ClientPool(cfgs)
        rounds = p.rounds if resume else 0
        if resume:
            setup = pool.ask_each([("storm-setup", [stop_after(int(u[1:]), rounds) for u in share])
                                   for share in shares], p.connect_timeout + 60 + n / 50)
            out["setup"] = {"ok": sum(s["ok"] for s in setup), "failed": sum(sum(s["failed"].values()) for s in setup)}
            pubs = []
            for seq in range(1, rounds + 1):
                pubs.append(tgt.publish_round(users, seq))
            out["setup"]["published"] = sum(r["ok"] for r in pubs)
            out["setup"]["publish_errors"] = [r["errors"] for r in pubs if r["errors"]]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                stopped = sum(pool.ask(("storm-setup-wait",), 10))
                if stopped >= out["setup"]["ok"]:
                    break
                time.sleep(0.2)
            out["setup"]["stopped"] = stopped
            time.sleep(p.settle)  # the server takes the drops in before the storm
        rss0 = server.rss_kb()
        rrss0 = redis.rss_kb() if redis else 0
        prof = None
        if p.profile_dir and target == "ours":
            Path(p.profile_dir).mkdir(parents=True, exist_ok=True)
            prof_path = Path(p.profile_dir) / f"ours-{variant}-{n}-{time.strftime('%H%M%S')}.txt"
            prof = _start_profile(server.pid, prof_path, p.profile_native)
            out["profile"] = str(prof_path)
        ns0 = netstat()
        c0 = server.cpu_seconds()
        r0 = redis.cpu_seconds() if redis else 0.0
        t_go = time.time() + 1.0
        replies = pool.ask(("storm-go", t_go, p.storm_timeout, resume), p.storm_timeout + 60)
        t_done = time.time()
        time.sleep(1.0)  # the tail of the work (hand-offs, first chunks) counts too
        c1 = server.cpu_seconds()
        r1 = redis.cpu_seconds() if redis else 0.0
        ns1 = netstat()
        if prof is not None:
            out["profile_stderr"] = _stop_profile(prof)
        ok = sum(r["ok"] for r in replies)
        fails: Counter[str] = Counter()
        for r in replies:
            fails.update(r["failed"])
        cpu = c1 - c0
        lat = _dist_ms([r["lat"] for r in replies])
        out["storm"] = {
            "streams": n, "ok": ok, "failed": n - ok, "failures": dict(fails.most_common()),
            "refused": fails.get("refused", 0), "reset": fails.get("reset", 0),
            "closed_unanswered": fails.get("closed unanswered", 0), "timeout": fails.get("timeout", 0),
            "retrans_streams": sum(r["retrans_streams"] for r in replies),
            "retrans_total": sum(r["retrans_total"] for r in replies),
            "launch_spread_s": max(r["last_connect"] for r in replies) - t_go,
            "late_start_s": max(r["first_connect"] for r in replies) - t_go,
            "all_live_s": max(r["last_headers"] for r in replies) - t_go, "wall_s": t_done - t_go,
            "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "max_ms": lat["max_ms"],
        }
        out["server"] = {"cpu_s": cpu, "streams_per_cpu_s": ok / cpu if cpu > 0 else float("nan"),
                         "cpu_ms_per_stream": 1e3 * cpu / ok if ok else float("nan")}
        if redis is not None:
            out["server"]["redis_cpu_s"] = r1 - r0
        out["kernel"] = {k: ns1[k] - ns0[k] for k in NETSTAT_KEYS}
        rss1 = server.rss_kb()
        out["server_rss"] = {"before_kb": rss0, "after_kb": rss1,
                             "per_stream_kb": (rss1 - rss0) / ok if ok else float("nan")}
        if redis is not None:
            out["redis_rss"] = {"per_stream_kb": (redis.rss_kb() - rrss0) / ok if ok else float("nan")}
        # every stream is live: one broadcast reaches all
        probe = rounds + 1 if resume else 1
        pr = tgt.probe(probe)
        got, last, last_change = 0, -1, time.monotonic()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            got = sum(pool.ask(("storm-count", probe), 10))
            if got >= ok:
                break
            if got != last:
                last, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > 3:
                break
            time.sleep(0.1)
        out["live"] = {"probe_published": pr["ok"], "probe_received": got, "not_live": ok - got}
        ver: Counter[str] = Counter()
        examples: list[str] = []
        for v in pool.ask(("storm-verify", rounds, probe, resume), 30):
            examples += v.pop("examples")
            ver.update(v)
        out["verify"] = {**{k: ver.get(k, 0) for k in ("exact", "missed_events", "lost_events", "doubled_events",
                                                        "streams_wrong", "streams_out_of_order", "resets",
                                                        "no_resume_point")},
                         "examples": examples[:3]}
        if not server.alive():
            raise RuntimeError(f"{target} died during the storm:\n{server.log_tail()}")
        return out
    finally:
        if pool is not None:
            pool.close()
        if env.opts.keep_logs:
            env.notes.append(f"{target} log: {server.log_path}")
        server.stop(keep_log=env.opts.keep_logs)


STORM_RATIO_KEYS = [("server.streams_per_cpu_s", "higher is better"), ("storm.all_live_s", "lower is better"),
                    ("storm.p99_ms", "lower is better"), ("server_rss.per_stream_kb", "lower is better")]


def run_storm(p: Params, targets: list[str], redis_url: str | None = None, opts: ServerOptions | None = None,
              variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Each variant against each target in turn, each on a fresh server, in one invocation; one result per
    variant, shaped like the other scenarios' (`targets`, `ratios`)."""
    import secrets

    raise_nofile()
    opts = opts or ServerOptions(secret=secrets.token_urlsafe(32))
    # ours on Redis (the production shape, and where its history is written); the baseline always is
    sp = replace(p, publish="redis" if p.publish == "auto" else p.publish)
    env = make_env(sp, opts, targets, redis_url)
    env.notes.append(f"net.core.somaxconn = {somaxconn()}; ours listens with LISTEN_BACKLOG (default 65535, the "
                     "kernel caps it at somaxconn), nchan with backlog 2048 (quart_sse/server.py listen_socket, "
                     "bench/nchan.conf.template), the baseline with "
                     "Hypercorn's default 100; the kernel counters (all) are system-wide, other users of the machine "
                     "add to them; `streams that needed retransmits` is per connection (TCP_INFO)")
    results: dict[str, Any] = {}
    try:
        for variant in variants:
            res: dict[str, Any] = {"scenario": f"storm ({variant}, {p.streams} streams)", "variant": variant,
                                   "params": asdict(p), "publish": "see per target",
                                   "server_workers": opts.workers, "server_cpu": opts.cpu, "targets": {},
                                   "errors": {}, "notes": [], "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            for target in targets:
                if target == "baseline" and variant == "resume":
                    res["notes"].append("baseline: no resume storm (it keeps no history; its connects cost what "
                                        "its fresh storm shows)")
                    continue
                if target == "baseline" and p.streams > p.baseline_max_streams:
                    res["notes"].append(f"baseline: skipped at {p.streams} streams (two fds per stream: it holds "
                                        f"~9,900 at most; --baseline-max-streams to force)")
                    continue
                try:
                    res["targets"][target] = run_storm_target(target, variant, sp, env)
                except Exception as exc:  # noqa: BLE001 -- one broken target must not hide the others' figures
                    res["errors"][target] = f"{type(exc).__name__}: {exc}"
            add_ratios(res, STORM_RATIO_KEYS)
            res["key_figures"] = _key_figures(res)
            res["notes"] += env.notes + ([NCHAN_NOTE] if "nchan" in res["targets"] else [])
            results[variant] = res
    finally:
        if env.redis is not None:
            env.redis.stop(keep_log=opts.keep_logs)
    return results


def _key_figures(res: dict[str, Any]) -> list[str]:
    out = []
    for name, t in res["targets"].items():
        s, v = t["storm"], t["verify"]
        line = (f"{name}: {t['server']['streams_per_cpu_s']:.0f} new streams per server CPU-s "
                f"({t['server']['cpu_ms_per_stream']:.2f} ms each), all live after {s['all_live_s']:.2f} s, "
                f"{s['failed']} failed, {s['retrans_streams']} connected only after a retransmission, "
                f"{t['live']['not_live']} not live")
        if res["variant"] == "resume":
            line += (f"; resumed exactly: {v['exact']}/{s['ok']} ({v['lost_events']} lost, "
                     f"{v['doubled_events']} doubled, {v['streams_out_of_order']} out of order, {v['resets']} resets)")
        out.append(line)
    return out

