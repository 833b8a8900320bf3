"""The scenarios (hold, unicast, broadcast, churn) run against one target, and the driver that runs them on both.

Every figure comes from the harness's own view: the clients' counters and latencies, and /proc for the server
processes the harness started itself. One measurement window per run: it opens when the clients reset their
counters and closes when the last expected event has arrived (or the drain time runs out).
"""

from __future__ import annotations

import math
import secrets
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bench.clients import CTX, ClientPool, split_streams
from bench.publisher import PublisherConfig, publisher_main
from bench.server import (
    LOOPBACK,
    Server,
    ServerOptions,
    nchan_missing,
    raise_nofile,
    redis_url_port,
    start_baseline,
    start_nchan,
    start_ours,
    start_redis,
)
from bench.sse_client import WorkerConfig

SCENARIOS = ("hold", "unicast", "broadcast", "churn")
TARGETS = ("ours", "baseline", "nchan")
# what each target checks on a stream request: nchan checks nothing (no JWT), which its figures must say
VERIFIES = {"ours": "JWT (HS256)", "baseline": "JWT (PyJWT)", "nchan": "NOTHING (no JWT)"}
NCHAN_NOTE = ("nchan (nginx + nchan, one worker) checks no JWT: its streams are keyed by an X-Bench-User header and "
              "anyone may subscribe; its publishes go to its HTTP publisher location")


def resolve_targets(choice: str) -> tuple[list[str], list[str]]:
    """`--target` to the targets to run, and notes to print: `all` (the default) is ours, the baseline and nchan
    when nginx + nchan are installed (else a note says why it is left out); `both` is ours and the baseline."""
    if choice in TARGETS:
        if choice == "nchan" and (missing := nchan_missing()):
            raise SystemExit(f"--target nchan: {missing}")
        return [choice], []
    targets = ["ours", "baseline"]
    if choice == "both":
        return targets, []
    missing = nchan_missing()
    if missing:
        return targets, [f"nchan NOT RUN: {missing}"]
    return [*targets, "nchan"], []


@dataclass
class Params:
    """One invocation's knobs; `rate` is per user for unicast/churn and per second on the channel for broadcast."""

    scenario: str
    streams: int = 1000  # hold/broadcast: streams; unicast/churn: derived from users x per_user
    users: int = 100
    per_user: int = 2
    rate: float = 10.0
    duration: float = 5.0
    clients: int = 0  # client processes; 0 = auto
    client_cpu: str | None = None
    connect_concurrency: int = 200
    connect_timeout: float = 15.0
    churn_rate: float = 50.0
    churn_hold: float = 1.0
    publish: str = "auto"  # auto | http | redis
    ours_broker: str = "auto"  # auto | memory | redis
    pub_conns: int = 8
    drain: float = 5.0
    settle: float = 1.0
    app: str = "bench"
    use_uvloop: bool = True
    count_only: bool = False  # clients count events without parsing them (no latency figures)
    read_batch_ms: float = 0.0  # clients read every this many ms (a cheap client: see sse_client.Worker._throttle)
    # storm (bench/storm.py)
    rounds: int = 4  # resume: events published per user; stream i reads 1 + i mod (rounds-1) before it drops
    storm_timeout: float = 60.0  # seconds a storm connect may take before it counts as a failure
    profile_dir: str | None = None  # py-spy records our server during the storm into this folder
    profile_native: bool = False  # py-spy --native (C frames too; pauses the process to sample)
    baseline_max_streams: int = 9000  # the baseline cannot hold more (two fds per stream)

    def stream_users(self) -> list[str]:
        """The user of each stream: unicast users get `per_user` streams each; hold/broadcast one user per stream."""
        if self.scenario in ("unicast", "churn"):
            return [f"u{s % self.users}" for s in range(self.users * self.per_user)]
        return [f"u{s}" for s in range(self.streams)]

    def auto_clients(self, nstreams: int) -> int:
        """One process per 9,000 streams (fd cap 20,000 with headroom) and per ~60k expected events/s."""
        if self.clients:
            return self.clients
        ev = 0.0
        if self.scenario in ("unicast", "churn"):
            ev = self.users * self.rate * self.per_user
        elif self.scenario == "broadcast":
            ev = self.rate * nstreams
        return max(1, math.ceil(nstreams / 9000), min(4, math.ceil(ev / 60000)))


