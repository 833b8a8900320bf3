"""Token verification (docs/security.md): pinned algorithms, asymmetric keys end to end, exp/nbf/iat with leeway,
audience, issuer allow-list, size limit before parsing, production secret rules, and 401s that are no oracle.

`POST /sse/ticket` is the probe: 201 for exactly the tokens the service accepts, 401 for the rest, no path or
scope involved.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import quart_sse.auth as auth_mod
from quart_sse.settings import EXAMPLE_SECRET, ConfigError, Settings, load_settings
from tests.support import SECRET, auth, live_server, make_settings, open_stream
from tests.support_security import GENERIC_401, capture_logs, claims, client_for, forge, sign

ROOT = Path(__file__).resolve().parent.parent


async def _probe(settings: Settings, tokens: list[str]) -> list[tuple[int, dict[str, Any], str]]:
    """(status, JSON body, WWW-Authenticate) of POST /sse/ticket for each token."""
    out = []
    async with client_for(settings) as (_, client):
        for tok in tokens:
            r = await client.post("/sse/ticket", headers=auth(tok))
            out.append((r.status_code, await r.get_json(), r.headers.get("WWW-Authenticate", "")))
    return out


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _public_pem(private: Any) -> str:
    return str(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())


# --------------------------------------------------------------------------------------------------- algorithms
async def test_hs256_is_the_only_algorithm_accepted_by_default() -> None:
    s = make_settings()
    unsigned = _b64(b'{"alg":"none","typ":"JWT"}') + "." + _b64(json.dumps(claims()).encode()) + "."
    results = await _probe(s, [
        sign(claims()),                              # the control: accepted
        sign(claims(), alg="HS384"),                 # same secret, other HMAC: refused
        sign(claims(), alg="HS512"),
        unsigned,                                    # alg none
        sign(claims(), key="another-secret-" + "y" * 40),  # wrong key
    ])
    assert [st for st, _, _ in results] == [201, 401, 401, 401, 401]


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_asymmetric_tokens_end_to_end(alg: str) -> None:
    """A real stream opened and fed with tokens signed by a private key the service never sees."""
    private: Any = rsa.generate_private_key(65537, 2048) if alg == "RS256" else ec.generate_private_key(ec.SECP256R1())
    other: Any = rsa.generate_private_key(65537, 2048) if alg == "RS256" else ec.generate_private_key(ec.SECP256R1())
    pem = _public_pem(private)
    s = make_settings(jwt_algorithm=alg, jwt_public_key=pem)
    async with live_server(s) as srv:
        st = await open_stream(srv.port, headers=auth(sign(claims("alice", "app1"), private, alg)))
        try:
            assert st.status == 200
            async with httpx.AsyncClient(base_url=srv.url) as c:
                pub = sign(claims("backend", "app1", scope="publish"), private, alg)
                r = await c.post("/publish/app1/alice", json={"type": "t", "data": {"k": 1}}, headers=auth(pub))
                assert r.status_code == 202, r.text
                ev = await st.next_event()
                assert ev is not None and ev.event == "t" and ev.json() == {"k": 1}
                refused = [
                    sign(claims(), other, alg),                                   # signed by someone else
                    sign(claims(), SECRET, "HS256"),                              # HS with the configured secret
                    forge(claims(), pem.encode()),  # key confusion: PEM as HMAC key
                    sign(claims(), rsa.generate_private_key(65537, 2048), "RS256") if alg == "ES256"
                    else sign(claims(), ec.generate_private_key(ec.SECP256R1()), "ES256"),  # the other family
                ]
                for tok in refused:
                    r = await c.post("/sse/ticket", headers=auth(tok))
                    assert r.status_code == 401, (tok, r.text)
        finally:
            await st.close()


def test_public_key_is_checked_at_start_up() -> None:
    private = rsa.generate_private_key(65537, 2048)
    pem = _public_pem(private)
    one_line = pem.replace("\n", "\\n")  # how .env files and CI secrets often carry a PEM
    s = load_settings(_env_file=None, jwt_secret="x", jwt_algorithm="RS256", jwt_public_key=one_line)
    assert s.jwt_public_key == pem
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
    for key, word in ((None, "required"), ("not a key", "not a valid public key"),
                      (private_pem, "private key"), (_public_pem(ec.generate_private_key(ec.SECP256R1())), "RS256")):
        with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY") as err:
            load_settings(_env_file=None, jwt_secret="x", jwt_algorithm="RS256", jwt_public_key=key)
        assert word in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------- claims
async def test_exp_is_required_and_bounded() -> None:
    now = int(time.time())
    base = {"sub": "alice", "iss": "app1"}
    results = await _probe(make_settings(), [
        sign(base),                                   # no exp
        sign({**base, "exp": str(now + 600)}),        # not a number
        sign({**base, "exp": True}),
        sign({**base, "exp": 10 ** 309}),             # would overflow float arithmetic later: refused, not a 500
        sign({**base, "exp": now + 600.5}),           # a NumericDate may be fractional
        sign({**base, "exp": now - 5}),               # expired
    ])
    assert [st for st, _, _ in results] == [401, 401, 401, 401, 201, 401]


@pytest.mark.parametrize("leeway", [0, 30])
async def test_nbf_exp_honour_the_leeway_iat_never_refuses(leeway: int) -> None:
    now = int(time.time())
    toks = [
        sign(claims(nbf=now + 10)),                   # not yet valid
        sign(claims(iat=now + 10)),                   # issued in the future: informational, never refused
        sign({**claims(), "exp": now - 10}),          # just expired
        sign(claims(nbf=now + 120)),                  # outside any leeway
        sign(claims(nbf=now - 10, iat=now - 10)),     # fine either way
        sign(claims(iat=now + 120)),                  # far ahead: still informational
    ]
    results = await _probe(make_settings(jwt_leeway=leeway), toks)
    inside = 201 if leeway else 401
    assert [st for st, _, _ in results] == [inside, 201, inside, 401, 201, 201]


async def test_ticket_of_a_leeway_token_is_short_and_positive() -> None:
    """A token past exp but inside the leeway buys a ticket valid at most until exp + leeway."""
    s = make_settings(jwt_leeway=30)
    (st, body, _), = await _probe(s, [sign({**claims(), "exp": int(time.time()) - 10})])
    assert st == 201 and 1 <= body["expires_in"] <= 20


async def test_audience_when_configured() -> None:
    results = await _probe(make_settings(jwt_audience="sse"), [
        sign(claims()), sign(claims(aud="sse")), sign(claims(aud=["other", "sse"])), sign(claims(aud="other"))])
    assert [st for st, _, _ in results] == [401, 201, 201, 401]
    # no audience configured: a token meant for an audience is not for us
    results = await _probe(make_settings(), [sign(claims()), sign(claims(aud="sse"))])
    assert [st for st, _, _ in results] == [201, 401]


async def test_issuer_allow_list() -> None:
    s = make_settings(jwt_issuers=" app1 , app2 ")
    results = await _probe(s, [sign(claims(iss="app1")), sign(claims(iss="app2")), sign(claims(iss="app3"))])
    assert [st for st, _, _ in results] == [201, 201, 401]


async def test_sub_iss_scope_shapes() -> None:
    results = await _probe(make_settings(), [
        sign(claims(sub="a:b")), sign(claims(iss="x" * 129)), sign(claims(sub=42)), sign(claims(iss=None)),
        sign(claims(scope=["publish"])), sign(claims(scope=7)), sign(claims(scope="publish connections")),
    ])
    assert [st for st, _, _ in results] == [401, 401, 401, 401, 401, 401, 201]


async def test_oversized_and_non_ascii_tokens_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = auth_mod.decode_token  # type: ignore[attr-defined]

    def spy(token: str, *a: Any, **kw: Any) -> Any:
        calls.append(token)
        return real(token, *a, **kw)

    monkeypatch.setattr(auth_mod, "decode_token", spy)
    s = make_settings(jwt_max_bytes=1024)
    big = sign(claims(scope="publish " + "x" * 2000))  # validly signed, only too large
    assert len(big) > 1024
    ok = sign(claims())
    results = await _probe(s, [big, "é" * 100, ok])
    assert [st for st, _, _ in results] == [401, 401, 201]
    assert calls == [ok]  # the refused ones never reached the decoder
    (st, _, _), = await _probe(make_settings(jwt_max_bytes=4096), [big])
    assert st == 201


# --------------------------------------------------------------------------------------------------- production
def test_production_refuses_weak_or_example_secret() -> None:
    example_line = next(line for line in (ROOT / ".env.example").read_text().splitlines()
                        if line.startswith("JWT_SECRET="))
    assert example_line == f"JWT_SECRET={EXAMPLE_SECRET}"  # the rule covers the secret actually shipped
    for secret in ("short", "x" * 31, EXAMPLE_SECRET):
        with pytest.raises(ConfigError, match="JWT_SECRET"):
            load_settings(_env_file=None, app_mode="production", jwt_secret=secret)
    assert load_settings(_env_file=None, app_mode="production", jwt_secret="x" * 32).app_mode == "production"
    assert load_settings(_env_file=None, app_mode="debug", jwt_secret="short").debug


def _bad_tokens() -> list[str]:
    now = int(time.time())
    return [
        sign({**claims(), "exp": now - 60}),                       # expired
        sign(claims(), key="wrong-" + "k" * 40),                   # bad signature
        sign(claims(), alg="HS512"),                               # wrong algorithm
        _b64(b'{"alg":"none"}') + "." + _b64(json.dumps(claims()).encode()) + ".",
        sign({"sub": "alice", "iss": "app1"}),                     # no exp
        sign(claims(sub="bad id")),                                # invalid sub
        sign(claims(iss="app9")),                                  # issuer not allowed
        sign(claims(aud="other")),                                 # audience
        sign(claims(nbf=now + 600)),                               # not yet valid
        sign(claims(scope=["publish"])),                           # scope shape
        sign(claims(scope="x" * 9000)),                            # too large
        "not.a.token-at-all-but-long-enough",                      # garbage
        "ÿ" * 40,                                                  # not ASCII
    ]


async def test_production_401s_are_generic_and_detailed_in_the_log() -> None:
    s = make_settings(app_mode="production", jwt_issuers="app1,app2")
    toks = _bad_tokens()
    async with client_for(s) as (_, client):
        with capture_logs() as logs:
            bodies = []
            for tok in toks:
                r = await client.post("/sse/ticket", headers=auth(tok))
                assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
                bodies.append(await r.get_json())
    assert all(b == GENERIC_401 for b in bodies), bodies  # no oracle of which check failed
    refused = [line for line in logs.lines if "token refused" in line]
    assert len(refused) >= 2 * len(toks)
    assert any("expired" in line.lower() for line in refused) and any("issuer" in line for line in refused)
    for tok in toks:
        sig = tok.rsplit(".", 1)[-1]
        assert tok not in logs.text and (len(sig) < 20 or sig[:20] not in logs.text)


async def test_debug_401s_say_which_check_failed() -> None:
    s = make_settings(app_mode="debug", jwt_issuers="app1,app2")
    results = await _probe(s, _bad_tokens())
    assert all(st == 401 for st, _, _ in results)
    messages = [body["message"] for _, body, _ in results]
    assert len(set(messages)) >= 8, messages  # detail, not one generic line
    assert all(body["error"] == "unauthorized" for _, body, _ in results)
