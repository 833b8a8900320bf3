"""The open client sockets of this process, by peer address, so that a stalled client can be aborted.

Closing a stream whose client stopped reading is not enough: asyncio's `close()` waits for the send buffer to drain,
which never happens. Only `transport.abort()` frees it. Hypercorn does not expose the transport to the app, so our
server (quart_sse.server) records it here. The hub also writes events of an idle HTTP/1.x stream straight to its
transport (see hub.Subscriber.push).
"""

from __future__ import annotations

import asyncio

_open: dict[tuple[str, int], asyncio.WriteTransport] = {}


def register(peer: tuple[str, int], transport: asyncio.WriteTransport) -> None:
    _open[peer] = transport


def get(peer: tuple[str, int] | None) -> asyncio.WriteTransport | None:
    return _open.get(peer) if peer is not None else None


def unregister(peer: tuple[str, int]) -> None:
    _open.pop(peer, None)


def abort(peer: tuple[str, int] | None) -> bool:
    transport = _open.pop(peer, None) if peer is not None else None
    if transport is None:
        return False
    transport.abort()
    return True


def count() -> int:
    return len(_open)
