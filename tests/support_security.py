"""Helpers for the security tests: apps under Quart's test client, hand-made tokens, streams, captured logs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning
from quart import Quart
from quart.testing import QuartClient
from quart.testing.connections import TestHTTPConnection

from quart_sse.app import create_app
from quart_sse.logs import JsonFormatter, TextFormatter
from quart_sse.settings import Settings
from tests.support import SECRET

GENERIC_401 = {"error": "unauthorized", "message": "invalid or expired token"}


def claims(sub: object = "alice", iss: object = "app1", ttl: float = 600, **extra: Any) -> dict[str, Any]:
    """A claim set as an outside issuer would write it (no quart-jwt-extended extras)."""
    out: dict[str, Any] = {"sub": sub, "iss": iss, "exp": int(time.time() + ttl)}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def sign(payload: dict[str, Any], key: Any = SECRET, alg: str = "HS256", headers: dict[str, Any] | None = None) -> str:
    """Sign as an outside issuer would; PyJWT's key-length warning (HS384/HS512 with the test secret) is moot here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, key, algorithm=alg, headers=headers)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(payload: dict[str, Any], key: str | bytes = SECRET, alg: str = "HS256",
          header: dict[str, Any] | None = None) -> str:
    """An HMAC-signed JWT built by hand, for what PyJWT refuses to produce (a non-string iss, NaN claims, an HS256
    signature keyed by a PEM): an attacker's issuer has no such scruples."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    head = header if header is not None else {"alg": alg, "typ": "JWT"}
    signing_input = _b64(json.dumps(head).encode()) + "." + _b64(json.dumps(payload).encode())
    raw_key = key.encode() if isinstance(key, str) else key
    return signing_input + "." + _b64(hmac.new(raw_key, signing_input.encode(), digest).digest())


@contextlib.asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[tuple[Quart, Any]]:
    """The app started (before_serving ran) with a test client: no sockets, fast enough to fuzz."""
    app = create_app(settings)
    async with app.test_app() as test_app:
        yield app, test_app.test_client()


@contextlib.asynccontextmanager
async def sse(client: QuartClient, path: str = "/sse", headers: dict[str, str] | None = None,
              query: dict[str, str] | None = None) -> AsyncIterator[tuple[int, bytes, TestHTTPConnection]]:
    """Open a stream through the test client: (status, first chunk, connection); disconnects on exit."""
    conn: Any = client.request(path, headers=headers, query_string=query)
    async with conn:
        await conn.send_complete()
        first = await asyncio.wait_for(conn.receive(), 5)
        try:
            yield int(conn.status_code), first, conn
        finally:
            await conn.disconnect()


class Captured(logging.Handler):
    """Every log record, formatted both ways the service formats them (text in debug, JSON in production)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._text = TextFormatter()
        self._json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self._text.format(record))
        self.lines.append(self._json.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def capture_logs() -> Iterator[Captured]:
    """Attach after create_app (its setup_logging replaces the root handlers); root at DEBUG meanwhile."""
    handler = Captured()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
