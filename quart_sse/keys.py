"""Every Redis key and channel name the service uses, in one place.

The seed's names (`{app}:channel:{user}`, `{app}:broadcast`, `{app}:client:{user}`) are kept verbatim. Our own keys
put the app in a Redis Cluster hash tag (`sse:{app}:...`) so that the keys one Lua script touches share a slot.
"""

from __future__ import annotations

CONTROL_CHANNEL = "sse:control"


def user_channel(app: str, user: str) -> str:
    return f"{app}:channel:{user}"


def broadcast_channel(app: str) -> str:
    return f"{app}:broadcast"


def sharded_user_channel(app: str, user: str) -> str:
    """REDIS_CLUSTER: the user's live channel for SSUBSCRIBE/SPUBLISH, in the app's slot like its history."""
    return f"sse:{{{app}}}:live:u:{user}"


def sharded_broadcast_channel(app: str) -> str:
    return f"sse:{{{app}}}:live:b"


def seed_client_hash(app: str, user: str) -> str:
    return f"{app}:client:{user}"


def history_key(app: str, user: str | None) -> str:
    return f"sse:{{{app}}}:h:b" if user is None else f"sse:{{{app}}}:h:u:{user}"


def seen_key(app: str, user: str | None) -> str:
    """The ids a channel published within HISTORY_TTL (a sorted set id → ms), for safe retries."""
    return f"sse:{{{app}}}:seen:b" if user is None else f"sse:{{{app}}}:seen:u:{user}"


def seq_key(app: str) -> str:
    return f"sse:{{{app}}}:seq"


def app_conns_key(app: str) -> str:
    return f"sse:{{{app}}}:conns"


def user_conns_key(app: str, user: str) -> str:
    return f"sse:{{{app}}}:u:{user}"


def ticket_key(ticket: str) -> str:
    return f"sse:ticket:{ticket}"


def reply_channel(instance: str) -> str:
    return f"sse:reply:{instance}"


#: Every app that ever had presence state: the sweepers of all instances visit each of them (its own slot).
PRESENCE_APPS = "sse:presence:apps"

#: One app's presence keys, in the order the presence scripts take them as KEYS (quart_sse.presence.scripts):
#: online users (zset: user -> when to look for a crashed instance), pending offlines (zset: user -> due time),
#: when each pending user's last stream closed (hash), the app's last seq, the webhook queue (stream), the
#: delivery leases (hash: user -> "consumer|deadline ms|entry id"). All in the app's slot, beside its registry sets.
PRESENCE_PARTS = ("on", "due", "gone", "seq", "q", "fly")


def presence_keys(app: str) -> list[str]:
    return [f"sse:{{{app}}}:p:{part}" for part in PRESENCE_PARTS]
