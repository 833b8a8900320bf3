"""Hypothesis-driven fuzzing (docs/security.md) of tokens, path segments, query strings, Last-Event-ID values,
publish bodies (HTTP and Python API) and raw Redis payloads.

Invariants: never a 500 (or any status outside the expected few), an exact oracle where one is cheap (which tokens
and which publish bodies are accepted), never an event outside its channel, and never a frame that breaks the SSE
framing. Mostly through Quart's test client (fast); the raw-payload fuzz runs over real HTTP and Redis, because
what it protects is the process's one pub/sub reader.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, unquote

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from quart import Quart
from quart.testing import QuartClient

from quart_sse import keys
from quart_sse.auth import MAX_EXP
from quart_sse.events import MAX_DATA_BYTES, MAX_ID_LEN, MAX_TYPE_LEN, EventError
from quart_sse.ids import is_valid_id
from quart_sse.registry import ConnRecord
from quart_sse.settings import Settings
from quart_sse.stream import Stream
from tests.support import SECRET, LiveServer, RawStream, auth, live_server, make_settings, open_stream, token
from tests.support_security import client_for, forge, sse

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ_SMALL = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ALL = "publish connections"
SSE_LINE = re.compile(rb"^(?:|:.*|id: [^\r\n\x00]*|event: [^\r\n\x00]+|data: [^\r\n]*|retry: \d+)$")

# ------------------------------------------------------------------------------------------------ strategies
valid_ids = st.from_regex(r"\A[A-Za-z0-9._@|+-]{1,24}\Z")
printable_latin1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
# everything a JSON string may hold, control characters and non-BMP included (no lone surrogates: JSON has none)
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
line_breakers = st.sampled_from(["a\nb", "a\rb", "a\r\nb", "\x00", "a\x00b", "event: x", "\n\nid: 9\n", "\u2028", "é"])
json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | \
    st.floats(allow_nan=False, allow_infinity=False) | any_text
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(any_text, c, max_size=4),
                           max_leaves=12)
junk = json_values | line_breakers | st.text(printable_latin1, min_size=100, max_size=300)


def _now() -> int:
    return int(time.time())


# time claims: comfortably past or future (no flaky boundaries), or junk of every JSON type
future = st.integers(60, 10**7).map(lambda d: _now() + d)
past = st.integers(60, 10**7).map(lambda d: _now() - d)
time_claim = st.none() | future | past | st.floats(allow_nan=True, allow_infinity=True) | \
    st.integers(10**12, 10**400) | st.booleans() | st.text(max_size=12) | st.lists(st.integers(), max_size=2)


JUNK_CLAIMS = {"sub": junk, "iss": junk, "exp": time_claim, "nbf": time_claim, "iat": time_claim,
               "scope": junk | st.just({}), "aud": st.sampled_from(["", [], "svc", ["svc"]])}


@st.composite
def token_cases(draw: st.DrawFn) -> tuple[str, bool]:
    """(token, whether the service must accept it) for POST /sse/ticket: a valid claim set with 0-2 claims
    replaced by junk or removed, signed right or wrong."""
    payload: dict[str, Any] = {"sub": draw(valid_ids), "iss": draw(valid_ids), "exp": draw(future)}
    for name, strat in (("nbf", past), ("iat", past | future), ("scope", st.text(printable_latin1, max_size=30))):
        if draw(st.booleans()):
            payload[name] = draw(strat)
    for name in draw(st.lists(st.sampled_from(sorted(JUNK_CLAIMS)), max_size=2, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            payload.pop(name, None)
        else:
            payload[name] = draw(JUNK_CLAIMS[name])
    alg = draw(st.sampled_from(["HS256"] * 8 + ["HS384", "HS512"]))
    right_key = draw(st.integers(0, 9).map(bool))
    tok = forge(payload, SECRET if right_key else "k" * 40, alg)
    return tok, alg == "HS256" and right_key and _claims_ok(payload)


def _time_ok(payload: dict[str, Any], name: str) -> bool:
    """PyJWT's rule for nbf: absent, or int() of it is not in the future (`iat` is not checked at all)."""
    if name not in payload:
        return True
    try:
        return int(payload[name]) <= _now()
    except (TypeError, ValueError, OverflowError):
        return False


