"""WORKERS=2: two processes share one port and behave as one service; /metrics sums both workers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support import (
    RedisServer,
    ServiceProcess,
    auth,
    free_port,
    make_settings,
    metric_value,
    open_stream,
    service_env,
    token,
)

pytestmark = pytest.mark.slow
SETTINGS = make_settings()


async def test_two_workers_one_service(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    svc = ServiceProcess(free_port(), {"REDIS_URL": redis.url, "WORKERS": "2"}, tmp_path / "svc.log")
    streams = []
    try:
        await svc.wait_ready()
        instances: set[str] = set()
        for _ in range(40):  # a new connection each time: the kernel spreads them over both workers
            async with httpx.AsyncClient(base_url=svc.url) as c:
                instances.add((await c.get("/ready")).json()["instance"])
            if len(instances) == 2:
                break
        assert len(instances) == 2, "both workers should answer"
        streams = [await open_stream(svc.port, headers=auth(token(SETTINGS, "alice", "shop"))) for _ in range(8)]
        assert all(s.status == 200 for s in streams)
        async with httpx.AsyncClient(base_url=svc.url) as c:
            r = await c.post("/publish/shop/alice", json={"type": "t", "data": 1},
                             headers=auth(token(SETTINGS, "b", "shop", "publish")))
            assert r.status_code == 202
            for s in streams:  # whichever worker holds it
                ev = await s.next_event()
                assert ev is not None and ev.id == r.json()["id"]
            metrics = (await c.get("/metrics")).text
            assert metric_value(metrics, "sse_streams_open") == 8  # both workers' streams, from either worker
            assert metric_value(metrics, "sse_events_delivered_total") == 8
        for s in streams:
            await s.close()
        streams = []
        async with httpx.AsyncClient(base_url=svc.url) as c:
            for _ in range(100):
                if metric_value((await c.get("/metrics")).text, "sse_streams_open") == 0:
                    break
                await asyncio.sleep(0.05)
            assert metric_value((await c.get("/metrics")).text, "sse_streams_open") == 0
        assert svc.stop() == 0
        assert "Traceback" not in svc.log()
    finally:
        for s in streams:
            await s.close()
        svc.stop()
        redis.stop()


def test_a_worker_that_fails_at_start_up_logs_its_traceback(tmp_path: Path) -> None:
    """WORKERS=2 and each worker's app factory raises: both tracebacks are logged and the service exits 1 (it used
    to exit 1 without a word: os._exit skips the interpreter's own report)."""
    code = ("import sys, quart_sse.app as a\n"
            "def boom(*_args, **_kw):\n"
            "    raise RuntimeError('injected start-up failure')\n"
            "a.create_app = boom\n"
            "from quart_sse.__main__ import main\n"
            "sys.exit(main(['serve']))\n")
    port = free_port()
    proc = subprocess.run([sys.executable, "-c", code], env=service_env({"APP_PORT": str(port), "WORKERS": "2",
                                                                  "REDIS_URL": "redis://127.0.0.1:1/0"}),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    failed = re.findall(r"worker (\d+) failed", out)
    exited = re.findall(r"worker (\d+) exited with code 1", out)
    assert len(set(failed)) == 2 and set(failed) == set(exited), out
    assert out.count("Traceback (most recent call last)") == 2, out
    assert out.count("RuntimeError: injected start-up failure") == 2, out


STOPPED_WHILE_STARTING = ("import os, signal, sys, quart_sse.app as a\n"
                          "real = a.create_app\n"
                          "def starting(*args, **kw):  # the stop arrives while the app is being built\n"
                          "    service = os.getpid() if os.environ['WORKERS'] == '1' else os.getppid()\n"
                          "    os.kill(service, signal.SIGTERM)  # to the service: the parent of workers\n"
                          "    return real(*args, **kw)\n"
                          "a.create_app = starting\n"
                          "from quart_sse.__main__ import main\n"
                          "sys.exit(main(['serve']))\n")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_while_starting_is_a_clean_stop(tmp_path: Path, workers: int) -> None:
    """SIGTERM before the loop's signal handlers are in place (here: while the app is built) stops the process as
    a later one would: exit 0, one stop line per process. The signal's default action used to kill it: a worker
    "exited with signal 15" and the service exited 1 (found by CI: a test stopped a fresh WORKERS=2 service while
    its second worker was still importing)."""
    redis = RedisServer(tmp_path)
    env = {"APP_PORT": str(free_port()), "WORKERS": str(workers)}
    if workers > 1:
        redis.start()
        env["REDIS_URL"] = redis.url
    try:
        proc = subprocess.run([sys.executable, "-c", STOPPED_WHILE_STARTING], env=service_env(env), cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    finally:
        redis.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("SIGTERM: ending 0 streams, then stopping") == workers, out
    assert "exited with" not in out and "Traceback" not in out, out


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:  # fields: state, ppid, ...
            found.append(int(stat.parent.name))
    return found


async def test_sigterm_to_the_supervisor_as_its_workers_start(tmp_path: Path) -> None:
    """`docker stop` right after `docker start`: SIGTERM to the supervisor (PID 1 in the image) as soon as its two
    workers exist, while they still import the app. The supervisor forwards it; each worker stops once it is up,
    and the service exits 0."""
    redis = RedisServer(tmp_path)
    redis.start()
    svc = ServiceProcess(free_port(), {"REDIS_URL": redis.url, "WORKERS": "2"}, tmp_path / "svc.log")
    try:
        deadline = time.monotonic() + 20
        while len(_children(svc.proc.pid)) < 2:
            assert time.monotonic() < deadline and svc.proc.poll() is None, svc.log()
            await asyncio.sleep(0.002)
        os.kill(svc.proc.pid, signal.SIGTERM)
        code = await asyncio.to_thread(svc.proc.wait, 30)
        log = svc.log()
        assert code == 0, log
        assert log.count("SIGTERM: ending 0 streams, then stopping") == 2, log
        assert "exited with" not in log and "Traceback" not in log, log
    finally:
        svc.stop()
        redis.stop()


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """A WORKERS=2 service on a Redis of its own, up."""
    redis = RedisServer(tmp_path)
    redis.start()
    svc = ServiceProcess(free_port(), {"REDIS_URL": redis.url, "WORKERS": "2"}, tmp_path / "svc.log")
    try:
        await svc.wait_ready()
        yield svc
    finally:
        svc.stop()
        redis.stop()


async def test_a_worker_killed_while_serving_is_replaced(two_workers: ServiceProcess) -> None:
    """The OOM killer takes one worker: the parent forks another in its place, both answer again, and the
    service still stops with exit 0 (it used to go on with one worker, and no line said so until it stopped)."""
    svc = two_workers
    first = _children(svc.proc.pid)
    assert len(first) == 2, svc.log()
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        now = _children(svc.proc.pid)
        if len(now) == 2 and first[0] not in now:
            break
        assert time.monotonic() < deadline, svc.log()
        await asyncio.sleep(0.02)
    instances: set[str] = set()
    while len(instances) < 2:  # a new connection each time: the kernel spreads them over both workers
        assert time.monotonic() < deadline, svc.log()
        async with httpx.AsyncClient(base_url=svc.url) as c:
            r = await c.get("/ready")
            if r.status_code == 200:
                instances.add(r.json()["instance"])
    new = (set(now) - set(first)).pop()
    assert f"worker {first[0]} exited with signal 9" in svc.log()
    assert f"worker {first[0]} replaced by worker {new} (signal 9)" in svc.log()
    assert svc.stop() == 0, svc.log()


def test_a_worker_that_fails_stops_the_service(tmp_path: Path) -> None:
    """One of two workers fails at start-up, the other comes up: the service stops and exits 1, so that the
    orchestrator sees it (it used to go on with one worker, silently, until it was stopped)."""
    code = ("import os, sys, quart_sse.app as a\n"
            "real = a.create_app\n"
            "def once(*args, **kw):  # the first worker here fails\n"
            "    try:\n"
            "        os.close(os.open(sys.argv[1], os.O_CREAT | os.O_EXCL))\n"
            "    except FileExistsError:\n"
            "        return real(*args, **kw)\n"
            "    raise RuntimeError('injected start-up failure')\n"
            "a.create_app = once\n"
            "from quart_sse.__main__ import main\n"
            "sys.exit(main(['serve']))\n")
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "marker")],
                              env=service_env({"APP_PORT": str(free_port()), "WORKERS": "2", "REDIS_URL": redis.url}),
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    finally:
        redis.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    failed = re.findall(r"worker (\d+) failed", out)
    assert len(failed) == 1, out
    assert f"stopping the service: worker {failed[0]} exited with code 1 and it failed" in out, out
    assert out.count("exited with") == 2, out  # the failed worker's line and the stop line; the other exited 0
    assert out.count("Traceback (most recent call last)") == 1, out


