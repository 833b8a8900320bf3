"""An incremental text/event-stream parser (WHATWG HTML, "Server-sent events", §9.2.6): pure, no I/O.

Why not httpx-sse's parser: its public API drops comments, and the service speaks through comments (`: connected`,
`: closing token expired`, `: refused too_many_connections`); its decoder classes are private. Why not httpx's
`aiter_lines()`: it also splits on U+2028, U+0085 and other Unicode line breaks, which compact JSON leaves raw inside
strings, while SSE lines end only at CRLF, LF or CR.

Lines are split on bytes (CR and LF never occur inside a multi-byte UTF-8 sequence) and each line is decoded as
UTF-8 with replacement, as the specification says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DIGITS = re.compile(rb"[0-9]+")


@dataclass(frozen=True, slots=True)
class SseEvent:
    """A dispatched event: `type` (`message` when there was no `event:` line), `data` (the `data:` lines joined
    with LF), `id` (the `id:` of this event, None when it had none)."""

    type: str
    data: str
    id: str | None


@dataclass(frozen=True, slots=True)
class SseComment:
    """A `:` line, without the colon and one leading space."""

    text: str


@dataclass(frozen=True, slots=True)
class SseRetry:
    """A `retry:` field: the reconnection time the server asks for, in milliseconds."""

    ms: int


SseItem = SseEvent | SseComment | SseRetry


class SseParser:
    """Feed bytes as they arrive (`feed`), get what they completed, in stream order."""

    __slots__ = ("_data", "_has_data", "_id", "_rest", "_skip_lf", "_type")

    def __init__(self) -> None:
        self._rest = b""
        self._skip_lf = False  # the last chunk ended with CR: a LF opening the next one belongs to it
        self._type = ""
        self._data: list[str] = []
        self._has_data = False
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SseItem]:
        out: list[SseItem] = []
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        buf = self._rest + chunk
        start = 0
        n = len(buf)
        while True:
            cr, lf = buf.find(b"\r", start), buf.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            end = lf if cr < 0 or 0 <= lf < cr else cr
            self._line(buf[start:end], out)
            start = end + 1
            if buf[end] == 0x0D:  # CR: a LF right after it is part of the same line ending
                if start < n:
                    if buf[start] == 0x0A:
                        start += 1
                else:
                    self._skip_lf = True
        self._rest = buf[start:]
        return out

    def _line(self, raw: bytes, out: list[SseItem]) -> None:
        if not raw:  # blank line: dispatch (an event without a data line is not dispatched, per the spec)
            if self._has_data:
                out.append(SseEvent(self._type or "message", "\n".join(self._data), self._id))
            self._type, self._data, self._has_data, self._id = "", [], False, None
            return
        if raw[0] == 0x3A:  # ':'
            out.append(SseComment(raw[2:].decode(errors="replace") if raw[1:2] == b" " else
                                  raw[1:].decode(errors="replace")))
            return
        name, colon, value = raw.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode(errors="replace"))
            self._has_data = True
        elif name == b"event":
            self._type = value.decode(errors="replace")
        elif name == b"id":
            if b"\0" not in value:
                self._id = value.decode(errors="replace")
        elif name == b"retry" and _DIGITS.fullmatch(value):
            out.append(SseRetry(int(value)))
