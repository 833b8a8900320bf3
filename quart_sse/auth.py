"""Tokens to identities, through quart-jwt-extended, behind this one module.

The library's own defaults are wrong for us (identity under `identity`, 422 for bad tokens, `exp` optional,
IndexError on some malformed headers, `iat` in the future refused), so it configures the app and mints tokens,
and tokens are verified here with PyJWT (which it is built on): where the token is read, which claims are
checked and required, and the 401/403 answers of docs/security.md.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

import jwt
from quart import Quart, Request
from quart_jwt_extended import JWTManager
from quart_jwt_extended.tokens import encode_access_token

from .errors import ApiError, forbidden, unauthorized
from .ids import is_valid_id
from .settings import Settings

log = logging.getLogger("quart_sse.auth")

SCOPE_PUBLISH = "publish"
SCOPE_CONNECTIONS = "connections"
SCOPE_PRESENCE = "presence"  # who is online (GET/POST /presence): less than `connections`, which also lists and kicks


@dataclass(frozen=True, slots=True)
class Identity:
    app: str  # iss
    user: str  # sub
    scopes: frozenset[str]
    exp: int

    def can(self, scope: str) -> bool:
        return scope in self.scopes


def init_app(app: Quart, settings: Settings) -> None:
    """Configure quart-jwt-extended for verification only: pinned algorithm, `sub` identity, leeway, audience."""
    app.config.update(
        JWT_SECRET_KEY=settings.jwt_secret.get_secret_value(),
        JWT_PUBLIC_KEY=settings.jwt_public_key,
        JWT_ALGORITHM=settings.jwt_algorithm,
        JWT_DECODE_ALGORITHMS=[settings.jwt_algorithm],
        JWT_IDENTITY_CLAIM="sub",
        JWT_USER_CLAIMS="scope",
        JWT_DECODE_LEEWAY=settings.jwt_leeway,
        JWT_DECODE_AUDIENCE=settings.jwt_audience,
        JWT_TOKEN_LOCATION=["headers"],
    )
    JWTManager(app)


#: Methods a cookie may authenticate: a browser attaches cookies to cross-site requests, so a cookie must never be
#: enough to change anything (publish, disconnect) or to buy a ticket; EventSource only ever sends GET.
COOKIE_METHODS = frozenset({"GET", "HEAD"})
#: The latest `exp` accepted (9999-12-31): beyond it, time arithmetic on the claim could overflow a float.
MAX_EXP = 253_402_300_799


def _refused(settings: Settings, detail: str) -> ApiError:
    """The 401: detail in debug; in production one text for every failure, so it is no oracle of the check."""
    return unauthorized(detail if settings.debug else "invalid or expired token")


def token_from_request(request: Request, settings: Settings) -> str | None:
    """First found wins: Bearer header, `?token=`, the seed's `?Authorization=`, the cookie (GET and HEAD only)."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _refused(settings, "Authorization header must be 'Bearer <token>'")
        return value.strip()
    for name in ("token", "Authorization"):
        value = request.args.get(name) or ""
        if value:
            scheme, sep, rest = value.partition(" ")
            return rest.strip() if sep and scheme.lower() == "bearer" else value
    if request.method not in COOKIE_METHODS:
        return None
    return request.cookies.get(settings.jwt_cookie_name) or None