async def test_workers_stop_when_their_parent_dies(two_workers: ServiceProcess) -> None:
    """SIGKILL of the parent (the OOM killer, a supervisor's kill): its workers get SIGTERM and stop cleanly. They
    used to serve on, orphaned, beside the next copy of the service on the same port."""
    svc = two_workers
    workers = _children(svc.proc.pid)
    assert len(workers) == 2, svc.log()
    os.kill(svc.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while any(_state(pid) not in ("Z", "gone") for pid in workers):
        assert time.monotonic() < deadline, svc.log()
        await asyncio.sleep(0.05)
    assert svc.log().count("SIGTERM: ending 0 streams, then stopping") == 2, svc.log()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


async def test_a_second_copy_on_the_same_port_is_refused(tmp_path: Path) -> None:
    """The workers bind with SO_REUSEPORT, so a second copy's check used to succeed beside them and the two
    services split the traffic; it now binds without it and says the port is in use."""
    redis = RedisServer(tmp_path)
    redis.start()
    port = free_port()
    svc = ServiceProcess(port, {"REDIS_URL": redis.url, "WORKERS": "2"}, tmp_path / "svc.log")
    try:
        await svc.wait_ready()
        for workers in ("2", "1"):
            env = service_env({"APP_PORT": str(port), "WORKERS": workers, "REDIS_URL": redis.url})
            second = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "quart_sse", "serve"],
                                             cwd=tmp_path, timeout=30, env=env, capture_output=True, text=True)
            assert second.returncode == 1, second.stdout + second.stderr
            assert f"error: APP_PORT: 0.0.0.0:{port} is already in use" in second.stderr, second.stderr
    finally:
        svc.stop()
        redis.stop()


