"""An answer given before the request body was read (413, 401, 400...) must reach the client, not a TCP reset.

When an HTTP/1.x response ends while the client is still sending its body, Hypercorn closes the connection at once
(h11 cannot start a next cycle). The kernel answers the client's next body bytes, or the unread ones, with a RST
(RFC 9293 §3.6.1: data arriving for a closed socket is answered with a reset; RFC 1122 §4.2.2.13: closing with data
unread sends a reset). A client that writes its whole body before reading — httpx, and any asyncio client, whose
transport aborts itself on the first failed write — then loses the answer it was sent and sees "connection reset"
instead of 413. Whether it happens is a race between the client's writes and the server's close: which Python and
event loop run either side changes the odds, not the fault (it showed on CPython 3.12/3.13 first).

The fix is the one nginx (`lingering_close`) and Go's net/http (`closeWriteAndWait`) apply: give the answer at
once, then read and discard what is left of the body before ending the response, bounded in bytes and in time.
When the body ends within those bounds the connection is even kept alive for the next request; past them the
connection is closed as before (an abusive upload may then see a reset). Requests that declare no body (every
`GET /sse`) pass straight through: this costs the stream path nothing.

This is ASGI middleware, not a patch of the server: it works the same under any ASGI server. See
docs/operations.md ("Request bodies").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Any, Any, Any], Awaitable[None]]  # loose: frameworks type their scopes and events each their way

#: Bytes of body read and discarded after an early answer, beyond the body limit, before giving up on the client.
DRAIN_MAX_BYTES = 1 << 20
#: Seconds the end of an early answer waits for the rest of the body (nginx's lingering_time is 30 s; Go's wait 0.5 s
#: after its own read of at most 256 KiB).
DRAIN_MAX_SECONDS = 5.0


def declares_body(scope: MutableMapping[str, Any]) -> bool:
    """An HTTP/1.x request with `Transfer-Encoding` or a non-zero `Content-Length` (RFC 9112 §6.3).

    HTTP/2 is left alone: an early answer there ends one stream (RST_STREAM), never the connection.
    """
    if scope.get("type") != "http" or scope.get("http_version") not in ("1.0", "1.1"):
        return False
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


class _BodyWatch:
    """The request's `receive`, watched: `ended` once the body is complete, the client left, or `limit` bytes came."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._bytes = 0
        self.ended = asyncio.Event()

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._bytes += len(message.get("body", b""))
            if not message.get("more_body", False) or self._bytes > self._limit:
                self.ended.set()
        elif message["type"] == "http.disconnect":
            self.ended.set()
        return message


class UnreadBodyDrain:
    """ASGI middleware: the last message of a response waits until the request body has been read to its end.

    The application keeps reading the body as it would (Quart's receiver task reads it to the end and, past
    MAX_CONTENT_LENGTH, throws it away), so the wait costs no memory. The answer's bytes go out at once; only its
    end (which makes the server close a connection whose request is unfinished) waits, at most `max_seconds` and
    until `max_bytes` of body have come in.
    """

    def __init__(self, app: AsgiApp, max_bytes: int, max_seconds: float = DRAIN_MAX_SECONDS) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if not declares_body(scope):
            await self.app(scope, receive, send)
            return
        body = _BodyWatch(receive, self.max_bytes)

        async def send_after_body(message: Message) -> None:
            if (message["type"] == "http.response.body" and not message.get("more_body", False)
                    and not body.ended.is_set()):
                if message.get("body"):
                    await send({"type": "http.response.body", "body": message["body"], "more_body": True})
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.max_seconds):
                        await body.ended.wait()
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, body.receive, send_after_body)
