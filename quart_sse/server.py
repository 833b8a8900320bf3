"""Run the app on Hypercorn with the settings, SIGTERM handling that ends streams first, and optional workers.

Hypercorn on its own would, on SIGTERM, keep serving open streams until `graceful_timeout` and only then run
`after_serving`; here SIGTERM first ends every stream (final comment + jittered `retry:`), then stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import socket
import sys
import tempfile
from typing import Any

from hypercorn.asyncio import run as hypercorn_run
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData

from . import transports
from .logs import setup_logging
from .settings import Settings

log = logging.getLogger("quart_sse.server")
_HIGH_WATER = 64 * 1024  # asyncio's default high-water mark for a transport's write buffer
# The kernel's send buffer per client socket (Linux doubles it). Left to autotuning it grows to megabytes
# (net.ipv4.tcp_wmem), all of it taken by a client that stopped reading before its queue in the hub even starts to
# fill; 64 KiB still carries >1 MB/s per stream at 100 ms round trip.
_SNDBUF = 64 * 1024


class _ReleasedWriter(asyncio.StreamWriter):
    """Hypercorn's writer once its connection is handed off: the transport is no longer its to write or close.

    Swapped in by class so that Hypercorn's own clean-up (`write_eof`, `close`, `wait_closed`) and the finaliser
    (`StreamWriter.__del__` closes an open transport) leave the stream alone.
    """

    def write(self, data: Any) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass

    async def drain(self) -> None:
        pass

    def __del__(self) -> None:
        pass


class _TrackedTCPServer(TCPServer):
    """Hypercorn's connection handler, recording itself so the app can abort a stalled client or take the
    connection over (`hand_off`)."""

    handed_off = False

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self.writer.transport  # type: ignore[return-value]

    def hand_off(self, protocol: asyncio.Protocol) -> bool:
        """Give the connection to `protocol` for good, if it is plain HTTP/1.x with nothing left to write.

        The transport gets the new protocol; the reader sees end-of-file, so Hypercorn's read loop ends and its
        connection (h11 state, stream, tasks) is let go; its writer can no longer touch the socket. Whatever
        Hypercorn still sends (the response's last chunk, when the app's generator returns) is dropped.
        """
        transport = self.writer.transport
        if self.handed_off or transport.is_closing() or self.writer.get_extra_info("ssl_object") is not None:
            return False
        if self.reader.at_eof():  # the client's end-of-file went to the old protocol: let Hypercorn end the stream
            return False
        low, _ = transport.get_write_buffer_limits()  # type: ignore[attr-defined]
        if transport.get_write_buffer_size() > low:  # the old protocol may be paused for writing: not now
            return False
        self.handed_off = True
        self.writer.__class__ = _ReleasedWriter
        # in an empty context: a reader callback registered here would keep the request's context (Quart's request,
        # Hypercorn's connection) alive for as long as the stream
        contextvars.Context().run(self._give, transport, protocol)
        self.reader.feed_eof()
        return True

    @staticmethod
    def _give(transport: asyncio.WriteTransport, protocol: asyncio.Protocol) -> None:
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if not transport.is_reading():  # type: ignore[attr-defined]
            transport.resume_reading()  # type: ignore[attr-defined]

    async def run(self) -> None:
        peer: Any = None
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        try:
            peer = self.writer.get_extra_info("peername")
            if isinstance(peer, tuple):
                peer = (peer[0], peer[1])
                transports.register(peer, self)
        except OSError:
            pass
        try:
            await super().run()
        finally:
            if isinstance(peer, tuple):
                transports.unregister(peer, self)

    async def protocol_send(self, event: Event) -> None:
        """Hypercorn takes a lock and awaits `drain()` for every chunk; an SSE stream writes many small chunks.

        When nobody else holds the lock and the transport is not paused, write directly: no await happens between
        the check and the write, so ordering is the same as under the lock. `drain()` is awaited only when the
        transport's buffer is above its high-water mark (a slow client), exactly when it would have blocked.
        """
        if self.handed_off:
            return
        if type(event) is RawData and not self.send_lock.locked():
            writer = self.writer
            try:
                writer.write(event.data)
            except (ConnectionError, RuntimeError):
                await self.protocol.handle(Closed())
                return
            if writer.transport.get_write_buffer_size() > _HIGH_WATER:
                async with self.send_lock:
                    try:
                        await writer.drain()
                    except (ConnectionError, RuntimeError):
                        await self.protocol.handle(Closed())
            return
        await super().protocol_send(event)


def install_connection_handler() -> None:
    """Make Hypercorn's asyncio worker use our connection handler (transport registry, lock-free writes)."""
    hypercorn_run.TCPServer = _TrackedTCPServer  # type: ignore[attr-defined,misc]