@pytest.mark.parametrize(("host", "says"), [("nonexistent.invalid", "Name or service not known"),
                                            ("10.99.99.99", "Cannot assign requested address")])
def test_a_host_that_cannot_be_listened_on_is_one_line(tmp_path: Path, host: str, says: str) -> None:
    for workers in ("1", "2"):
        proc = subprocess.run([sys.executable, "-m", "quart_sse", "serve"], cwd=tmp_path, timeout=30,
                              env=service_env({"APP_HOST": host, "APP_PORT": str(free_port()), "WORKERS": workers,
                                               "REDIS_URL": "redis://127.0.0.1:1/0"}),
                              capture_output=True, text=True)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip() == f"error: APP_HOST: cannot listen on '{host}': {says}", proc.stderr


async def test_workers_on_ipv6(tmp_path: Path) -> None:
    """APP_HOST=::1 with WORKERS=2: the port check used an IPv4 socket and failed with a traceback."""
    redis = RedisServer(tmp_path)
    redis.start()
    svc = ServiceProcess(free_port(), {"REDIS_URL": redis.url, "WORKERS": "2", "APP_HOST": "::1"},
                         tmp_path / "svc.log")
    svc.url = f"http://[::1]:{svc.port}"
    try:
        await svc.wait_ready()
        assert svc.stop() == 0, svc.log()
    finally:
        svc.stop()
        redis.stop()


async def test_the_metrics_directory_is_the_run_own(tmp_path: Path) -> None:
    """WORKERS=2 keeps its workers' metrics in a directory: one it made is removed at exit (each start used to
    leave one in /tmp), one given in PROMETHEUS_MULTIPROC_DIR is emptied of an earlier run's files at start (they
    used to be added to this run's counters)."""
    redis = RedisServer(tmp_path)
    redis.start()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_12345.db").write_bytes(b"stale")
    try:
        for env in ({"TMPDIR": str(tmp)}, {"PROMETHEUS_MULTIPROC_DIR": str(given)}):
            svc = ServiceProcess(free_port(), {"REDIS_URL": redis.url, "WORKERS": "2", **env}, tmp_path / "svc.log")
            try:
                await svc.wait_ready()
                assert ("PROMETHEUS_MULTIPROC_DIR" in env) is not (given / "counter_12345.db").exists()
                assert svc.stop() == 0, svc.log()
            finally:
                svc.stop()
        assert list(tmp.iterdir()) == []
    finally:
        redis.stop()
