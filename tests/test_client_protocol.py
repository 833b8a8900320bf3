"""quart_sse.client's pure parts: the text/event-stream parser (WHATWG HTML §9.2.6), the reconnection rules of
docs/clients.md as a decision table, the backoff, the errors, and the publish request it builds."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quart_sse.client import BatchEvent, BatchResult, Publisher, ServiceError
from quart_sse.client.publisher import publish_body, publish_path
from quart_sse.client.retry import (
    CloseReason,
    Reconnect,
    Retry,
    Stop,
    StreamEnd,
    WaitReason,
    backoff_ms,
)
from quart_sse.client.sse import SseComment, SseEvent, SseItem, SseParser, SseRetry
from quart_sse.events import closing_frame, encode_frame, reset_frame, retry_frame


def parse(*chunks: bytes) -> list[SseItem]:
    p = SseParser()
    out: list[SseItem] = []
    for c in chunks:
        out += p.feed(c)
    return out


# ------------------------------------------------------------------------------------------------ parser
def test_the_services_own_frames_parse_back() -> None:
    wire = (retry_frame(300) + encode_frame("1-0", "notification", b'{"a":1}') + encode_frame(None, "ping", b"{}")
            + reset_frame("unknown id", "9") + closing_frame("token expired", 412))
    assert parse(wire) == [
        SseRetry(300), SseComment("connected"), SseEvent("notification", '{"a":1}', "1-0"),
        SseEvent("ping", "{}", None), SseEvent("reset", '{"reason":"unknown id","last_event_id":"9"}', None),
        SseComment("closing token expired"), SseRetry(412)]


def test_every_split_of_a_stream_gives_the_same_items() -> None:
    wire = ("retry: 300\r\n: connected\r\n\r\nid: é-1\revent: t\rdata: a\u2028b\rdata: ☃\r\r"
            ": refused too_many_connections\n\n").encode()
    whole = parse(wire)
    assert whole == [SseRetry(300), SseComment("connected"), SseEvent("t", "a\u2028b\n☃", "é-1"),
                     SseComment("refused too_many_connections")]
    for i in range(len(wire)):
        for j in range(i, len(wire)):
            assert parse(wire[:i], wire[i:j], wire[j:]) == whole, (i, j)


def test_field_rules() -> None:
    assert parse(b"data\n\n") == [SseEvent("message", "", None)]  # a field name alone: empty value
    assert parse(b"event: x\nid: 5\n\n") == []  # no data line: not dispatched
    assert parse(b"data:no space\ndata:  two\n\n") == [SseEvent("message", "no space\n two", None)]
    assert parse(b"id: a\x00b\ndata: x\n\n") == [SseEvent("message", "x", None)]  # an id with NUL is ignored
    assert parse(b"retry: 12x\nretry: -1\nretry:7\n") == [SseRetry(7)]
    assert parse(b":\n:x\n: y\n") == [SseComment(""), SseComment("x"), SseComment("y")]
    assert parse(b"unknown: z\ndata: \xff\n\n") == [SseEvent("message", "\ufffd", None)]  # UTF-8 with replacement


_text = st.text(st.characters(blacklist_characters="\r\n\x00", blacklist_categories=["Cs"]), max_size=12)
_items = st.lists(st.one_of(
    st.builds(lambda t, d, i: SseEvent(t or "message", "\n".join(d), i), _text, st.lists(_text, min_size=1, max_size=3),
              st.one_of(st.none(), _text)),
    st.builds(SseComment, _text), st.builds(SseRetry, st.integers(0, 10**6))), max_size=8)


def _encode(items: list[SseItem], eol: bytes) -> bytes:
    out = b""
    for it in items:
        if isinstance(it, SseEvent):
            lines = [b"event:" + it.type.encode()] + [b"data:" + d.encode() for d in it.data.split("\n")]
            if it.id is not None:
                lines.append(b"id:" + it.id.encode())
            out += eol.join(lines) + eol + eol
        elif isinstance(it, SseComment):
            out += b":" + it.text.encode() + eol
        else:
            out += b"retry:" + str(it.ms).encode() + eol
    return out


@given(_items, st.sampled_from([b"\n", b"\r", b"\r\n"]), st.lists(st.integers(0, 400), max_size=6))
def test_any_stream_any_chunking(items: list[SseItem], eol: bytes, cuts: list[int]) -> None:
    wire = _encode(items, eol)
    # a value that starts with a space loses it (the spec's one optional space): compare with what it means
    expected = [SseEvent(i.type[1:] if i.type.startswith(" ") else i.type,
                         "\n".join(d[1:] if d.startswith(" ") else d for d in i.data.split("\n")),
                         None if i.id is None else i.id[1:] if i.id.startswith(" ") else i.id)
                if isinstance(i, SseEvent) else
                SseComment(i.text[1:] if i.text.startswith(" ") else i.text) if isinstance(i, SseComment) else i
                for i in items]
    expected = [SseEvent(e.type or "message", e.data, e.id) if isinstance(e, SseEvent) else e for e in expected]
    bounds = sorted({min(c, len(wire)) for c in cuts})
    chunks = [wire[a:b] for a, b in zip([0, *bounds], [*bounds, len(wire)], strict=True)]
    assert parse(*chunks) == expected


# ------------------------------------------------------------------------------------------------ the rules
def no_jitter() -> float:
    return 0.0


def test_backoff_doubles_from_the_base_to_the_cap_with_up_to_half_jitter() -> None:
    assert [backoff_ms(300, n, 30_000, no_jitter) for n in range(1, 10)] == [
        300, 600, 1200, 2400, 4800, 9600, 19200, 30000, 30000]
    assert backoff_ms(300, 1, 30_000, lambda: 0.999) == 450 and backoff_ms(300, 10**6, 30_000, no_jitter) == 30000


def test_renewal_at_token_expiry_is_immediate_and_not_a_failure() -> None:
    r = Reconnect(rand=no_jitter)
    r.opened(300)
    assert r.after_stream(StreamEnd(opened=True, closing=CloseReason.TOKEN_EXPIRED, retry_ms=377)) == Retry(0, None)
    assert r.failures == 0


def test_a_closing_waits_the_services_delay_once_and_keeps_the_opening_retry_as_base() -> None:
    r = Reconnect(rand=no_jitter)
    r.opened(300)
    assert r.after_stream(StreamEnd(opened=True, closing=CloseReason.SHUTDOWN, retry_ms=8_123)) == \
        Retry(8_123, WaitReason.CLOSED)
    # the service is still down afterwards: backoff from the opening `retry: 300`, not from the 8 s
    assert [r.after_error(WaitReason.NETWORK).delay_ms for _ in range(3)] == [300, 600, 1200]
    r.opened(None)
    assert r.failures == 0 and r.base_ms == 300


def test_refusals_and_broken_streams_back_off() -> None:
    r = Reconnect(retry_ms=1000, rand=no_jitter)
    assert r.after_stream(StreamEnd(refused="too_many_connections", retry_ms=700)) == Retry(700, WaitReason.REFUSED)
    assert r.after_stream(StreamEnd(refused="unavailable", retry_ms=700)) == Retry(1400, WaitReason.REFUSED)
    assert r.after_status(503, retry_after_s=2) == Retry(8000, WaitReason.HTTP)  # 3rd failure: 2 s times 4
    assert r.after_status(429) == Retry(8000, WaitReason.HTTP)  # no Retry-After: the base, 4th failure
    # a stream that opened and then broke starts the count again
    assert r.after_stream(StreamEnd(opened=True)) == Retry(1000, WaitReason.NETWORK)
    assert r.after_stream(StreamEnd(opened=True, idle=True)) == Retry(1000, WaitReason.IDLE)
    assert r.after_error(WaitReason.CREDENTIALS) == Retry(2000, WaitReason.CREDENTIALS)


def test_401_gets_one_fresh_credential_then_stops_and_403_stops_at_once() -> None:
    r = Reconnect(rand=no_jitter)
    assert r.after_status(401) == Retry(0, None)
    assert r.after_status(401) == Stop()
    r = Reconnect(rand=no_jitter)
    assert r.after_status(401) == Retry(0, None)
    r.opened(300)  # the fresh credential worked: a later 401 gets its own fresh credential
    assert r.after_status(401) == Retry(0, None)
    for status in (204, 400, 403, 404):
        assert Reconnect().after_status(status) == Stop()
    assert isinstance(Reconnect().after_status(502), Retry)


def test_close_reasons_parse() -> None:
    assert [CloseReason.parse(t) for t in ("token expired", "shutdown", "disconnected by API", "new one")] == [
        CloseReason.TOKEN_EXPIRED, CloseReason.SHUTDOWN, CloseReason.DISCONNECTED, CloseReason.OTHER]


# ------------------------------------------------------------------------------------------------ errors, requests
def test_service_error_carries_the_json_error_and_retry_after() -> None:
    err = ServiceError.from_response(httpx.Response(
        503, json={"error": "unavailable", "message": "broker unavailable"}, headers={"Retry-After": "2"}))
    assert (err.status, err.code, err.message, err.retry_after, err.retryable) == (
        503, "unavailable", "broker unavailable", 2.0, True)
    assert str(err) == "503 unavailable: broker unavailable"
    proxy = ServiceError.from_response(httpx.Response(403, text="<html>denied</html>"))
    assert (proxy.code, proxy.message, proxy.retry_after, proxy.retryable, proxy.body) == (
        "http_403", "Forbidden", None, False, "<html>denied</html>")


def test_publish_request() -> None:
    assert publish_path("shop", "alice") == "/publish/shop/alice"
    assert publish_path("shop", None) == "/publish/shop"
    assert publish_path("a|b", "x@y.z") == "/publish/a%7Cb/x%40y.z"
    assert publish_path("shop", "..") == "/publish/shop/%2E%2E"  # a dot segment would be dropped
    assert publish_body("t", {"k": 1}, None) == {"type": "t", "data": {"k": 1}}
    assert publish_body("t", None, "e1") == {"type": "t", "data": None, "id": "e1"}
    for bad in ("", "a/b", "a b", "é", "x" * 129):
        with pytest.raises(ValueError, match="user: not a valid id"):
            publish_path("shop", bad)


def test_batch_uses_the_batch_route_when_the_service_has_it() -> None:
    """The request and answer shapes of `POST /publish/{app}` with an array (the batch route: docs/publishing.md)."""
    seen: list[tuple[str, Any]] = []

    def service(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content)))
        return httpx.Response(202, json={"ids": ["a-1", "b-2"], "duplicates": [1]})

    with Publisher("http://svc", "tok", client=httpx.Client(transport=httpx.MockTransport(service))) as pub:
        got = pub.publish_batch("shop", [BatchEvent("note", {"n": 1}, user="alice", id="a-1"),
                                         BatchEvent("news", None)])
    assert got == BatchResult(["a-1", "b-2"], [1], True)
    assert seen == [("/publish/shop", [{"type": "note", "data": {"n": 1}, "id": "a-1", "user": "alice"},
                                       {"type": "news", "data": None}])]


def test_batch_falls_back_to_one_request_per_event_on_an_older_service() -> None:
    seen: list[str] = []

    def service(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(request.url.path)
        if isinstance(body, list):  # what a service without the batch route answers
            return httpx.Response(400, json={"error": "bad_request", "message": "body: must be a JSON object"})
        return httpx.Response(202, json={"id": body.get("id") or f"gen-{len(seen)}"})

    with Publisher("http://svc", "tok", client=httpx.Client(transport=httpx.MockTransport(service))) as pub:
        got = pub.publish_batch("shop", [BatchEvent("note", 1, user="alice"), BatchEvent("news", 2, id="n")])
        with pytest.raises(ValueError, match="at least one event"):
            pub.publish_batch("shop", [])
        with pytest.raises(ValueError, match="user: not a valid id"):
            pub.publish_batch("shop", [BatchEvent("note", 1, user="not valid")])
    assert got == BatchResult(["gen-2", "n"], [], False)
    assert seen == ["/publish/shop", "/publish/shop/alice", "/publish/shop"]


def test_batch_refused_as_a_whole_raises() -> None:
    def service(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "bad_request", "message": "events[1].type: must not be empty"})

    with Publisher("http://svc", "tok", client=httpx.Client(transport=httpx.MockTransport(service))) as pub, \
            pytest.raises(ServiceError, match=r"events\[1\]\.type"):
        pub.publish_batch("shop", [BatchEvent("a"), BatchEvent("")])
