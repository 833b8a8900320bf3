"""One Redis pub/sub connection per process, read with hiredis straight off an asyncio Protocol.

Why not redis-py's PubSub: its `subscribe()` returns before Redis confirms (a resuming stream needs the confirmation
to close the seam between history and live), `unsubscribe()` keeps the pooled connection, errors can surface late,
and it parses one message per await. Here a whole TCP read is parsed in one synchronous loop, confirmations resolve
futures in command order, a keep-alive PING catches a dead peer, and reconnects resubscribe every channel.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis

from ..tasks import cancel_and_wait

log = logging.getLogger("quart_sse.pubsub")

MessageCallback = Callable[[bytes, bytes], None]


def pack(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self, link: PubSubLink) -> None:
        self.link = link
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        handle = self.link._handle
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError:
                log.error("pub/sub protocol error; reconnecting")
                if self.transport is not None:
                    self.transport.abort()
                return
            if reply is False:
                return
            handle(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class PubSubLink:
    """Keeps the desired set of channels subscribed on one connection, across Redis restarts."""

    def __init__(self, url: str, on_message: MessageCallback, on_up: Callable[[], None],
                 on_down: Callable[[], None], *, keepalive: float = 5.0, sharded: bool = False) -> None:
        self._url = url
        self._on_message = on_message
        self._on_up = on_up
        self._on_down = on_down
        self._keepalive = keepalive
        self._sub = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
        self._unsub = b"SUNSUBSCRIBE" if sharded else b"UNSUBSCRIBE"
        self._msg_kind = b"smessage" if sharded else b"message"
        self._sub_kind = self._sub.lower()
        self.desired: set[str] = set()
        # per channel, one group of waiters per SUBSCRIBE sent, confirmed in command order
        self._pending: dict[str, deque[list[asyncio.Future[None]]]] = {}
        self._out: list[bytes] = []  # commands waiting for the end of this loop iteration (`_write`)
        self._proto: _Protocol | None = None
        self._pong: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    # -- public API -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-pubsub")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        if self._proto and self._proto.transport:
            self._proto.transport.abort()
        self._fail_pending()

    def subscribe(self, channel: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.desired.add(channel)
        self._pending.setdefault(channel, deque()).append([fut])
        if self.connected:
            self._write(pack(self._sub, channel))
        return fut

    def unsubscribe(self, channel: str) -> None:
        self.desired.discard(channel)
        if self.connected:
            self._write(pack(self._unsub, channel))

    # -- internals ------------------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        """Commands of one loop iteration go out in one write: a reconnect storm subscribes thousands of channels
        in a few iterations, and a write (a send syscall) per SUBSCRIBE was 4 % of its CPU."""
        out = self._out
        out.append(data)
        if len(out) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self._proto is not None and self._proto.transport is not None:
            self._proto.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _handle(self, reply: Any) -> None:
        if type(reply) is list and reply:
            kind = reply[0]
            if kind == self._msg_kind:
                self._on_message(reply[1], reply[2])
            elif kind == self._sub_kind:
                self._confirm(reply[1].decode())
            elif kind == b"pong":
                self._got_pong()
            # unsubscribe confirmations need no action
        elif reply == b"PONG":  # PING before the first SUBSCRIBE answers a plain +PONG
            self._got_pong()
        elif isinstance(reply, hiredis.ReplyError):
            log.error("redis pub/sub error: %s", reply)
            if self._pong is not None and not self._pong.done():  # e.g. an auth failure answers the PING
                self._pong.set_exception(ConnectionError(str(reply)))

    def _got_pong(self) -> None:
        if self._pong is not None and not self._pong.done():
            self._pong.set_result(None)

    def _confirm(self, channel: str) -> None:
        groups = self._pending.get(channel)
        if not groups:
            return
        for fut in groups.popleft():
            if not fut.done():
                fut.set_result(None)
        if not groups:
            del self._pending[channel]

    def _fail_pending(self) -> None:
        for groups in self._pending.values():
            for group in groups:
                for fut in group:
                    if not fut.done():
                        fut.cancel()
        self._pending.clear()

    async def _connect(self) -> _Protocol:
        u = urlparse(self._url)
        loop = asyncio.get_running_loop()
        ctx = ssl.create_default_context() if u.scheme == "rediss" else None
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands as its awaitable completes,
        # and close() would then wait forever for a link that carries on
        async with asyncio.timeout(3.0):
            _, proto = await loop.create_connection(
                lambda: _Protocol(self), u.hostname or "127.0.0.1", u.port or 6379, ssl=ctx)
        assert proto.transport is not None
        if u.password or u.username:
            auth = [b"AUTH"] + ([unquote(u.username).encode()] if u.username else []) + [
                unquote(u.password or "").encode()]
            proto.transport.write(pack(*auth))
        return proto

    async def _ping(self, proto: _Protocol, timeout: float) -> None:
        self._pong = asyncio.get_running_loop().create_future()
        assert proto.transport is not None
        proto.transport.write(pack(b"PING"))
        async with asyncio.timeout(timeout):  # not wait_for: see _connect
            await asyncio.shield(self._pong)

    async def _run(self) -> None:
        delay = 0.05
        first = True
        while True:
            proto: _Protocol | None = None
            try:
                proto = await self._connect()
                await self._ping(proto, 3.0)  # proves AUTH went through and Redis answers
                self._out = []  # meant for the lost connection: the resubscription below covers `desired`
                self._proto = proto
                # every waiter of a channel is answered by the one SUBSCRIBE this connection sends for it
                old, self._pending = self._pending, {}
                for ch, groups in old.items():
                    waiters = [f for g in groups for f in g]
                    if ch in self.desired:
                        self._pending[ch] = deque([waiters])
                    else:
                        for f in waiters:
                            f.cancel()
                chans = sorted(self.desired)
                if self._sub == b"SSUBSCRIBE":  # one command per channel: its channels must share a hash slot
                    proto.transport.write(b"".join([pack(self._sub, ch) for ch in chans]))  # type: ignore[union-attr]
                else:
                    for i in range(0, len(chans), 500):
                        proto.transport.write(pack(self._sub, *chans[i:i + 500]))  # type: ignore[union-attr]
                self.connected = True
                delay = 0.05
                if not first:
                    log.warning("redis pub/sub link re-established; %d channels resubscribed", len(chans))
                first = False
                self._on_up()
                while not proto.lost.done():
                    done, _ = await asyncio.wait([proto.lost], timeout=self._keepalive)
                    if done:
                        break
                    await self._ping(proto, self._keepalive)
                raise ConnectionError("connection lost")
            except asyncio.CancelledError:
                if proto is not None and proto.transport is not None and proto is not self._proto:
                    proto.transport.abort()  # cancelled before the link owned it (close() aborts self._proto)
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: drop the link and reconnect
                was = self.connected
                self.connected = False
                self._proto = None
                if proto is not None and proto.transport is not None:
                    proto.transport.abort()
                if was:
                    log.error("redis pub/sub link lost (%s); reconnecting", str(exc) or type(exc).__name__)
                    self._on_down()
                elif first:
                    log.warning("redis not reachable yet (%s); retrying", str(exc) or type(exc).__name__)
                    first = False
                    self._on_down()
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)  # Redis back => resubscribed within ~1.5 s