class TokenCache:
    """Identities of tokens verified before, by the token's exact text.

    A backend publishes with the same token again and again, and PyJWT's decode (twice per token in
    quart-jwt-extended, base64 checked a character at a time) was 70 % of a POST /publish. Only successes are
    kept, bounded (oldest out first); a hit is still refused once `exp` (+ leeway) has passed. Nothing else about
    a verified token can change: signature, claims and settings are fixed, and `nbf` only ever passes.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._ids: dict[str, Identity] = {}

    def get(self, token: str, leeway: int) -> Identity | None:
        ident = self._ids.get(token)
        if ident is not None and ident.exp + leeway <= time.time():
            del self._ids[token]
            return None
        return ident

    def put(self, token: str, ident: Identity) -> None:
        if len(self._ids) >= self.size:
            del self._ids[next(iter(self._ids))]
        self._ids[token] = ident


def decode_token(token: str, settings: Settings) -> dict[str, Any]:
    """The verified claims of `token`: signature (the pinned algorithm and key), `exp` and `nbf` with the leeway,
    `aud` when configured. Raises a `jwt.InvalidTokenError` (`verify` turns any failure into the 401).

    `iat` refuses nothing: it is informational (RFC 7519 §4.1.6, "the time at which the JWT was issued"), and
    PyJWT's check of it (ImmatureSignatureError when it is ahead of our clock) refused tokens of an issuer whose
    clock runs ahead, and half of those Postman signs with `{{$timestamp}}` (rounded to the nearest second).

    Not quart-jwt-extended's `decode_jwt`: it calls PyJWT with fixed options that verify `iat` (no way to turn
    that off), and adds defaults for its own claims (`type`, `fresh`, `jti`) that nothing here reads. Its
    `decode_token()` also decodes every token twice (unverified first, to find the key) and needs an app context;
    the key here is fixed by the settings, so one verified decode does (38 µs instead of 104 µs per token).
    """
    asymmetric = settings.jwt_algorithm[:2] in ("RS", "ES")  # the settings require the public key for these
    key = (settings.jwt_public_key or "") if asymmetric else settings.jwt_secret.get_secret_value()
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=[settings.jwt_algorithm],
                                        audience=settings.jwt_audience, leeway=settings.jwt_leeway,
                                        options={"verify_iat": False})
    return claims


def verify(token: str, settings: Settings, cache: TokenCache | None = None) -> Identity:
    """A verified identity, or the 401 of docs/security.md (generic text in production, detail in debug and the log)."""
    if cache is not None:
        hit = cache.get(token, settings.jwt_leeway)
        if hit is not None:
            return hit
        ident = verify(token, settings)
        cache.put(token, ident)
        return ident

    def fail(detail: str) -> ApiError:
        log.info("token refused: %s", detail)
        return _refused(settings, detail)

    if len(token) > settings.jwt_max_bytes or not token.isascii():  # JWTs are ASCII: chars == bytes
        raise fail("token too large" if len(token) > settings.jwt_max_bytes else "token is not ASCII")
    try:
        claims = decode_token(token, settings)
    except Exception as exc:  # noqa: BLE001 - every decoding failure is a 401, whatever the library raises
        raise fail(f"invalid token: {type(exc).__name__}: {exc}") from None
    exp, sub, iss, scope = claims.get("exp"), claims.get("sub"), claims.get("iss"), claims.get("scope")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        raise fail("token has no numeric 'exp' claim")
    if not 0 < exp <= MAX_EXP:  # PyJWT checked it is in the future; bound it so that arithmetic on it is safe
        raise fail("'exp' out of range")
    if not is_valid_id(sub):
        raise fail("'sub' missing or not a valid id")
    if not is_valid_id(iss):
        raise fail("'iss' missing or not a valid id")
    allowed = settings.issuer_allow_list
    if allowed and iss not in allowed:
        raise fail("issuer not allowed")
    if scope in (None, {}):
        scopes: frozenset[str] = frozenset()
    elif isinstance(scope, str):
        scopes = frozenset(scope.split())
    else:
        raise fail("'scope' must be a space-separated string")
    return Identity(app=str(iss), user=str(sub), scopes=scopes, exp=int(exp))


def authenticate(request: Request, settings: Settings, cache: TokenCache | None = None) -> Identity:
    token = token_from_request(request, settings)
    if token is None:
        raise _refused(settings, "missing token")
    return verify(token, settings, cache)


def require_app(ident: Identity, app: str, scope: str | None = None) -> None:
    """403 unless the token belongs to `app` (and holds `scope`)."""
    if ident.app != app:
        raise forbidden("token is not valid for this application")
    if scope is not None and not ident.can(scope):
        raise forbidden(f"token lacks the '{scope}' scope")


def mint(settings: Settings, sub: str, iss: str, scope: str = "", ttl: int = 3600) -> str:
    """A token as our verifier expects it, signed with the configured secret (CLI `token`, tests, demo)."""
    if not is_valid_id(sub) or not is_valid_id(iss):
        raise ValueError("sub and iss must match " + r"^[A-Za-z0-9._@|+-]{1,128}$")
    if not settings.jwt_algorithm.startswith("HS"):
        raise ValueError("minting needs an HS* algorithm")
    token = encode_access_token(
        identity=sub, secret=settings.jwt_secret.get_secret_value(), algorithm=settings.jwt_algorithm,
        expires_delta=dt.timedelta(seconds=ttl), fresh=False, user_claims=scope or None, csrf=False,
        identity_claim_key="sub", user_claims_key="scope", issuer=iss)
    return token if isinstance(token, str) else token.decode()


def seconds_left(ident: Identity, leeway: int) -> float:
    return ident.exp + leeway - time.time()
