"""`python -m bench <scenario> [options]`: run one scenario against our service and/or the baseline, print, save.

Exit status 0 when every requested target produced its figures (for `smoke`: when all smoke checks pass).
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
from typing import Any

from bench import ceiling, report, smoke
from bench.scenarios import SCENARIOS, Params, resolve_targets, run, run_workers
from bench.server import ServerOptions
from bench.storm import VARIANTS, run_storm


def _parser() -> argparse.ArgumentParser:
    d = Params(scenario="hold")
    o = ServerOptions(secret="")
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("scenario", nargs="?", choices=[*SCENARIOS, "storm", "ceiling", "workers", "all", "smoke"],
                    help="what to run; `all` runs hold, unicast, broadcast, churn and storm in turn with the same "
                         "options; `workers`: the broadcast on our service with 1 worker, then --workers, same "
                         "invocation; `storm`: N clients connect at once (fresh, then resuming); `ceiling`: "
                         "publishes/s of one Redis primary through the publish script")
    ap.add_argument("--smoke", action="store_true", help="same as the `smoke` scenario")
    ap.add_argument("--target", choices=["ours", "baseline", "nchan", "both", "all"], default="all",
                    help="all: ours, the baseline and nginx+nchan (when installed); both: ours and the baseline")
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
    g = ap.add_argument_group("storm")
    g.add_argument("--variant", choices=[*VARIANTS, "both"], default="both", help="storm: fresh, resume or both")
    g.add_argument("--rounds", type=int, default=d.rounds,
                   help="storm resume: events per user; stream i reads 1 + i mod (rounds-1) of them, then drops")
    g.add_argument("--storm-timeout", type=float, default=d.storm_timeout, help="storm: seconds a connect may take")
    g.add_argument("--profile", metavar="DIR", help="storm: py-spy records our server into DIR (raw stacks)")
    g.add_argument("--profile-native", action="store_true", help="storm: py-spy --native (pauses the server)")
    g.add_argument("--baseline-max-streams", type=int, default=d.baseline_max_streams,
                   help="storm: skip the baseline above this many streams (it holds ~9,900 at most)")
    g = ap.add_argument_group("ceiling")
    g.add_argument("--ceiling-conns", type=int, default=8, help="ceiling: connections of the pipelined mode")
    g.add_argument("--ceiling-depth", type=int, default=64, help="ceiling: EVALSHAs in flight per connection")
    g.add_argument("--ceiling-users", type=int, default=1000, help="ceiling: users of the one app published to")
    g.add_argument("--batch", type=int, default=0, metavar="N",
                   help="ceiling: also measure the batch publish API with N events per call (skipped with a "
                        "message while quart_sse.publisher has none)")
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
    g.add_argument("--ours-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for our service (repeatable), e.g. LOG_LEVEL=INFO")
    g.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (/tmp/bench-*.log)")
    return ap


def _params(a: argparse.Namespace, scenario: str) -> Params:
    return Params(scenario=scenario, streams=a.streams, users=a.users, per_user=a.per_user, rate=a.rate,
                  duration=a.duration, clients=a.clients, client_cpu=a.client_cpu,
                  connect_concurrency=a.connect_concurrency, connect_timeout=a.connect_timeout,
                  churn_rate=a.churn_rate, churn_hold=a.churn_hold, publish=a.publish, ours_broker=a.ours_broker,
                  pub_conns=a.pub_conns, drain=a.drain, settle=a.settle, use_uvloop=not a.no_uvloop,
                  count_only=a.count_only, read_batch_ms=a.read_batch_ms, rounds=a.rounds,
                  storm_timeout=a.storm_timeout, profile_dir=a.profile, profile_native=a.profile_native,
                  baseline_max_streams=a.baseline_max_streams)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.smoke:
        a.scenario = "smoke"
    if a.scenario is None:
        _parser().error("a scenario is required")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every server and client we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    extra_env = dict(kv.split("=", 1) for kv in a.ours_env)
    opts = ServerOptions(secret=secrets.token_urlsafe(32), workers=a.workers, cpu=a.server_cpu,
                         ping_interval=a.ping_interval, app_mode=a.app_mode, ours_cmd=a.ours_cmd,
                         keep_logs=a.keep_logs, extra_env=extra_env)
    result: dict[str, Any]
    targets_l, target_notes = resolve_targets(a.target)
    for note in target_notes:
        print(f"note: {note}", flush=True)
    if a.scenario == "ceiling":
        result = ceiling.run_ceiling(a.duration, a.ceiling_users, a.ceiling_conns, a.ceiling_depth, a.batch,
                                     a.server_cpu, a.client_cpu)
        ok = all(not m["errors"] for m in result["modes"])
        print(ceiling.table(result))
    elif a.scenario == "storm":
        variants = VARIANTS if a.variant == "both" else (a.variant,)
        storms = run_storm(_params(a, "storm"), targets_l, a.redis_url, opts, variants)
        for r in storms.values():
            print(report.table(r), end="\n\n", flush=True)
        ok = not any(r["errors"] for r in storms.values())
        result = {"scenario": "storm", "runs": storms}
    elif a.scenario == "workers":
        result = run_workers(_params(a, "broadcast"), a.redis_url, opts)
        ok = not result["errors"]
        print(report.table(result))
    elif a.scenario == "smoke":
        result = smoke.run_inline(opts, tuple(targets_l))
        ok = result["ok"]
        print(report.table(result), end="\n\n")
        for r in result["storm"].values():
            print(report.table(r), end="\n\n")
        print(ceiling.table(result["ceiling"]))
    else:
        runs: dict[str, Any] = {}
        for scenario in SCENARIOS if a.scenario == "all" else (a.scenario,):
            runs[scenario] = run(_params(a, scenario), targets_l, a.redis_url, opts)
            print(report.table(runs[scenario]), end="\n\n", flush=True)
        if a.scenario == "all":
            storms = run_storm(_params(a, "storm"), targets_l, a.redis_url, opts)
            for variant, r in storms.items():
                runs[f"storm-{variant}"] = r
                print(report.table(r), end="\n\n", flush=True)
        ok = not any(r["errors"] for r in runs.values())
        result = runs[a.scenario] if a.scenario != "all" else {"scenario": "all", "runs": runs}
    if a.scenario == "smoke":
        print("smoke:", "OK" if ok else "FAILED: " + "; ".join(result["problems"]))
    if a.json:
        report.write_json(result, a.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
