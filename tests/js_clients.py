"""Clients nobody here wrote, from npm: newman (runs Postman collections), the npm `eventsource` package (v2, whose
Node code browser bundles carry, and the current fetch-based one) and Yaffle's EventSource polyfill.

They are pinned by tests/js/package-lock.json and installed with `npm ci` once per lockfile into a cache folder
(QUART_SSE_JS_CACHE, else ~/.cache/quart-sse/js/<hash>), never globally and never into the repository. Node and
npm are test dependencies like redis-server and Chromium: missing, the tests that need them fail saying how to
install them (.ci/run installs them).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT

JS_DIR = ROOT / "tests" / "js"
MANIFESTS = ("package.json", "package-lock.json")


def _cache_root() -> Path:
    env = os.environ.get("QUART_SSE_JS_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quart-sse" / "js"


def node_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: install Node.js 20+ with npm (Debian/Ubuntu: apt-get install -y "
                    "nodejs npm); .ci/run installs them", pytrace=False)
    return path


def install() -> Path:
    """The node_modules folder holding exactly tests/js/package-lock.json, installed on first use.

    Installed into a temporary folder and renamed into place under a file lock, so concurrent test runs (several
    worktrees share the cache) neither install twice nor see a half-installed tree.
    """
    npm = node_tool("npm")
    node_tool("node")
    key = hashlib.sha256(b"".join((JS_DIR / m).read_bytes() for m in MANIFESTS)).hexdigest()[:16]
    root = _cache_root()
    target = root / key
    done = target / "node_modules" / ".quart-sse-installed"
    if done.exists():
        return target / "node_modules"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return target / "node_modules"
        work = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=root))
        try:
            for m in MANIFESTS:
                shutil.copy(JS_DIR / m, work / m)
            proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=work,
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                pytest.fail(f"npm ci failed in {work}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", pytrace=False)
            (work / "node_modules" / ".quart-sse-installed").touch()
            if target.exists():
                shutil.rmtree(target)
            work.rename(target)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return target / "node_modules"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    return install()


def bin_path(modules: Path, name: str) -> Path:
    return modules / ".bin" / name


def browserify(modules: Path, entry_source: str, out: Path) -> Path:
    """Bundle `entry_source` (CommonJS; require packages by absolute path under `modules`) for a browser, with
    browserify's shims for Node's http, events, url... as any bundler of a Node package does."""
    entry = out.with_suffix(".entry.js")
    entry.write_text(entry_source)
    proc = subprocess.run([node_tool("node"), str(bin_path(modules, "browserify")), str(entry), "-o", str(out)],
                          cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@contextlib.contextmanager
def static_site(directory: Path, port: int) -> Iterator[str]:
    """`directory` over HTTP on 127.0.0.1:`port` (another origin than the service's): yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=httpd.serve_forever, name=f"static-site-{port}", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
