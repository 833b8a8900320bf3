"""HS256 JWTs from the stdlib, so the harness depends on neither PyJWT nor the service package."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def make_token(secret: str, sub: str, iss: str, *, scope: str | None = None, ttl: float = 3600.0) -> str:
    """A token for `sub` of app `iss`; `scope="publish"` makes a publisher token."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "iss": iss, "iat": now, "exp": now + int(ttl)}
    if scope is not None:
        claims["scope"] = scope
    signing_input = _HEADER + b"." + _b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64(sig)).decode()
