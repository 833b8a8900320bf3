"""Start, probe, measure and stop the processes under test (our service, the baseline, Redis).

The harness starts every server itself so it knows the pid and can read /proc for RSS and CPU: figures for the
whole process tree, because Hypercorn-style servers fork workers.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def raise_nofile() -> int:
    """Lift the soft open-files limit to the hard one (20,000 here): one stream is one fd on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A port the kernel just handed out on loopback; a tiny race with other users, acceptable on a dev box."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# --- /proc readers -------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces or parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def tree_pids(root: int) -> list[int]:
    """`root` and all its live descendants (workers of a pre-fork server)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is not None:
            children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime plus reaped children's, in seconds; 0 for a gone process."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    # after the comm field: state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
    return (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    return sum(proc_cpu_seconds(p) for p in tree_pids(root))


def proc_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(root: int) -> int:
    return sum(proc_rss_kb(p) for p in tree_pids(root))


# --- processes -----------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A started server process; `stop()` ends it and any worker it forked."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None  # removed by stop() (nginx's prefix: config, pid, temp paths)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def rss_kb(self) -> int:
        return tree_rss_kb(self.pid)

    def nprocs(self) -> int:
        return len(tree_pids(self.pid))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 5.0, keep_log: bool = False) -> None:
        pids = tree_pids(self.pid) if self.alive() else []
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in pids[1:]:  # workers that outlived their master
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not keep_log:
            self.log_path.unlink(missing_ok=True)
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)


def _spawn(name: str, argv: list[str], env: dict[str, str], port: int, cpu: str | None,
           log: Path | None = None) -> Server:
    if cpu is not None:
        argv = ["taskset", "-c", cpu, *argv]
    if log is None:
        log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=raise_nofile)
    return Server(name, proc, port, log, env)


def _wait(server: Server, probe: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            tail = server.log_tail()
            server.stop()
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{tail}")
        if probe():
            return
        time.sleep(0.1)
    tail = server.log_tail()
    server.stop()
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f}s:\n{tail}")


def http_ok(port: int, path: str = "/health") -> bool:
    """GET over http.client (no proxy env is honoured, so this can only reach loopback)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=1.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def redis_ok(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(cpu: str | None = None, timeout: float = 10.0) -> Server:
    """A throwaway redis-server: no persistence, loopback only, as many clients as our fd limit allows."""
    port = free_port()
    argv = ["/usr/bin/redis-server", "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
            "--maxclients", str(resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 32), "--loglevel", "warning"]
    server = _spawn("redis", argv, {}, port, cpu)
    _wait(server, lambda: redis_ok(port), timeout)
    return server


def redis_url_port(url: str) -> tuple[str, int]:
    """host and port of a redis:// URL; only loopback hosts are accepted as publish targets."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or LOOPBACK
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"--redis-url must point at this machine's loopback, not {host}")
    return host, parts.port or 6379


@dataclass
class ServerOptions:
    """What both targets are started with, so the comparison is like for like."""

    secret: str
    workers: int = 1
    cpu: str | None = None
    ping_interval: float = 15.0
    app_mode: str = "production"
    ours_cmd: str = f"{sys.executable} -m quart_sse serve"
    extra_env: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 30.0
    keep_logs: bool = False  # leave /tmp/bench-<name>-*.log behind for a post-mortem


def start_ours(opts: ServerOptions, redis_url: str | None) -> Server:
    """Our service, configured only through its documented environment."""
    port = free_port()
    env = {
        "APP_HOST": LOOPBACK, "APP_PORT": str(port), "JWT_SECRET": opts.secret, "APP_MODE": opts.app_mode,
        "PING_INTERVAL": str(opts.ping_interval), "MAX_CONNECTIONS_PER_USER": "0", "LOG_LEVEL": "WARNING",
        # the worker count is forwarded under every name the service may read (see README)
        "WORKERS": str(opts.workers), "WEB_CONCURRENCY": str(opts.workers), "HYPERCORN_WORKERS": str(opts.workers),
        **opts.extra_env,
    }
    if redis_url:
        env["REDIS_URL"] = redis_url
    else:
        env["REDIS_URL"] = ""
    server = _spawn("ours", shlex.split(opts.ours_cmd), env, port, opts.cpu)
    _wait(server, lambda: http_ok(port), opts.start_timeout)
    return server


def start_baseline(opts: ServerOptions, redis_url: str) -> Server:
    """The naive Quart app under Hypercorn, exactly as a reader of the seed would run it."""
    port = free_port()
    env = {"JWT_SECRET": opts.secret, "REDIS_URL": redis_url, "PING_INTERVAL": str(opts.ping_interval)}
    argv = [sys.executable, "-m", "hypercorn", "bench.baseline_app:app", "--bind", f"{LOOPBACK}:{port}",
            "--workers", str(opts.workers)]
    server = _spawn("baseline", argv, env, port, opts.cpu)
    _wait(server, lambda: http_ok(port), opts.start_timeout)
    return server


# --- nginx + nchan, the reference peer -----------------------------------------------------------------------

NGINX = "/usr/sbin/nginx"
NCHAN_MODULE = Path("/usr/share/nginx/modules/ngx_nchan_module.so")
NCHAN_TEMPLATE = Path(__file__).resolve().parent / "nchan.conf.template"


def nchan_missing() -> str | None:
    """Why nchan cannot run here (None when it can): Debian's `nginx-light` and `libnginx-mod-nchan`."""
    if not Path(NGINX).is_file():
        return f"{NGINX} not found (apt-get install nginx-light libnginx-mod-nchan)"
    if not NCHAN_MODULE.is_file():
        return f"{NCHAN_MODULE} not found (apt-get install libnginx-mod-nchan)"
    return None


def render_nchan_conf(prefix: Path, port: int, *, ping_interval: float, backlog: int, history: int,
                      nofile: int) -> str:
    """The nginx.conf of `nchan.conf.template` for one run: one worker, loopback `port`, `history` messages kept
    per channel (for Last-Event-ID), pings every `ping_interval` s, listen backlog `backlog` (ours: 2048)."""
    values = {"PREFIX": str(prefix), "PORT": str(port), "BACKLOG": str(backlog), "NOFILE": str(nofile),
              "CONNECTIONS": str(max(1024, nofile - 64)), "SHM": "512M", "HISTORY": str(max(1, history)),
              "PING": str(max(1, round(ping_interval)))}
    text = NCHAN_TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def start_nchan(opts: ServerOptions, history: int = 100, backlog: int = 2048) -> Server:
    """nginx + nchan in the foreground (`daemon off`: the harness owns the master, whose tree holds the worker)."""
    missing = nchan_missing()
    if missing:
        raise RuntimeError(f"nchan is not installed: {missing}")
    port = free_port()
    prefix = Path(tempfile.mkdtemp(prefix="bench-nchan-"))
    conf = prefix / "nginx.conf"
    # nginx's master runs as root and raises its worker's limit itself: room for 19,000 streams plus the
    # connections it counts while they close (at 20,000 it logged "worker_connections are not enough, reusing
    # connections" and closed some of a 19,000-client storm unanswered)
    nofile = 65536
    conf.write_text(render_nchan_conf(prefix, port, ping_interval=opts.ping_interval, backlog=backlog,
                                      history=history, nofile=nofile))
    argv = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    server = _spawn("nchan", argv, {}, port, opts.cpu, log=prefix / "error.log")
    server.workdir = prefix
    _wait(server, lambda: http_ok(port), opts.start_timeout)
    return server
