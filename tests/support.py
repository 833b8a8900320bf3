"""Test helpers: settings without a developer's .env, tokens, a real-socket SSE client, servers on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from hypercorn.asyncio import serve as hypercorn_serve
from pydantic import TypeAdapter, ValidationError
from quart import Quart

from quart_sse.app import create_app
from quart_sse.auth import mint
from quart_sse.server import hypercorn_config, listen_socket
from quart_sse.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

#: True while only the fast tier runs (`pytest -m fast`): the helpers that start a server, a Redis or a service
#: process then fail the test, which tests/tiers.py should not have classified as fast.
FAST_TIER = False


def fast_tier_guard(what: str) -> None:
    if FAST_TIER:
        import pytest

        pytest.fail(f"{what} in the fast tier: tests/tiers.py took this test for one that needs no server, Redis or "
                    f"process; add the helper's name to its HEAVY_NAMES", pytrace=False)
SECRET = "test-secret-" + "x" * 40


def _suite_handoff() -> bool | None:
    """STREAM_HANDOFF from the environment the suite was started in (`STREAM_HANDOFF=false make test` runs every
    stream on the generator path); None when unset. Read here, at import, before conftest clears the service's
    variables from the environment; parsed as the setting is, so a bad value fails as the service would."""
    raw = os.environ.get("STREAM_HANDOFF")
    if raw is None:
        return None
    try:
        return TypeAdapter(bool).validate_python(raw)  # pydantic's reading of a bool setting, as the service's
    except ValidationError:
        import pytest

        raise pytest.UsageError(f"STREAM_HANDOFF={raw!r}: not a boolean (true or false)") from None


#: The suite's STREAM_HANDOFF (None: the setting's default, true).
SUITE_HANDOFF: bool | None = _suite_handoff()


def handoff_on() -> bool:
    """Whether streams of this run hand their connection off (the default) or stay on the generator path."""
    return SUITE_HANDOFF is not False


def make_settings(**overrides: Any) -> Settings:
    """Settings from explicit values only: a developer's .env or shell must not change what is tested, except for
    STREAM_HANDOFF, which the suite passes through (tests that set it themselves win)."""
    base: dict[str, Any] = {"jwt_secret": SECRET, "ping_interval": 30, "app_port": free_port()}
    if SUITE_HANDOFF is not None:
        base["stream_handoff"] = SUITE_HANDOFF
    base.update(overrides)
    return Settings(_env_file=None, **base)  # type: ignore[call-arg]


def token(settings: Settings, sub: str, iss: str, scope: str = "", ttl: int = 600) -> str:
    return mint(settings, sub, iss, scope, ttl)


def auth(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


_handed_out: set[int] = set()
_rng = random.SystemRandom()  # not the global generator, which hypothesis seeds
_PORTS_FROM = 15000  # below the kernel's ephemeral range (and above the usual fixed service ports)


def _ephemeral_start() -> int:
    """Where the kernel's ephemeral ports begin (Linux: net.ipv4.ip_local_port_range, 32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nobody listens on, and never the same one twice in a session: the kernel may give a just-released
    port again, and two services told the same port start as one (a test then kills the wrong one).

    Drawn below the ephemeral range: a port the kernel handed out (bind to 0) goes back into that range the moment
    the probe closes, and on a machine where other suites run their clients, one of their outgoing connections can
    take it before our server binds it (EADDRINUSE, "server did not start").
    """
    hi = min(_ephemeral_start(), 32768)
    while True:
        with socket.socket() as s:
            if hi - _PORTS_FROM > 1000:
                try:
                    s.bind(("0.0.0.0", _rng.randrange(_PORTS_FROM, hi)))  # free on every address
                except OSError:
                    continue
            else:  # an unusual ephemeral range: let the kernel choose
                s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


# ------------------------------------------------------------------------------------------------ SSE over sockets
@dataclass
class SseEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class RawStream:
    """A real-socket SSE client: raw bytes kept for byte-exact checks, events parsed per the SSE spec."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    headers: dict[str, str]
    raw: bytearray = field(default_factory=bytearray)
    retry: int | None = None
    _buf: bytes = b""
    _chunked: bool = True

    async def _read_body(self) -> bytes:
        """One chunk of the chunked body (b'' at its end)."""
        line = await self.reader.readline()
        if not line:
            return b""
        size = int(line.strip() or b"0", 16)
        if size == 0:
            await self.reader.readline()
            return b""
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def next_event(self, timeout: float = 5.0, skip_ping: bool = True) -> SseEvent | None:
        """The next dispatched event; None when the stream ended."""
        async with asyncio.timeout(timeout):
            while True:
                ev = self._parse_one()
                if ev is not None:
                    if skip_ping and ev.event == "ping":
                        continue
                    return ev
                chunk = await self._read_body()
                if not chunk:
                    return None
                self.raw += chunk
                self._buf += chunk

    def _parse_one(self) -> SseEvent | None:
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                return None
            block, self._buf = self._buf[:end], self._buf[end + 2:]
            ev = SseEvent()
            has_data = False
            for line in block.decode().split("\n"):
                if not line or line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    ev.data = ev.data + "\n" + value if has_data else value
                    has_data = True
                elif name == "event":
                    ev.event = value
                elif name == "id":
                    ev.id = value
                elif name == "retry" and value.isdigit():
                    self.retry = int(value)
            if has_data:
                return ev

    async def read_until_closed(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await self._read_body()
                if not chunk:
                    return bytes(self.raw)
                self.raw += chunk
                self._buf += chunk

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def open_stream(port: int, path: str = "/sse", headers: dict[str, str] | None = None,
                      host: str = "127.0.0.1", accept: str = "text/event-stream") -> RawStream:
    """A stream request as an EventSource sends it (`accept`: what else a client may name, e.g. JSON)."""
    reader, writer = await asyncio.open_connection(host, port)
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", f"Accept: {accept}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    status = int(status_line.split()[1])
    hdrs: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        hdrs[k.strip().lower()] = v.strip()
    stream = RawStream(reader, writer, status, hdrs)
    if hdrs.get("transfer-encoding") != "chunked":  # an error answer or a refusal: read its body whole
        n = int(hdrs.get("content-length", "0"))
        stream.raw += await reader.readexactly(n) if n else b""
    return stream


# ------------------------------------------------------------------------------------------------ servers
class LiveServer:
    """The app under Hypercorn in this event loop, on a free port: real HTTP, internals still inspectable."""

    def __init__(self, app: Quart, port: int, tweak: Callable[[Any], None] | None = None) -> None:
        self.app = app
        self.tweak = tweak  # adjusts the Hypercorn config before serving
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def services(self) -> Any:
        return self.app.extensions["quart_sse"]

    async def start(self) -> None:
        fast_tier_guard("a live server")
        settings = self.services.settings
        # the same connection handler as `python -m quart_sse serve`, tracked by the app's own adapter
        sock = listen_socket(settings.model_copy(update={"app_port": self.port}), host="127.0.0.1")
        cfg = hypercorn_config(settings, sock, adapter=self.services.adapter)
        if self.tweak is not None:
            self.tweak(cfg)
        self._task = asyncio.get_running_loop().create_task(
            hypercorn_serve(self.app, cfg, shutdown_trigger=self._stop.wait))  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        # Connection: close, or the probe's connection outlives it: Hypercorn keeps an idle connection's task
        # until keep_alive_timeout (5 s) even after the client has closed it, and a test counting tasks sees it go
        async with httpx.AsyncClient(headers={"Connection": "close"}) as c:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(self.url + "/health")).status_code == 200:
                        return
                await asyncio.sleep(0.02)
        raise RuntimeError("server did not start")

    async def stop(self) -> None:
        self.services.begin_shutdown()
        await asyncio.sleep(0.05)
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 15)


