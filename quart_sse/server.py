"""Run the app on Hypercorn with the settings, SIGTERM handling that ends streams first, and optional workers.

Hypercorn on its own would, on SIGTERM, keep serving open streams until `graceful_timeout` and only then run
`after_serving` (and on Python 3.12+ wait for every connection, however long: its issue #308). Here SIGTERM first
ends every stream (final comment + jittered `retry:`), then stops the server, and `GRACEFUL_TIMEOUT` after the
signal cuts whatever connection is still open (a client that stopped reading), so the process always exits.
The connections themselves are reached through the adapter (quart_sse.adapter) this module builds and attaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from .accesslog import AccessLogger
from .adapter import ServerAdapter
from .logs import setup_logging
from .settings import Settings
from .supervisor import STOP_SIGNALS, Supervisor

log = logging.getLogger("quart_sse.server")


def hypercorn_config(settings: Settings, sock: socket.socket | None = None,
                     adapter: ServerAdapter | None = None) -> Config:
    """Hypercorn's config for the app; with `adapter`, its connections are tracked by it (quart_sse.adapter)."""
    cfg = Config()
    # the socket's file descriptor is Hypercorn's from here (it closes it at the end)
    cfg.bind = [f"fd://{sock.detach()}"] if sock is not None else [f"{settings.app_host}:{settings.app_port}"]
    cfg.graceful_timeout = settings.graceful_timeout
    cfg.keep_alive_timeout = 5  # idle keep-alive connections and clients that never finish their headers
    cfg.read_timeout = None
    cfg.h11_max_incomplete_size = 16 * 1024  # request line + headers
    cfg.backlog = settings.listen_backlog
    # the path without its query string: tokens and tickets travel in `?token=` / `?ticket=` and must never be logged
    cfg.accesslog = logging.getLogger("hypercorn.access")  # type: ignore[assignment]
    cfg.access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(D)sus'
    cfg.logger_class = AccessLogger  # atoms built only for a line that is logged (quart_sse/accesslog.py)
    cfg.errorlog = logging.getLogger("hypercorn.error")  # type: ignore[assignment]
    if adapter is not None:
        adapter.attach(cfg)
    return cfg


#: The kernel's send buffer per client socket (Linux doubles it). Left to autotuning it grows to megabytes
#: (net.ipv4.tcp_wmem), all of it taken by a client that stopped reading before the stream's own bounded queue
#: even starts to fill; 64 KiB still carries >1 MB/s per stream at 100 ms round trip.
SNDBUF = 64 * 1024


def listen_socket(settings: Settings, *, host: str | None = None, reuse_port: bool = False) -> socket.socket:
    """The listening socket, with what every client socket inherits from it (set once here, not per connection:
    a setsockopt per accepted connection was ~3 % of a reconnect storm's CPU): the send buffer bound, and
    TCP_USER_TIMEOUT (`unacked_timeout`). Its backlog is LISTEN_BACKLOG (the kernel caps it at somaxconn)."""
    host = host or settings.app_host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, settings.app_port), family=family, backlog=settings.listen_backlog,
                                reuse_port=reuse_port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux, tcp(7); accepted sockets inherit it
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(unacked_timeout(settings) * 1000))
    return sock


def unacked_timeout(settings: Settings) -> float:
    """How long a client socket's data may go unacknowledged before the kernel drops it (TCP_USER_TIMEOUT): three
    ping intervals, at least 10 s. A client that vanished silently frees its place within PING_INTERVAL plus this
    (90-120 s with the default PING_INTERVAL=30; measured in tests/test_vanished_client.py) instead of the kernel's
    ~15 min of retransmissions."""
    return max(10.0, 3 * settings.ping_interval)


def _raise_nofile() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