def _claims_ok(p: dict[str, Any]) -> bool:
    exp = p.get("exp")
    exp_ok = isinstance(exp, (int, float)) and not isinstance(exp, bool) and \
        (isinstance(exp, int) or math.isfinite(exp)) and _now() < exp <= MAX_EXP
    scope = p.get("scope")
    return (exp_ok and is_valid_id(p.get("sub")) and is_valid_id(p.get("iss")) and _time_ok(p, "nbf")
            and (scope is None or scope == {} or isinstance(scope, str))
            and not p.get("aud"))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
async def fuzz_app() -> AsyncIterator[tuple[Quart, QuartClient, Settings]]:
    s = make_settings(history_size=50)
    async with client_for(s) as (app, client):
        yield app, client, s


@pytest.fixture
def published_ids() -> set[tuple[str, str | None, str]]:
    """(app, user or None, id) of every event published with an id so far, across the examples that share one
    fuzz_app: a second publish of one of them is a duplicate (safe retries), answered but not published."""
    return set()


def _check_frames(raw: bytes) -> list[dict[str, str]]:
    """Every line is a well-formed SSE line; returns the events (as field dicts) the bytes hold."""
    assert raw.endswith(b"\n\n") or not raw, raw[-50:]
    events = []
    for block in raw.split(b"\n\n")[:-1]:
        fields: dict[str, str] = {}
        for line in block.split(b"\n"):
            assert SSE_LINE.match(line), line[:200]
            if line and not line.startswith(b":"):
                name, _, value = line.partition(b": ")
                assert name.decode() not in fields, block[:200]  # one field of each kind per event
                fields[name.decode()] = value.decode()
        if "data" in fields:
            json.loads(fields["data"])
            events.append(fields)
    return events


# ------------------------------------------------------------------------------------------------ tokens
@FUZZ
@given(case=token_cases())
async def test_fuzz_tokens_exact_oracle(fuzz_app: Any, case: tuple[str, bool]) -> None:
    _, client, _ = fuzz_app
    tok, ok = case
    event("accepted" if ok else "refused")  # --hypothesis-show-statistics: both kinds are exercised
    r = await client.post("/sse/ticket", headers=auth(tok))
    assert r.status_code == (201 if ok else 401), (tok, await r.get_data())


@FUZZ_SMALL
@given(raw=st.text(printable_latin1, max_size=300) | st.text(st.sampled_from("abcXYZ012-_.="), max_size=400))
async def test_fuzz_token_strings(fuzz_app: Any, raw: str) -> None:
    """Anything in the header, the query or the cookie is a clean 401, never a 500."""
    _, client, s = fuzz_app
    for kw in ({"headers": {"Authorization": f"Bearer {raw}"}}, {"query_string": {"token": raw}},
               {"query_string": {"Authorization": raw}}, {"headers": {"Cookie": f"{s.jwt_cookie_name}={raw}"}}):
        r = await client.get("/connections/app1/alice", **kw)
        assert r.status_code == 401, (kw, r.status_code)
        assert (await r.get_json())["error"] == "unauthorized"


# ------------------------------------------------------------------------------------------------ paths and queries
segments = valid_ids | st.text(st.characters(exclude_categories=["Cs"]), min_size=0, max_size=140) | \
    st.sampled_from(["app1", "..", ".", "a:b", "%2F", "a/b", "{app1}", "*", "x" * 129, "app1?x=1", "app1#f"])


def _route_oracle(method: str, path: str) -> int:
    """The status the contract gives `path` for a token of app1 holding every scope (routing done by hand)."""
    parts = path.split("/")[1:]
    shapes = {("connections", 2): {"GET"}, ("connections", 3): {"GET", "DELETE"},
              ("publish", 2): {"POST"}, ("publish", 3): {"POST"}}
    allowed = shapes.get((parts[0], len(parts)))
    if allowed is None or "" in parts:
        return 404
    if method not in allowed:
        return 405
    if not all(is_valid_id(x) for x in parts[1:]):
        return 400
    if parts[1] != "app1":
        return 403
    return 202 if method == "POST" else 200


