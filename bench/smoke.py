"""A few-second run against ours, the baseline and nchan (when installed) that CI can afford: are all the figures
produced? A small unicast run, a 200-stream storm (fresh and resuming) and a short Redis ceiling.

`run(timeout)` is for a pytest test: it runs `python -m bench smoke` in its own process group (so a hang is killed
with every server it started) and returns the parsed result, with `ok` and `problems`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import ceiling
from bench.scenarios import Params, dig
from bench.scenarios import run as run_scenario
from bench.server import PROJECT_ROOT, ServerOptions
from bench.storm import run_storm

# 50 streams, 250 deliveries/s for 2 s: enough to exercise connect, publish, fan-out, latency and /proc readings.
SMOKE_PARAMS = Params(scenario="unicast", users=25, per_user=2, rate=5.0, duration=2.0, drain=3.0, settle=0.3,
                      clients=1, connect_timeout=10.0)
REQUIRED = ("connect.ok", "server_rss.per_stream_kb", "events.delivered", "events.p99_ms", "events.delivered_per_s",
            "server.events_per_cpu_s", "client.cpu_pct_max")


# 200 clients at once, then 200 resuming after 3 events each published while they were away (1 or 2 seen)
SMOKE_STORM = Params(scenario="storm", streams=200, rounds=3, clients=2, connect_timeout=10.0, storm_timeout=20.0,
                     settle=0.3)
STORM_REQUIRED = ("storm.ok", "storm.all_live_s", "storm.p99_ms", "server_rss.per_stream_kb", "kernel.ListenOverflows",
                  "live.probe_received", "verify.exact")


class SmokeError(RuntimeError):
    """The smoke run hung or produced no result at all."""


def problems(result: dict[str, Any], targets: tuple[str, ...] = ("ours", "baseline")) -> list[str]:
    """What is missing for the smoke to pass: every target ran, connected all streams, and got events."""
    out = [f"{t}: {err}" for t, err in result.get("errors", {}).items()]
    for t in targets:
        fig = result.get("targets", {}).get(t)
        if fig is None:
            out.append(f"{t}: no figures")
            continue
        for key in REQUIRED:
            v = dig(fig, key)
            if not isinstance(v, (int, float)) or math.isnan(v):
                out.append(f"{t}: {key} missing")
        if dig(fig, "connect.failed"):
            out.append(f"{t}: {fig['connect']['failed']} streams failed to connect")
        if not dig(fig, "events.delivered"):
            out.append(f"{t}: no event delivered")
    for variant, res in result.get("storm", {}).items():
        out += [f"storm {variant} {t}: {err}" for t, err in res.get("errors", {}).items()]
        for t in targets:
            if variant == "resume" and t == "baseline":
                continue  # it keeps no history
            fig = res.get("targets", {}).get(t)
            if fig is None:
                out.append(f"storm {variant} {t}: no figures")
                continue
            out += [f"storm {variant} {t}: {key} missing" for key in STORM_REQUIRED
                    if not isinstance(dig(fig, key), (int, float))]
            n = fig["storm"]["streams"]
            if fig["storm"]["ok"] != n or fig["verify"]["exact"] != n or fig["live"]["not_live"]:
                out.append(f"storm {variant} {t}: {fig['storm']['ok']}/{n} connected, {fig['verify']['exact']} exact, "
                           f"{fig['live']['not_live']} not live: {fig['verify']['examples']}")
            if t == "ours" and not isinstance(dig(fig, "server.streams_per_cpu_s"), (int, float)):
                out.append(f"storm {variant} ours: no new streams per CPU-second")
    for m in result.get("ceiling", {}).get("modes", []):
        if not m["ok"] or m["errors"]:
            out.append(f"ceiling {m['mode']}: {m['ok']} publishes, errors {m['errors']}")
    return out


def run_inline(opts: ServerOptions | None = None, targets: tuple[str, ...] = ("ours", "baseline")) -> dict[str, Any]:
    """The smoke scenario in this process (what `python -m bench smoke` calls)."""
    result = run_scenario(SMOKE_PARAMS, list(targets), None, opts)
    result["storm"] = run_storm(SMOKE_STORM, list(targets), None, opts)
    result["ceiling"] = ceiling.run_ceiling(duration=0.5, users=100, modes=("raw1", "rawpipe", "py1"))
    result["problems"] = problems(result, targets)
    result["ok"] = not result["problems"]
    return result


def run(timeout: float = 150.0, ours_cmd: str | None = None) -> dict[str, Any]:
    """Run the smoke in a child process group; raise SmokeError on timeout or when no result came back."""
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        out = Path(tmp) / "smoke.json"
        argv = [sys.executable, "-m", "bench", "smoke", "--json", str(out)]
        if ours_cmd:
            argv += ["--ours-cmd", ours_cmd]
        # TMPDIR: the servers' logs land in `tmp` too, so even a killed run leaves nothing behind
        proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "TMPDIR": tmp})
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            tail = log.decode(errors="replace")[-3000:]
            raise SmokeError(f"smoke did not finish in {timeout:.0f}s:\n{tail}") from None
        if not out.exists():
            tail = log.decode(errors="replace")[-3000:]
            raise SmokeError(f"smoke exited {proc.returncode} without a result:\n{tail}")
        result: dict[str, Any] = json.loads(out.read_text())
    result["exit_code"] = proc.returncode
    result["log"] = log.decode(errors="replace")
    return result