@dataclass
class Env:
    """What the targets share: the secret, server options, Redis, and how publishes travel."""

    opts: ServerOptions
    redis_url: str | None = None
    redis: Server | None = None  # set when the harness started Redis itself (so its CPU can be read)
    publish: str = "http"
    ours_redis: bool = False
    notes: list[str] = field(default_factory=list)


def _pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def _dist_ms(raw: list[bytes]) -> dict[str, float]:
    vals = array("d")
    for r in raw:
        vals.frombytes(r)
    s = sorted(vals)
    return {"n": len(s), "p50_ms": _pct(s, 0.50) * 1e3, "p99_ms": _pct(s, 0.99) * 1e3,
            "max_ms": (s[-1] * 1e3) if s else float("nan")}


def publish_via(target: str, env: Env) -> str:
    """How this target's events are published in this run (printed per target: the paths differ)."""
    if target == "nchan":
        return "HTTP (nchan pub)"
    return "redis PUBLISH" if env.publish == "redis" else "HTTP POST"


def _start_target(target: str, env: Env) -> Server:
    if target == "ours":
        return start_ours(env.opts, env.redis_url if env.ours_redis else None)
    if target == "nchan":
        return start_nchan(env.opts)
    assert env.redis_url is not None
    return start_baseline(env.opts, env.redis_url)


def run_target(target: str, p: Params, env: Env) -> dict[str, Any]:
    """Start `target`, run scenario `p` against it, stop it; the figures as a flat-ish dict."""
    server = _start_target(target, env)
    pool: ClientPool | None = None
    uses_redis = target == "baseline" or (target == "ours" and env.ours_redis)
    redis = env.redis if uses_redis else None  # only a Redis we started, and only when this target talks to it
    out: dict[str, Any] = {"target": target,
                           "broker": "nchan (memory)" if target == "nchan" else "redis" if uses_redis else "memory",
                           "server_procs": server.nprocs(), "verifies": VERIFIES[target],
                           "publish_via": publish_via(target, env)}
    try:
        time.sleep(0.3)
        rss0, rrss0 = server.rss_kb(), redis.rss_kb() if redis else 0
        users = p.stream_users()
        k = p.auto_clients(len(users))
        shares = split_streams(users, k)
        churn_each = p.churn_rate / k if p.scenario == "churn" else 0.0
        cfgs = [WorkerConfig(i, LOOPBACK, server.port, p.app, env.opts.secret, share, p.connect_concurrency,
                             p.connect_timeout, churn_each, p.churn_hold, p.client_cpu, p.use_uvloop,
                             {"count_only": p.count_only, "read_batch_ms": p.read_batch_ms})
                for i, share in enumerate(shares)]
        pool = ClientPool(cfgs)
        conn = pool.ask("connect", timeout=p.connect_timeout + 60 + len(users) / 50)
        failed_users: Counter[str] = Counter()
        for c in conn:
            failed_users.update(c["failed_users"])
        connected = sum(c["ok"] for c in conn)
        reasons: Counter[str] = Counter()
        for c in conn:
            reasons.update(c["reasons"])
        out["clients"] = k
        out["connect"] = {"streams": len(users), "ok": connected, "failed": len(users) - connected,
                          "seconds": max(c["seconds"] for c in conn), **_dist_ms([c["times"] for c in conn]),
                          "reasons": dict(reasons.most_common(5))}
        time.sleep(p.settle)
        rss1 = server.rss_kb()
        out["server_rss"] = {"before_kb": rss0, "after_kb": rss1,
                             "per_stream_kb": (rss1 - rss0) / connected if connected else float("nan")}
        if redis is not None:
            rrss1 = redis.rss_kb()
            out["redis_rss"] = {"before_kb": rrss0, "after_kb": rrss1,
                                "per_stream_kb": (rrss1 - rrss0) / connected if connected else float("nan")}
        if p.scenario == "hold":
            out.update(_hold_window(p, server, pool, redis, env.opts.ping_interval))
        else:
            out.update(_traffic_window(p, env, server, pool, users, failed_users, redis, target))
        out["server_rss"]["end_kb"] = server.rss_kb()
        if not server.alive():
            raise RuntimeError(f"{target} died during the run:\n{server.log_tail()}")
        return out
    finally:
        if pool is not None:
            pool.close()
        if env.opts.keep_logs:
            env.notes.append(f"{target} log: {server.log_path}")
        server.stop(keep_log=env.opts.keep_logs)


