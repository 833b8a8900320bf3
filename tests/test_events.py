"""quart_sse.events, byte for byte: the seed's wire format, and no input that can break SSE framing or escape as
anything but EventError (decode_payload runs inside the pub/sub reader, which must survive any payload)."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quart_sse.events import (
    MAX_DATA_BYTES,
    MAX_ID_LEN,
    MAX_RAW_PAYLOAD,
    MAX_TYPE_LEN,
    PING,
    PING_FRAME,
    EventError,
    Message,
    check_line,
    checked_message,
    closing_frame,
    decode_payload,
    dump_data,
    encode_frame,
    format_position,
    parse_position,
    reset_frame,
    retry_frame,
)

U64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------------------ a spec SSE parser
def parse_sse(frame: bytes) -> list[dict[str, str]]:
    """The WHATWG event-stream parser, reduced: lines end at CRLF, CR or LF (so a stray CR would show), one leading
    space after the colon is dropped, a blank line dispatches. Returns one dict per dispatched block."""
    text = frame.decode("utf-8")
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in re.split(r"\r\n|\r|\n", text)[:-1]:  # the text after the last line end is not a line
        if line == "":
            if current:
                events.append(current)
            current = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        current[name] = value[1:] if value.startswith(" ") else value
    return events


# ------------------------------------------------------------------------------------------------ encode_frame
def test_encode_frame_is_the_seeds_format() -> None:
    assert encode_frame("100", "event", b'{"hello":"world"}') == b'id: 100\nevent: event\ndata: {"hello":"world"}\n\n'


def test_encode_frame_without_id_has_no_id_line() -> None:
    assert encode_frame(None, "greet", b"[1,2]") == b"event: greet\ndata: [1,2]\n\n"


def test_encode_frame_empty_string_id_is_still_written() -> None:
    """An empty `id:` resets the browser's Last-Event-ID; only None omits the line (decode_payload turns an empty
    id into None before it gets here)."""
    assert encode_frame("", "t", b"1") == b"id: \nevent: t\ndata: 1\n\n"


def test_encode_frame_default_type_has_no_event_line() -> None:
    """The SSE default event type: no `event:` line, so an EventSource fires `message` (WHATWG HTML §9.2.6)."""
    assert encode_frame("p3", None, b'{"k":"v"}') == b'id: p3\ndata: {"k":"v"}\n\n'
    assert encode_frame(None, None, b"1") == b"data: 1\n\n"
    assert parse_sse(encode_frame("p3", None, b"1")) == [{"id": "p3", "data": "1"}]


def test_encode_frame_utf8() -> None:
    assert encode_frame("é", "ü", "\"ß\"".encode()) == "id: é\nevent: ü\ndata: \"ß\"\n\n".encode()


def test_message_build_and_payload_round_trip() -> None:
    msg = Message.build("e1", "greet", b'{"a":[1,"x"]}', (5, 7))
    assert msg.frame == b'id: e1\nevent: greet\ndata: {"a":[1,"x"]}\n\n'
    payload = msg.to_payload()
    assert json.loads(payload) == {"id": "e1", "type": "greet", "data": {"a": [1, "x"]}, "pos": "5-7"}
    assert decode_payload(payload) == msg
    live_only = Message.build(None, "t", b"null", None)
    assert json.loads(live_only.to_payload()) == {"id": None, "type": "t", "data": None}
    assert decode_payload(live_only.to_payload()) == live_only


@pytest.mark.parametrize("event_id", [None, "e1"])
@pytest.mark.parametrize("pos", [None, (5, 7)])
def test_default_type_message_round_trips(event_id: str | None, pos: tuple[int, int] | None) -> None:
    """A message of the default type survives every re-encoding: to_payload/decode_payload (the pub/sub copy) and
    checked_message (history read back from Redis, where a missing type is stored as "")."""
    msg = Message.build(event_id, None, b'{"k":"v"}', pos)
    assert b"event:" not in msg.frame
    assert json.loads(msg.to_payload())["type"] is None
    assert decode_payload(msg.to_payload()) == msg
    assert checked_message(event_id, "", b'{"k":"v"}', pos) == msg
    assert checked_message(event_id, None, b'{"k":"v"}', pos) == msg


# ------------------------------------------------------------------------------------------------ dump_data
def test_dump_data_is_compact() -> None:
    assert dump_data({"a": 1, "b": [1, 2, {"c": None}], "d": True}) == b'{"a":1,"b":[1,2,{"c":null}],"d":true}'


def test_dump_data_escapes_line_breaks_inside_strings() -> None:
    out = dump_data({"text": "line1\nline2\r\nline3\x00"})
    assert b"\n" not in out and b"\r" not in out and b"\x00" not in out
    assert out == b'{"text":"line1\\nline2\\r\\nline3\\u0000"}'
    assert orjson.loads(out) == {"text": "line1\nline2\r\nline3\x00"}


def test_dump_data_keeps_non_ascii() -> None:
    assert dump_data({"name": "Zoë ☃ 日本"}) == '{"name":"Zoë ☃ 日本"}'.encode()


@pytest.mark.parametrize("value", [None, 0, -1, 1.5, "s", [], {}, True])
def test_dump_data_any_json_value(value: Any) -> None:
    assert orjson.loads(dump_data(value)) == value


def test_dump_data_size_bound() -> None:
    overhead = len(b'""')
    assert len(dump_data("x" * (MAX_DATA_BYTES - overhead))) == MAX_DATA_BYTES
    with pytest.raises(EventError) as ei:
        dump_data("x" * (MAX_DATA_BYTES - overhead + 1))
    assert ei.value.field == "data"


@pytest.mark.parametrize("value", [{1, 2}, object(), b"bytes", "\ud800", {"k": "\udfff"}, 1 << 64, {1: "int key"}])
def test_dump_data_refuses_what_is_not_json(value: Any) -> None:
    """Sets, objects, bytes, lone surrogates, ints past 64 bits, non-str keys: never a half-written frame."""
    with pytest.raises(EventError) as ei:
        dump_data(value)
    assert ei.value.field == "data"


def test_dump_data_never_writes_nan() -> None:
    """JSON has no NaN/Infinity: whatever dump_data makes of them, a strict JSON parser must read it."""
    for value in (float("nan"), float("inf"), [float("-inf")]):
        try:
            out = dump_data(value)
        except EventError:
            continue
        json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


# ------------------------------------------------------------------------------------------------ check_line
@pytest.mark.parametrize("ch", [chr(c) for c in [*range(0x20), 0x7F]])
def test_check_line_refuses_every_control_char(ch: str) -> None:
    with pytest.raises(EventError) as ei:
        check_line("id", f"a{ch}b", MAX_ID_LEN)
    assert ei.value.field == "id"


@pytest.mark.parametrize("value", ["\r", "\n", "\r\n", "\x00", "a\rb", "trailing\n"])
def test_check_line_refuses_cr_lf_nul(value: str) -> None:
    with pytest.raises(EventError):
        check_line("type", value, MAX_TYPE_LEN)


def test_check_line_length_bounds() -> None:
    assert check_line("type", "t" * MAX_TYPE_LEN, MAX_TYPE_LEN) == "t" * MAX_TYPE_LEN
    with pytest.raises(EventError, match="at most"):
        check_line("type", "t" * (MAX_TYPE_LEN + 1), MAX_TYPE_LEN)
    with pytest.raises(EventError, match="empty"):
        check_line("type", "", MAX_TYPE_LEN)
    assert check_line("id", "", MAX_ID_LEN, allow_empty=True) == ""


@pytest.mark.parametrize("value", [None, 1, 1.0, True, b"abc", ["a"], {"a": 1}])
def test_check_line_refuses_non_str(value: object) -> None:
    with pytest.raises(EventError, match="string"):
        check_line("id", value, MAX_ID_LEN)


def test_check_line_refuses_lone_surrogates() -> None:
    with pytest.raises(EventError):
        check_line("id", "a\ud800", MAX_ID_LEN)


@pytest.mark.parametrize("value", ["ok", "with space", "é日本", "a\u2028b", "a:b", "ping", " lead", "x" * 256])
def test_check_line_accepts_single_lines(value: str) -> None:
    assert check_line("id", value, MAX_ID_LEN) == value


# ------------------------------------------------------------------------------------------------ decode_payload
def test_decode_seed_payload() -> None:
    msg = decode_payload(b'{"id": "42", "type": "event", "data": {"hello": "world"}}')
    assert (msg.id, msg.type, msg.data, msg.pos) == ("42", "event", b'{"hello":"world"}', None)
    assert msg.frame == b'id: 42\nevent: event\ndata: {"hello":"world"}\n\n'


def test_decode_payload_str_input_and_no_id() -> None:
    msg = decode_payload('{"type": "t", "data": [1, 2]}')
    assert msg.id is None and msg.frame == b"event: t\ndata: [1,2]\n\n"


def test_decode_payload_int_id_accepted() -> None:
    msg = decode_payload(b'{"id": 7, "type": "t", "data": null}')
    assert msg.id == "7" and msg.frame == b"id: 7\nevent: t\ndata: null\n\n"


def test_decode_payload_missing_data_is_null() -> None:
    assert decode_payload(b'{"type": "t"}').data == b"null"


# The seed's Go publishers marshal a struct: an unset field arrives as "" (or is left out by `omitempty`), and the
# seed delivered such messages (docs/wire.md).
SEED_SHAPES: list[tuple[bytes, bytes]] = [
    (b'{"id":"p3","data":{"k":"v"}}', b'id: p3\ndata: {"k":"v"}\n\n'),                    # no type
    (b'{"id":"p3","type":"","data":{"k":"v"}}', b'id: p3\ndata: {"k":"v"}\n\n'),          # empty type
    (b'{"id":"p3","type":null,"data":{"k":"v"}}', b'id: p3\ndata: {"k":"v"}\n\n'),        # null type
    (b'{"id":"","type":"event","data":{"k":"v"}}', b'event: event\ndata: {"k":"v"}\n\n'),  # empty id
    (b'{"id":null,"type":"event","data":{"k":"v"}}', b'event: event\ndata: {"k":"v"}\n\n'),
    (b'{"id":"","type":"","data":{"k":"v"}}', b'data: {"k":"v"}\n\n'),                     # the zero struct
    (b'{"id":"","type":"","data":null}', b"data: null\n\n"),
    (b"{}", b"data: null\n\n"),
    (b'{"id":7,"data":[]}', b"id: 7\ndata: []\n\n"),
]


@pytest.mark.parametrize(("raw", "frame"), SEED_SHAPES, ids=lambda v: v.decode()[:40])
def test_decode_payload_seed_shapes_are_delivered(raw: bytes, frame: bytes) -> None:
    """Missing, null or empty `type`: the SSE default event type (no `event:` line, EventSource fires `message`);
    missing, null or empty `id`: no `id:` line, so the client's Last-Event-ID does not move."""
    msg = decode_payload(raw)
    assert msg.frame == frame
    assert msg.type is None or msg.type == "event"
    assert msg.id is None or msg.id in ("p3", "7")
    [ev] = parse_sse(msg.frame)
    assert ("event" in ev) == (msg.type is not None) and ("id" in ev) == (msg.id is not None)


