"""GET /openapi.json: a valid OpenAPI 3.1 document that describes exactly the routes the app serves, and whose
schemas and status codes match what the service really answers."""

from __future__ import annotations

import re
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate
from quart import Quart

from blueprints.openapi import build_spec
from quart_sse.app import create_app
from tests.support import auth, live_server, make_settings, open_stream, token

IGNORED_METHODS = {"OPTIONS", "HEAD"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def routes(app: Quart) -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every rule of the app but static files."""
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.endswith(".static"):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        out |= {(path, m.lower()) for m in (rule.methods or set()) - IGNORED_METHODS}
    return out


def documented(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, m) for path, item in spec["paths"].items() for m in item if m in HTTP_METHODS}


@pytest.mark.parametrize("mode", ["debug", "production"])
def test_spec_is_valid_openapi_31(mode: str) -> None:
    spec = build_spec(make_settings(app_mode=mode))
    assert spec["openapi"].startswith("3.1")
    validate(spec)  # raises on any violation of the OpenAPI 3.1 schema
    ids = [op["operationId"] for item in spec["paths"].values() for m, op in item.items() if m in HTTP_METHODS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("mode", ["debug", "production"])
def test_spec_and_url_map_agree_both_ways(mode: str) -> None:
    settings = make_settings(app_mode=mode)
    app = create_app(settings)
    served, described = routes(app), documented(build_spec(settings))
    assert served - described == set(), "routes the spec does not describe"
    assert described - served == set(), "described routes the app does not serve"
    assert (("/demo/token", "post") in served) is (mode == "debug")


async def test_openapi_json_is_served() -> None:
    settings = make_settings()
    app = create_app(settings)
    async with app.test_app():
        r = await app.test_client().get("/openapi.json")
        assert r.status_code == 200 and r.content_type == "application/json"
        assert await r.get_json() == build_spec(settings)


class Checker:
    """Hold real answers to the spec: documented status, and a body valid under the documented schema."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def __call__(self, path: str, method: str, r: httpx.Response) -> None:
        op = self.spec["paths"][path][method]
        answer = op["responses"].get(str(r.status_code))
        assert answer is not None, f"{method.upper()} {path}: {r.status_code} is not documented"
        if "$ref" in answer:
            answer = self.spec["components"]["responses"][answer["$ref"].rsplit("/", 1)[-1]]
        ctype = r.headers.get("content-type", "").split(";")[0]
        content = answer.get("content", {})
        assert ctype in content or not content, f"{method.upper()} {path}: {ctype} not documented"
        if ctype == "application/json":
            schema = {**content[ctype]["schema"], "components": self.spec["components"]}
            jsonschema.Draft202012Validator(schema).validate(r.json())


async def test_real_answers_match_the_spec(redis_url: str) -> None:
    settings = make_settings(redis_url=redis_url, app_mode="debug")
    spec = build_spec(settings)
    check = Checker(spec)
    user, pub = token(settings, "alice", "app1"), token(settings, "backend", "app1", "publish connections")
    async with live_server(settings) as srv:
        st = await open_stream(srv.port, headers=auth(user))
        try:
            async with httpx.AsyncClient(base_url=srv.url) as c:
                check("/", "get", await c.get("/"))
                check("/health", "get", await c.get("/health"))
                check("/ready", "get", await c.get("/ready"))
                check("/metrics", "get", await c.get("/metrics"))
                check("/demo", "get", await c.get("/demo"))
                check("/openapi.json", "get", await c.get("/openapi.json"))
                check("/sse/ticket", "post", await c.post("/sse/ticket", headers=auth(user)))
                check("/sse/ticket", "post", await c.post("/sse/ticket"))  # 401
                check("/connections/{app}", "get", await c.get("/connections/app1", headers=auth(pub)))
                check("/connections/{app}", "get", await c.get("/connections/app1", headers=auth(user)))  # 403
                check("/connections/{app}/{user}", "get", await c.get("/connections/app1/alice", headers=auth(user)))
                check("/connections/{app}/{user}", "get", await c.get("/connections/app1/a:b", headers=auth(user)))
                body = {"type": "notification", "data": {"n": 1}}
                check("/publish/{app}/{user}", "post", await c.post("/publish/app1/alice", json=body,
                                                                     headers=auth(pub)))
                check("/publish/{app}", "post", await c.post("/publish/app1", json=body, headers=auth(pub)))
                check("/publish/{app}", "post", await c.post("/publish/app1", json={"data": 1}, headers=auth(pub)))
                check("/publish/{app}", "post", await c.post("/publish/app1", content=b"x" * 70_000,
                                                             headers=auth(pub)))  # 413
                batch = [{"user": "alice", "type": "t", "data": 1, "id": "b-1"}, {"type": "news", "data": 2}]
                check("/publish/{app}", "post", await c.post("/publish/app1", json=batch, headers=auth(pub)))
                again = await c.post("/publish/app1/alice", json={"type": "t", "id": "b-1"}, headers=auth(pub))
                check("/publish/{app}/{user}", "post", again)  # a retry: 202 and Idempotent-Replayed
                assert again.headers["Idempotent-Replayed"] == "true"
                check("/publish/{app}", "post", await c.post("/publish/app1", json=[{"type": ""}],
                                                             headers=auth(pub)))  # 400
                check("/demo/token", "post", await c.post("/demo/token", json={"app": "app1", "user": "bob"}))
                check("/demo/token", "post", await c.post("/demo/token", json={"app": "app1"}))  # 400
                closed = await c.delete("/connections/app1/alice", headers=auth(pub))
                check("/connections/{app}/{user}", "delete", closed)
                assert closed.json() == {"closed": 1}
            check("/sse", "get", httpx.Response(st.status, headers=st.headers))
        finally:
            await st.close()
