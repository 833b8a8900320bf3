"""`python -m bench <scenario> [options]`: run one scenario against our service and/or the baseline, print, save.

Exit status 0 when every requested target produced its figures (for `smoke`: when all smoke checks pass).
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
from typing import Any

from bench import report, smoke
from bench.scenarios import SCENARIOS, Params, run, run_workers
from bench.server import ServerOptions


def _parser() -> argparse.ArgumentParser:
    d = Params(scenario="hold")
    o = ServerOptions(secret="")
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("scenario", nargs="?", choices=[*SCENARIOS, "workers", "all", "smoke"],
                    help="what to run; `all` runs every scenario in turn with the same options; `workers`: the "
                         "broadcast on our service with 1 worker, then --workers, same invocation")
    ap.add_argument("--smoke", action="store_true", help="same as the `smoke` scenario")
    ap.add_argument("--target", choices=["ours", "baseline", "both"], default="both")
    ap.add_argument("--json", metavar="PATH", help="also write the full result as JSON")
    g = ap.add_argument_group("load")
    g.add_argument("--streams", type=int, default=d.streams, help="hold/broadcast: number of streams")
    g.add_argument("--users", type=int, default=d.users, help="unicast/churn: users")
    g.add_argument("--per-user", type=int, default=d.per_user, help="unicast/churn: streams per user")
    g.add_argument("--rate", type=float, default=d.rate,
                   help="unicast/churn: publishes/s to EACH user; broadcast: messages/s on the app channel")
    g.add_argument("--duration", type=float, default=d.duration, help="seconds of the measured window")
    g.add_argument("--churn-rate", type=float, default=d.churn_rate, help="churn: new streams/s (and as many closed)")
    g.add_argument("--churn-hold", type=float, default=d.churn_hold, help="churn: mean seconds a churn stream lives")
    g.add_argument("--publish", choices=["auto", "http", "redis"], default=d.publish,
                   help="auto: Redis PUBLISH when --redis-url is given, else HTTP POST /publish")
    g.add_argument("--pub-conns", type=int, default=d.pub_conns, help="HTTP publish: keep-alive connections")
    g.add_argument("--drain", type=float, default=d.drain, help="max seconds to wait for stragglers after publishing")
    g.add_argument("--settle", type=float, default=d.settle, help="seconds between connecting and measuring")
    g = ap.add_argument_group("clients")
    g.add_argument("--clients", type=int, default=0, help="client processes (0: one per 9,000 streams, more for load)")
    g.add_argument("--client-cpu", help="pin client processes, e.g. 1 (taskset-style list: 0,1)")
    g.add_argument("--connect-concurrency", type=int, default=d.connect_concurrency,
                   help="connects in flight per client process")
    g.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    g.add_argument("--no-uvloop", action="store_true", help="plain asyncio loop in the clients")
    g.add_argument("--count-only", action="store_true",
                   help="clients count events without parsing them: no latency or order figures, far less client CPU")
    g.add_argument("--read-batch-ms", type=float, default=d.read_batch_ms,
                   help="clients read every this many ms (many events per read; latency grows by up to this)")
    g = ap.add_argument_group("servers")
    g.add_argument("--workers", type=int, default=o.workers, help="server worker processes (both targets)")
    g.add_argument("--server-cpu", help="pin the servers with taskset -c, e.g. 0")
    g.add_argument("--redis-url", help="use this (loopback) Redis instead of starting one")
    g.add_argument("--ours-broker", choices=["auto", "memory", "redis"], default=d.ours_broker,
                   help="our service's broker; auto: Redis when publishing via Redis")
    g.add_argument("--ping-interval", type=float, default=o.ping_interval)
    g.add_argument("--app-mode", choices=["debug", "production"], default=o.app_mode)
    g.add_argument("--ours-cmd", default=o.ours_cmd, help="command that starts our service")
    g.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (/tmp/bench-*.log)")
    return ap


def _params(a: argparse.Namespace, scenario: str) -> Params:
    return Params(scenario=scenario, streams=a.streams, users=a.users, per_user=a.per_user, rate=a.rate,
                  duration=a.duration, clients=a.clients, client_cpu=a.client_cpu,
                  connect_concurrency=a.connect_concurrency, connect_timeout=a.connect_timeout,
                  churn_rate=a.churn_rate, churn_hold=a.churn_hold, publish=a.publish, ours_broker=a.ours_broker,
                  pub_conns=a.pub_conns, drain=a.drain, settle=a.settle, use_uvloop=not a.no_uvloop,
                  count_only=a.count_only, read_batch_ms=a.read_batch_ms)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.smoke:
        a.scenario = "smoke"
    if a.scenario is None:
        _parser().error("a scenario is required")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every server and client we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    opts = ServerOptions(secret=secrets.token_urlsafe(32), workers=a.workers, cpu=a.server_cpu,
                         ping_interval=a.ping_interval, app_mode=a.app_mode, ours_cmd=a.ours_cmd,
                         keep_logs=a.keep_logs)
    result: dict[str, Any]
    if a.scenario == "workers":
        result = run_workers(_params(a, "broadcast"), a.redis_url, opts)
        ok = not result["errors"]
        print(report.table(result))
    elif a.scenario == "smoke":
        targets = ("ours", "baseline") if a.target == "both" else (a.target,)
        result = smoke.run_inline(opts, targets)
        ok = result["ok"]
        print(report.table(result))
    else:
        targets_l = ["ours", "baseline"] if a.target == "both" else [a.target]
        runs: dict[str, Any] = {}
        for scenario in SCENARIOS if a.scenario == "all" else (a.scenario,):
            runs[scenario] = run(_params(a, scenario), targets_l, a.redis_url, opts)
            print(report.table(runs[scenario]), end="\n\n", flush=True)
        ok = not any(r["errors"] for r in runs.values())
        result = runs[a.scenario] if a.scenario != "all" else {"scenario": "all", "runs": runs}
    if a.scenario == "smoke":
        print("smoke:", "OK" if ok else "FAILED: " + "; ".join(result["problems"]))
    if a.json:
        report.write_json(result, a.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
