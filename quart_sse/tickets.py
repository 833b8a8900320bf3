"""Single-use, short-lived stream tickets, so browsers need not put a long-lived token in a URL (docs/security.md)."""

from __future__ import annotations

import secrets
import time
from typing import Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import keys
from .auth import Identity
from .broker.base import BrokerUnavailable
from .ids import is_valid_id


def _encode(ident: Identity) -> bytes:
    return orjson.dumps({"app": ident.app, "user": ident.user, "scopes": sorted(ident.scopes), "exp": ident.exp})


def _decode(raw: bytes) -> Identity | None:
    """The stored identity, re-checked: a value in Redis that is not ours opens nothing (and is no 500)."""
    try:
        d = orjson.loads(raw)
        ident = Identity(app=d["app"], user=d["user"], scopes=frozenset(d["scopes"]), exp=d["exp"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not (is_valid_id(ident.app) and is_valid_id(ident.user)) or type(ident.exp) is not int \
            or not all(isinstance(s, str) for s in ident.scopes):
        return None
    return ident


#: A ticket is `secrets.token_urlsafe(32)` (43 characters); anything much longer is not one of ours.
MAX_TICKET_LEN = 128


class TicketStore(Protocol):
    async def issue(self, ident: Identity, ttl: int) -> str: ...

    async def peek(self, ticket: str) -> Identity | None:
        """The ticket's identity without spending it; None when unknown, used or expired."""
        ...

    async def redeem(self, ticket: str) -> Identity | None:
        """The ticket's identity, once; None when unknown, used or expired."""
        ...


def new_ticket() -> str:
    return secrets.token_urlsafe(32)


class MemoryTickets:
    def __init__(self) -> None:
        self._tickets: dict[str, tuple[float, Identity]] = {}

    async def issue(self, ident: Identity, ttl: int) -> str:
        now = time.monotonic()
        for t, (exp, _) in list(self._tickets.items()):  # lazily forget the expired
            if exp < now:
                del self._tickets[t]
        ticket = new_ticket()
        self._tickets[ticket] = (now + ttl, ident)
        return ticket

    async def peek(self, ticket: str) -> Identity | None:
        entry = self._tickets.get(ticket)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    async def redeem(self, ticket: str) -> Identity | None:
        if len(ticket) > MAX_TICKET_LEN:
            return None
        entry = self._tickets.pop(ticket, None)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]


class RedisTickets:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def issue(self, ident: Identity, ttl: int) -> str:
        ticket = new_ticket()
        try:
            await self.redis.set(keys.ticket_key(ticket), _encode(ident), ex=ttl, nx=True)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        return ticket

    async def peek(self, ticket: str) -> Identity | None:
        if len(ticket) > MAX_TICKET_LEN:
            return None
        try:
            raw = await self.redis.get(keys.ticket_key(ticket))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        return _decode(raw) if isinstance(raw, bytes) else None

    async def redeem(self, ticket: str) -> Identity | None:
        if len(ticket) > MAX_TICKET_LEN:
            return None
        try:
            raw = await self.redis.getdel(keys.ticket_key(ticket))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        return _decode(raw) if isinstance(raw, bytes) else None
