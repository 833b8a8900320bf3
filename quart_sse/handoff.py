"""An SSE stream that owns its connection: the lean phase of a stream's life, after Quart and Hypercorn let go.

A stream parked in Quart + Hypercorn keeps, besides its socket, a Quart request (headers, contexts, two tasks) and a
Hypercorn connection (h11 state, an HTTP stream, two tasks, events, an ASGI queue): about 30 KiB, fifteen times what
the stream itself needs, and none of it used once the response has started and the hub writes events straight to
the transport. So when its generator has sent the first bytes (retry, replay) and has nothing queued, it hands the
connection over (transports.hand_off) and returns: Hypercorn forgets the connection without closing it, Quart
finishes the request, and from then on this protocol is the transport's: it hears the client leave, it tells the
subscriber when the send buffer has drained, and the stream writes its own last bytes (hub.Subscriber.write_last).

HTTP/2 (streams share a connection), TLS and the Quart test client keep the generator for the stream's whole life.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .hub import Subscriber


class OwnedStream(asyncio.Protocol):
    """The transport's protocol after hand-off. `lost` runs once, when the connection is gone for any reason."""

    __slots__ = ("_lost", "_sub")

    def __init__(self, sub: Subscriber, lost: Callable[[], None]) -> None:
        self._sub = sub
        self._lost = lost

    def data_received(self, data: bytes) -> None:
        """A client has nothing more to say on an event stream; whatever it sends (a pipelined request that
        would never be answered) is dropped."""

    def eof_received(self) -> bool:
        return False  # the client closed its side: close ours, `connection_lost` follows

    def resume_writing(self) -> None:
        self._sub.flush()  # what queued while the client's buffer was full goes out now

    def connection_lost(self, exc: Exception | None) -> None:
        self._sub.close("client left")  # no-op when the server ended the stream
        self._lost()