def _client_cpu(stops: list[dict[str, Any]]) -> dict[str, float]:
    pcts = [100 * s["cpu"] / s["wall"] for s in stops if s["wall"] > 0]
    return {"cpu_pct_max": max(pcts, default=0.0), "cpu_pct_total": sum(pcts)}


def _hold_window(p: Params, server: Server, pool: ClientPool, redis: Server | None,
                 ping_interval: float) -> dict[str, Any]:
    """Idle streams: how much CPU the server burns doing nothing but keeping them (and pinging).

    The window is a whole number of ping intervals: a server that pings all streams from one timer does its work
    in bursts, and a shorter window would catch a burst or not by luck.
    """
    window = ping_interval * max(1, math.ceil(p.duration / ping_interval - 1e-9))
    pool.ask("start", 10)
    c0, t0 = server.cpu_seconds(), time.monotonic()
    r0 = redis.cpu_seconds() if redis else 0.0
    time.sleep(window)
    c1, t1 = server.cpu_seconds(), time.monotonic()
    r1 = redis.cpu_seconds() if redis else 0.0
    stops = pool.ask("stop", 30)
    window = t1 - t0
    idle = {"server_cpu_s": c1 - c0, "server_cpu_pct": 100 * (c1 - c0) / window,
            "pings_per_s": sum(s["pings"] for s in stops) / window, "drops": sum(s["drops"] for s in stops)}
    if redis is not None:
        idle["redis_cpu_pct"] = 100 * (r1 - r0) / window
    return {"window_s": window, "idle": idle, "client": _client_cpu(stops)}


