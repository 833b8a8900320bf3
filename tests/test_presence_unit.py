"""Presence's pure rules: webhook targets, the signature and the receiver's check (the snippet in
docs/presence.md, run as written), how an answer is classified, backoff, Retry-After, and the settings."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from quart_sse import keys
from quart_sse.metrics import Metrics
from quart_sse.presence.service import Presence
from quart_sse.presence.webhooks import (
    Outcome,
    backoff,
    classify,
    parse_targets,
    retry_after,
    signature,
    url_for,
    verify,
)
from quart_sse.registry import ConnRecord, RedisRegistry
from quart_sse.settings import ConfigError, load_settings
from quart_sse.tasks import cancel_and_wait
from tests.support import ROOT, SECRET, make_settings


def test_targets_one_url_or_a_mapping() -> None:
    assert parse_targets(None) == {} and parse_targets("  ") == {}
    one = parse_targets("https://hooks.example.com/presence")
    assert url_for(one, "shop") == url_for(one, "blog") == "https://hooks.example.com/presence"
    many = parse_targets('{"shop": "https://a.example/h", "*": "http://b.example:8080/h?x=1"}')
    assert url_for(many, "shop") == "https://a.example/h"
    assert url_for(many, "blog") == "http://b.example:8080/h?x=1"
    assert url_for(parse_targets('{"shop": "https://a.example/h"}'), "blog") is None


@pytest.mark.parametrize(("value", "reason"), [
    ("ftp://x.example/h", "not an http(s) URL"), ("https://", "not an http(s) URL"), ("hooks.example.com", "not an"),
    ("http://x.example:99999/h", "Port out of range"), ("{", "not valid JSON"), ("{}", "non-empty object"),
    ('{"shop": 1}', "non-empty object"), ('["https://x.example"]', "not an http(s) URL"),
    ('{"sh:op": "https://x.example"}', "not a valid app id"),
])
def test_bad_targets(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_targets(value)


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    secret, ts, body = b"k" * 32, 1_764_208_123, b'{"id":"x"}'
    expected = hmac.new(secret, b"1764208123." + body, hashlib.sha256).hexdigest()
    assert signature(secret, ts, body) == "sha256=" + expected
    good = signature(secret, ts, body)
    assert verify(secret, str(ts), good, body, now=ts + 10)
    assert not verify(secret, str(ts), good, body + b" ", now=ts)  # body changed
    assert not verify(b"other" * 8, str(ts), good, body, now=ts)  # another secret
    assert not verify(secret, str(ts + 1), good, body, now=ts)  # timestamp changed
    assert not verify(secret, str(ts), good, body, now=ts + 301)  # a replay, too old
    assert not verify(secret, "soon", good, body, now=ts)


def _docs_snippet() -> Callable[..., bool]:
    text = (ROOT / "docs" / "presence.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "def verify_webhook" in
                block)
    scope: dict[str, Any] = {}
    exec(compile(code, "docs/presence.md", "exec"), scope)  # our own documentation, run as written
    fn: Callable[..., bool] = scope["verify_webhook"]
    return fn


def test_the_documented_receiver_check_accepts_ours_and_refuses_the_rest() -> None:
    verify_webhook = _docs_snippet()
    secret, body, ts = b"s" * 32, b'{"id":"1","type":"user.online"}', int(time.time())
    headers = {"X-Webhook-Timestamp": str(ts), "X-Signature": signature(secret, ts, body)}
    assert verify_webhook(secret, headers, body)
    assert not verify_webhook(secret, headers, body[:-1] + b"!")
    assert not verify_webhook(b"x" * 32, headers, body)
    old = ts - 3600
    assert not verify_webhook(secret, {"X-Webhook-Timestamp": str(old),
                                       "X-Signature": signature(secret, old, body)}, body)
    assert not verify_webhook(secret, {}, body)


@pytest.mark.parametrize(("status", "outcome"), [
    (200, Outcome.DELIVERED), (201, Outcome.DELIVERED), (204, Outcome.DELIVERED), (299, Outcome.DELIVERED),
    (500, Outcome.RETRY), (502, Outcome.RETRY), (503, Outcome.RETRY), (599, Outcome.RETRY), (408, Outcome.RETRY),
    (429, Outcome.RETRY), (400, Outcome.REJECTED), (401, Outcome.REJECTED), (404, Outcome.REJECTED),
    (410, Outcome.REJECTED), (301, Outcome.REJECTED), (302, Outcome.REJECTED), (100, Outcome.REJECTED),
])
def test_classify(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome


def test_backoff_doubles_up_to_the_cap_with_some_jitter() -> None:
    rng = random.Random(1)
    for attempt, nominal in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (8, 60.0), (100, 60.0), (10_000, 60.0)]:
        for _ in range(50):
            d = backoff(attempt, 60.0, rng=rng)
            assert 0.75 * nominal <= d <= nominal


def test_retry_after() -> None:
    assert retry_after(None, 60) is None
    assert retry_after("7", 60) == 7
    assert retry_after(" 2.5 ", 60) == 2.5
    assert retry_after("3600", 60) == 60
    assert retry_after("-1", 60) is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 60) is None


@pytest.mark.parametrize(("env", "message"), [
    ({"WEBHOOK_URL": "https://x.example/h"}, "WEBHOOK_SECRET: required"),
    ({"WEBHOOK_URL": "nope", "WEBHOOK_SECRET": "s"}, "WEBHOOK_URL: 'nope' is not an http(s) URL"),
    ({"WEBHOOK_URL": "https://x.example/h", "WEBHOOK_SECRET": "short", "APP_MODE": "production",
      "JWT_SECRET": "p" * 40}, "WEBHOOK_SECRET: production needs"),
    ({"PRESENCE_GRACE": "-1"}, "PRESENCE_GRACE"),
    ({"WEBHOOK_QUEUE_MAX": "0"}, "WEBHOOK_QUEUE_MAX"),
    ({"WEBHOOK_CONCURRENCY": "lots"}, "WEBHOOK_CONCURRENCY"),
])
def test_bad_presence_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                 message: str) -> None:
    monkeypatch.setenv("JWT_SECRET", SECRET)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        load_settings(_env_file=None)
    assert "\n" not in str(exc.value)


def test_presence_settings_defaults() -> None:
    s = make_settings()
    assert (s.presence_grace, s.webhook_url, s.webhook_secret, s.webhook_queue_max, s.webhook_timeout,
            s.webhook_retry_max, s.webhook_concurrency) == (5.0, None, None, 100_000, 5.0, 60.0, 16)


async def test_a_stream_released_while_its_heartbeat_is_in_flight_does_not_come_back(redis_url: str) -> None:
    """The heartbeat script writes every open stream back; one released while that call is on its way must not
    stay in listings, caps and presence until REGISTRY_TTL: it is released again after the call."""
    r = aioredis.Redis.from_url(redis_url)
    settings = make_settings(redis_url=redis_url, presence_grace=0.2)
    presence = Presence(settings, Metrics(), "i1", r)
    reg = RedisRegistry(r, ttl=30, presence=presence)
    try:
        rec = ConnRecord("c1", "shop", "alice", "127.0.0.1")
        assert await reg.admit(rec, cap=0)
        script = reg._refresh

        async def refresh_while_released(**kw: Any) -> Any:
            reg.release(rec)  # the client leaves while the heartbeat call is in flight
            await reg.drain()  # its release reaches Redis first; the heartbeat then writes it back
            return await script(**kw)

        reg._refresh = refresh_while_released  # type: ignore[assignment]
        await reg.refresh()
        await reg.drain()
        assert await reg.list_user("shop", "alice") == {}
        assert await r.zcard(keys.app_conns_key("shop")) == 0
        assert (await presence.state.sweep("shop", time.time() + 0.5)).changes == 1  # and alice goes offline
    finally:
        await r.aclose()


async def test_the_heartbeat_survives_redis_going_away(tmp_path: Any) -> None:
    """A beat that fails (Redis down: the presence index and the script both fail) leaves the heartbeat running;
    the next beat after Redis is back writes the stream and its user's presence back."""
    from tests.support import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    r = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    presence = Presence(make_settings(redis_url=server.url), Metrics(), "i1", r)
    reg = RedisRegistry(r, ttl=3, presence=presence)
    try:
        assert await reg.admit(ConnRecord("c1", "shop", "alice", "127.0.0.1"), cap=0)
        await reg.start()
        server.kill()
        await asyncio.sleep(2.5)  # at least one beat fails meanwhile (every ttl/3 = 1 s)
        assert reg._heartbeat is not None and not reg._heartbeat.done()
        server.start()  # empty: as after a restart without persistence
        for _ in range(50):  # the next beat, within ttl/3 = 1 s (Redis state: nothing to await but polling)
            if await presence.online("shop", ["alice"]) == ["alice"]:
                break
            await asyncio.sleep(0.1)
        assert await presence.online("shop", ["alice"]) == ["alice"]
        assert set(await reg.list_user("shop", "alice")) == {"c1"}
    finally:
        await cancel_and_wait(reg._heartbeat)
        await r.aclose()
        server.stop()


async def test_a_loop_stops_although_a_callee_swallowed_its_cancellation() -> None:
    """What Python 3.11's asyncio.wait_for does when the call completes as the caller is cancelled (gh-86296): the
    cancellation is lost, the task stays `cancelling()`. The presence and heartbeat loops still stop."""
    from quart_sse.tasks import raise_if_cancelling

    rounds = 0

    async def swallowing_call() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)

    async def loop() -> None:
        nonlocal rounds
        while True:
            raise_if_cancelling()
            rounds += 1
            await swallowing_call()

    task = asyncio.get_running_loop().create_task(loop())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert rounds == 1
