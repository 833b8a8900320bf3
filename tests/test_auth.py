"""Who may do what (docs/security.md), through Quart's test client: where the token is read and in which order, every
way a token can be wrong (always a 401 JSON with `WWW-Authenticate: Bearer`, never a 422 or 500), the knobs
(leeway, issuers, audience, cookie name, size) and the 403s.

The probe is `GET /connections/app1/alice`: a plain token of alice@app1 gets 200, bob's gets 403, and a GET lets
the cookie take part.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any, cast

import jwt
import pytest
from jwt.warnings import InsecureKeyLengthWarning
from quart.testing import QuartClient

from quart_sse.app import create_app
from quart_sse.settings import Settings
from tests.support import SECRET, make_settings, token

PROBE = "/connections/app1/alice"
WRONG_SECRET = "not-the-secret-" + "z" * 40


@contextlib.asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[QuartClient]:
    app = create_app(settings)
    async with app.test_app() as ta:
        yield cast(QuartClient, ta.test_client())


def claims(sub: object = "alice", iss: object = "app1", ttl: float = 600, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"sub": sub, "iss": iss, "exp": int(time.time() + ttl), "iat": int(time.time())}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def sign(payload: dict[str, Any], key: str = SECRET, alg: str = "HS256") -> str:
    """As an outside issuer would; PyJWT's key-length warning (HS512 with the test secret) is moot for a forgery."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, key, algorithm=alg)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def alg_none(payload: dict[str, Any]) -> str:
    """PyJWT will not write an unsigned token for us: by hand."""
    return _b64(b'{"alg":"none","typ":"JWT"}') + "." + _b64(json.dumps(payload).encode()) + "."


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


async def assert_401(resp: Any) -> str:
    assert resp.status_code == 401, (resp.status_code, await resp.get_data())
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    body = await resp.get_json()
    assert set(body) == {"error", "message"} and body["error"] == "unauthorized"
    assert isinstance(body["message"], str) and body["message"]
    return str(body["message"])


async def assert_403(resp: Any) -> None:
    assert resp.status_code == 403, (resp.status_code, await resp.get_data())
    body = await resp.get_json()
    assert set(body) == {"error", "message"} and body["error"] == "forbidden"


# ------------------------------------------------------------------------------------------------ where the token is
async def test_token_sources_each_accepted() -> None:
    s = make_settings()
    tok = token(s, "alice", "app1")
    async with client_for(s) as c:
        assert (await c.get(PROBE, headers=bearer(tok))).status_code == 200
        assert (await c.get(PROBE, headers={"Authorization": f"bearer  {tok} "})).status_code == 200
        assert (await c.get(PROBE, query_string={"token": tok})).status_code == 200
        assert (await c.get(PROBE, query_string={"Authorization": tok})).status_code == 200  # the seed's
        assert (await c.get(PROBE, query_string={"Authorization": f"Bearer {tok}"})).status_code == 200
        r = await c.get(PROBE, headers={"Cookie": f"access_token_cookie={tok}"})
        assert r.status_code == 200 and await r.get_json() == {}


async def test_cookie_name_is_configurable() -> None:
    s = make_settings(jwt_cookie_name="sse_auth")
    tok = token(s, "alice", "app1")
    async with client_for(s) as c:
        assert (await c.get(PROBE, headers={"Cookie": f"sse_auth={tok}"})).status_code == 200
        await assert_401(await c.get(PROBE, headers={"Cookie": f"access_token_cookie={tok}"}))


async def test_cookie_never_authenticates_a_state_change() -> None:
    """Browsers attach cookies to cross-site requests: a cookie alone must not publish (nor buy a ticket)."""
    s = make_settings()
    tok = token(s, "backend", "app1", "publish")
    async with client_for(s) as c:
        cookie = {"Cookie": f"access_token_cookie={tok}"}
        await assert_401(await c.post("/publish/app1/alice", json={"type": "t"}, headers=cookie))
        await assert_401(await c.post("/sse/ticket", headers=cookie))
        assert (await c.post("/publish/app1/alice", json={"type": "t"}, headers=bearer(tok))).status_code == 202