def _traffic_window(p: Params, env: Env, server: Server, pool: ClientPool, users: list[str],
                    failed_users: Counter[str], redis: Server | None, target: str = "ours") -> dict[str, Any]:
    """Publish for `duration`, drain, and turn counters into rates, loss, latency and events per CPU-second."""
    broadcast = p.scenario == "broadcast"
    pub_users = None if broadcast else [f"u{i}" for i in range(p.users)]
    total_rate = p.rate if broadcast else p.rate * p.users
    mode = "http" if target == "nchan" else env.publish  # nchan has no Redis: its HTTP publisher location
    if mode == "redis":
        assert env.redis_url is not None
        host, port = redis_url_port(env.redis_url)
    else:
        host, port = LOOPBACK, server.port
    pcfg = PublisherConfig(mode, host, port, p.app, env.opts.secret, pub_users, total_rate, p.duration,
                           p.pub_conns, p.client_cpu)
    parent, child = CTX.Pipe()
    pub = CTX.Process(target=publisher_main, args=(pcfg, child), name="bench-publisher", daemon=True)
    pub.start()
    child.close()
    try:
        pool.ask("start", 10)
        c0, t0 = server.cpu_seconds(), time.monotonic()
        r0 = redis.cpu_seconds() if redis else 0.0
        parent.send("go")
        if not parent.poll(p.duration + 60):
            raise TimeoutError("publisher did not finish")
        pres: dict[str, Any] = parent.recv()
    finally:
        pub.join(5)
        if pub.is_alive():
            pub.kill()
    per_stream = Counter(users)
    if broadcast:
        expected = pres["ok"] * (len(users) - sum(failed_users.values()))
    else:
        pairs = zip(pub_users or [], pres["per_user"], strict=True)
        expected = sum(n * (per_stream[u] - failed_users[u]) for u, n in pairs)
    delivered, deadline = 0, time.monotonic() + p.drain
    last_change, last = time.monotonic(), -1
    while time.monotonic() < deadline:
        delivered = sum(pool.ask("count", 10))
        if delivered >= expected:
            break
        if delivered != last:
            last, last_change = delivered, time.monotonic()
        elif time.monotonic() - last_change > 1.5:  # nothing more is coming
            break
        time.sleep(0.05)
    c1, t1 = server.cpu_seconds(), time.monotonic()
    r1 = redis.cpu_seconds() if redis else 0.0
    stops = pool.ask("stop", 30)
    window = t1 - t0
    delivered = sum(s["delivered"] for s in stops)
    cpu = c1 - c0
    events = {"published": pres["ok"], "publish_rate": pres["rate"], "publish_errors": pres["errors"],
              "expected": expected, "delivered": delivered, "lost": expected - delivered,
              "loss_pct": 100 * (expected - delivered) / expected if expected else float("nan"),
              "delivered_per_s": delivered / window, "reordered": sum(s["reordered"] for s in stops),
              "drops": sum(s["drops"] for s in stops), **_dist_ms([s["lat"] for s in stops])}
    res: dict[str, Any] = {
        "window_s": window, "events": events,
        "server": {"cpu_s": cpu, "cpu_pct": 100 * cpu / window,
                   "events_per_cpu_s": delivered / cpu if cpu > 0 else float("nan")},
        "client": {**_client_cpu(stops), "publisher_cpu_pct": 100 * pres["cpu"] / max(pres["wall"], 1e-9)},
    }
    if redis is not None:
        rc = r1 - r0
        res["server"]["redis_cpu_s"] = rc
        res["server"]["events_per_cpu_s_with_redis"] = delivered / (cpu + rc) if cpu + rc > 0 else float("nan")
    churns = [s["churn"] for s in stops if s["churn"]]
    if churns:
        ok = sum(c["ok"] for c in churns)
        reasons: Counter[str] = Counter()
        for c in churns:
            reasons.update(c["reasons"])
        res["churn"] = {"target_per_s": p.churn_rate, "attempts": sum(c["attempts"] for c in churns),
                        "connects": ok, "connects_per_s": ok / window,
                        "disconnects_per_s": sum(c["closed"] for c in churns) / window,
                        "failed": sum(c["failed"] for c in churns), "skipped": sum(c["skipped"] for c in churns),
                        **_dist_ms([c["times"] for c in churns]), "reasons": dict(reasons)}
    return res


RATIO_KEYS: list[tuple[str, str]] = [
    ("server.events_per_cpu_s", "higher is better"),
    ("server.events_per_cpu_s_with_redis", "higher is better"),
    ("events.delivered_per_s", "higher is better"),
    ("events.p99_ms", "lower is better"),
    ("server_rss.per_stream_kb", "lower is better"),
    ("idle.server_cpu_pct", "lower is better"),
    ("connect.p99_ms", "lower is better"),
    ("churn.connects_per_s", "higher is better"),
]