@FUZZ
@given(app=segments, user=segments, route=st.sampled_from(["list_app", "list_user", "delete", "to_user", "broadcast"]))
async def test_fuzz_path_segments(fuzz_app: Any, app: str, user: str, route: str) -> None:
    _, client, s = fuzz_app
    h = auth(token(s, "ops", "app1", ALL))
    a, u = quote(app, safe=""), quote(user, safe="")  # on the wire; the path the app sees is decoded again
    method, wire = {
        "list_app": ("GET", f"/connections/{a}"),
        "list_user": ("GET", f"/connections/{a}/{u}"),
        "delete": ("DELETE", f"/connections/{a}/{u}"),
        "to_user": ("POST", f"/publish/{a}/{u}"),
        "broadcast": ("POST", f"/publish/{a}"),
    }[route]
    path = unquote(wire)
    r = await client.open(wire, method=method, headers=h, json={"type": "t", "data": 1} if method == "POST" else None)
    body = await r.get_json()
    assert isinstance(body, dict)  # every answer is JSON
    assert r.status_code == _route_oracle(method, path), (method, path, r.status_code, body)


@FUZZ_SMALL
@given(query=st.dictionaries(st.sampled_from(["token", "Authorization", "ticket", "lastEventId"]) | any_text,
                             any_text | st.text(printable_latin1, max_size=300), max_size=5))
async def test_fuzz_query_strings(fuzz_app: Any, query: dict[str, str]) -> None:
    _, client, s = fuzz_app
    r = await client.get("/sse", query_string=query)  # no credential that could be valid: a clean 401
    assert r.status_code == 401 and (await r.get_json())["error"] == "unauthorized"
    r = await client.get("/connections/app1/alice", query_string=query, headers=auth(token(s, "alice", "app1")))
    assert r.status_code == 200 and await r.get_json() == {}


# ------------------------------------------------------------------------------------------------ Last-Event-ID
last_ids = st.text(printable_latin1, max_size=300) | st.from_regex(r"\A[0-9²٣]{1,25}-[0-9]{1,25}\Z") | \
    st.sampled_from(["0-0", "18446744073709551615-18446744073709551615", "18446744073709551616-0", "-", "1-",
                     "99999999999999999999999-1", "e1", "e2"])


async def _seed_history(client: QuartClient, s: Settings) -> None:
    h = auth(token(s, "backend", "app1", "publish"))
    for i in (1, 2, 3):
        r = await client.post("/publish/app1/alice", json={"id": f"e{i}", "type": "hist", "data": i}, headers=h)
        assert r.status_code == 202


@FUZZ
@given(last_id=last_ids, via=st.sampled_from(["header", "query"]))
async def test_fuzz_last_event_id_memory(fuzz_app: Any, last_id: str, via: str) -> None:
    _, client, s = fuzz_app
    if not fuzz_app[0].extensions["quart_sse"].broker._history:
        await _seed_history(client, s)
    await _resume_once(client, s, last_id, via)


async def _resume_once(client: QuartClient, s: Settings, last_id: str, via: str) -> None:
    h = auth(token(s, "alice", "app1"))
    kw: dict[str, Any] = {"headers": {**h, "Last-Event-ID": last_id}} if via == "header" else \
        {"headers": h, "query": {"lastEventId": last_id}}
    async with sse(client, **kw) as (status, first, _):
        assert status == 200, first
        events = _check_frames(first)
        assert first.startswith(b"retry: ")
        kinds = [e.get("event") for e in events]
        if last_id in ("e1", "e2"):
            assert kinds == ["hist"] * (3 - int(last_id[1])), first
        else:
            assert kinds == ["reset"], first


@pytest.fixture
async def fuzz_redis_app(redis_url: str) -> AsyncIterator[tuple[QuartClient, Settings]]:
    s = make_settings(redis_url=redis_url, history_size=50)
    async with client_for(s) as (_, client):
        await _seed_history(client, s)
        yield client, s


@FUZZ_SMALL
@given(last_id=last_ids, via=st.sampled_from(["header", "query"]))
async def test_fuzz_last_event_id_redis(fuzz_redis_app: Any, last_id: str, via: str) -> None:
    """The Redis replay script, too: a position-shaped id beyond 64 bits is a reset, not a 503."""
    client, s = fuzz_redis_app
    await _resume_once(client, s, last_id, via)