def test_decode_payload_reformats_multiline_json() -> None:
    msg = decode_payload(b'{\n  "type": "t",\n  "data": {\n    "a": "x\\ny"\n  }\n}')
    assert msg.frame == b'event: t\ndata: {"a":"x\\ny"}\n\n'


def test_decode_payload_reads_our_position() -> None:
    assert decode_payload(b'{"type": "t", "pos": "12-3"}').pos == (12, 3)
    assert decode_payload(b'{"type": "t", "pos": "garbage"}').pos is None
    assert decode_payload(b'{"type": "t", "pos": 12}').pos is None


def _nested(depth: int) -> bytes:
    return b'{"type": "t", "data": ' + b"[" * depth + b"]" * depth + b"}"


BAD_PAYLOADS: list[bytes | str] = [
    b"", b"not json", b"{", b'{"type": "t",}', b"\xff\xfe", b"\x00",
    b"[]", b'"a string"', b"42", b"null", b"true", b'[{"type": "t"}]',
    b'{"type": 1}', b'{"type": ["t"]}', b'{"type": true}', b'{"type": {}}', b'{"type": " \\n"}',
    b'{"id": {}, "type": "t"}', b'{"id": "", "type": "\\r"}', b'{"id": "\\n", "type": ""}',
    b'{"type": "a\\nb"}', b'{"type": "a\\rb"}', b'{"type": "a\\u0000b"}',
    b'{"id": "a\\r\\nb", "type": "t"}', b'{"id": "a\\nid: 2", "type": "t"}', b'{"id": true, "type": "t"}',
    b'{"id": 1.5, "type": "t"}', b'{"id": ["1"], "type": "t"}',
    b'{"id": "' + b"i" * (MAX_ID_LEN + 1) + b'", "type": "t"}',
    b'{"type": "' + b"t" * (MAX_TYPE_LEN + 1) + b'"}',
    b'{"type": "t", "data": NaN}', b'{"type": "t", "data": Infinity}', b'{"type": "t", "data": -Infinity}',
    b'{"type": "t", "data": "\\ud800"}', b'{"type": "\\udc00"}', b'{"id": "\\ud800", "type": "t"}',
    '{"type": "t", "data": "\ud800"}',  # a str carrying a lone surrogate (a Python caller's payload)
    b'{"type": "t", "data": "' + b"x" * MAX_DATA_BYTES + b'"}',
    b'{"type": "t", "data": "' + b"x" * MAX_RAW_PAYLOAD + b'"}',
    _nested(1000), _nested(100_000),
]


