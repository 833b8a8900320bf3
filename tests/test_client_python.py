"""quart_sse.client against the real service: the sync and async publishers (answers and errors), the Flask
example of docs/examples publishing to a real stream, and `subscribe()` renewing at token expiry, resuming across
SIGKILL and SIGTERM restarts, retrying refusals that pass and stopping on those that cannot."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from quart_sse.client import (
    AsyncPublisher,
    BatchEvent,
    Event,
    NoCredentials,
    Publisher,
    ServiceError,
    State,
    Status,
    WaitReason,
    subscribe,
)
from quart_sse.publisher import connect as redis_publisher
from quart_sse.settings import Settings
from tests.support import (
    ROOT,
    RedisServer,
    ServiceProcess,
    auth,
    live_server,
    make_settings,
    open_stream,
    token,
)
from tests.support_faults import until
from tests.support_restart import restart_port

APP, USER = "shop", "alice"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flask_app_example", ROOT / "docs" / "examples" / "flask_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Tokens:
    """`get_token` for subscribe(): a fresh token per call, counted."""

    def __init__(self, settings: Settings, ttl: int = 600, user: str = USER) -> None:
        self.settings, self.ttl, self.user, self.calls = settings, ttl, user, 0

    def __call__(self) -> str:
        self.calls += 1
        return token(self.settings, self.user, APP, ttl=self.ttl)


async def collect(feed: Any, into: list[Event]) -> None:
    async for event in feed:
        into.append(event)


async def take(feed: Any, n: int, timeout: float = 10) -> list[Event]:
    out: list[Event] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(await anext(feed))
    return out


# ------------------------------------------------------------------------------------------------ publishers
async def test_sync_and_async_publishers_reach_a_stream(redis_url: str) -> None:
    settings = make_settings(redis_url=redis_url)
    pub_tok = token(settings, "backend", APP, "publish")
    async with live_server(settings) as srv:
        st = await open_stream(srv.port, headers=auth(token(settings, USER, APP)))
        try:
            def sync_side() -> list[str]:  # a thread, as in a Flask view or a Celery task
                with Publisher(srv.url, pub_tok) as pub:
                    return [pub.publish(APP, USER, "note", {"n": 1}, id="order-1"),
                            pub.broadcast(APP, "news", {"n": 2})]

            ids = await asyncio.to_thread(sync_side)
            async with AsyncPublisher(srv.url + "/", lambda: pub_tok) as apub:  # a callable token works too
                ids.append(await apub.publish(APP, USER, "note", {"n": 3}))
                ids.append(await apub.broadcast(APP, "news", {"n": 4}, id="b-4"))
            got = [await st.next_event() for _ in range(4)]
        finally:
            await st.close()
    assert ids[0] == "order-1" and ids[3] == "b-4"
    assert [(e.event, e.id, e.json()) for e in got if e is not None] == [
        ("note", ids[0], {"n": 1}), ("news", ids[1], {"n": 2}), ("note", ids[2], {"n": 3}), ("news", ids[3], {"n": 4})]


async def test_publisher_errors_carry_the_services_json_error() -> None:
    settings = make_settings()
    async with live_server(settings) as srv:
        def attempts() -> list[ServiceError]:
            errors: list[ServiceError] = []
            for tok, kwargs in ((token(settings, "backend", APP), {}),  # no publish scope: 403
                                ("not-a-token", {}),  # 401
                                (token(settings, "backend", APP, "publish"), {"type": "two\nlines"})):  # 400
                with Publisher(srv.url, tok) as pub, pytest.raises(ServiceError) as caught:
                    pub.publish(APP, USER, kwargs.get("type", "note"), {})
                errors.append(caught.value)
            return errors

        forbidden, unauthorized, bad = await asyncio.to_thread(attempts)
        async with AsyncPublisher(srv.url, token(settings, "backend", "other-app", "publish")) as apub:
            with pytest.raises(ServiceError) as wrong_app:
                await apub.broadcast(APP, "news", {})
            with pytest.raises(ValueError, match="app: not a valid id"):
                await apub.broadcast("no spaces", "news", {})
    assert (forbidden.status, forbidden.code, forbidden.retryable) == (403, "forbidden", False)
    assert "publish" in forbidden.message
    assert (unauthorized.status, unauthorized.code) == (401, "unauthorized")
    assert (bad.status, bad.code) == (400, "bad_request") and bad.message.startswith("type:")
    assert (wrong_app.value.status, wrong_app.value.code) == (403, "forbidden")


async def test_publish_to_a_dot_dot_user_reaches_that_user() -> None:
    """`..` is a valid id; the publisher must not let the URL drop it as a dot segment."""
    settings = make_settings()
    async with live_server(settings) as srv:
        st = await open_stream(srv.port, headers=auth(token(settings, "..", APP)))
        try:
            async with AsyncPublisher(srv.url, token(settings, "backend", APP, "publish")) as apub:
                event_id = await apub.publish(APP, "..", "note", {"to": ".."})
            got = await st.next_event()
        finally:
            await st.close()
    assert got is not None and (got.id, got.json()) == (event_id, {"to": ".."})


async def test_flask_example_view_publishes_to_a_real_stream() -> None:
    """docs/examples/flask_app.py: a Flask view (sync) publishes with Publisher; a subscriber receives it."""
    example = load_example()
    settings = make_settings()
    async with live_server(settings) as srv:
        publisher = Publisher(srv.url, token(settings, "backend", APP, "publish"))
        flask_app = example.create_app(publisher)
        async with subscribe(srv.url, Tokens(settings)) as feed:
            first = asyncio.ensure_future(anext(feed))
            await until(lambda: feed.status.state is State.OPEN)

            def order() -> Any:
                with flask_app.test_client() as client:
                    return client.post("/orders/alice", json={"item": "book"})

            resp = await asyncio.to_thread(order)
            event = await asyncio.wait_for(first, 10)
    # the service is gone: the view still answers, saying the notification did not go out
    down = await asyncio.to_thread(order)
    publisher.close()
    assert resp.status_code == 201 and resp.json["notified"] is True
    order_body = resp.json["order"]
    assert (event.type, event.id, event.data) == ("order.created", f"order-{order_body['id']}", order_body)
    assert event.data["item"] == "book" and resp.json["event_id"] == event.id
    assert down.status_code == 201 and down.json == {"order": down.json["order"], "notified": False,
                                                     "error": "unreachable"}

    def bad_order() -> Any:
        with flask_app.test_client() as client:
            return client.post("/orders/bad%20user", json={"id": "mine", "user": "mallory"})

    bad = await asyncio.to_thread(bad_order)  # refused before sending: a 400, never a 500
    assert bad.status_code == 400 and bad.json["error"] == "bad_request"
    assert order_body["user"] == "alice" and order_body["id"] != "mine"


# ------------------------------------------------------------------------------------------------ subscribe
async def test_subscribe_renews_at_token_expiry_with_nothing_lost() -> None:
    settings = make_settings(sse_retry_ms=300)
    tokens = Tokens(settings, ttl=2)
    statuses: list[Status] = []
    async with live_server(settings) as srv, subscribe(srv.url, tokens, on_status=statuses.append) as feed, \
            AsyncPublisher(srv.url, token(settings, "backend", APP, "publish")) as pub:
        first = asyncio.ensure_future(take(feed, 50, timeout=30))
        await until(lambda: feed.status.state is State.OPEN)  # the first event must find the stream open
        ids = []
        for n in range(50):  # 5 s of events; tokens live 2 s
            ids.append(await pub.publish(APP, USER, "tick", {"n": n}))
            await asyncio.sleep(0.1)
        got = await first
    assert [e.id for e in got] == ids and [e.data["n"] for e in got] == list(range(50))
    assert feed.connections >= 3 and tokens.calls == feed.connections  # one token per connection
    assert not [s for s in statuses if s.state in (State.WAITING, State.ERROR)]
    assert statuses[-1].state is State.CLOSED


async def test_subscribe_resumes_across_sigkill_then_sigterm(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    port = restart_port()  # not free_port(): see tests/support_restart.py
    env = {"REDIS_URL": redis.url, "SSE_RETRY_MS": "300"}
    settings = make_settings()
    procs = [ServiceProcess(port, env, tmp_path / "service-1.log")]
    ids: list[str] = []
    statuses: list[Status] = []

    async def publish_http(n: int) -> None:
        async with AsyncPublisher(procs[-1].url, token(settings, "backend", APP, "publish")) as pub:
            ids.append(await pub.publish(APP, USER, "tick", {"n": n}))

    async def publish_while_down(n: int) -> None:
        async with redis_publisher(redis.url) as pub:
            ids.append((await pub.publish(APP, USER, "tick", {"n": n})).id or "")

    try:
        await procs[0].wait_ready()
        async with subscribe(procs[0].url, Tokens(settings), on_status=statuses.append) as feed:
            got: list[Event] = []
            consumer = asyncio.ensure_future(collect(feed, got))
            await until(lambda: feed.status.state is State.OPEN)
            await publish_http(0)
            await until(lambda: len(got) == 1)
            procs[0].signal(signal.SIGKILL)
            await asyncio.to_thread(procs[0].proc.wait)
            await publish_while_down(1)
            await publish_while_down(2)
            procs.append(ServiceProcess(port, env, tmp_path / "service-2.log"))
            await procs[1].wait_ready()
            await until(lambda: len(got) == 3, timeout=30)
            await publish_http(3)
            await until(lambda: len(got) == 4)
            await asyncio.to_thread(procs[1].stop)  # SIGTERM
            await publish_while_down(4)
            procs.append(ServiceProcess(port, env, tmp_path / "service-3.log"))
            await procs[2].wait_ready()
            await publish_http(5)
            await until(lambda: len(got) == 6, timeout=30)
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
        assert [e.id for e in got] == ids and [e.data["n"] for e in got] == list(range(6))
        assert feed.connections == 3
        waits = [s for s in statuses if s.state is State.WAITING]
        assert any(s.reason is WaitReason.CLOSED and s.message == "shutdown" for s in waits)
        assert any(s.reason is WaitReason.NETWORK for s in waits)
    finally:
        for p in procs:
            await asyncio.to_thread(p.stop)
        redis.stop()


async def test_subscribe_retries_a_refusal_until_it_clears() -> None:
    settings = make_settings(sse_retry_ms=100, max_connections_per_user=1)
    statuses: list[Status] = []
    async with live_server(settings) as srv:
        holder = await open_stream(srv.port, headers=auth(token(settings, USER, APP)))
        async with subscribe(srv.url, Tokens(settings), on_status=statuses.append, max_retry_ms=1000) as feed:
            nxt = asyncio.ensure_future(anext(feed))
            await until(lambda: len([s for s in statuses if s.state is State.WAITING]) >= 2)
            await holder.close()
            await until(lambda: feed.status.state is State.OPEN, timeout=10)
            async with AsyncPublisher(srv.url, token(settings, "backend", APP, "publish")) as pub:
                event_id = await pub.publish(APP, USER, "tick", {})
            assert (await asyncio.wait_for(nxt, 10)).id == event_id
    waits = [s for s in statuses if s.state is State.WAITING]
    assert all(s.http_status == 429 or s.reason is WaitReason.REFUSED for s in waits)
    assert [s.attempt for s in waits[:2]] == [1, 2]


async def test_subscribe_stops_on_401_twice_403_and_no_token() -> None:
    settings = make_settings()
    other = make_settings(jwt_secret="another-secret-" + "y" * 40)
    async with live_server(settings) as srv:
        bad = Tokens(other)  # signed with another secret: 401
        with pytest.raises(ServiceError) as unauthorized:
            async with subscribe(srv.url, bad) as feed:
                await anext(feed)
        assert (unauthorized.value.status, bad.calls) == (401, 2)  # one fresh token, then the error
        assert feed.status.state is State.ERROR and feed.status.http_status == 401

        good = Tokens(settings)
        with pytest.raises(ServiceError) as forbidden:  # another user's listing: the service's real 403
            async with subscribe(srv.url, good, path=f"/connections/{APP}/bob") as feed:
                await anext(feed)
        assert (forbidden.value.status, forbidden.value.code, good.calls) == (403, "forbidden", 1)

        with pytest.raises(NoCredentials):
            async with subscribe(srv.url, lambda: None) as feed:
                await anext(feed)


async def test_subscribe_resumes_from_a_given_id_and_filters_types() -> None:
    settings = make_settings()
    async with live_server(settings) as srv:
        async with AsyncPublisher(srv.url, token(settings, "backend", APP, "publish")) as pub:
            first = await pub.publish(APP, USER, "tick", {"n": 0})
            await pub.publish(APP, USER, "other", {"n": 1})
            second = await pub.publish(APP, USER, "tick", {"n": 2})
        async with subscribe(srv.url, Tokens(settings), first, types=["tick"]) as feed:
            got = await take(feed, 1)
        async with subscribe(srv.url, Tokens(settings), "unknown-id") as feed:
            reset = await take(feed, 1)
    assert [(e.type, e.id) for e in got] == [("tick", second)]
    assert reset[0].is_reset and reset[0].data == {"reason": "unknown id", "last_event_id": "unknown-id"}


def test_httpx_is_all_it_needs() -> None:
    """quart_sse.client imports neither Quart nor redis: a Flask app or a script installs only httpx."""
    import subprocess
    import sys

    code = ("import sys, quart_sse.client; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('quart', 'redis', 'hypercorn', 'werkzeug')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert httpx  # the one dependency


async def test_publish_batch_reaches_the_streams_in_order() -> None:
    """On a service with the batch route: one request; without it: one request per event. Either way every event
    reaches its streams, in the batch's order."""
    settings = make_settings()
    async with live_server(settings) as srv:
        alice = await open_stream(srv.port, headers=auth(token(settings, USER, APP)))
        bob = await open_stream(srv.port, headers=auth(token(settings, "bob", APP)))
        try:
            async with AsyncPublisher(srv.url, token(settings, "backend", APP, "publish")) as apub:
                result = await apub.publish_batch(APP, [
                    BatchEvent("note", {"n": 0}, user=USER), BatchEvent("news", {"n": 1}),
                    BatchEvent("note", {"n": 2}, user="bob", id="to-bob")])
            to_alice = [await alice.next_event() for _ in range(2)]
            to_bob = [await bob.next_event() for _ in range(2)]
        finally:
            await alice.close()
            await bob.close()
    assert result.ids[2] == "to-bob" and result.duplicates == []
    assert [(e.event, e.id, e.json()) for e in to_alice if e] == [("note", result.ids[0], {"n": 0}),
                                                                  ("news", result.ids[1], {"n": 1})]
    assert [(e.event, e.id, e.json()) for e in to_bob if e] == [("news", result.ids[1], {"n": 1}),
                                                                ("note", "to-bob", {"n": 2})]