def dig(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def ratios(ours: dict[str, Any], base: dict[str, Any],
           keys: list[tuple[str, str]] | None = None) -> dict[str, float]:
    out = {}
    for key, _ in keys or RATIO_KEYS:
        a, b = dig(ours, key), dig(base, key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b and not math.isnan(b):
            out[key] = a / b
    return out


def make_env(p: Params, opts: ServerOptions, targets: list[str], redis_url: str | None) -> Env:
    """Decide the publish path and whether Redis is needed; start our own Redis when none was given."""
    publish = p.publish if p.publish != "auto" else ("redis" if redis_url else "http")
    ours_redis = p.ours_broker == "redis" or (p.ours_broker == "auto" and publish == "redis")
    env = Env(opts, redis_url, None, publish, ours_redis)
    needs = "baseline" in targets or publish == "redis" or ("ours" in targets and ours_redis)
    if needs and not redis_url:
        env.redis = start_redis()
        env.redis_url = f"redis://{LOOPBACK}:{env.redis.port}/0"
        env.notes.append(f"started redis-server on port {env.redis.port}")
    if redis_url:
        redis_url_port(redis_url)  # refuse a non-loopback URL before any traffic
        env.notes.append("redis given by --redis-url: its CPU is not measured")
    return env


def run(p: Params, targets: list[str], redis_url: str | None = None, opts: ServerOptions | None = None,
        ) -> dict[str, Any]:
    """Run scenario `p` against each target in turn (same Redis, same client settings) and compare."""
    raise_nofile()
    opts = opts or ServerOptions(secret=secrets.token_urlsafe(32))
    env = make_env(p, opts, targets, redis_url)
    result: dict[str, Any] = {"scenario": p.scenario, "params": asdict(p), "publish": env.publish,
                              "server_workers": opts.workers, "server_cpu": opts.cpu, "targets": {},
                              "errors": {}, "notes": env.notes, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        for target in targets:
            try:
                result["targets"][target] = run_target(target, p, env)
            except Exception as exc:  # noqa: BLE001 -- one broken target must not hide the other's figures
                result["errors"][target] = f"{type(exc).__name__}: {exc}"
    finally:
        if env.redis is not None:
            env.redis.stop(keep_log=opts.keep_logs)
    add_ratios(result)
    if "nchan" in targets:
        env.notes.append(NCHAN_NOTE)
    return result


def add_ratios(result: dict[str, Any], keys: list[tuple[str, str]] | None = None) -> None:
    """`ratios`: ours / each peer that ran (`ours/baseline`, `ours/nchan`); `ratio_ours_to_baseline` kept as is."""
    t = result["targets"]
    result["ratios"] = {f"ours/{peer}": ratios(t["ours"], t[peer], keys) for peer in ("baseline", "nchan")
                        if "ours" in t and peer in t}
    if "ours/baseline" in result["ratios"]:
        result["ratio_ours_to_baseline"] = result["ratios"]["ours/baseline"]


def run_workers(p: Params, redis_url: str | None, opts: ServerOptions) -> dict[str, Any]:
    """Worker scaling: the broadcast scenario on our service with one worker (pinned to the first CPU of
    `opts.cpu`) and with `opts.workers` (at least 2, pinned to all of them), in one invocation. Offer more than one
    worker can deliver, so that delivered events/s is each configuration's capacity; the ratio is the scaling."""
    n = max(2, opts.workers)
    first = opts.cpu.split(",")[0] if opts.cpu else None
    bp = replace(p, scenario="broadcast")
    names = ("1 worker", f"{n} workers")
    runs = [run(bp, ["ours"], redis_url, replace(opts, workers=1, cpu=first)),
            run(bp, ["ours"], redis_url, replace(opts, workers=n, cpu=opts.cpu))]
    result: dict[str, Any] = {"scenario": "workers", "params": asdict(bp), "publish": runs[0]["publish"],
                              "server_workers": f"1 vs {n}", "server_cpu": f"{first or 'any'} vs {opts.cpu or 'any'}",
                              "targets": {}, "errors": {}, "notes": runs[0]["notes"] + runs[1]["notes"],
                              "started": runs[0]["started"], "ratio_label": f"{n} / 1"}
    for name, r in zip(names, runs, strict=True):
        if "ours" in r["targets"]:
            result["targets"][name] = r["targets"]["ours"]
        for err in r["errors"].values():
            result["errors"][name] = err
    if len(result["targets"]) == 2:
        result["ratio"] = ratios(result["targets"][names[1]], result["targets"][names[0]])
    return result