# (header, query, cookie) -> which identity wins; alice passes the probe (200), bob does not (403)
PRECEDENCE = [
    ({"header": "alice", "token": "bob", "Authorization": "bob", "cookie": "bob"}, 200),
    ({"header": "bob", "token": "alice", "Authorization": "alice", "cookie": "alice"}, 403),
    ({"token": "alice", "Authorization": "bob", "cookie": "bob"}, 200),
    ({"token": "bob", "Authorization": "alice", "cookie": "alice"}, 403),
    ({"Authorization": "alice", "cookie": "bob"}, 200),
    ({"Authorization": "bob", "cookie": "alice"}, 403),
    ({"token": "", "Authorization": "alice"}, 200),  # an empty parameter is not a token
    # first found wins even when it is bad: no falling through to a later, valid source
    ({"header": "garbage", "token": "alice", "cookie": "alice"}, 401),
    ({"token": "garbage", "Authorization": "alice", "cookie": "alice"}, 401),
    ({"Authorization": "garbage", "cookie": "alice"}, 401),
]


@pytest.mark.parametrize(("sources", "status"), PRECEDENCE)
async def test_first_found_wins(sources: dict[str, str], status: int) -> None:
    s = make_settings()
    toks = {"alice": token(s, "alice", "app1"), "bob": token(s, "bob", "app1"), "garbage": "not.a.jwt", "": ""}
    headers: dict[str, str] = {}
    query: dict[str, str] = {}
    if "header" in sources:
        headers["Authorization"] = f"Bearer {toks[sources['header']]}"
    if "cookie" in sources:
        headers["Cookie"] = f"access_token_cookie={toks[sources['cookie']]}"
    for name in ("token", "Authorization"):
        if name in sources:
            query[name] = toks[sources[name]]
    async with client_for(s) as c:
        r = await c.get(PROBE, headers=headers, query_string=query)
    if status == 401:
        await assert_401(r)
    else:
        assert r.status_code == status


# ------------------------------------------------------------------------------------------------ every failure
def bad_tokens() -> dict[str, dict[str, Any]]:
    """label -> request kwargs; every one must be a 401."""
    now = int(time.time())
    huge = sign(claims(pad="x" * 9000))
    return {
        "missing": {},
        "garbage": {"headers": bearer("not.a.jwt")},
        "one segment": {"headers": bearer("abcdef")},
        "garbage in query": {"query_string": {"token": "%%%"}},
        "garbage cookie": {"headers": {"Cookie": "access_token_cookie=xyz"}},
        "expired": {"headers": bearer(sign(claims(ttl=-120)))},
        "alg none": {"headers": bearer(alg_none(claims()))},
        "alg none, no dot": {"headers": bearer(alg_none(claims())[:-1])},
        "wrong secret": {"headers": bearer(sign(claims(), key=WRONG_SECRET))},
        "other HMAC": {"headers": bearer(sign(claims(), alg="HS512"))},
        "missing iss": {"headers": bearer(sign(claims(iss=None)))},
        "missing sub": {"headers": bearer(sign(claims(sub=None)))},
        "missing exp": {"headers": bearer(sign({"sub": "alice", "iss": "app1"}))},
        "exp not a number": {"headers": bearer(sign({**claims(), "exp": "soon"}))},
        "exp too far": {"headers": bearer(sign({**claims(), "exp": 10**20}))},
        "nbf in future": {"headers": bearer(sign(claims(nbf=now + 600)))},
        "Authorization: ,": {"headers": {"Authorization": ","}},
        "Basic": {"headers": {"Authorization": "Basic x"}},
        "Bearer alone": {"headers": {"Authorization": "Bearer"}},
        "Bearer space": {"headers": {"Authorization": "Bearer "}},
        "token without scheme": {"headers": {"Authorization": token(make_settings(), "alice", "app1")}},
        "sub with ':'": {"headers": bearer(sign(claims(sub="alice:channel:bob")))},
        "sub of 129 chars": {"headers": bearer(sign(claims(sub="u" * 129)))},
        "sub not a string": {"headers": bearer(sign(claims(sub=42)))},
        "iss with '*'": {"headers": bearer(sign(claims(iss="app*")))},
        "scope a list": {"headers": bearer(sign(claims(scope=["publish"])))},
        "scope a number": {"headers": bearer(sign(claims(scope=1)))},
        "oversized": {"headers": bearer(huge)},
        "oversized in query": {"query_string": {"token": huge}},
        "not ASCII": {"query_string": {"token": "é" * 30}},
    }


