"""History rules shared by both brokers: where a Last-Event-ID points and what a resuming stream is owed.

History is the last `HISTORY_SIZE` events of each channel (a user's, the app's broadcast) younger than
`HISTORY_TTL`. A Last-Event-ID resumes after the most recent event with that id among them; the gap is covered
when neither channel had more than `HISTORY_SIZE` events after it. Anything else is a reset.
"""

from __future__ import annotations

from ..events import Message, Position, format_position, parse_position
from .base import Replay

MAX_LAST_EVENT_ID = 256
#: Positions are compared as Lua numbers (doubles) in Redis scripts: larger values cannot be ours.
_MAX_POSITION_PART = 2**53


def merge(user: list[Message], broadcast: list[Message]) -> list[Message]:
    """Both lists are in position order; positions come from one per-app sequence, so a merge restores publish order."""
    if not broadcast:
        return user
    if not user:
        return broadcast
    out = user + broadcast
    out.sort(key=lambda m: m.pos or (0, 0))
    return out


def covered(after: Position, user: list[Message], broadcast: list[Message]) -> Replay:
    """The replay owed after `after`. Its `after` is the newest position it delivers, so that the stream drops
    live copies of the replayed events too (they queue up between the subscription and the replay)."""
    messages = merge(user, broadcast)
    newest = messages[-1].pos if messages else None
    return Replay(messages=messages, after=max(after, newest) if newest is not None else after)


def as_position(last_id: str) -> Position | None:
    """`last_id` as one of our positions, when it is written exactly as we write them; else None."""
    if len(last_id) > MAX_LAST_EVENT_ID:
        return None
    pos = parse_position(last_id)
    if pos is None or pos[0] >= _MAX_POSITION_PART or pos[1] >= _MAX_POSITION_PART or format_position(pos) != last_id:
        return None
    return pos