class EarlySignals:
    """SIGTERM and SIGINT that arrive while the process starts, before the loop's own handlers are in place.

    Their default actions would end a starting process at once: a worker that got the stop while it was still
    importing the app "exited with signal 15" (or, for SIGINT, with KeyboardInterrupt) and the service exited 1,
    which an orchestrator records as a crash. Noted here instead, and acted on once the loop's handlers are
    installed: the process then stops as it would have a moment later (exit 0).
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.signame: str | None = None  # the first stop signal that arrived, e.g. "SIGTERM"

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum: int, _frame: Any) -> None:
        self.signame = self.signame or signal.Signals(signum).name


async def _serve(settings: Settings, sock: socket.socket | None, early: EarlySignals) -> None:
    from .app import create_app

    adapter = ServerAdapter()
    config = hypercorn_config(settings, sock or listen_socket(settings), adapter)
    app = create_app(settings, adapter)
    _tune_gc()
    services = app.extensions["quart_sse"]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    cut_at = 0.0  # loop time: the shutdown's deadline (Services.stop_by), at least 0.5 s after the signal

    def on_signal(signame: str) -> None:
        nonlocal cut_at
        if services.shutting_down:
            return
        n = services.begin_shutdown()
        log.info("%s: ending %d stream%s, then stopping", signame, n, "" if n == 1 else "s")
        # let the streams' last bytes go out before Hypercorn stops accepting and waits on connections
        loop.call_later(0.2, stop.set)
        cut_at = max(services.stop_by, loop.time() + 0.5)
        loop.call_at(cut_at, cut)

    def cut() -> None:
        n = adapter.abort_all()
        if n:
            log.info("cut %d connections still open %.1f s after the signal", n, settings.graceful_timeout)

    for sig in EarlySignals.SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig.name)
    if early.signame is not None:  # the stop came while this process was starting
        on_signal(early.signame)
    try:
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    except BaseExceptionGroup as group:  # connections torn down under Hypercorn's task groups (h2 at shutdown)
        rest = group.split((ConnectionError, asyncio.CancelledError))[1]
        if rest is not None and not services.shutting_down:
            raise
        log.info("stopped; %d errors of connections cut at shutdown ignored", len(group.exceptions))
    # Hypercorn returns without waiting for handed-off streams (not its own) nor for the bytes its own ended
    # connections still buffer. Each stream was told to end and its connection closes once the client has read
    # the last bytes; `cut` aborts the rest at the deadline. Without this wait the loop ended at once and a client
    # still reading lost its last events and its goodbye.
    if not await adapter.flushed(max(0.0, cut_at - loop.time()) + 0.5):
        cut()


def _tune_gc() -> None:
    """Fewer collections of the young generation: a reconnect storm allocates many short-lived objects per stream,
    and the cyclic collector took 13.5 % of its CPU (bench profile). Everything made at start-up is frozen out of
    the collector's way, and generation 0 is collected once 20,000 more container objects are alive than at the
    last collection (CPython's default: 700 on 3.11 and 3.12, 2,000 on 3.13).

    The threshold bounds the garbage that waits for a collection, a fixed cost, not one per stream: 100,000 cost
    ~11 MiB of RSS (2.3 KiB per stream at 5,000 streams) for no more storm throughput than 20,000, which costs
    ~2.5 MiB (docs/performance.md, "After the changes").
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _worker(settings: Settings, sock: socket.socket | None, early: EarlySignals) -> None:
    _raise_nofile()
    try:
        import uvloop

        uvloop.run(_serve(settings, sock, early))
    except ImportError:  # pragma: no cover - uvloop is in requirements, but the service runs without it
        asyncio.run(_serve(settings, sock, early))


def serve(settings: Settings) -> int:
    """Serve in this process, or fork `WORKERS` processes, each with its own SO_REUSEPORT socket on the port.

    One shared accept socket would let the first idle worker win most connections; with SO_REUSEPORT the kernel
    spreads them over the workers by connection hash.
    """
    if settings.workers <= 1:
        early = EarlySignals()
        early.install()
        _worker(settings, None, early)
        return 0
    setup_logging(settings)  # the parent's own lines (a worker that exited) in the workers' format
    # Fail here, once, if the port is taken: bound without SO_REUSEPORT, so that the workers of another copy of
    # the service (which bind with it) count too; the address family is the workers' own (listen_socket).
    listen_socket(settings).close()
    # metrics of all workers in one answer (quart_sse.metrics); must be set before prometheus_client is imported
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    made_metrics_dir = metrics_dir is None
    if metrics_dir is None:
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="quart-sse-metrics-")
    else:  # a directory of the operator's: what an earlier run left there would be added to this run's figures
        for stale in Path(metrics_dir).glob("*.db"):
            stale.unlink(missing_ok=True)
    parent = os.getpid()

    def child() -> NoReturn:
        code = 0
        try:
            early = EarlySignals()
            early.install()
            _stop_with_parent(parent)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, EarlySignals.SIGNALS)  # blocked by the parent for the fork
            sock = listen_socket(settings, reuse_port=True)
            _worker(settings, sock, early)
        except Exception:
            # os._exit skips the interpreter's own report: without this line a worker that cannot start
            # (a Redis URL redis-py refuses, a port it may not bind) vanishes without a word
            setup_logging(settings)  # the failure may come before create_app set logging up
            log.exception("worker %d failed", os.getpid())
            code = 1
        except BaseException:  # noqa: BLE001 - KeyboardInterrupt, SystemExit: still never past this frame
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def dead(pid: int) -> None:
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

    try:
        code = Supervisor(settings.workers, child, dead, kill_after=max(0.5, settings.graceful_timeout) + 5).run()
    finally:
        if made_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    sys.stdout.flush()
    return code


def _stop_with_parent(parent: int) -> None:
    """A worker gets SIGTERM (a clean stop) when its parent dies, however it dies (SIGKILL, SIGHUP): orphaned
    workers would go on serving the port, beside the next copy of the service (prctl(2) PR_SET_PDEATHSIG, Linux;
    elsewhere nothing). The parent may have died before the call: then the stop is sent here."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1 (linux/prctl.h)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
