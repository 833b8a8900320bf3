"""Postman collections under newman against a live service (docs/wire.md): every request a user of the seed,
or of ours, sends from Postman gets the documented answer, never a 401.

- The seed's requests (tests/data/seed_postman_collection.json): Postman signs each with `iat: {{$timestamp}}`,
  which Postman rounds to the nearest second, so about half of them carry an `iat` up to 0.5 s ahead of the
  service's clock. Runs repeat until the service has verified at least one such token (each run must pass).
- Ours (docs/examples/): every route, with the checks each request carries (its Tests), end to end.

A request for a stream lasts as long as the stream: a watcher ends each one (`DELETE /connections/...`) once it is
registered, so newman gets the whole answer, as a user who cancels it in Postman would have seen it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import quart_sse.auth as auth_mod
from quart_sse.settings import Settings
from tests.js_clients import node_modules, node_tool  # noqa: F401 - node_modules is a fixture
from tests.support import ROOT, LiveServer, auth, live_server, make_settings, token

pytestmark = pytest.mark.slow

SEED_COLLECTION = ROOT / "tests" / "data" / "seed_postman_collection.json"
OUR_COLLECTION = ROOT / "docs" / "examples" / "sse_notification_service.postman_collection.json"
SEED_SECRET = "my-secret-key"  # the seed's .env.example, which its collection signs with
NEWMAN_TIMEOUT = 180


@contextlib.asynccontextmanager
async def stream_ender(srv: LiveServer, app: str, user: str, ops_token: str) -> AsyncIterator[list[int]]:
    """End every stream of app/user as soon as it is registered; yields the `closed` count of each DELETE."""
    closed: list[int] = []

    async def run() -> None:
        async with httpx.AsyncClient(base_url=srv.url, headers=auth(ops_token)) as c:
            while True:
                listed = (await c.get(f"/connections/{app}/{user}")).json()
                if listed:
                    closed.append((await c.delete(f"/connections/{app}/{user}")).json()["closed"])
                await asyncio.sleep(0.05)

    task = asyncio.get_running_loop().create_task(run())
    try:
        yield closed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # re-raises what made the watcher stop early, if anything did


async def newman(modules: Path, collection: Path, report: Path, *args: str) -> dict[str, Any]:
    """`newman run` in a child process (the server stays responsive in this loop); the JSON report's `run`."""
    proc = await asyncio.create_subprocess_exec(
        node_tool("node"), str(modules / "newman" / "bin" / "newman.js"), "run", str(collection),
        "--reporters", "cli,json", "--reporter-json-export", str(report), "--color", "off", "--disable-unicode",
        "--timeout-request", "60000", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), NEWMAN_TIMEOUT)
    text = out.decode(errors="replace")
    assert report.exists(), text[-4000:]  # noqa: ASYNC240 - the child is done; a local file, read once
    run: dict[str, Any] = json.loads(report.read_text())["run"]  # noqa: ASYNC240
    run["exit_code"], run["output"] = proc.returncode, text
    return run


