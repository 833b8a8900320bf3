"""Events and their SSE wire encoding: pure functions, no I/O.

One `Message` is decoded and encoded once per publish and the same object (and the same `frame` bytes) is handed
to every local subscriber, so nothing here runs per stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

MAX_ID_LEN = 256
MAX_TYPE_LEN = 128
MAX_DATA_BYTES = 60 * 1024
MAX_RAW_PAYLOAD = 256 * 1024
#: CR, LF and NUL would end an SSE field or the stream's framing; other C0 controls are refused for hygiene.
_BAD_LINE_CHARS = re.compile(r"[\x00-\x1f\x7f]")

Position = tuple[int, int]


class EventError(ValueError):
    """An event that must not reach the wire; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_line(field: str, value: object, max_len: int, *, allow_empty: bool = False) -> str:
    """A single-line SSE field value: a str with no control characters, bounded length."""
    if not isinstance(value, str):
        raise EventError(field, "must be a string")
    if not value and not allow_empty:
        raise EventError(field, "must not be empty")
    if len(value) > max_len:
        raise EventError(field, f"must be at most {max_len} characters")
    if _BAD_LINE_CHARS.search(value):
        raise EventError(field, "must not contain control characters (CR, LF, NUL, ...)")
    if not value.isascii():
        try:  # a lone surrogate (possible from Python callers) cannot be written as UTF-8
            value.encode()
        except UnicodeEncodeError:
            raise EventError(field, "must be valid Unicode (no lone surrogates)") from None
    return value


def optional_line(field: str, value: object, max_len: int) -> str | None:
    """A raw message's `id` or `type`: missing (None), JSON null or "" mean none; anything else is `check_line`d.

    The seed's publishers are Go programs marshalling a struct, so an unset field arrives as "" (and the seed
    delivered such messages): none is the only reading that keeps our guarantees. No `type` is the SSE default
    event type (`message`), no `id` leaves the client's Last-Event-ID alone.
    """
    if value is None or value == "":
        return None
    return check_line(field, value, max_len)


def dump_data(data: Any) -> bytes:
    """Compact one-line JSON. orjson escapes CR/LF inside strings and refuses NaN-free-JSON violations."""
    try:
        out = orjson.dumps(data)
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise EventError("data", f"not serialisable as JSON: {exc}") from None
    if len(out) > MAX_DATA_BYTES:
        raise EventError("data", f"must be at most {MAX_DATA_BYTES} bytes as JSON")
    return bytes(memoryview(out))  # exact-size copy: orjson's output holds a 4 KiB buffer, history keeps these


_MAX_U64 = (1 << 64) - 1


def parse_position(value: str) -> Position | None:
    """`<ms>-<seq>` (a Redis stream id: two unsigned 64-bit ints) to a comparable tuple; None for anything else.

    ASCII digits only: `str.isdigit()` also admits e.g. '²', which `int()` refuses (a 500 on a Last-Event-ID).
    """
    if len(value) > 41 or not value.isascii():
        return None
    ms, sep, seq = value.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        return None
    pos = int(ms), int(seq)
    return pos if pos[0] <= _MAX_U64 and pos[1] <= _MAX_U64 else None


def format_position(pos: Position) -> str:
    return f"{pos[0]}-{pos[1]}"


def encode_frame(event_id: str | None, event_type: str | None, data_json: bytes) -> bytes:
    """The seed's wire format: `id:`, `event:`, one `data:` line, blank line.

    `event_id=None`: no `id:` line, so the client's Last-Event-ID stays where it was (an `id:` line with an empty
    value would reset it: WHATWG HTML §9.2.6). `event_type=None`: no `event:` line, the SSE default event type,
    which an EventSource dispatches as `message` (its `onmessage`).
    """
    head = b"data: "
    if event_type is not None:
        head = b"event: " + event_type.encode() + b"\n" + head
    if event_id is not None:
        head = b"id: " + event_id.encode() + b"\n" + head
    return head + data_json + b"\n\n"


