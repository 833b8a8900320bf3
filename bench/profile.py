"""Where a server's CPU went: a py-spy raw profile (collapsed stacks) cut into the buckets of
docs/performance.md (Reconnect storms).

    python -m bench.profile bench/results/profiles/ours-fresh-5000-*.txt [--top 25]

Each sample is put in one bucket. Walking its stack from the innermost frame outwards, the first frame that marks
a part of our stream handler decides (token verification, registry admission, subscription, replay/head, log
lines, metrics); a sample with no such frame goes to the innermost frame's package (Quart, Hypercorn/h11,
redis-py, our other code), and only then to asyncio/uvloop, so that asyncio's streams called by Hypercorn count
for Hypercorn. Other standard-library frames are transparent: `uuid4` called from the handler counts for the
handler. Samples with nothing but the process's entry frames are the event loop's own C code (uvloop: epoll,
accept, dispatch). With `py-spy --native`, samples inside CPython's cyclic GC go to `GC` whatever called it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from bench.server import PROJECT_ROOT

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

OUR_MODULES = frozenset(p.name for d in ("quart_sse", "blueprints")
                        for p in (PROJECT_ROOT / d).rglob("*.py"))
# the process's entry frames, under every sample of the main loop: transparent
ENTRY = frozenset({"_worker", "serve", "_serve", "main", "<module>", "_run_code", "_run_module_as_main"})

# (bucket, file: our module's name or a package path fragment, function name or None for any): the markers of
# our handler's parts, checked innermost first. py-spy names our files by module path or by basename alone.
MARKERS: list[tuple[str, str, str | None]] = [
    ("GC", "gcmodule.c", None),
    ("GC", "", "gc_collect_main"),
    ("GC", "", "collect_with_callback"),
    ("log lines", "logging/__init__.py", None),
    ("log lines", "logs.py", None),
    ("log lines", "hypercorn/logging.py", None),
    ("token verification", "auth.py", None),
    ("token verification", "quart_jwt_extended/", None),
    ("token verification", "jwt/", None),
    ("registry admission", "registry.py", None),
    ("subscription (hub.attach, pub/sub)", "hub.py", "attach"),
    ("subscription (hub.attach, pub/sub)", "pubsub.py", None),
    ("subscription (hub.attach, pub/sub)", "redis.py", "subscribe"),
    ("replay / head", "redis.py", "replay"),
    ("replay / head", "redis.py", "head"),
    ("replay / head", "history.py", None),
    ("replay / head", "memory.py", "replay"),
    ("replay / head", "memory.py", "head"),
    ("metrics", "prometheus_client/", None),
]
# the innermost frame of these packages names the bucket of a sample without a marker; asyncio comes last, so
# that asyncio called from Hypercorn or redis-py counts for them
PACKAGES: list[tuple[str, str]] = [
    ("Quart request path", "quart/"),
    ("Quart request path", "werkzeug/"),
    ("Quart request path", "blinker/"),
    ("Hypercorn / h11", "hypercorn/"),
    ("Hypercorn / h11", "h11/"),
    ("Hypercorn / h11", "h2/"),
    ("redis-py, other (its sends run in a wait_for task of their own)", "redis/"),
    ("redis-py, other (its sends run in a wait_for task of their own)", "hiredis"),
]
EVENT_LOOP = "asyncio / uvloop (the loop, accept, callbacks)"


def _is_ours(file: str) -> bool:
    """Our module: `quart_sse/...`, `blueprints/...`, or a bare basename of one of ours (py-spy's short form)."""
    if "site-packages" in file or "/lib/python" in file:
        return False
    name = file.rsplit("/", 1)[-1]
    return name in OUR_MODULES and (file == name or file.startswith(("quart_sse/", "blueprints/"))
                                    or "/quart_sse/" in file or "/blueprints/" in file)


def _marker(func: str, file: str) -> str | None:
    for name, frag, fn in MARKERS:
        if fn is not None and fn != func and not func.endswith("." + fn):  # py-spy qualifies: `Hub.attach`
            continue
        if frag.endswith(".py") and frag.rsplit("/", 1)[-1] in OUR_MODULES and "/" not in frag:
            if _is_ours(file) and file.rsplit("/", 1)[-1] == frag:
                return name
        elif (frag and frag in file) or (not frag and fn is not None and func.endswith(fn)):
            return name
    return None


def parse(path: Path) -> list[tuple[list[tuple[str, str, str]], int]]:
    """(frames root first as (function, file, line), count) per line of a py-spy raw file."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for part in stack.split(";"):
            m = _FRAME.match(part.strip())
            if m:
                frames.append((m["func"], m["file"], m["line"] or ""))
        out.append((frames, int(count)))
    return out


def bucket(frames: list[tuple[str, str, str]]) -> str:
    for func, file, _ in reversed(frames):
        name = _marker(func, file)
        if name is not None:
            return name
    for func, file, _ in reversed(frames):
        for name, frag in PACKAGES:
            if frag in file:
                return name
        if _is_ours(file) and func not in ENTRY:
            return "our code, other (stream handler, hand-off, hub)"
    return EVENT_LOOP


def _short(file: str) -> str:
    for anchor in ("site-packages/", "lib/python3.11/", "lib/python3.12/", "lib/python3.13/"):
        if anchor in file:
            return file.split(anchor, 1)[1]
    return file.split("/wt/bench/", 1)[-1]


def breakdown(paths: list[Path], top: int = 25) -> str:
    buckets: Counter[str] = Counter()
    selfs: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for path in paths:
        for frames, n in parse(path):
            total += n
            buckets[bucket(frames)] += n
            if frames:
                func, file, line = frames[-1]
                selfs[f"{func} ({_short(file)}:{line})"] += n
            for key in {f"{f} ({_short(fl)})" for f, fl, _ in frames}:
                incl[key] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples in {len(paths)} profile(s)", "", f"{'bucket':52}{'samples':>9}{'%':>7}"]
    for name, n in buckets.most_common():
        lines.append(f"{name:52}{n:>9}{100 * n / total:>7.1f}")
    lines += ["", f"hottest lines (self time), top {top}:"]
    lines += [f"{100 * n / total:6.1f}%  {k}" for k, n in selfs.most_common(top)]
    lines += ["", f"heaviest functions (inclusive), top {top}:"]
    lines += [f"{100 * n / total:6.1f}%  {k}" for k, n in incl.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="+", type=Path, help="py-spy --format raw files")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    print(breakdown(a.profiles, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
