"""Property: whatever the interleaving of publishes, disconnects and reconnects, every stream gets exactly what the
history model says — each event of its channels once and in order while history covers the gap, a reset otherwise.

Real HTTP against a live server on each broker, HISTORY_SIZE=5 so that trimming and resets are exercised, and
publishes racing each reconnect so that the seam between replay and live is exercised. The model is the documented
rule (docs/history.md), written independently of the brokers: history is the last SIZE events of each channel; a
stream resumes after the most recent event with its Last-Event-ID; the gap is covered when neither channel had more
than SIZE events after that one. A publish whose id was already given on the same channel is a duplicate (safe
retries, docs/publishing.md): answered, not published.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quart_sse.settings import Settings
from tests.support import LiveServer, RawStream, auth, live_server, open_stream, token

SIZE = 5
USERS = ("u0", "u1")
CLIENT_USERS = ("u0", "u1", "u0")  # two streams of u0 share its channel subscription
RESET = -1  # stands for the `reset` event in expected sequences
_apps = itertools.count()


@dataclass(frozen=True)
class Pub:
    n: int
    target: str | None  # a user, or None for the app's broadcast
    id: str


@dataclass
class Client:
    user: str
    stream: RawStream | None = None
    last_id: str | None = None  # what a browser would send as Last-Event-ID
    candidates: list[list[int]] = field(default_factory=list)  # what this connection may rightly deliver
    got: list[int] = field(default_factory=list)
    run: list[int] = field(default_factory=list)  # events seen since the last fresh start or reset


def owed(pubs: list[Pub], user: str, last_id: str) -> tuple[Pub | None, list[int]]:
    """The model: where a stream of `user` resuming from `last_id` resumes (None: reset) and what it replays."""
    mine = [p for p in pubs if p.target == user]
    bcast = [p for p in pubs if p.target is None]
    hits = [p for p in mine[-SIZE:] + bcast[-SIZE:] if p.id == last_id] if len(last_id) <= 256 else []
    if not hits:
        return None, [RESET]
    anchor = max(hits, key=lambda p: p.n)
    if sum(p.n > anchor.n for p in mine) > SIZE or sum(p.n > anchor.n for p in bcast) > SIZE:
        return None, [RESET]
    return anchor, [p.n for p in pubs if p.n > anchor.n and p.target in (user, None)]


targets = st.sampled_from([*USERS, None])
id_kinds = st.one_of(st.none(), st.sampled_from(["a", "b", "uniq"]), st.integers(0, 60))
publish_op = st.tuples(st.just("pub"), targets, id_kinds, st.integers(1, 7))
connect_op = st.tuples(
    st.just("connect"), st.integers(0, len(CLIENT_USERS) - 1),
    st.one_of(st.just("last"), st.just("last"), st.sampled_from(["none", "garbage", "1-1", "x" * 300]),
              st.integers(0, 60)),
    st.booleans(),
    st.lists(st.tuples(targets, id_kinds, st.integers(0, 6)), max_size=4))  # published while connecting
sync_op = st.tuples(st.just("sync"), st.integers(0, len(CLIENT_USERS) - 1))
drop_op = st.tuples(st.just("drop"), st.integers(0, len(CLIENT_USERS) - 1), st.booleans())  # after a sync?
scenarios = st.lists(st.one_of(publish_op, publish_op, connect_op, connect_op, sync_op, drop_op, drop_op),
                     min_size=15, max_size=50)


@pytest.fixture
async def small_server(settings_factory: Any) -> AsyncIterator[LiveServer]:
    s: Settings = settings_factory(history_size=SIZE, history_ttl=3600)
    async with live_server(s) as srv:
        yield srv


class Scenario:
    def __init__(self, srv: LiveServer) -> None:
        self.srv = srv
        self.app = f"prop{next(_apps)}"  # a fresh app per example: no state leaks between examples
        self.pubs: list[Pub] = []
        self.given: set[tuple[str | None, str]] = set()  # (channel, id) of every id a publisher gave so far
        self.clients = [Client(u) for u in CLIENT_USERS]

    async def publish(self, target: str | None, id_kind: str | int | None) -> Pub | None:
        """The event published, or None for a duplicate (its id was given on that channel before)."""
        n = len(self.pubs)
        eid: str | None
        if isinstance(id_kind, int):  # reuse an earlier event's id (assigned or not): resume is after the newest
            eid = self.pubs[id_kind % n].id if n else None
        else:
            eid = f"uniq{n}" if id_kind == "uniq" else id_kind
        msg = await self.srv.services.publisher.publish(self.app, target, "t", {"n": n}, eid)
        if eid is not None:
            assert msg.duplicate == ((target, eid) in self.given), (target, eid)
            self.given.add((target, eid))  # only given ids count: an assigned id reused as given is new once
        if msg.duplicate:
            assert msg.id == eid
            return None
        pub = Pub(n, target, msg.id)
        self.pubs.append(pub)
        for c in self.clients:
            if c.stream is not None and target in (c.user, None):
                for cand in c.candidates:
                    cand.append(n)
        return pub

    async def connect(self, c: Client, anchor: str | int, query: bool,
                      racing: list[tuple[str | None, str | int | None, int]]) -> None:
        await self.drop(c)
        if anchor == "last":
            last_id = c.last_id
        elif anchor == "none":
            last_id = None
        elif isinstance(anchor, int):
            last_id = self.pubs[anchor % len(self.pubs)].id if self.pubs else "nothing-yet"
        else:
            last_id = anchor
        headers = auth(token(self.srv.services.settings, c.user, self.app))
        path = "/sse"
        if last_id is not None and (query or len(last_id) > 256):
            path += "?lastEventId=" + quote(last_id, safe="")
        elif last_id is not None:
            headers["Last-Event-ID"] = last_id
        before = len(self.pubs)
        opening = asyncio.get_running_loop().create_task(open_stream(self.srv.port, path, headers))
        for target, id_kind, pause in racing:  # published while the stream subscribes and replays
            for _ in range(pause):
                await asyncio.sleep(0)
            await self.publish(target, id_kind)
        c.stream = await opening
        assert c.stream.status == 200
        c.got = []
        # the server's replay saw the first `before + j` events, for some j; later ones reach the stream live.
        # On a reset, what was published before the subscription is not owed: any tail of the racing events.
        racing_mine = [p.n for p in self.pubs[before:] if p.target in (c.user, None)]
        cands: list[list[int]] = []
        anchors = set()
        for j in range(len(self.pubs) - before + 1):
            replay: list[Any]
            if last_id is None:
                at, replay = None, []
            else:
                at, replay = owed(self.pubs[:before + j], c.user, last_id)
            anchors.add(at.n if at else None)
            live = [n for n in racing_mine if n >= before + j]
            if replay == [RESET]:
                cands += [[RESET, *racing_mine[i:]] for i in range(len(racing_mine) - len(live) + 1)]
            else:
                cands.append(replay + live)
        c.candidates = [list(x) for x in {tuple(x) for x in cands}]
        if not (c.run and anchors == {c.run[-1]}):
            c.run = []  # a fresh start, a reset, or a resume from elsewhere than the last event seen

    async def drop(self, c: Client) -> None:
        if c.stream is not None:
            await c.stream.close()
            c.stream = None

    async def sync(self, c: Client) -> None:
        """Publish a marker to the client's user and read up to it: everything before must be exactly as owed."""
        if c.stream is None:
            return
        marker = await self.publish(c.user, None)
        assert marker is not None  # no id: never a duplicate
        while not c.got or c.got[-1] != marker.n:
            ev = await c.stream.next_event(5)
            assert ev is not None, f"{c.user}: stream ended; got {c.got}, expected one of {c.candidates}"
            if ev.event == "reset":
                assert ev.id is None and isinstance(ev.json(), dict)
                c.got.append(RESET)
                continue
            n = ev.json()["n"]
            assert ev.id == self.pubs[n].id
            c.got.append(n)
            c.last_id = ev.id
            c.run.append(n)
        matching = [cand for cand in c.candidates if cand[:len(c.got)] == c.got]
        assert matching, f"{c.user}: got {c.got}, expected one of {c.candidates}"
        c.candidates = matching
        # exactly once and in order across reconnects: the run is a contiguous slice of the user's channels
        channel = [p.n for p in self.pubs if p.target in (c.user, None)]
        start = channel.index(c.run[0]) if c.run else 0
        assert c.run == channel[start:start + len(c.run)], f"{c.user}: run {c.run} vs channel {channel}"


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=scenarios)
async def test_every_stream_gets_exactly_what_history_owes_it(small_server: LiveServer,
                                                              steps: list[tuple[Any, ...]]) -> None:
    sc = Scenario(small_server)
    try:
        for step in steps:
            kind = step[0]
            if kind == "pub":
                for _ in range(step[3]):
                    await sc.publish(step[1], step[2])
            elif kind == "connect":
                await sc.connect(sc.clients[step[1]], step[2], step[3], step[4])
            elif kind == "drop":
                if step[2]:
                    await sc.sync(sc.clients[step[1]])
                await sc.drop(sc.clients[step[1]])
            else:
                await sc.sync(sc.clients[step[1]])
        for c in sc.clients:
            await sc.sync(c)
    finally:
        for c in sc.clients:
            await sc.drop(c)