@dataclass(slots=True, frozen=True)
class Message:
    """One event ready for fan-out. `pos` orders it in history (None: live only, e.g. a raw PUBLISH).

    `id` None: an event without an `id:` line; `type` None: the SSE default event type (no `event:` line).
    """

    id: str | None
    type: str | None
    data: bytes
    pos: Position | None
    frame: bytes
    #: `frame` as one HTTP/1.1 chunk (`<hex length>\r\n<frame>\r\n`), joined once per message: a direct write to
    #: any number of streams is one `write` of this same buffer each (no `writelines`: see Stream.push)
    chunk: bytes

    @classmethod
    def build(cls, event_id: str | None, event_type: str | None, data_json: bytes, pos: Position | None) -> Message:
        frame = encode_frame(event_id, event_type, data_json)
        return cls(event_id, event_type, data_json, pos, frame, b"%x\r\n%b\r\n" % (len(frame), frame))

    def to_payload(self) -> bytes:
        """The seed's JSON payload, plus our `pos` so that live copies can be matched against history.

        `decode_payload(m.to_payload()) == m` for every Message: a None id or type is written as JSON null.
        """
        body: dict[str, Any] = {"id": self.id, "type": self.type, "data": orjson.Fragment(self.data)}
        if self.pos is not None:
            body["pos"] = format_position(self.pos)
        return orjson.dumps(body)


def decode_payload(raw: bytes | str) -> Message:
    """A pub/sub payload (ours or a raw seed-style PUBLISH) to a Message; EventError when it must be dropped.

    Anything can arrive on a channel, so every field is re-checked exactly as the publish route checks it, and no
    other exception may escape: this runs inside the pub/sub reader, which must survive any payload.
    """
    try:
        return _decode_payload(raw)
    except EventError:
        raise
    except Exception as exc:  # noqa: BLE001 - defence in depth, see above
        raise EventError("payload", f"unreadable: {type(exc).__name__}") from None


def checked_message(event_id: str | None, event_type: str | None, data_json: bytes,
                    pos: Position | None) -> Message:
    """A Message from fields read back from Redis history (anyone with Redis access can XADD): re-checked, with
    the raw message's rules for the optional fields (an empty id or type is none, see `optional_line`)."""
    event_id = optional_line("id", event_id, MAX_ID_LEN)
    event_type = optional_line("type", event_type, MAX_TYPE_LEN)
    if len(data_json) > MAX_DATA_BYTES:
        raise EventError("data", "too large")
    try:
        value = orjson.loads(data_json)
    except orjson.JSONDecodeError:
        raise EventError("data", "not JSON") from None
    if b"\n" in data_json or b"\r" in data_json:  # JSON may carry raw line breaks between tokens: one line again
        data_json = orjson.dumps(value)
    return Message.build(event_id, event_type, data_json, pos)


def _decode_payload(raw: bytes | str) -> Message:
    if len(raw) > MAX_RAW_PAYLOAD:
        raise EventError("payload", "too large")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventError("payload", f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise EventError("payload", "not a JSON object")
    event_id = body.get("id")
    if isinstance(event_id, int) and not isinstance(event_id, bool):
        event_id = str(event_id)
    event_id = optional_line("id", event_id, MAX_ID_LEN)
    event_type = optional_line("type", body.get("type"), MAX_TYPE_LEN)
    data = dump_data(body.get("data"))
    pos = None
    raw_pos = body.get("pos")
    if isinstance(raw_pos, str):
        pos = parse_position(raw_pos)
    return Message.build(event_id, event_type, data, pos)


PING_FRAME = b"event: ping\ndata: {}\n\n"
PING = Message.build(None, "ping", b"{}", None)
assert PING.frame == PING_FRAME


def retry_frame(retry_ms: int) -> bytes:
    """Opens every stream: browsers reconnect after `retry_ms`, and curl and proxies see bytes at once."""
    return b"retry: " + str(retry_ms).encode() + b"\n: connected\n\n"


def reset_frame(reason: str, last_event_id: str | None) -> bytes:
    """History cannot cover the gap: no `id:` line, so it never moves the client's Last-Event-ID."""
    data = orjson.dumps({"reason": reason, "last_event_id": last_event_id})
    return encode_frame(None, "reset", data)


def closing_frame(reason: str, retry_ms: int) -> bytes:
    """The last bytes of a stream the server ends: a comment saying why and when to come back."""
    return b": closing " + reason.encode() + b"\nretry: " + str(retry_ms).encode() + b"\n\n"
