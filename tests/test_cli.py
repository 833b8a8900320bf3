"""`python -m quart_sse token | publish` (README.md) as real child processes: the token carries what was asked and
is accepted by the service; publish reaches open streams and history on Redis, and posts to the running service
on the in-process broker."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import jwt
import pytest

from quart_sse.app import create_app
from tests.support import SECRET, auth, free_port, live_server, make_settings, open_stream, service_env, token


async def run_cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); asynchronous so that a LiveServer in this loop can answer the child."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quart_sse", *args, env=service_env(env or {}), cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_clean_failure(rc: int, out: str, err: str, *words: str) -> None:
    assert rc != 0, (out, err)
    assert "Traceback" not in out + err, err
    for w in words:
        assert w in err, err


# ------------------------------------------------------------------------------------------------ token
async def test_token_carries_the_claims_and_is_accepted(tmp_path: Path) -> None:
    before = time.time()
    rc, out, err = await run_cli(tmp_path, "token", "--sub", "U", "--iss", "A", "--scope", "publish connections",
                                 "--ttl", "120")
    assert rc == 0, err
    tok = out.strip()
    assert len(out.strip().splitlines()) == 1
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["iss"], claims["scope"]) == ("U", "A", "publish connections")
    assert before + 120 - 2 <= claims["exp"] <= time.time() + 120 + 2
    assert jwt.get_unverified_header(tok)["alg"] == "HS256"
    # the service takes it, with its scopes, for its app
    app = create_app(make_settings())
    async with app.test_app() as ta:
        c = ta.test_client()
        assert (await c.get("/connections/A", headers=auth(tok))).status_code == 200
        assert (await c.post("/publish/A", json={"type": "t"}, headers=auth(tok))).status_code == 202
        assert (await c.get("/connections/B", headers=auth(tok))).status_code == 403


async def test_token_default_ttl_and_no_scope(tmp_path: Path) -> None:
    rc, out, err = await run_cli(tmp_path, "token", "--sub", "alice@example.com", "--iss", "my-app")
    assert rc == 0, err
    claims = jwt.decode(out.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice@example.com" and claims["iss"] == "my-app"
    assert not claims.get("scope")
    assert abs(claims["exp"] - (time.time() + 3600)) < 5


@pytest.mark.parametrize("args", [
    ["--sub", "a:b", "--iss", "A"],
    ["--sub", "U", "--iss", "app*"],
    ["--sub", "has space", "--iss", "A"],
    ["--sub", "", "--iss", "A"],
    ["--sub", "u" * 129, "--iss", "A"],
])
async def test_token_refuses_bad_ids(tmp_path: Path, args: list[str]) -> None:
    rc, out, err = await run_cli(tmp_path, "token", *args)
    assert_clean_failure(rc, out, err, "error")
    assert out == ""  # nothing a script could mistake for a token


async def test_token_bad_arguments_and_config(tmp_path: Path) -> None:
    results = await asyncio.gather(
        run_cli(tmp_path, "token", "--sub", "U", "--iss", "A", "--ttl", "soon"),
        run_cli(tmp_path, "token", "--sub", "U"),
        run_cli(tmp_path, "token", "--sub", "U", "--iss", "A", env={"JWT_SECRET": ""}))
    for rc, out, err in results:
        assert_clean_failure(rc, out, err)
    assert "--ttl" in results[0][2] and "--iss" in results[1][2] and "JWT_SECRET" in results[2][2]


# ------------------------------------------------------------------------------------------------ publish
async def test_publish_through_redis_reaches_a_stream_and_writes_history(tmp_path: Path, redis_url: str) -> None:
    s = make_settings(redis_url=redis_url)
    env = {"REDIS_URL": redis_url}
    async with live_server(s) as srv:
        st = await open_stream(srv.port, headers=auth(token(s, "alice", "app1")))
        try:
            assert st.status == 200
            rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--user", "alice", "--type", "greet",
                                         "--id", "e1", '{"x": 1, "s": "a\\nb"}', env=env)
            assert rc == 0, err
            assert json.loads(out) == {"id": "e1"}
            ev = await st.next_event()
            assert ev is not None and (ev.id, ev.event, ev.json()) == ("e1", "greet", {"x": 1, "s": "a\nb"})
            assert b'id: e1\nevent: greet\ndata: {"x":1,"s":"a\\nb"}\n\n' in st.raw  # the seed's wire format
            rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--type", "news", "[1, 2]", env=env)
            assert rc == 0, err
            assigned = json.loads(out)["id"]
            ev = await st.next_event()
            assert ev is not None and (ev.id, ev.event, ev.json()) == (assigned, "news", [1, 2])
        finally:
            await st.close()
        # history: a client that last saw e1 is replayed the broadcast it missed
        again = await open_stream(srv.port, headers={**auth(token(s, "alice", "app1")), "Last-Event-ID": "e1"})
        try:
            ev = await again.next_event()
            assert ev is not None and (ev.id, ev.event, ev.json()) == (assigned, "news", [1, 2])
        finally:
            await again.close()


async def test_publish_through_redis_refuses_bad_input(tmp_path: Path, redis_url: str) -> None:
    env = {"REDIS_URL": redis_url}
    results = await asyncio.gather(
        run_cli(tmp_path, "publish", "--app", "app1", "--user", "alice", "--type", "a\nb", "{}", env=env),
        run_cli(tmp_path, "publish", "--app", "app1", "--user", "a:b", "--type", "t", "{}", env=env),
        run_cli(tmp_path, "publish", "--app", "app1", "--type", "t", "{not json", env=env))
    for (rc, out, err), word in zip(results, ["type", "user", "JSON"], strict=True):
        assert_clean_failure(rc, out, err, word)


async def test_publish_with_the_in_process_broker_posts_to_the_service(tmp_path: Path) -> None:
    s = make_settings()
    assert s.redis_dsn is None
    env = {"APP_PORT": str(s.app_port)}
    async with live_server(s) as srv:
        st = await open_stream(srv.port, headers=auth(token(s, "alice", "app1")))
        try:
            rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--user", "alice", "--type", "greet",
                                         '{"hello": "world"}', env=env)
            assert rc == 0, err
            event_id = json.loads(out)["id"]
            ev = await st.next_event()
            assert ev is not None and (ev.id, ev.event, ev.json()) == (event_id, "greet", {"hello": "world"})
            rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--type", "news", "--id", "n1", "null",
                                         env=env)
            assert rc == 0 and json.loads(out) == {"id": "n1"}, err
            ev = await st.next_event()
            assert ev is not None and (ev.id, ev.event, ev.data) == ("n1", "news", "null")
            # the service's own checks answer: a type with a newline is refused, nothing is delivered
            rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--user", "alice", "--type", "a\nb",
                                         "{}", env=env)
            assert_clean_failure(rc, out, err, "400")
        finally:
            await st.close()


async def test_publish_with_the_in_process_broker_and_no_service(tmp_path: Path) -> None:
    rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--type", "t", "{}",
                                 env={"APP_PORT": str(free_port())})
    assert_clean_failure(rc, out, err, "not reachable")


# ------------------------------------------------------------------------------------------------ publish --batch
async def run_cli_input(cwd: Path, stdin: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quart_sse", *args, env=service_env(env or {}), cwd=cwd,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


BATCH_LINES = "\n".join([
    '{"user": "alice", "type": "greet", "data": {"n": 1}, "id": "b1"}',
    "",  # blank lines are skipped
    '{"type": "news", "data": [2], "id": "b2"}',
    '{"user": "bob", "type": "t", "data": 3, "id": "b3"}',
    '{"user": "alice", "type": "t", "data": 4, "id": "b4"}',
]) + "\n"


@pytest.mark.parametrize("broker", ["redis", "memory"])
async def test_publish_batch_from_stdin_and_a_file(tmp_path: Path, broker: str, request: pytest.FixtureRequest) -> None:
    """JSON lines in, one JSON line per event out, in order; a second run of the same lines is all duplicates (a
    safe retry); through Redis directly, or posted to the running service with the in-process broker."""
    s = make_settings(redis_url=request.getfixturevalue("redis_url")) if broker == "redis" else make_settings()
    env = {"REDIS_URL": s.redis_url} if s.redis_url else {"APP_PORT": str(s.app_port)}
    async with live_server(s) as srv:
        st = await open_stream(srv.port, headers=auth(token(s, "alice", "app1")))
        try:
            rc, out, err = await run_cli_input(tmp_path, BATCH_LINES, "publish", "--app", "app1", "--batch", "-",
                                               env=env)
            assert rc == 0, err
            assert [json.loads(line) for line in out.splitlines()] == [{"id": f"b{i}"} for i in (1, 2, 3, 4)]
            got = [await st.next_event() for _ in range(3)]
            assert [(e.id, e.event, e.json()) for e in got if e] == [("b1", "greet", {"n": 1}), ("b2", "news", [2]),
                                                                     ("b4", "t", 4)]
            (tmp_path / "events.jsonl").write_text(BATCH_LINES)
            rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--batch", "events.jsonl", env=env)
            assert rc == 0, err
            assert [json.loads(line) for line in out.splitlines()] == [{"id": f"b{i}", "duplicate": True}
                                                                        for i in (1, 2, 3, 4)]
            # one event retried through the single form is a duplicate too
            rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--user", "alice", "--type", "t",
                                         "--id", "b4", "4", env=env)
            assert rc == 0 and json.loads(out) == {"id": "b4", "duplicate": True}, err
            rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--user", "alice", "--type", "end",
                                         "--id", "end", "0", env=env)
            assert rc == 0, err
            ev = await st.next_event()
            assert ev is not None and ev.id == "end"  # nothing of the retries reached the stream
        finally:
            await st.close()


async def test_publish_batch_refuses_bad_lines_before_publishing_anything(tmp_path: Path, redis_url: str) -> None:
    env = {"REDIS_URL": redis_url}
    lines = '{"user": "alice", "type": "t", "id": "ok"}\n\n{"user": "alice", "type": "a\\nb"}\n'
    rc, out, err = await run_cli_input(tmp_path, lines, "publish", "--app", "app1", "--batch", "-", env=env)
    assert_clean_failure(rc, out, err, "line 3: type:")
    assert out == ""
    rc, out, err = await run_cli_input(tmp_path, '{"type": "t"}\n{nope\n', "publish", "--app", "app1", "--batch", "-",
                                       env=env)
    assert_clean_failure(rc, out, err, "line 2: not valid JSON")
    rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--batch", "missing.jsonl", env=env)
    assert_clean_failure(rc, out, err, "missing.jsonl")
    rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--batch", "-", "--type", "t", env=env)
    assert_clean_failure(rc, out, err, "--batch")
    rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--type", "t", env=env)
    assert_clean_failure(rc, out, err, "DATA_JSON")
    # nothing of the refused batch was published: "ok" is new now
    rc, out, err = await run_cli(tmp_path, "publish", "--app", "app1", "--user", "alice", "--type", "t", "--id", "ok",
                                 "1", env=env)
    assert rc == 0 and json.loads(out) == {"id": "ok"}, err


async def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        rc, out, err = await run_cli(tmp_path, "serve", env={"APP_PORT": str(port), "APP_HOST": "127.0.0.1"})
    assert_clean_failure(rc, out, err, "APP_PORT", f"127.0.0.1:{port}", "already in use")