def hypercorn_config(settings: Settings, sock: socket.socket | None = None) -> Config:
    cfg = Config()
    cfg.bind = [f"fd://{sock.fileno()}"] if sock is not None else [f"{settings.app_host}:{settings.app_port}"]
    cfg.graceful_timeout = settings.graceful_timeout
    cfg.keep_alive_timeout = 5  # idle keep-alive connections and clients that never finish their headers
    cfg.read_timeout = None
    cfg.h11_max_incomplete_size = 16 * 1024  # request line + headers
    cfg.backlog = 2048
    # the path without its query string: tokens and tickets travel in `?token=` / `?ticket=` and must never be logged
    cfg.accesslog = logging.getLogger("hypercorn.access")  # type: ignore[assignment]
    cfg.access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(D)sus'
    cfg.errorlog = logging.getLogger("hypercorn.error")  # type: ignore[assignment]
    return cfg


def _raise_nofile() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


async def _serve(settings: Settings, sock: socket.socket | None) -> None:
    from .app import create_app

    app = create_app(settings)
    services = app.extensions["quart_sse"]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signame: str) -> None:
        if services.shutting_down:
            return
        n = services.begin_shutdown()
        log.info("%s: ending %d streams, then stopping", signame, n)
        # let the streams' last bytes go out before Hypercorn stops accepting and waits on connections
        loop.call_later(0.2, stop.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    await hypercorn_serve(app, hypercorn_config(settings, sock), shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def _worker(settings: Settings, sock: socket.socket | None) -> None:
    _raise_nofile()
    install_connection_handler()
    try:
        import uvloop

        uvloop.run(_serve(settings, sock))
    except ImportError:  # pragma: no cover - uvloop is in requirements, but the service runs without it
        asyncio.run(_serve(settings, sock))


def serve(settings: Settings) -> int:
    """Serve in this process, or fork `WORKERS` processes, each with its own SO_REUSEPORT socket on the port.

    One shared accept socket would let the first idle worker win most connections; with SO_REUSEPORT the kernel
    spreads them over the workers by connection hash.
    """
    if settings.workers <= 1:
        _worker(settings, None)
        return 0
    setup_logging(settings)  # the parent's own lines (a worker that exited) in the workers' format
    # metrics of all workers in one answer (quart_sse.metrics); must be set before prometheus_client is imported
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="quart-sse-metrics-"))
    with socket.create_server((settings.app_host, settings.app_port), reuse_port=True):
        pass  # fail here, once, if the port is taken (the workers bind their own sockets)
    children: list[int] = []
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                sock = socket.create_server((settings.app_host, settings.app_port), backlog=2048,
                                            reuse_port=True)
                _worker(settings, sock)
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
        children.append(pid)

    def forward(signum: int, _frame: Any) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    for pid in children:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code != 0:
            log.error("worker %d exited with %s", pid,
                      f"signal {-exit_code}" if exit_code < 0 else f"code {exit_code}")
        code = code or (exit_code != 0)
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
    sys.stdout.flush()
    return int(code)
