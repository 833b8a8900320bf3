"""Exceptions of the HTTP client."""

from __future__ import annotations

from typing import Any

import httpx


class ClientError(Exception):
    """Base of the errors quart_sse.client raises (transport failures stay httpx.TransportError)."""


class ServiceError(ClientError):
    """The service answered an error: `status` (HTTP), `code` and `message` from its JSON body
    `{"error": code, "message": text}` (README, "Routes"), `retry_after` seconds when it said so (429, 503).

    `retryable` is True for answers that pass by themselves (429, 5xx): a publish may be sent again (with the same
    `id`, so that a server that deduplicates by id publishes it once)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None,
                 body: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.body = body

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500

    @classmethod
    def from_response(cls, resp: httpx.Response) -> ServiceError:
        """Read the JSON error of a read response (a proxy's HTML page gives code `http_<status>`)."""
        body: Any
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        code, message = f"http_{resp.status_code}", resp.reason_phrase
        if isinstance(body, dict):
            code = str(body.get("error") or code)
            message = str(body.get("message") or message)
        return cls(resp.status_code, code, message, retry_after(resp), body)


class NoCredentials(ClientError):
    """The credentials callback returned no token: the subscriber stops."""


def retry_after(resp: httpx.Response) -> float | None:
    """`Retry-After` in seconds when it is a number (RFC 9110 §10.2.3 also allows a date: ignored)."""
    value = resp.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