# ------------------------------------------------------------------------------------------------ publish bodies
@st.composite
def publish_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return orjson.dumps(draw(json_values))
    body: dict[str, Any] = {}
    if draw(st.integers(0, 9).map(bool)):
        body["type"] = draw(st.text(printable_latin1, min_size=1, max_size=20) | junk | st.just("t" * 129))
    if draw(st.booleans()):
        body["data"] = draw(json_values | st.just("x" * (MAX_DATA_BYTES + 1)))
    if draw(st.booleans()):
        body["id"] = draw(st.text(printable_latin1, min_size=1, max_size=20) | junk | st.just("i" * 257) | st.just(""))
    if draw(st.integers(0, 9)) == 0:
        body[draw(any_text)] = draw(json_values)
    return orjson.dumps(body)


def _publish_ok(raw: bytes) -> dict[str, Any] | None:
    """The oracle: the body the contract accepts, else None."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or set(body) - {"type", "data", "id"} or "type" not in body:
        return None

    def line_ok(v: Any, n: int) -> bool:
        return isinstance(v, str) and 0 < len(v) <= n and not re.search(r"[\x00-\x1f\x7f]", v)

    if not line_ok(body["type"], MAX_TYPE_LEN) or (body.get("id") not in (None, "")  # "": no id, one is assigned
                                                   and not line_ok(body["id"], MAX_ID_LEN)):
        return None
    if len(orjson.dumps(body.get("data"))) > MAX_DATA_BYTES:
        return None
    return body


@contextlib.asynccontextmanager
async def _listeners(app: Quart) -> AsyncIterator[dict[str, Stream]]:
    """Streams on the hub for app1/alice (the target), app1/bob and app2/alice (bystanders)."""
    hub = app.extensions["quart_sse"].hub
    subs = {f"{a}/{u}": Stream(ConnRecord(str(uuid.uuid4()), a, u, ""),
                               (keys.user_channel(a, u), keys.broadcast_channel(a)))
            for a, u in (("app1", "alice"), ("app1", "bob"), ("app2", "alice"))}
    for sub in subs.values():
        await hub.attach(sub)
    try:
        yield subs
    finally:
        for sub in subs.values():
            hub.detach(sub)


@FUZZ
@given(raw=publish_bodies())
async def test_fuzz_publish_bodies(fuzz_app: Any, published_ids: set[tuple[str, str | None, str]],
                                   raw: bytes) -> None:
    app, client, s = fuzz_app
    expected = _publish_ok(raw)
    async with _listeners(app) as subs:
        r = await client.post("/publish/app1/alice", data=raw, headers={
            **auth(token(s, "backend", "app1", "publish")), "Content-Type": "application/json"})
        body = await r.get_json()
        if expected is None:
            assert r.status_code == 400 and body["error"] == "bad_request" and body["message"], (raw[:200], body)
            assert not any(sub.pending() for sub in subs.values())
            return
        assert r.status_code == 202, (raw[:200], body)
        frame = subs["app1/alice"].drain()
        assert not subs["app1/bob"].pending() and not subs["app2/alice"].pending()  # never outside its channel
    given: str | None = expected.get("id") or None
    if r.headers.get("Idempotent-Replayed") == "true":
        assert given is not None and ("app1", "alice", given) in published_ids, (raw[:200], body)
        assert frame == b"" and body == {"id": given}, (raw[:200], body)
        return
    if given is not None:
        assert ("app1", "alice", given) not in published_ids, given
        published_ids.add(("app1", "alice", given))
    (ev,) = _check_frames(frame)
    assert ev["event"] == expected["type"] and json.loads(ev["data"]) == json.loads(
        orjson.dumps(expected.get("data")))
    assert ev["id"] == (expected.get("id") or body["id"]) == body["id"]


@FUZZ
@given(app_id=valid_ids | junk, user=st.none() | valid_ids | junk,
       event_type=valid_ids | junk | st.just("\ud800"), data=json_values | st.just({1: 2}) | st.just(2**70),
       event_id=st.none() | valid_ids | junk | st.just("x\udfff"))
async def test_fuzz_python_publisher(fuzz_app: Any, published_ids: set[tuple[str, str | None, str]], app_id: Any,
                                     user: Any, event_type: Any, data: Any, event_id: Any) -> None:
    """The Python API refuses exactly what the HTTP route refuses, with EventError and nothing else."""
    app, _, _ = fuzz_app
    pub = app.extensions["quart_sse"].publisher
    async with _listeners(app) as subs:
        try:
            msg = await pub.publish(app_id, user, event_type, data, event_id)
        except EventError as exc:
            assert exc.field in ("app", "user", "type", "id", "data")
            assert not any(sub.pending() for sub in subs.values())
            return
        assert is_valid_id(app_id) and (user is None or is_valid_id(user))
        frames = {k: sub.drain() for k, sub in subs.items()}
    if event_id == "":  # no id: one is assigned
        event_id = None
    if event_id is not None:
        assert msg.duplicate == ((app_id, user, event_id) in published_ids)
        published_ids.add((app_id, user, event_id))
    if msg.duplicate:
        assert msg.id == event_id and not any(frames.values())
        return
    for key, frame in frames.items():
        a, u = key.split("/")
        reached = a == app_id and (user is None or u == user)
        assert bool(frame) == reached, (key, app_id, user)
        if frame:
            (ev,) = _check_frames(frame)
            assert ev["event"] == event_type and ev["id"] == msg.id


# ------------------------------------------------------------------------------------------------ raw Redis payloads
tricky_payloads = st.sampled_from([
    b'{"type":"a\\nevent: evil","data":1}', b'{"type":"ok","id":"1\\r\\nretry: 1","data":1}',
    b'{"type":"ok","data":1,"pos":"\xc2\xb2-1"}', b'{"type":"ok","data":1,"pos":"99999999999999999999999-1"}',
    b'{"type":"x\\u0000","data":1}', b'{"type":"t","data":"' + b"x" * 300_000 + b'"}', b'{"type":"\\ud800"}',
    b'{"type":"t","data":NaN}', b'[1,2]', b'"str"', b"\xff\xfe", b"", b'{"type":"t","data":' + b"[" * 3000 + b"]" * 3000
    + b"}", b'{"type":"ok","id":true,"data":1}', b'{"type":"ok","id":12345678901234567890123,"data":1}'])


# what the seed's Go publishers send: every field present, unset ones as "" (or null), ids as numbers at times
seed_shapes = st.fixed_dictionaries({
    "id": st.sampled_from(["", None, "p3", 7, "a b"]), "type": st.sampled_from(["", None, "event", "message"]),
    "data": st.sampled_from([{"k": "v"}, {}, None, ""])})


@st.composite
def raw_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(tricky_payloads)
    if kind == 1:
        return draw(st.binary(max_size=300))
    if kind == 2:
        shape = draw(seed_shapes)
        return orjson.dumps({k: v for k, v in shape.items() if v is not None or draw(st.booleans())})
    body = {k: draw(junk | valid_ids | st.sampled_from(["", None]))
            for k in draw(st.sets(st.sampled_from(["id", "type", "data", "pos"])))}
    return orjson.dumps(body)


def _raw_oracle(payload: bytes) -> tuple[str | None, str, Any] | None:
    """The event (id, EventSource type, data) a raw PUBLISH must become, by the rules README states, else None.

    Written apart from quart_sse.events; only the JSON parsing is orjson's (the strict parser the service uses).
    """
    if len(payload) > 256 * 1024:
        return None
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None

    def line(value: Any, limit: int) -> tuple[bool, str | None]:
        if value is None or value == "":
            return True, None  # missing, null or empty: none
        ok = isinstance(value, str) and len(value) <= limit and not re.search(r"[\x00-\x1f\x7f]", value)
        return ok, value if ok else None

    raw_id = body.get("id")
    if type(raw_id) is int:
        raw_id = str(raw_id)
    id_ok, event_id = line(raw_id, MAX_ID_LEN)
    type_ok, event_type = line(body.get("type"), MAX_TYPE_LEN)
    if not (id_ok and type_ok) or len(orjson.dumps(body.get("data"))) > MAX_DATA_BYTES:
        return None
    return event_id, event_type or "message", body.get("data")


@pytest.fixture
async def raw_fuzz(redis_url: str) -> AsyncIterator[tuple[LiveServer, aioredis.Redis, RawStream, RawStream]]:
    s = make_settings(redis_url=redis_url)
    async with live_server(s) as srv:
        r = aioredis.Redis.from_url(redis_url)
        alice = await open_stream(srv.port, headers=auth(token(s, "alice", "app1")))
        bob = await open_stream(srv.port, headers=auth(token(s, "bob", "app1")))
        try:
            yield srv, r, alice, bob
            # afterwards: the reader never restarted, and the bystander's stream is alive and clean
            assert srv.services.metrics.redis_reconnects._value.get() == 0
            await r.publish(keys.user_channel("app1", "bob"), b'{"type":"bob-end","data":{}}')
            ev = await bob.next_event()
            assert ev is not None and ev.event == "bob-end"
            _check_frames(bytes(bob.raw).split(b"\n\n", 1)[1])  # after the retry/comment preamble
        finally:
            await alice.close()
            await bob.close()
            await r.aclose()


@FUZZ
@given(payload=raw_payloads())
async def test_fuzz_raw_redis_payloads(raw_fuzz: Any, payload: bytes) -> None:
    """Whatever a raw PUBLISH carries, the pub/sub reader lives on, the framing holds, a valid event follows."""
    srv, r, alice, _ = raw_fuzz
    before = len(alice.raw)
    dropped = srv.services.metrics.events_dropped
    dropped_before = dropped._value.get()
    marker = uuid.uuid4().hex
    await r.publish(keys.user_channel("app1", "alice"), payload)
    await r.publish(keys.user_channel("app1", "alice"), orjson.dumps({"type": "marker", "id": marker, "data": 0}))
    seen = []
    while True:
        ev = await alice.next_event(timeout=5)
        assert ev is not None, "stream ended"
        if ev.id == marker:
            break
        seen.append(ev)
    expected = _raw_oracle(payload)
    event("delivered" if expected else "dropped")
    # exactly the payload's event when the rules accept it, nothing otherwise
    assert [(e.id, e.event, e.json()) for e in seen] == ([expected] if expected else []), payload[:200]
    # and what was not delivered was counted where operators see it (sse_events_dropped_total)
    assert len(seen) + (dropped._value.get() - dropped_before) == 1, (payload, seen)
    assert srv.services.broker.link.connected
    new = bytes(alice.raw[before:])
    assume(new)
    _check_frames(new)


async def test_history_entries_are_rechecked_on_replay(redis_url: str) -> None:
    """Anyone with Redis access can XADD to a history stream: replay skips what would break the framing,
    re-encodes JSON that spans lines and reads an empty type as the default type, exactly as for a raw PUBLISH."""
    s = make_settings(redis_url=redis_url)
    async with live_server(s) as srv:
        pub = auth(token(s, "backend", "app1", "publish"))
        async with httpx.AsyncClient(base_url=srv.url) as c:
            ids = [(await c.post("/publish/app1/alice", json={"type": "good", "data": i}, headers=pub)).json()["id"]
                   for i in (1, 2)]
        ms = int(ids[1].split("-")[0])
        r = aioredis.Redis.from_url(redis_url)
        try:
            key = keys.history_key("app1", "alice")
            for n, fields in enumerate(({"id": "x1", "type": "a\nevent: evil", "data": "1"},
                                        {"id": "x2\r\nid: 9", "type": "t", "data": "1"},
                                        {"id": "x3", "type": "t", "data": "not json"},
                                        {"id": "x4", "type": "spread", "data": '{"a":\n1}'},
                                        {"id": "x5", "type": "", "data": '{"k":"v"}'})):  # default type
                await r.xadd(key, fields, id=f"{ms + 1000}-{n}")  # type: ignore[arg-type]
        finally:
            await r.aclose()
        st = await open_stream(srv.port, headers={**auth(token(s, "alice", "app1")), "Last-Event-ID": ids[0]})
        try:
            got = [await st.next_event(), await st.next_event(), await st.next_event()]
            assert [(e.id, e.event, e.json()) for e in got if e] == [
                (ids[1], "good", 2), ("x4", "spread", {"a": 1}), ("x5", "message", {"k": "v"})]
            events = _check_frames(bytes(st.raw).split(b"\n\n", 1)[1])
            assert [e.get("event") for e in events] == ["good", "spread", None]
        finally:
            await st.close()
