"""When to reconnect and how long to wait: the rules of docs/clients.md, as pure logic (no I/O, no clock).

The browser client (clients/js/index.js) follows the same table; tests hold both to it.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

#: Answers that cannot pass by themselves: retrying cannot help, the credentials or the URL are wrong; 204 is how
#: a server tells an event stream client to stop (WHATWG HTML, "Server-sent events", §9.2.3).
FATAL_STATUSES = frozenset({204, 400, 403, 404, 405, 410, 414, 431})


class CloseReason(enum.Enum):
    """The reason of the `: closing <reason>` comment the service writes before it ends a stream."""

    TOKEN_EXPIRED = "token expired"
    SHUTDOWN = "shutdown"
    DISCONNECTED = "disconnected by API"
    OTHER = "other"

    @classmethod
    def parse(cls, text: str) -> CloseReason:
        try:
            return cls(text)
        except ValueError:
            return cls.OTHER


class WaitReason(enum.Enum):
    """Why the client waits before its next attempt."""

    CLOSED = "closed"            # the service ended the stream (shutdown, disconnected by API): its `retry:` says when
    REFUSED = "refused"          # `: refused <code>`: a refusal that passes by itself
    HTTP = "http"                # 429, 503, another 5xx, a proxy's page
    NETWORK = "network"          # no answer, or the connection broke
    IDLE = "idle"                # nothing arrived for the idle timeout
    CREDENTIALS = "credentials"  # the credentials callback raised


@dataclass(frozen=True, slots=True)
class Retry:
    """Connect again after `delay_ms`; `reason` None means it is not a failure (renewal at token expiry, or the
    one fresh credential after a 401): at once."""

    delay_ms: int
    reason: WaitReason | None


@dataclass(frozen=True, slots=True)
class Stop:
    """Do not connect again: the answer cannot pass by itself (401 twice in a row, 403, another 4xx)."""


Decision = Retry | Stop


@dataclass(slots=True)
class StreamEnd:
    """How a stream that answered 200 text/event-stream ended."""

    opened: bool = False                    # `: connected` (or an event) was seen
    closing: CloseReason | None = None      # `: closing <reason>` was seen
    closing_text: str | None = None         # its reason as written (a newer service may name others)
    refused: str | None = None              # `: refused <code>` was seen
    idle: bool = False                      # cut by the idle timeout
    retry_ms: int | None = None             # the last `retry:` of this answer


def backoff_ms(base_ms: int, failures: int, max_ms: int, rand: Callable[[], float] = random.random) -> int:
    """Delay before attempt `failures` (1, 2, ...): base * 2^(failures-1), capped at `max_ms`, plus a random
    jitter of up to half of that (so that clients refused together do not come back together)."""
    d = min(max_ms, base_ms * (1 << min(30, max(0, failures - 1))))
    return round(d + rand() * d / 2)


@dataclass(slots=True)
class Reconnect:
    """The state a client carries from one attempt to the next, and the decision after each."""

    retry_ms: int = 3000          # until the service sends `retry:`
    max_retry_ms: int = 30000
    rand: Callable[[], float] = field(default=random.random)
    failures: int = 0             # attempts in a row that did not open a stream
    auth_retried: bool = False    # a 401 already got its one fresh credential
    server_retry_ms: int | None = None

    @property
    def base_ms(self) -> int:
        return self.server_retry_ms if self.server_retry_ms is not None else self.retry_ms

    def _fail(self, reason: WaitReason, base_ms: int | None = None) -> Retry:
        self.failures += 1
        base = base_ms if base_ms is not None else self.base_ms
        return Retry(backoff_ms(base, self.failures, self.max_retry_ms, self.rand), reason)

    def opened(self, retry_ms: int | None = None) -> None:
        """A stream opened; the `retry:` it opened with is the base of later delays."""
        self.failures = 0
        self.auth_retried = False
        if retry_ms is not None:
            self.server_retry_ms = retry_ms

    def after_stream(self, end: StreamEnd) -> Retry:
        """A 200 text/event-stream answer ended (or broke). The `retry:` on a closing or a refusal (chosen and
        jittered by the service) is for this one wait; the stream's opening `retry:` stays the base."""
        if end.closing is CloseReason.TOKEN_EXPIRED:
            return Retry(0, None)  # not a failure: fresh credentials and resume now
        if end.closing is not None:
            return Retry(end.retry_ms if end.retry_ms is not None else self.base_ms, WaitReason.CLOSED)
        if end.opened:
            self.failures = 0
        if end.refused is not None:
            return self._fail(WaitReason.REFUSED, end.retry_ms)
        return self._fail(WaitReason.IDLE if end.idle else WaitReason.NETWORK)

    def after_status(self, status: int, retry_after_s: float | None = None) -> Decision:
        """A non-stream answer: 401 → one fresh credential, then Stop; fatal 4xx → Stop; anything else passes."""
        if status == 401:
            if self.auth_retried:
                return Stop()
            self.auth_retried = True
            return Retry(0, None)
        if status in FATAL_STATUSES:
            return Stop()
        base = round(retry_after_s * 1000) if retry_after_s and retry_after_s > 0 else None
        return self._fail(WaitReason.HTTP, base)

    def after_error(self, reason: WaitReason) -> Retry:
        """No answer (network), or the credentials callback raised."""
        return self._fail(reason)
