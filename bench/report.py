"""Turn a run's result dict into a terminal table and a JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.scenarios import RATIO_KEYS, dig

# (label, dotted path into a target's result, format)
ROWS: list[tuple[str, str, str]] = [
    ("verifies on connect", "verifies", "{}"),
    ("publish via", "publish_via", "{}"),
    ("server processes", "server_procs", "{:.0f}"),
    ("broker", "broker", "{}"),
    ("client processes", "clients", "{:.0f}"),
    ("streams connected", "connect.ok", "{:.0f}"),
    ("streams failed", "connect.failed", "{:.0f}"),
    ("time to connect all (s)", "connect.seconds", "{:.2f}"),
    ("connect p50 (ms)", "connect.p50_ms", "{:.1f}"),
    ("connect p99 (ms)", "connect.p99_ms", "{:.1f}"),
    ("server RSS before (MiB)", "server_rss.before_kb", "kb"),
    ("server RSS after (MiB)", "server_rss.after_kb", "kb"),
    ("server RSS per stream (KiB)", "server_rss.per_stream_kb", "{:.1f}"),
    ("redis RSS per stream (KiB)", "redis_rss.per_stream_kb", "{:.1f}"),
    ("measured window (s)", "window_s", "{:.2f}"),
    ("idle server CPU (%)", "idle.server_cpu_pct", "{:.2f}"),
    ("idle redis CPU (%)", "idle.redis_cpu_pct", "{:.2f}"),
    ("pings received /s", "idle.pings_per_s", "{:.1f}"),
    ("streams dropped by server", "idle.drops", "{:.0f}"),
    ("published", "events.published", "{:.0f}"),
    ("publish rate achieved (/s)", "events.publish_rate", "{:.1f}"),
    ("expected deliveries", "events.expected", "{:.0f}"),
    ("delivered", "events.delivered", "{:.0f}"),
    ("lost", "events.lost", "{:.0f}"),
    ("loss (%)", "events.loss_pct", "{:.3f}"),
    ("delivered events /s", "events.delivered_per_s", "{:.0f}"),
    ("latency p50 (ms)", "events.p50_ms", "{:.2f}"),
    ("latency p99 (ms)", "events.p99_ms", "{:.2f}"),
    ("latency max (ms)", "events.max_ms", "{:.2f}"),
    ("re-ordered events", "events.reordered", "{:.0f}"),
    ("streams dropped by server", "events.drops", "{:.0f}"),
    ("churn connects /s", "churn.connects_per_s", "{:.1f}"),
    ("churn disconnects /s", "churn.disconnects_per_s", "{:.1f}"),
    ("churn connect p50 (ms)", "churn.p50_ms", "{:.1f}"),
    ("churn connect p99 (ms)", "churn.p99_ms", "{:.1f}"),
    ("churn failed", "churn.failed", "{:.0f}"),
    ("churn skipped (client cap)", "churn.skipped", "{:.0f}"),
    # storm (bench/storm.py)
    ("resume setup: streams", "setup.ok", "{:.0f}"),
    ("resume setup: events published", "setup.published", "{:.0f}"),
    ("resume setup: streams dropped", "setup.stopped", "{:.0f}"),
    ("storm streams", "storm.streams", "{:.0f}"),
    ("storm streams connected", "storm.ok", "{:.0f}"),
    ("storm failed", "storm.failed", "{:.0f}"),
    ("  refused", "storm.refused", "{:.0f}"),
    ("  reset", "storm.reset", "{:.0f}"),
    ("  closed unanswered", "storm.closed_unanswered", "{:.0f}"),
    ("  timed out", "storm.timeout", "{:.0f}"),
    ("connects launched within (s)", "storm.launch_spread_s", "{:.2f}"),
    ("TIME UNTIL ALL LIVE (s)", "storm.all_live_s", "{:.2f}"),
    ("storm connect p50 (ms)", "storm.p50_ms", "{:.0f}"),
    ("storm connect p99 (ms)", "storm.p99_ms", "{:.0f}"),
    ("storm connect max (ms)", "storm.max_ms", "{:.0f}"),
    ("NEW STREAMS PER SERVER CPU-s", "server.streams_per_cpu_s", "{:.0f}"),
    ("server CPU per stream (ms)", "server.cpu_ms_per_stream", "{:.3f}"),
    ("streams that needed retransmits", "storm.retrans_streams", "{:.0f}"),
    ("  retransmitted segments", "storm.retrans_total", "{:.0f}"),
    ("listen overflows (kernel, all)", "kernel.ListenOverflows", "{:.0f}"),
    ("listen drops (kernel, all)", "kernel.ListenDrops", "{:.0f}"),
    ("SYN queue full drops (kernel, all)", "kernel.TCPReqQFullDrop", "{:.0f}"),
    ("SYN cookies sent (kernel, all)", "kernel.SyncookiesSent", "{:.0f}"),
    ("probe received by", "live.probe_received", "{:.0f}"),
    ("streams not live", "live.not_live", "{:.0f}"),
    ("resumed streams exact", "verify.exact", "{:.0f}"),
    ("events missed while away", "verify.missed_events", "{:.0f}"),
    ("  lost", "verify.lost_events", "{:.0f}"),
    ("  doubled", "verify.doubled_events", "{:.0f}"),
    ("  streams out of order", "verify.streams_out_of_order", "{:.0f}"),
    ("  reset frames", "verify.resets", "{:.0f}"),
    ("  not verified (setup failed)", "verify.no_resume_point", "{:.0f}"),
    ("server CPU (s)", "server.cpu_s", "{:.2f}"),
    ("server CPU (%)", "server.cpu_pct", "{:.1f}"),
    ("redis CPU (s)", "server.redis_cpu_s", "{:.2f}"),
    ("EVENTS PER SERVER CPU-s", "server.events_per_cpu_s", "{:.0f}"),
    ("events per (server+redis) CPU-s", "server.events_per_cpu_s_with_redis", "{:.0f}"),
    ("client CPU, busiest proc (%)", "client.cpu_pct_max", "{:.1f}"),
    ("client CPU, all procs (%)", "client.cpu_pct_total", "{:.1f}"),
    ("publisher CPU (%)", "client.publisher_cpu_pct", "{:.1f}"),
]


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if fmt == "kb":
        return f"{value / 1024:.1f}"
    return fmt.format(value)


def table(result: dict[str, Any]) -> str:
    """Rows of figures, one column per target, plus ours/baseline where both ran."""
    targets: dict[str, Any] = result["targets"]
    names = list(targets)
    # one ratio column per peer: ours/baseline, ours/nchan (or the workers scenario's N/1)
    ratio_cols: dict[str, dict[str, float]] = dict(result.get("ratios") or {})
    if not ratio_cols and result.get("ratio"):
        ratio_cols = {result.get("ratio_label", "ours/baseline"): result["ratio"]}
    ratio: dict[str, float] = next(iter(ratio_cols.values()), {})
    heads = [f"{n}*" if n == "nchan" else n for n in names]
    cols = [*heads, *ratio_cols]
    lines = [f"scenario: {result['scenario']}   publish via: {result['publish']}   "
             f"server workers: {result['server_workers']}   server cpu: {result['server_cpu'] or 'any'}"]
    head = f"{'':34}" + "".join(f"{c:>17}" for c in cols)
    lines += [head, "-" * len(head)]
    for label, path, fmt in ROWS:
        vals = [dig(targets[n], path) for n in names]
        if all(v is None for v in vals):
            continue
        row = f"{label:34}" + "".join(f"{_fmt(v, fmt):>17}" for v in vals)
        for rc in ratio_cols.values():
            r = rc.get(path)
            row += f"{(f'{r:.2f}x' if r is not None else ''):>17}"
        lines.append(row)
    if "nchan" in names:
        lines.append("* nchan checks NO JWT (streams keyed by a header, anyone may subscribe); ours and the baseline "
                     "verify an HS256 token on every stream")
    for name in names:
        t = targets[name]
        if dig(t, "storm.failures"):
            lines.append(f"{name} storm failures: {t['storm']['failures']}")
        for ex in dig(t, "verify.examples") or []:
            lines.append(f"{name} resume mismatch: {ex}")
        if t.get("connect", {}).get("reasons"):
            lines.append(f"{name} connect failures: {t['connect']['reasons']}")
        if dig(t, "events.publish_errors"):
            lines.append(f"{name} publish errors: {t['events']['publish_errors']}")
    for name, err in result.get("errors", {}).items():
        lines.append(f"{name} FAILED: {err}")
    if result["scenario"] == "workers" and "events.delivered_per_s" in ratio:
        lines.append(f"key figure: {names[1]} deliver {ratio['events.delivered_per_s']:.2f}x the events/s of one "
                     "(target: >= 1.7x; the clients, Redis and the publisher share the CPUs given)")
    elif "server.events_per_cpu_s" in ratio and "ours" in targets:
        o = targets["ours"]["server"]["events_per_cpu_s"]
        peers = ", ".join(f"{rc['server.events_per_cpu_s']:.2f}x {label.split('/')[1]}"
                          for label, rc in ratio_cols.items() if "server.events_per_cpu_s" in rc)
        lines.append(f"key figure: ours delivers {o:.0f} events per server CPU-second: {peers}")
    if "client" in next(iter(targets.values()), {}):
        busiest = max((dig(t, "client.cpu_pct_max") or 0) for t in targets.values())
        if busiest > 85:
            lines.append(f"warning: a client process ran at {busiest:.0f}% CPU: the harness may be the limit "
                         "(add --clients or --client-cpu)")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    lines += [f"ratio direction: {k}: {d}" for k, d in RATIO_KEYS if k in ratio and k.endswith(("ms", "kb", "pct"))]
    lines += [f"key figure: {line}" for line in result.get("key_figures", [])]
    return "\n".join(lines)


def _clean(v: Any) -> Any:
    """NaN is not JSON: write null."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(_clean(result), indent=2, default=str) + "\n")