def executions(run: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(request name, status, body) of each request newman sent."""
    out = []
    for ex in run["executions"]:
        resp = ex.get("response") or {}
        body = bytes((resp.get("stream") or {}).get("data") or []).decode(errors="replace")
        out.append((ex["item"]["name"], int(resp.get("code", 0)), body))
    return out


@pytest.fixture
def iat_offsets(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """iat minus the service's clock, for each token the service decoded (a cache hit is not decoded again)."""
    offsets: list[float] = []
    real = auth_mod.decode_token

    def spy(tok: str, settings: Settings) -> dict[str, Any]:
        now = time.time()
        try:
            claims = real(tok, settings)
        finally:  # a refused token counts too: that is what the run must not meet
            with contextlib.suppress(Exception):
                import jwt

                iat = jwt.decode(tok, options={"verify_signature": False}).get("iat")
                if isinstance(iat, (int, float)):
                    offsets.append(iat - now)
        return claims

    monkeypatch.setattr(auth_mod, "decode_token", spy)
    return offsets


# the seed's example secret is 13 bytes: PyJWT warns on every use of it (the service allows it in debug mode only)
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_seed_postman_collection_under_newman(node_modules: Path, redis_url: str,  # noqa: F811
                                                    tmp_path: Path, iat_offsets: list[float]) -> None:
    """The seed's three requests, with Postman's JWT auth. The stream: 200, an event stream. The user's own
    connections: 200. The app's connections: 403 JSON, since docs/security.md gives the app-wide list to the
    `connections` scope only, which the seed's token does not have (the seed listed any app to any token)."""
    settings = make_settings(jwt_secret=SEED_SECRET, redis_url=redis_url)
    collection = json.loads(SEED_COLLECTION.read_text())
    for item in collection["item"]:  # the one request hard-coded to the seed user's port goes to ours too
        url = item["request"]["url"]
        if url["host"] == ["localhost"] and url["port"] == "8081":
            url.update(host=["{{host}}"], port="{{port}}",
                       raw=url["raw"].replace("localhost:8081", "{{host}}:{{port}}"))
    seed = tmp_path / "seed.postman_collection.json"
    seed.write_text(json.dumps(collection))
    expected = {"SSE Connect": 200, "App connections": 403, "User connections": 200}

    async with live_server(settings) as srv:
        ops = token(settings, "ops", "app-id-1", "connections")
        runs = 0
        async with stream_ender(srv, "app-id-1", "user-id-1", ops) as closed:
            while runs < 8 and not any(d > 0 for d in iat_offsets):  # until a token ahead of our clock was met
                runs += 1
                run = await newman(node_modules, seed, tmp_path / f"seed-{runs}.json", "-n", "3",
                                   "--env-var", "host=127.0.0.1", "--env-var", f"port={srv.port}")
                got = executions(run)
                assert len(got) == 3 * 3 and not run["failures"], run["output"][-4000:]
                assert [(name, code) for name, code, _ in got] == [(n, expected[n]) for n, _, _ in got], got
                for name, _, body in got:
                    if name == "SSE Connect":
                        assert body.startswith("retry: ") and ": closing" in body, body[:200]
                    elif name == "App connections":
                        assert json.loads(body)["error"] == "forbidden"
                    else:
                        assert isinstance(json.loads(body), dict)
                assert run["exit_code"] == 0, run["output"][-4000:]
        assert sum(closed) == 3 * runs  # each SSE Connect, ended once
    assert any(d > 0 for d in iat_offsets), f"no token with iat ahead of the service's clock in {runs} runs"


async def test_our_postman_collection_under_newman(node_modules: Path, redis_url: str,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """docs/examples/: every route; each request's own Tests pass (status, content type, body shape)."""
    settings = make_settings(redis_url=redis_url, app_mode="debug")
    app, user = "my-app", "alice"
    async with live_server(settings) as srv:
        backend = token(settings, "backend", app, "publish connections")
        async with stream_ender(srv, app, user, backend) as closed:
            run = await newman(node_modules, OUR_COLLECTION, tmp_path / "ours.json",
                               "--env-var", f"base_url={srv.url}", "--env-var", f"app={app}",
                               "--env-var", f"user={user}", "--env-var", f"user_token={token(settings, user, app)}",
                               "--env-var", f"publish_token={backend}")
    got = executions(run)
    names = [item["name"] for folder in json.loads(OUR_COLLECTION.read_text())["item"] for item in folder["item"]]
    assert [name for name, _, _ in got] == names
    assertions = [(ex["item"]["name"], a["assertion"], a.get("error")) for ex in run["executions"]
                  for a in ex.get("assertions") or []]
    assert len(assertions) >= len(names) and all(err is None for _, _, err in assertions), assertions
    assert not run["failures"] and run["exit_code"] == 0, run["output"][-4000:]
    assert sum(closed) == 4  # the four stream requests, each ended once
    assert all(code != 401 for _, code, _ in got)
