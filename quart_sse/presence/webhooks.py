"""Webhook rules, pure (no I/O): where an app's events go, how a request is signed, what an answer means, how long
to wait before the next attempt.

Signature (docs/presence.md has the receiver's side): `X-Webhook-Timestamp: <Unix seconds>` and
`X-Signature: sha256=<hex HMAC-SHA256 over "<timestamp>." + body, keyed with WEBHOOK_SECRET>`. The timestamp is
inside the signed bytes so that a receiver can refuse a replayed request older than a few minutes (the scheme of
Stripe's and Slack's webhooks).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import random
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

SIGNATURE_HEADER = "X-Signature"
TIMESTAMP_HEADER = "X-Webhook-Timestamp"
ID_HEADER = "X-Webhook-Id"
ATTEMPT_HEADER = "X-Webhook-Attempt"
#: The key of WEBHOOK_URL's JSON form that names the URL of every app not listed.
ANY_APP = "*"


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # 2xx
    RETRY = "retry"  # 5xx, 408, 429, timeout, refused or broken connection: the receiver is down or busy
    REJECTED = "rejected"  # any other answer: the receiver refuses this event; retrying would not change that


class RetryReason(enum.StrEnum):
    """Label of sse_webhooks_retried."""

    STATUS = "status"  # 5xx, 408, 429
    TIMEOUT = "timeout"
    CONNECTION = "connection"  # refused, reset, DNS


class FailReason(enum.StrEnum):
    """Label of sse_webhooks_failed: why an event was given up."""

    REJECTED = "rejected"  # the receiver answered another 4xx or a 3xx
    QUEUE_FULL = "queue_full"  # dropped, oldest first, at WEBHOOK_QUEUE_MAX


def parse_targets(value: str | None) -> dict[str, str]:
    """WEBHOOK_URL → {app or "*": URL}. One URL (every app), or a JSON object of app id → URL where the key `*`
    names the URL of the apps not listed. Raises ValueError with a one-line reason."""
    if value is None or not value.strip():
        return {}
    text = value.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at {exc.pos})") from None
        if not isinstance(raw, dict) or not raw or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError('the JSON form must be a non-empty object of app id -> URL, e.g. {"shop": "https://..."}')
        from ..ids import is_valid_id

        for app in raw:
            if app != ANY_APP and not is_valid_id(app):
                raise ValueError(f"{app!r} is not a valid app id")
        targets = dict(raw)
    else:
        targets = {ANY_APP: text}
    for url in targets.values():
        _check_url(url)
    return targets


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL with a host")


def url_for(targets: Mapping[str, str], app: str) -> str | None:
    return targets.get(app) or targets.get(ANY_APP)


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The X-Signature value: `sha256=` + hex HMAC-SHA256 of `b"<timestamp>." + body`."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, timestamp_header: str, signature_header: str, body: bytes, *, tolerance: float = 300,
           now: float | None = None) -> bool:
    """The receiver's check (the snippet in docs/presence.md): the signature matches, in constant time, and the
    timestamp is within `tolerance` seconds of `now` (a replay of an old request is refused)."""
    try:
        ts = int(timestamp_header)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, ts, body), signature_header)


def classify(status: int) -> Outcome:
    """2xx delivered; 408 (timeout), 429 (slow down) and 5xx retried; every other answer (3xx: we follow no
    redirect, the URL is wrong; 4xx: the receiver refuses it) rejected, logged and dropped."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in (408, 429) or 500 <= status < 600:
        return Outcome.RETRY
    return Outcome.REJECTED


def backoff(attempt: int, cap: float, base: float = 0.5, rng: random.Random | None = None) -> float:
    """Seconds to wait after the `attempt`-th failure (1-based): base·2^(attempt-1), at most `cap`, of which a
    random 0-25 % is taken off so that the events a receiver outage held back do not all come back in one burst."""
    delay = min(cap, base * 2.0 ** min(attempt - 1, 30))
    return delay * (1 - 0.25 * (rng or random).random())


def retry_after(value: str | None, cap: float) -> float | None:
    """A `Retry-After` in seconds (RFC 9110 §10.2.3; the HTTP-date form is not used by webhook receivers and is
    ignored), at most `cap`."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return min(cap, seconds) if seconds >= 0 else None