@contextlib.asynccontextmanager
async def live_server(settings: Settings) -> AsyncIterator[LiveServer]:
    srv = LiveServer(create_app(settings), settings.app_port)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def service_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS_", "JWT_", "APP_", "PING_", "MAX_", "CORS_", "HISTORY_", "SSE_", "WORKERS"))}
    env.update({"JWT_SECRET": SECRET, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    if SUITE_HANDOFF is not None:  # service processes take the suite's STREAM_HANDOFF too
        env["STREAM_HANDOFF"] = "true" if SUITE_HANDOFF else "false"
    env.update(settings_env)
    return env


class ServiceProcess:
    """`python -m quart_sse serve` as a real child process, for SIGTERM/SIGKILL tests.

    `command` and `full_env` run something else the same way (an installed `quart-sse serve`, the Dockerfile's CMD):
    then the environment is exactly `full_env`, without this checkout on the import path.
    """

    def __init__(self, port: int, env: dict[str, str], log_path: Path, command: list[str] | None = None,
                 full_env: dict[str, str] | None = None) -> None:
        fast_tier_guard("a service process")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        argv = command or [sys.executable, "-m", "quart_sse", "serve"]
        environ = full_env if full_env is not None else service_env({"APP_PORT": str(port), **env})
        self.proc = subprocess.Popen(argv, env=environ, cwd=log_path.parent,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    async def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited: {self.log()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(self.url + "/health")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"service not up: {self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class RedisServer:
    """A redis-server of the test's own on a fixed free port, so it can be SIGKILLed and restarted there."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        fast_tier_guard("a redis-server")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def refusal(st: RawStream) -> tuple[str, int] | None:
    """An EventSource's view of a refused stream: 200, then `retry: <ms>` and `: refused <code>`, and the end."""
    m = re.fullmatch(rb"retry: (\d+)\n: refused ([a-z_]+)\n\n", bytes(st.raw))
    if st.status != 200 or m is None:
        return None
    return m.group(2).decode(), int(m.group(1))


def metric_value(text: str, name: str) -> float:
    """One sample of a Prometheus text exposition, by its full name (labels included)."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))
