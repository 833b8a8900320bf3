"""A publisher that retries every request, and the streams that must still see each event exactly once.

Shared by tests/test_publish_batch.py (both brokers) and tests/test_cluster.py (Redis Cluster): the same plan of
single and batch publishes, each request sent three times (one after another, or all at once as a timed-out
request's retry can race the original), checked against an independent model of the rule: an event whose id its
channel (a user's, or the app's broadcast) already published is answered with the same id and not published again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

from quart_sse.settings import Settings
from tests.support import RawStream, auth, open_stream, token

REPLAYED = "Idempotent-Replayed"

#: (target of a single publish: a user, None for the broadcast, or "batch"; the body)
PLAN: list[tuple[str | None, Any]] = [
    ("alice", {"id": "s1", "type": "t", "data": {"n": 1}}),
    (None, {"id": "b1", "type": "news", "data": {"n": 2}}),
    ("batch", [{"user": "alice", "id": "m1", "type": "t", "data": 3},
               {"user": "bob", "id": "m2", "type": "t", "data": 4},
               {"id": "m3", "type": "news", "data": 5},
               {"user": "alice", "id": "m4", "type": "t", "data": [6]}]),
    ("bob", {"id": "s2", "type": "t", "data": "seven"}),
    ("batch", [{"user": "alice", "id": "m5", "type": "t", "data": 8},
               {"user": "alice", "id": "s1", "type": "t", "data": "again"},  # published before: a duplicate
               {"id": "b1", "type": "news", "data": "again"},  # the broadcast's b1 too
               {"user": "bob", "id": "b1", "type": "t", "data": 9},  # the same id on another channel: new
               {"user": "bob", "id": "m6", "type": "t", "data": 10},
               {"user": "bob", "id": "m6", "type": "t", "data": "twice in one batch"}]),  # in-batch duplicate
    (None, {"id": "m3", "type": "news", "data": "again"}),  # a single broadcast retrying a batch's event
]


@dataclass
class Expected:
    """What the model says: per event of each request, its id and whether it is new; per user, the ids owed."""

    answers: list[list[tuple[str, bool]]]
    streams: dict[str, list[str]]


def model(plan: list[tuple[str | None, Any]], users: tuple[str, ...]) -> Expected:
    seen: set[tuple[str | None, str]] = set()
    answers: list[list[tuple[str, bool]]] = []
    streams: dict[str, list[str]] = {u: [] for u in users}
    for target, body in plan:
        events = body if target == "batch" else [{**body, "user": target}]
        out = []
        for ev in events:
            channel = ev.get("user")
            new = (channel, ev["id"]) not in seen
            seen.add((channel, ev["id"]))
            out.append((ev["id"], new))
            if new:
                for u in users:
                    if channel in (u, None):
                        streams[u].append(ev["id"])
        answers.append(out)
    return Expected(answers, streams)


async def send(client: httpx.AsyncClient, app: str, target: str | None, body: Any,
               headers: dict[str, str]) -> tuple[list[tuple[str, bool]], bool]:
    """One request: per event (id, new), and whether the answer says it is a replay (the header)."""
    path = f"/publish/{app}" + ("" if target in (None, "batch") else f"/{target}")
    r = await client.post(path, json=body, headers=headers)
    assert r.status_code == 202, r.text
    js = r.json()
    replayed = r.headers.get(REPLAYED) == "true"
    if target == "batch":
        assert set(js) == {"ids", "duplicates"}, js
        dup = set(js["duplicates"])
        return [(i, n not in dup) for n, i in enumerate(js["ids"])], replayed
    assert set(js) == {"id"}, js
    return [(js["id"], not replayed)], replayed


async def read_ids(stream: RawStream, until: str) -> list[str]:
    """Event ids up to (without) the marker `until`."""
    got: list[str] = []
    while True:
        ev = await stream.next_event(10)
        assert ev is not None, f"stream ended after {got}"
        assert ev.event != "reset", got
        if ev.id == until:
            return got
        assert ev.id is not None
        got.append(ev.id)


async def retried_publishes_reach_each_stream_once(base_url: str, port: int, settings: Settings, app: str,
                                                   *, concurrent: bool) -> None:
    """Every request of PLAN three times: the same answer each time (the retries marked replayed), each event once
    on every stream (two of alice's, one of bob's) and once in history."""
    users = ("alice", "bob")
    expected = model(PLAN, users)
    streams = {"alice": [await open_stream(port, headers=auth(token(settings, "alice", app))) for _ in range(2)],
               "bob": [await open_stream(port, headers=auth(token(settings, "bob", app)))]}
    headers = auth(token(settings, "backend", app, "publish"))
    try:
        assert all(s.status == 200 for group in streams.values() for s in group)
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            for (target, body), want in zip(PLAN, expected.answers, strict=True):
                if concurrent:  # a retry racing the request it retries
                    tries = await asyncio.gather(*[send(client, app, target, body, headers) for _ in range(3)])
                    firsts = [t for t in tries if any(new for _, new in t[0])]
                    assert len(firsts) <= 1, tries  # the event's first publish happened in one of them only
                    assert [i for i, _ in tries[0][0]] == [i for i, _ in want]
                    assert all([i for i, _ in t[0]] == [i for i, _ in want] for t in tries), tries
                    news = [any(t[0][k][1] for t in tries) for k in range(len(want))]
                    assert news == [n for _, n in want], (tries, want)
                else:
                    first = await send(client, app, target, body, headers)
                    assert first == (want, not any(n for _, n in want)), (first, want)
                    for _ in range(2):
                        retried = await send(client, app, target, body, headers)
                        assert retried == ([(i, False) for i, _ in want], True), retried
            for user in users:  # a marker per user: everything before it must be exactly what is owed
                await send(client, app, user, {"id": f"end-{user}", "type": "end"}, headers)
        for user, group in streams.items():
            for s in group:
                assert await read_ids(s, f"end-{user}") == expected.streams[user], user
        # history holds each once: a stream resuming after alice's first event gets the rest of her channels once
        again = await open_stream(port, headers={**auth(token(settings, "alice", app)), "Last-Event-ID": "s1"})
        try:
            assert await read_ids(again, "end-alice") == expected.streams["alice"][1:]
        finally:
            await again.close()
    finally:
        for group in streams.values():
            for s in group:
                await s.close()