async def test_every_failure_is_a_401_json_in_debug_with_detail() -> None:
    s = make_settings(app_mode="debug")
    messages: dict[str, str] = {}
    async with client_for(s) as c:
        for label, kwargs in bad_tokens().items():
            try:
                messages[label] = await assert_401(await c.get(PROBE, **kwargs))
            except AssertionError as exc:
                raise AssertionError(f"{label}: {exc}") from None
    assert len(set(messages.values())) >= 8, messages  # debug says which check failed
    assert "expired" in messages["expired"].lower()
    assert "sub" in messages["sub with ':'"] and "iss" in messages["missing iss"]
    assert "large" in messages["oversized"]


async def test_every_failure_is_the_same_401_in_production() -> None:
    """No oracle: whatever failed, production answers the same text."""
    s = make_settings(app_mode="production")
    messages: dict[str, str] = {}
    async with client_for(s) as c:
        for label, kwargs in bad_tokens().items():
            messages[label] = await assert_401(await c.get(PROBE, **kwargs))
    assert len(set(messages.values())) == 1, messages


async def test_failures_on_every_route_are_401_not_422_or_500() -> None:
    s = make_settings()
    bad = bearer(sign(claims(sub="a:b")))
    async with client_for(s) as c:
        for method, path in [("GET", "/sse"), ("POST", "/sse/ticket"), ("GET", "/connections/app1"),
                             ("GET", "/connections/app1/alice"), ("DELETE", "/connections/app1/alice"),
                             ("POST", "/publish/app1/alice"), ("POST", "/publish/app1")]:
            for headers in ({}, bad, {"Authorization": "Basic x"}):
                await assert_401(await c.open(path, method=method, headers=headers, json={"type": "t"}))


async def test_token_size_limit_is_configurable() -> None:
    s = make_settings(jwt_max_bytes=512)
    small = sign(claims())
    big = sign(claims(pad="x" * 500))
    assert len(small) <= 512 < len(big)
    async with client_for(s) as c:
        assert (await c.get(PROBE, headers=bearer(small))).status_code == 200
        await assert_401(await c.get(PROBE, headers=bearer(big)))


# ------------------------------------------------------------------------------------------------ knobs
async def test_leeway_honoured() -> None:
    just_expired = sign(claims(ttl=-10))
    not_yet = sign(claims(nbf=int(time.time()) + 10))
    long_expired = sign(claims(ttl=-120))
    async with client_for(make_settings(jwt_leeway=0)) as c:
        await assert_401(await c.get(PROBE, headers=bearer(just_expired)))
        await assert_401(await c.get(PROBE, headers=bearer(not_yet)))
    async with client_for(make_settings(jwt_leeway=30)) as c:
        assert (await c.get(PROBE, headers=bearer(just_expired))).status_code == 200
        assert (await c.get(PROBE, headers=bearer(not_yet))).status_code == 200
        await assert_401(await c.get(PROBE, headers=bearer(long_expired)))


@pytest.mark.parametrize("leeway", [0, 30])
@pytest.mark.parametrize("ahead", [1, 3600])
async def test_iat_in_the_future_never_refuses(leeway: int, ahead: int) -> None:
    """`iat` is informational (RFC 7519 §4.1.6; docs/security.md): an issuer whose clock runs ahead, or Postman's
    rounded `{{$timestamp}}`, is not refused, with or without leeway, alone or with a past `nbf`."""
    now = int(time.time())
    async with client_for(make_settings(jwt_leeway=leeway)) as c:
        for extra in ({"iat": now + ahead}, {"iat": now + ahead, "nbf": now - 5}, {"iat": now + ahead + 0.5}):
            r = await c.get(PROBE, headers=bearer(sign(claims(**extra))))
            assert r.status_code == 200, (extra, await r.get_json())


@pytest.mark.parametrize("iat", ["soon", None, [1], 10**30, -1])
async def test_iat_of_any_shape_is_informational(iat: Any) -> None:
    """Whatever `iat` holds, it is not a reason to refuse (nothing here reads it)."""
    payload = {**claims(), "iat": iat}
    async with client_for(make_settings()) as c:
        assert (await c.get(PROBE, headers=bearer(sign(payload)))).status_code == 200


