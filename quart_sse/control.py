"""Cluster-wide commands over the broker's control channel: close a user's streams on every instance."""

from __future__ import annotations

import asyncio
import logging
import uuid

import orjson

from .broker.base import Broker
from .hub import Hub
from .ids import is_valid_id
from .stream import CloseReason

log = logging.getLogger("quart_sse.control")


class Control:
    def __init__(self, broker: Broker, hub: Hub, instance: str, reply_timeout: float = 2.0) -> None:
        self.broker = broker
        self.hub = hub
        self.instance = instance
        self.reply_timeout = reply_timeout
        self._requests: dict[str, tuple[asyncio.Queue[int], int]] = {}

    async def disconnect_user(self, app: str, user: str) -> int:
        """Close every stream of (app, user) everywhere; returns how many were closed in all."""
        req = uuid.uuid4().hex
        replies: asyncio.Queue[int] = asyncio.Queue()
        self._requests[req] = (replies, 0)
        try:
            n_instances = await self.broker.publish_control(orjson.dumps(
                {"op": "close", "app": app, "user": user, "req": req, "from": self.instance}))
            total = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.reply_timeout
            for _ in range(n_instances):
                try:
                    total += await asyncio.wait_for(replies.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    log.warning("disconnect %s/%s: an instance did not answer in time", app, user)
                    break
            return total
        finally:
            self._requests.pop(req, None)

    async def handle(self, payload: bytes) -> None:
        try:
            msg = orjson.loads(payload)
            op = msg.get("op")
            if op == "close" and is_valid_id(msg.get("app")) and is_valid_id(msg.get("user")):
                n = self.hub.close_user(msg["app"], msg["user"], CloseReason.DISCONNECTED)
                await self.broker.send_reply(str(msg["from"]), orjson.dumps(
                    {"op": "closed", "req": msg["req"], "n": n}))
            elif op == "closed":
                entry = self._requests.get(str(msg.get("req")))
                if entry is not None:
                    entry[0].put_nowait(int(msg.get("n", 0)))
        except Exception as exc:  # noqa: BLE001 - a bad control message must not kill anything
            log.warning("ignored a bad control message: %s", exc)
