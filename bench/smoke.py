"""A few-second run against the baseline and ours that CI can afford: are all the figures produced?

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

from bench.scenarios import Params, dig
from bench.scenarios import run as run_scenario
from bench.server import PROJECT_ROOT, ServerOptions

# 50 streams, 250 deliveries/s for 2 s: enough to exercise connect, publish, fan-out, latency and /proc readings.
SMOKE_PARAMS = Params(scenario="unicast", users=25, per_user=2, rate=5.0, duration=2.0, drain=3.0, settle=0.3,
                      clients=1, connect_timeout=10.0)
REQUIRED = ("connect.ok", "server_rss.per_stream_kb", "events.delivered", "events.p99_ms", "events.delivered_per_s",
            "server.events_per_cpu_s", "client.cpu_pct_max")


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
    return out


def run_inline(opts: ServerOptions | None = None, targets: tuple[str, ...] = ("ours", "baseline")) -> dict[str, Any]:
    """The smoke scenario in this process (what `python -m bench smoke` calls)."""
    result = run_scenario(SMOKE_PARAMS, list(targets), None, opts)
    result["problems"] = problems(result, targets)
    result["ok"] = not result["problems"]
    return result


def run(timeout: float = 120.0, ours_cmd: str | None = None) -> dict[str, Any]:
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