@pytest.mark.parametrize("leeway", [0, 30])
async def test_nbf_and_exp_still_honoured_when_iat_is_ahead(leeway: int) -> None:
    """A future `iat` does not relax anything else: `nbf` ahead and `exp` past refuse, within JWT_LEEWAY only."""
    now = int(time.time())
    inside = 200 if leeway else 401
    cases = [  # (claims, expected status)
        (claims(iat=now + 3600, nbf=now + 10), inside),              # not yet valid, inside a 30 s leeway
        (claims(iat=now + 3600, nbf=now + 120), 401),                 # not yet valid, outside any leeway
        ({**claims(iat=now + 1), "exp": now - 10}, inside),           # just expired
        ({**claims(iat=now + 1), "exp": now - 120}, 401),             # long expired
        (claims(iat=now + 5, nbf=now + 5), inside),                   # both a few seconds ahead: nbf decides
    ]
    async with client_for(make_settings(jwt_leeway=leeway)) as c:
        got = [(await c.get(PROBE, headers=bearer(sign(payload)))).status_code for payload, _ in cases]
    assert got == [want for _, want in cases]


async def test_issuer_allow_list() -> None:
    s = make_settings(jwt_issuers="app1, app2")
    async with client_for(s) as c:
        assert (await c.get(PROBE, headers=bearer(sign(claims(iss="app1"))))).status_code == 200
        r = await c.get("/connections/app2/alice", headers=bearer(sign(claims(iss="app2"))))
        assert r.status_code == 200
        await assert_401(await c.get("/connections/app3/alice", headers=bearer(sign(claims(iss="app3")))))
    async with client_for(make_settings()) as c:  # empty list: any issuer
        assert (await c.get("/connections/app3/alice", headers=bearer(sign(claims(iss="app3"))))).status_code == 200


async def test_audience() -> None:
    s = make_settings(jwt_audience="sse")
    async with client_for(s) as c:
        assert (await c.get(PROBE, headers=bearer(sign(claims(aud="sse"))))).status_code == 200
        assert (await c.get(PROBE, headers=bearer(sign(claims(aud=["other", "sse"]))))).status_code == 200
        await assert_401(await c.get(PROBE, headers=bearer(sign(claims()))))
        await assert_401(await c.get(PROBE, headers=bearer(sign(claims(aud="other")))))


async def test_outside_issuer_token_without_library_extras_is_accepted() -> None:
    """Only sub, iss, exp: what any backend's JWT library writes."""
    async with client_for(make_settings()) as c:
        tok = sign({"sub": "alice", "iss": "app1", "exp": int(time.time()) + 60})
        assert (await c.get(PROBE, headers=bearer(tok))).status_code == 200


# ------------------------------------------------------------------------------------------------ 403
async def test_wrong_app_is_403() -> None:
    s = make_settings()
    async with client_for(s) as c:
        other = token(s, "alice", "app2", "publish connections")
        await assert_403(await c.get(PROBE, headers=bearer(other)))
        await assert_403(await c.get("/connections/app1", headers=bearer(other)))
        await assert_403(await c.delete("/connections/app1/alice", headers=bearer(other)))
        await assert_403(await c.post("/publish/app1/alice", json={"type": "t"}, headers=bearer(other)))
        await assert_403(await c.post("/publish/app1", json={"type": "t"}, headers=bearer(other)))


async def test_missing_scope_is_403_and_scope_grants() -> None:
    s = make_settings()
    plain = bearer(token(s, "alice", "app1"))
    pub = bearer(token(s, "backend", "app1", "publish"))
    ops = bearer(token(s, "ops", "app1", "connections"))
    async with client_for(s) as c:
        await assert_403(await c.get("/connections/app1", headers=plain))
        await assert_403(await c.get("/connections/app1/bob", headers=plain))
        await assert_403(await c.delete("/connections/app1/alice", headers=plain))
        await assert_403(await c.post("/publish/app1/alice", json={"type": "t"}, headers=plain))
        await assert_403(await c.post("/publish/app1", json={"type": "t"}, headers=ops))
        await assert_403(await c.get("/connections/app1", headers=pub))
        assert (await c.get("/connections/app1", headers=ops)).status_code == 200
        assert (await c.get("/connections/app1/bob", headers=ops)).status_code == 200
        assert (await c.delete("/connections/app1/bob", headers=ops)).status_code == 200
        assert (await c.post("/publish/app1/alice", json={"type": "t"}, headers=pub)).status_code == 202
        assert (await c.post("/publish/app1", json={"type": "t"}, headers=pub)).status_code == 202
