"""The one place that touches the server's connections: Hypercorn's asyncio worker, patched and checked.

Quart hands an app nothing but ASGI events, and ASGI has no way to reach a connection's socket. The service's
speed needs three things ASGI does not give (docs/internals.md explains each, with its measurement):

- **direct writes**: the hub writes each pre-encoded event straight to an idle HTTP/1.x stream's transport
  (one `write` per event per socket, instead of a task wake-up, Quart's send loop, Hypercorn's ASGI send and h11);
- **hand-off**: once a stream has started, its connection leaves Hypercorn for good, so Quart's request and
  Hypercorn's connection objects (~30 KiB) do not live as long as the stream;
- **abort**: a client that stopped reading is cut (`transport.abort()`); closing would wait forever on a send
  buffer that never drains.

So `install()` makes Hypercorn's asyncio worker build connections with `TrackedTCPServer`, which records itself in
the `ServerAdapter` of the app it serves (reached through Hypercorn's `Config`, so several servers in one process,
as in the tests, keep apart). `check()` verifies, at start-up, every Hypercorn and asyncio internal this relies on,
and that the patch took effect; when anything is missing the adapter is off: one log line names what, and every
stream takes the generator path (Quart's response generator holds it; slow consumers are closed, not aborted).

An event stream's connection carries nothing after the stream's request: its response says `Connection: close`,
and from the stream's start its reads go to the stream (`Stream` is the transport's protocol, quart_sse.stream):
whatever the client sends (a request pipelined behind the stream) is dropped and never started, and the client's
end-of-file ends the stream at once (RFC 9112 §9.3.2 allows a server to close instead of answering pipelined
requests; Hypercorn would otherwise stop reading behind a pipelined request and never see the client leave).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import fcntl
import inspect
import logging
import struct
import termios
import types
from collections.abc import Callable, Iterable
from typing import Any

from hypercorn.asyncio import run as hypercorn_run
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData

log = logging.getLogger("quart_sse.adapter")

Peer = tuple[str, int]
HIGH_WATER = 64 * 1024  # a transport's write buffer above this pauses writers (asyncio's and uvloop's default)
#: How long a connection whose request has arrived but not been read yet may wait for the loop (`_idle_timeout`).
FIRST_REQUEST_TIMEOUT = 60.0
_CONFIG_ATTR = "quart_sse_adapter"
_STREAM_ENDED = "quart_sse: the event stream ended, and so does the connection's read loop"


class StreamPath(enum.Enum):
    """Which path a stream takes (`/ready`'s `stream_path`, the `path` label of `sse_streams_opened_total`)."""

    HANDED_OFF = "handed_off"  # the stream owns its connection; the hub writes to it
    GENERATOR = "generator"  # Quart's response generator holds the stream to its end


class ReleasedWriter(asyncio.StreamWriter):
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


class ServerAdapter:
    """The open HTTP connections of one served app, by the client's address, and what may be done with them.

    Built by `quart_sse.server` and given to the app (`Services.adapter`); `attach(config)` ties it to the
    Hypercorn config that serves the app. `active` is False when `check()` found something missing or when the
    app is served some other way: then `take_reads` answers None and every stream takes the generator path.
    """

    def __init__(self) -> None:
        self._open: dict[Peer, TrackedTCPServer] = {}
        # handed-off connections not closed yet: Hypercorn no longer knows them, and a shutdown must wait for their
        # last bytes (or cut them) before the loop ends, or whatever a slow reader had not read is dropped. A count
        # (no reference per stream); the transports themselves are collected once, when the shutdown begins.
        self._owned = 0
        self._none_owned = asyncio.Event()
        self._none_owned.set()
        self.stopping = False  # the service is shutting down: connections that end are followed until flushed
        self._followed: list[asyncio.WriteTransport] = []  # the handed-off ones open when the shutdown began
        self._flushing: set[asyncio.WriteTransport] = set()  # Hypercorn's, ended with bytes still unsent
        self.attached = False  # a Hypercorn config of quart_sse.server serves the app
        self.problems: tuple[str, ...] = ()  # what `check()` found missing

    @property
    def active(self) -> bool:
        return self.attached and not self.problems

    def attach(self, config: Config) -> None:
        """Install the connection handler, check what it relies on, and serve `config`'s connections."""
        install()
        self.problems = tuple(check())
        self.attached = True
        setattr(config, _CONFIG_ATTR, self)
        if self.problems:
            log.warning("stream hand-off and direct writes are off, every stream takes the generator path: %s",
                        "; ".join(self.problems))

    def recheck(self) -> None:
        """Before serving: the patch must still be in place (another import may have undone it)."""
        if self.active:
            self.problems = tuple(check())
            if self.problems:
                log.warning("stream hand-off and direct writes are off, every stream takes the generator path: %s",
                            "; ".join(self.problems))

    # -- connections ------------------------------------------------------------------------------------------
    def track(self, peer: Peer, conn: TrackedTCPServer) -> None:
        self._open[peer] = conn

    def untrack(self, peer: Peer, conn: TrackedTCPServer) -> None:
        """Forget `peer` if it is still `conn`'s (a handed-off connection's address may be reused)."""
        if self._open.get(peer) is conn:
            del self._open[peer]
        if self.stopping and conn.transport.get_write_buffer_size():  # Hypercorn returns before they are sent
            self._flushing.add(conn.transport)

    def __len__(self) -> int:
        return len(self._open)

    def take_reads(self, peer: Peer | None,
                   protocol: asyncio.Protocol) -> tuple[asyncio.WriteTransport, asyncio.BaseProtocol] | None:
        """An event stream starts on `peer`'s HTTP/1.x connection: from now on its reads go to `protocol`, which
        must pass the write-flow callbacks on to the connection's own protocol (returned with the transport, for
        direct writes) until `hand_off`. None when the connection is not ours to touch (the adapter is off, an
        unknown peer, the client already gone)."""
        conn = self._open.get(peer) if peer is not None and self.active else None
        if conn is None or conn.streaming:
            return None
        return conn.start_stream(protocol)

    def hand_off(self, peer: Peer | None) -> bool:
        """The stream's generator is done with Hypercorn: the connection is the stream's alone from here.

        False when it cannot be (TLS, a send buffer above its low-water mark, the client already gone)."""
        conn = self._open.get(peer) if peer is not None else None
        if peer is None or conn is None or not conn.hand_off():
            return False
        del self._open[peer]  # the server no longer owns it; the stream aborts it itself
        self._owned += 1
        self._none_owned.clear()
        return True

    def let_go(self) -> None:
        """A handed-off connection is closed (its stream's `connection_lost`, once per connection)."""
        self._owned -= 1
        if self._owned <= 0:
            self._owned = 0
            self._none_owned.set()

    def follow(self, transports: Iterable[asyncio.WriteTransport]) -> None:
        """The shutdown begins: the stopping flag, and the handed-off connections to cut if they outlast it."""
        self.stopping = True
        self._followed = list(transports)

    async def flushed(self, timeout: float) -> bool:
        """Shutdown, once Hypercorn has stopped: wait up to `timeout` s until every connection's last bytes are
        out. A handed-off connection closes once its client has read them; one of Hypercorn's that ended with
        bytes still buffered (a generator-path stream's goodbye to a slow reader) is followed until its buffer is
        empty (a poll, at shutdown only: asyncio tells a closing transport's end to its protocol alone). The loop
        ending before that would drop them. False if some are still not out."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            await asyncio.wait_for(self._none_owned.wait(), timeout)
        except TimeoutError:
            return False
        while any(t.get_write_buffer_size() for t in self._flushing):
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.02)
        return True

    def abort_all(self) -> int:
        """Shutdown: cut every connection still open or still sending: Hypercorn's, handed-off ones, and those
        Hypercorn ended with bytes unsent (a client that stopped reading would hold the process)."""
        transports = [conn.transport for conn in self._open.values()] + \
            [t for t in self._followed if not t.is_closing() or t.get_write_buffer_size()] + \
            [t for t in self._flushing if t.get_write_buffer_size()]
        for transport in transports:
            transport.abort()
        return len(transports)


class TrackedTCPServer(TCPServer):
    """Hypercorn's connection handler, recording itself in its app's `ServerAdapter`.

    Adds to Hypercorn's: lock-free writes while uncontended, an idle timer that does not count the loop's lateness
    against the client, and the two steps of an event stream (`start_stream`, `hand_off`). Everything else is
    Hypercorn's own. (Client sockets' options are inherited from the listening socket: server.listen_socket.)
    """

    streaming = False  # an event stream started on this connection: its reads are the stream's
    handed_off = False  # the stream owns the connection; Hypercorn only winds down its own objects
    _task: asyncio.Task[Any] | None = None

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self.writer.transport  # type: ignore[return-value]

    async def run(self) -> None:
        adapter: ServerAdapter | None = getattr(self.config, _CONFIG_ATTR, None)
        peer: Any = None
        with contextlib.suppress(OSError):
            peer = self.writer.get_extra_info("peername")
        if adapter is not None and isinstance(peer, tuple):
            peer = (peer[0], peer[1])
            adapter.track(peer, self)
        else:
            peer = None
        self._task = asyncio.current_task()
        try:
            await super().run()
        except asyncio.CancelledError as exc:  # ours (protocol_send) is no failure: the connection is done
            if not (exc.args and exc.args[0] == _STREAM_ENDED) or self._task is None or self._task.uncancel():
                raise
        finally:
            if adapter is not None and peer is not None:
                adapter.untrack(peer, self)

    def start_stream(self, protocol: asyncio.Protocol) -> tuple[asyncio.WriteTransport, asyncio.BaseProtocol] | None:
        """The connection's reads go to `protocol` (an event stream's); Hypercorn's protocol, returned, keeps
        hearing of the write side (pause/resume, the connection's loss) through it until the hand-off."""
        transport: Any = self.writer.transport
        if transport.is_closing() or self.reader.at_eof():
            return None
        self.streaming = True
        upstream = transport.get_protocol()
        _in_empty_context(_give, transport, protocol)
        return transport, upstream

    def hand_off(self) -> bool:
        transport = self.writer.transport
        if self.handed_off or not self.streaming or transport.is_closing():
            return False
        if self.writer.get_extra_info("ssl_object") is not None:  # TLS served by Hypercorn: keep its writer
            return False
        low, _ = transport.get_write_buffer_limits()  # type: ignore[attr-defined]
        if transport.get_write_buffer_size() > low:  # Hypercorn's writer may be paused: not now
            return False
        self.handed_off = True
        self.writer.__class__ = ReleasedWriter
        self.reader.feed_eof()  # Hypercorn's read loop ends; its connection objects are let go
        return True

    def end(self) -> None:
        """The event stream is over: the connection's task ends too (its read loop may wait behind a pipelined
        request it will never start), with the adapter's own message, which `run` takes as a normal end."""
        task = self._task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel(_STREAM_ENDED)

    async def _idle_timeout(self) -> None:
        """Hypercorn's idle timer (keep_alive_timeout from accept, and between requests), except that a connection
        whose bytes are waiting to be read is not idle: in a reconnect storm the loop is seconds behind, and closing
        a connection whose request already arrived would make our lateness the client's failure (a closed stream
        an EventSource may not retry). Such a connection gets up to FIRST_REQUEST_TIMEOUT; a client that sends
        nothing, or drips its headers, is still cut at keep_alive_timeout (slowloris)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIRST_REQUEST_TIMEOUT
        while True:
            try:
                await asyncio.wait_for(self.context.terminated.wait(), self.config.keep_alive_timeout)
            except TimeoutError:
                if loop.time() < deadline and self._unread():
                    continue
            break
        await asyncio.shield(self._initiate_server_close())

    def _unread(self) -> bool:
        """Bytes the client sent that this process has not handled yet: in the kernel, or in the reader's buffer."""
        if getattr(self.reader, "_buffer", None):
            return True
        sock = self.writer.get_extra_info("socket")
        if sock is None or sock.fileno() < 0:  # already closed
            return False
        try:
            waiting: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
            return waiting > 0
        except OSError:
            return False

    async def protocol_send(self, event: Event) -> None:
        """Hypercorn takes a lock and awaits `drain()` for every chunk; an SSE stream writes many small chunks.

        When nobody else holds the lock, write directly: no await happens between the check and the write, so
        ordering is the same as under the lock. `drain()` is awaited only above the high-water mark (a slow
        client), exactly when it would have blocked. Once an event stream ended (its response carries
        `Connection: close`), Hypercorn's read loop may still wait behind a pipelined request it will never
        start: it is ended here, or the connection's task would live on.
        """
        if type(event) is RawData:
            if self.handed_off:
                return
            if not self.send_lock.locked():
                writer = self.writer
                try:
                    writer.write(event.data)
                except (ConnectionError, RuntimeError):
                    await self.protocol.handle(Closed())
                    return
                if writer.transport.get_write_buffer_size() > HIGH_WATER:
                    async with self.send_lock:
                        try:
                            await writer.drain()
                        except (ConnectionError, RuntimeError):
                            await self.protocol.handle(Closed())
                return
        elif type(event) is Closed and self.streaming:
            await super().protocol_send(event)  # after a hand-off its writer is a ReleasedWriter: no harm done
            self.end()
            return
        await super().protocol_send(event)


def _give(transport: asyncio.BaseTransport, protocol: asyncio.Protocol) -> None:
    transport.set_protocol(protocol)
    if not transport.is_reading():  # type: ignore[attr-defined]  # Hypercorn's reader may have paused it
        transport.resume_reading()  # type: ignore[attr-defined]


def _in_empty_context(fn: Callable[..., None], *args: Any) -> None:
    """A reader callback registered in the request's context would keep that context (Quart's request,
    Hypercorn's connection) alive for as long as the stream."""
    contextvars.Context().run(fn, *args)


def install() -> None:
    """Make Hypercorn's asyncio worker build its connections with `TrackedTCPServer` (idempotent)."""
    hypercorn_run.TCPServer = TrackedTCPServer  # type: ignore[attr-defined,misc]


# -- what the adapter relies on -------------------------------------------------------------------------------
def _nested_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _nested_names(const)
    return names


def _assigned_attributes(fn: Any) -> set[str]:
    return set(fn.__code__.co_names) if hasattr(fn, "__code__") else set()


#: Each internal of Hypercorn and asyncio the adapter relies on: a name, and a check returning a problem or None.
#: tests/test_internals.py runs each as its own test, so an upgrade that breaks one fails by that name.
INTERNALS: tuple[tuple[str, Callable[[], str | None]], ...] = (
    ("hypercorn.asyncio.run.TCPServer is looked up when a connection arrives",
     lambda: None if "TCPServer" in _nested_names(hypercorn_run.worker_serve.__code__)
     else "hypercorn.asyncio.run.worker_serve no longer builds connections with the module's TCPServer"),
    ("the connection handler is ours",
     lambda: None if getattr(hypercorn_run, "TCPServer", None) is TrackedTCPServer
     else "hypercorn.asyncio.run.TCPServer is not quart_sse.adapter.TrackedTCPServer (the patch did not take)"),
    ("TCPServer(app, loop, config, context, state, reader, writer)",
     lambda: None if list(inspect.signature(TCPServer.__init__).parameters)[1:] ==
     ["app", "loop", "config", "context", "state", "reader", "writer"]
     else "TCPServer.__init__ takes other arguments"),
    ("TCPServer keeps config, reader, writer, send_lock",
     lambda: None if {"config", "reader", "writer", "send_lock"} <= _assigned_attributes(TCPServer.__init__)
     else "TCPServer.__init__ no longer sets config/reader/writer/send_lock"),
    ("TCPServer.run sets protocol and reads through _read_data",
     lambda: None if {"protocol", "_read_data"} <= _assigned_attributes(TCPServer.run)
     else "TCPServer.run no longer sets self.protocol or calls _read_data"),
    ("TCPServer.protocol_send(event) is the connection's only writer",
     lambda: None if list(inspect.signature(TCPServer.protocol_send).parameters) == ["self", "event"]
     and "protocol_send" in _assigned_attributes(TCPServer.run)
     else "TCPServer.protocol_send is gone or no longer handed to the protocol"),
    ("TCPServer._idle_timeout() closes an idle connection through _initiate_server_close()",
     lambda: None if "_initiate_server_close" in _assigned_attributes(TCPServer._idle_timeout)
     and {"context", "config"} <= _assigned_attributes(TCPServer._idle_timeout)
     and "_idle_timeout" in _assigned_attributes(TCPServer.run)
     else "TCPServer._idle_timeout is gone or no longer closes through _initiate_server_close"),
    ("asyncio.StreamReader keeps what it read and nobody consumed in _buffer",
     lambda: None if "_buffer" in _assigned_attributes(asyncio.StreamReader.__init__)
     else "asyncio.StreamReader has no _buffer: a storm's unread requests are not seen by the idle timer"),
    ("hypercorn.events RawData(data) and Closed()",
     lambda: None if hasattr(RawData, "data") or "data" in getattr(RawData, "__dataclass_fields__", {})
     else "hypercorn.events.RawData has no data field"),
    ("asyncio transports can change protocol and pause reading",
     lambda: None if all(hasattr(asyncio.Transport, m) for m in
                         ("set_protocol", "is_reading", "resume_reading", "get_write_buffer_limits",
                          "get_write_buffer_size", "abort"))
     else "asyncio.Transport lacks set_protocol/is_reading/resume_reading/write buffer limits/abort"),
    ("asyncio.StreamWriter can be swapped by class",
     lambda: None if "__slots__" not in vars(asyncio.StreamWriter)
     else "asyncio.StreamWriter has __slots__: its class cannot be swapped at hand-off"),
)


def check() -> list[str]:
    """What is missing of `INTERNALS` (empty: the adapter may act)."""
    problems = []
    for _name, probe in INTERNALS:
        try:
            problem = probe()
        except Exception as exc:  # noqa: BLE001 - a probe that raises is a missing internal, named
            problem = f"{_name}: {type(exc).__name__}: {exc}"
        if problem:
            problems.append(problem)
    return problems
