"""History rules shared by both brokers: where a Last-Event-ID points and what a resuming stream is owed."""

from __future__ import annotations

from ..events import Message, Position, parse_position

MAX_LAST_EVENT_ID = 256


def merge(user: list[Message], broadcast: list[Message]) -> list[Message]:
    """Both lists are in position order; positions come from one per-app sequence, so a merge restores publish order."""
    if not broadcast:
        return user
    if not user:
        return broadcast
    out = user + broadcast
    out.sort(key=lambda m: m.pos or (0, 0))
    return out


def as_position(last_id: str) -> Position | None:
    return parse_position(last_id) if len(last_id) <= MAX_LAST_EVENT_ID else None
