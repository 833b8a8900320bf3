"""A webhook receiver for tests: a small HTTP/1.1 server on a free port that records every request (time, headers,
body) and answers from a script of statuses (e.g. 500, 500, then the default 200). It can go down (stop
listening and drop its connections, so that the service meets "connection refused") and come back on the same
port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quart_sse.presence.webhooks import verify
from tests.support import free_port


@dataclass(frozen=True)
class Received:
    at: float  # time.time() when the body was read
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    status: int  # what the receiver answered

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.body)
        return out

    def verifies(self, secret: bytes) -> bool:
        return verify(secret, self.headers.get("x-webhook-timestamp", ""), self.headers.get("x-signature", ""),
                      self.body)


class Receiver:
    def __init__(self, port: int | None = None, path: str = "/hook") -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self.received: list[Received] = []
        self.script: deque[int] = deque()  # statuses to answer next; then `default`
        self.scripts: dict[str, deque[int]] = {}  # per app (the body's "app"), before `script`
        self.default = 200
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    @property
    def up(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        """Down: the port refuses connections and the kept-alive ones are closed."""
        if self._server is None:
            return
        self._server.close()
        for w in list(self._writers):
            w.close()
        if self._handlers:  # each returns once its connection is closed
            await asyncio.wait(list(self._handlers), timeout=5)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what was received -------------------------------------------------------------------------------------
    def accepted(self) -> list[Received]:
        """The requests answered 2xx, in arrival order."""
        return [r for r in self.received if 200 <= r.status < 300]

    def events(self) -> list[dict[str, Any]]:
        """Bodies of the accepted requests."""
        return [r.json() for r in self.accepted()]

    async def wait_for(self, done: Callable[[Receiver], bool], timeout: float) -> None:
        """Until `done(self)` holds (checked at every request), or TimeoutError."""
        async with asyncio.timeout(timeout):
            while not done(self):
                self._changed.clear()
                await self._changed.wait()

    async def quiet_for(self, seconds: float) -> list[Received]:
        """Waits `seconds` and returns what arrived meanwhile (for "and then nothing more")."""
        n = len(self.received)
        await asyncio.sleep(seconds)
        return self.received[n:]

    # -- the server ----------------------------------------------------------------------------------------------
    def _status(self, body: bytes) -> int:
        with contextlib.suppress(ValueError, AttributeError):
            app_script = self.scripts.get(json.loads(body).get("app"))
            if app_script:
                return app_script.popleft()
        return self.script.popleft() if self.script else self.default

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self._status(body)
                self.received.append(Received(time.time(), method, path, headers, body, status))
                self._changed.set()
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._handlers.discard(me)  # type: ignore[arg-type]
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
