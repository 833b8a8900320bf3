"""Safe retries: the event ids each channel published recently, so that a retried publish is not published again.

The rule (docs/publishing.md): an event that carries an id already published on the same channel (a user's, or an
app's broadcast) within the window (HISTORY_TTL) is a duplicate. Each channel remembers at most `max_ids` ids, the
newest, so that a publisher sending unique ids at a high rate cannot grow memory without bound. The Redis broker
keeps the same index in one sorted set per channel (id → ms), inside its publish script; this is the in-process
broker's, pure logic with the clock passed in.
"""

from __future__ import annotations

#: Ids remembered per channel. A retry comes seconds or minutes after the first attempt; a channel would have to
#: publish more than this many events with ids in between for a retry to slip through. ~100 bytes each on Redis.
MAX_SEEN_IDS = 100_000


class SeenIds:
    """Per channel: id → ms it was first published, oldest first; bounded by age (`window_ms`) and by count."""

    __slots__ = ("_channels", "max_ids", "window_ms")

    def __init__(self, window_ms: int, max_ids: int = MAX_SEEN_IDS) -> None:
        self.window_ms = window_ms
        self.max_ids = max_ids
        # channel -> (id -> ms); the outer dict in order of each channel's newest id, the inner ones oldest first
        self._channels: dict[str, dict[str, int]] = {}

    @property
    def enabled(self) -> bool:
        return self.window_ms > 0 and self.max_ids > 0

    def __len__(self) -> int:
        return len(self._channels)

    def seen(self, channel: str, event_id: str, now_ms: int) -> bool:
        """`event_id` was published on `channel` within the window."""
        ids = self._channels.get(channel)
        if ids is None:
            return False
        at = ids.get(event_id)
        return at is not None and at >= now_ms - self.window_ms

    def add(self, channel: str, event_id: str, now_ms: int) -> None:
        """Remember `event_id` as published now; `now_ms` never decreases per channel (positions never do)."""
        ids = self._channels.pop(channel, None)
        if ids is None:
            ids = {}
        self._channels[channel] = ids  # now the channel with the newest id
        ids.pop(event_id, None)  # an expired entry comes back as the newest
        ids[event_id] = now_ms
        oldest = now_ms - self.window_ms
        while len(ids) > self.max_ids or ids[next(iter(ids))] < oldest:
            del ids[next(iter(ids))]
        self._forget_idle(now_ms)

    def _forget_idle(self, now_ms: int) -> None:
        """Drop channels whose newest id left the window (so all of theirs did): amortised O(1), oldest first."""
        channels = self._channels
        oldest = now_ms - self.window_ms
        while channels:
            first = next(iter(channels))
            ids = channels[first]
            if ids and ids[next(reversed(ids))] >= oldest:
                return
            del channels[first]
