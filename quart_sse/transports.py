"""The open client connections of this process, by peer address: to abort a stalled client, and to take over a stream.

Closing a stream whose client stopped reading is not enough: asyncio's `close()` waits for the send buffer to drain,
which never happens. Only `transport.abort()` frees it. Hypercorn does not expose the transport to the app, so our
server (quart_sse.server) records each connection here. The hub writes events of an idle HTTP/1.x stream straight to
its transport (see hub.Subscriber.push), and a stream can take the connection over from Hypercorn for good
(`hand_off`, see quart_sse.handoff).
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Connection(Protocol):
    """What the server records per connection (quart_sse.server._TrackedTCPServer)."""

    @property
    def transport(self) -> asyncio.WriteTransport: ...

    def hand_off(self, protocol: asyncio.Protocol) -> bool: ...


_open: dict[tuple[str, int], Connection] = {}


def register(peer: tuple[str, int], conn: Connection) -> None:
    _open[peer] = conn


def get(peer: tuple[str, int] | None) -> asyncio.WriteTransport | None:
    conn = _open.get(peer) if peer is not None else None
    return conn.transport if conn is not None else None


def hand_off(peer: tuple[str, int] | None, protocol: asyncio.Protocol) -> bool:
    """Give the connection to `protocol`; False when the server cannot (HTTP/2, TLS, a full send buffer)."""
    conn = _open.get(peer) if peer is not None else None
    if conn is None or not conn.hand_off(protocol):
        return False
    del _open[peer]  # type: ignore[arg-type]  # the server no longer owns it; the stream aborts it itself
    return True


def unregister(peer: tuple[str, int], conn: Connection | None = None) -> None:
    """Forget `peer` (only if it is still `conn`'s, when given: a handed-off connection's address may be reused)."""
    if conn is None or _open.get(peer) is conn:
        _open.pop(peer, None)


def abort(peer: tuple[str, int] | None) -> bool:
    conn = _open.pop(peer, None) if peer is not None else None
    if conn is None:
        return False
    conn.transport.abort()
    return True


def count() -> int:
    return len(_open)