@pytest.mark.parametrize("raw", BAD_PAYLOADS, ids=lambda r: repr(r[:40]))
def test_decode_payload_refuses_with_event_error_only(raw: bytes | str) -> None:
    with pytest.raises(EventError):
        decode_payload(raw)


def test_decode_payload_huge_is_refused_before_parsing() -> None:
    with pytest.raises(EventError) as ei:
        decode_payload(b" " * (MAX_RAW_PAYLOAD + 1))
    assert ei.value.field == "payload"


@given(st.binary(max_size=200) | st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decode_payload_any_input_event_error_or_message(raw: bytes | str) -> None:
    try:
        msg = decode_payload(raw)
    except EventError:
        return
    assert msg.frame.endswith(b"\n\n") and msg.frame.count(b"\n\n") == 1


def test_checked_message_reformats_history_data_and_rechecks_fields() -> None:
    assert checked_message("1", "t", b'{\n"a": 1\n}', (1, 0)).frame == b'id: 1\nevent: t\ndata: {"a":1}\n\n'
    for args in [("a\nb", "t", b"1"), (None, "t\r", b"1"), (None, "t", b"not json"), (None, "t", b"1" * 70_000),
                 ("", "\x00", b"1"), ("\r", "", b"1")]:
        with pytest.raises(EventError):
            checked_message(args[0], args[1], args[2], None)
    # an entry XADDed with an empty id or type: the raw message's rules, not a dropped entry
    assert checked_message("", "", b"1", (1, 0)).frame == b"data: 1\n\n"


# ------------------------------------------------------------------------------------------------ positions
@pytest.mark.parametrize(("text", "pos"), [("0-0", (0, 0)), ("1-2", (1, 2)), ("1700000000000-15", (1700000000000, 15)),
                                          (f"{U64}-{U64}", (U64, U64)), ("007-01", (7, 1))])
def test_parse_position(text: str, pos: tuple[int, int]) -> None:
    assert parse_position(text) == pos


@pytest.mark.parametrize("text", ["", "1", "1-", "-1", "a-b", "1-2-3", "1_2", " 1-2", "1-2 ", "+1-2", "1--2", "1.0-2",
                                  "²-1", "1-\u0661", f"{U64 + 1}-0", f"0-{U64 + 1}", "1" * 30 + "-" + "2" * 30, "e1"])
def test_parse_position_refuses(text: str) -> None:
    assert parse_position(text) is None


@given(st.integers(0, U64), st.integers(0, U64))
def test_position_round_trip(ms: int, seq: int) -> None:
    assert parse_position(format_position((ms, seq))) == (ms, seq)


@given(st.text(max_size=50))
def test_parse_position_never_raises(text: str) -> None:
    pos = parse_position(text)
    assert pos is None or (0 <= pos[0] <= U64 and 0 <= pos[1] <= U64 and parse_position(format_position(pos)) == pos)


# ------------------------------------------------------------------------------------------------ special frames
def test_ping_frame_has_no_id() -> None:
    assert PING_FRAME == b"event: ping\ndata: {}\n\n"
    assert (PING.id, PING.type, PING.data, PING.frame) == (None, "ping", b"{}", PING_FRAME)
    assert parse_sse(PING_FRAME) == [{"event": "ping", "data": "{}"}]


def test_reset_frame_has_json_object_data_and_no_id() -> None:
    frame = reset_frame("unknown_id", "abc")
    assert frame == b'event: reset\ndata: {"reason":"unknown_id","last_event_id":"abc"}\n\n'
    [ev] = parse_sse(frame)
    assert "id" not in ev and isinstance(json.loads(ev["data"]), dict)


def test_reset_frame_with_hostile_last_event_id_stays_one_event() -> None:
    """The client's Last-Event-ID is echoed: a newline in it must not open a second event or an id line."""
    frame = reset_frame("garbage", "x\n\nid: 9\nevent: evil\ndata: {}")
    [ev] = parse_sse(frame)
    assert ev["event"] == "reset" and "id" not in ev
    assert json.loads(ev["data"])["last_event_id"] == "x\n\nid: 9\nevent: evil\ndata: {}"
    assert json.loads(parse_sse(reset_frame("r", None))[0]["data"]) == {"reason": "r", "last_event_id": None}


def test_retry_frame() -> None:
    assert retry_frame(3000) == b"retry: 3000\n: connected\n\n"
    assert parse_sse(retry_frame(0)) == [{"retry": "0"}]


def test_closing_frame() -> None:
    assert closing_frame("shutdown", 1500) == b": closing shutdown\nretry: 1500\n\n"


# ------------------------------------------------------------------------------------------------ property
I64 = st.integers(-(1 << 63), (1 << 63) - 1)  # beyond it JSON parsers (orjson, browsers) read a float
json_values = st.recursive(
    st.none() | st.booleans() | I64 | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20)
# every character class that matters: controls, line breaks, NUL, separators, surrogates, astral planes
hostile_text = st.text(st.characters(exclude_categories=()), max_size=40) | st.sampled_from(
    ["\r", "\n", "\r\n", "\x00", "a\rb", "\u2028", "\u0085", "\ud800", "id: 1", "data: x", ":", " ", "\ufeff"])


def _encode(event_id: str | None, event_type: str | None, data: Any) -> bytes:
    """What every publish path does before the wire: check both lines, dump the data, frame."""
    if event_id is not None:
        check_line("id", event_id, MAX_ID_LEN)
    check_line("type", event_type, MAX_TYPE_LEN)
    return encode_frame(event_id, event_type, dump_data(data))


def _assert_frame_round_trips(frame: bytes, event_id: str | None, event_type: str | None, data: Any) -> None:
    assert frame.endswith(b"\n\n")
    lines = frame[:-2].split(b"\n")
    assert len(lines) == 1 + (event_id is not None) + (event_type is not None)
    for line in lines:
        assert b"\r" not in line and b"\x00" not in line
    [ev] = parse_sse(frame)
    assert ev.get("id") == event_id
    assert ev.get("event") == event_type
    assert orjson.loads(ev["data"]) == data


@given(st.none() | hostile_text, hostile_text, json_values)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_id_and_type_encode_safely_or_raise(event_id: str | None, event_type: str, data: Any) -> None:
    try:
        frame = _encode(event_id, event_type, data)
    except EventError:
        return
    _assert_frame_round_trips(frame, event_id, event_type, data)


@given(st.none() | st.just("") | hostile_text | st.integers(), st.none() | st.just("") | hostile_text, json_values)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_payload_decodes_safely_or_raises(event_id: Any, event_type: str | None, data: Any) -> None:
    """The same through decode_payload, with the payload as a raw PUBLISH would carry it (ASCII-escaped JSON)."""
    raw = json.dumps({"id": event_id, "type": event_type, "data": data})
    try:
        msg = decode_payload(raw)
    except EventError:
        return
    expected_id = str(event_id) if isinstance(event_id, int) else event_id
    _assert_frame_round_trips(msg.frame, expected_id or None, event_type or None, data)
    assert decode_payload(msg.to_payload()) == msg
