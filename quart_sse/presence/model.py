"""A presence change as the webhook receiver sees it (pure: no I/O).

The body is `{"id", "type", "app", "user", "at", "seq"}` (docs/presence.md):
- `type`: `user.online` | `user.offline`;
- `at`: Unix time in milliseconds of the change (the first stream's admission; the last stream's close, or the
  last heartbeat of a crashed instance's stream);
- `seq`: the app's presence counter at the change. It strictly increases per app (so per app and user): Redis's
  clock in milliseconds, or the previous seq + 1 when that is higher, so it keeps increasing even after Redis lost
  its data. A receiver keeps the highest seq per user and ignores an event whose seq is not higher.
- `id`: stable across retries and instances (a UUID derived from app and seq): the receiver's de-duplication key.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

import orjson

#: Namespace of the event ids (uuid5 of "<app>/<seq>"): any fixed UUID would do, this one is ours.
EVENT_ID_NAMESPACE = uuid.UUID("5b1f7c1e-3f4a-4d8e-9a51-2d6b0c1e8f30")


class Change(enum.StrEnum):
    ONLINE = "user.online"
    OFFLINE = "user.offline"


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """One queued change; `entry` is its place in the app's queue (a Redis Stream entry id, or the in-process
    queue's equivalent), used to acknowledge it."""

    app: str
    user: str
    change: Change
    at: int  # Unix ms
    seq: int
    entry: str

    @property
    def id(self) -> str:
        return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{self.app}/{self.seq}"))

    def body(self) -> bytes:
        """The JSON body, the same bytes at every attempt (the signature covers them)."""
        return orjson.dumps({"id": self.id, "type": self.change.value, "app": self.app, "user": self.user,
                             "at": self.at, "seq": self.seq})

    @classmethod
    def from_fields(cls, app: str, entry: str, fields: dict[str, str]) -> PresenceEvent:
        """From a queue entry's fields (`type`, `user`, `at`, `seq`)."""
        return cls(app=app, user=fields["user"], change=Change(fields["type"]), at=int(fields["at"]),
                   seq=int(fields["seq"]), entry=entry)
