"""The server adapter (quart_sse.adapter): every internal it relies on, by name, and the fallback when one is gone.

An upgrade of Hypercorn, Quart or Python that takes away something the adapter uses fails here, in the test named
after that internal, instead of as a distant symptom (a stream that never ends, a stalled client never cut). And
when the coupling is broken in production, the service says so in one log line, /ready and a metric, and serves
every stream on the generator path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

import httpx
import pytest
from hypercorn.asyncio import run as hypercorn_run
from hypercorn.asyncio.tcp_server import TCPServer

from quart_sse import adapter
from quart_sse.adapter import INTERNALS, StreamPath, TrackedTCPServer, check, install
from quart_sse.stream import StreamState
from tests.support import auth, live_server, make_settings, metric_value, open_stream, token
from tests.support_faults import until


class _Records(logging.Handler):
    """Records of one logger (create_app replaces the root's handlers, so pytest's caplog sees nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def said(self, *words: str) -> bool:
        return any(all(w in r.getMessage() for w in words) for r in self.records)


@pytest.fixture
def logged() -> Iterator[_Records]:
    handler = _Records()
    log = logging.getLogger("quart_sse")
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)


@pytest.mark.parametrize(("name", "probe"), INTERNALS, ids=[name for name, _ in INTERNALS])
def test_internal_is_there(name: str, probe: Callable[[], str | None]) -> None:
    install()
    assert probe() is None, f"quart_sse.adapter relies on: {name}"


def test_check_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    install()
    assert check() == []
    monkeypatch.delattr(TCPServer, "protocol_send")
    monkeypatch.delattr(TrackedTCPServer, "protocol_send")
    assert any("protocol_send" in p for p in check())
    monkeypatch.undo()
    monkeypatch.setattr(hypercorn_run, "TCPServer", TCPServer)  # the patch undone, e.g. by another import
    assert any("patch did not take" in p for p in check())


async def _stream_through(port: int, svc: object) -> StreamState:
    s = svc.settings  # type: ignore[attr-defined]
    st = await open_stream(port, headers=auth(token(s, "fb", "app1")))
    try:
        assert st.status == 200
        hub = svc.hub  # type: ignore[attr-defined]
        await until(lambda: len(hub.subscribers) == 1 and next(iter(hub.subscribers)).state in (
            StreamState.LIVE, StreamState.OWNED))
        sub = next(iter(hub.subscribers))
        await asyncio.sleep(0.1)  # a hand-off, if there were one, is done by now
        async with httpx.AsyncClient() as http:
            r = await http.post(f"http://127.0.0.1:{port}/publish/app1/fb", json={"id": "e1", "type": "t"},
                                headers=auth(token(s, "b", "app1", "publish")))
            assert r.status_code == 202
        ev = await st.next_event()
        assert ev is not None and ev.id == "e1"
        return sub.state  # type: ignore[no-any-return]
    finally:
        await st.close()


async def test_a_missing_internal_falls_back_to_the_generator_path(
        monkeypatch: pytest.MonkeyPatch, logged: _Records) -> None:
    """The start-up check finds an internal gone: one log line naming it, streams on the generator path, /ready
    and the metric say so; everything else works."""
    monkeypatch.setattr(adapter, "INTERNALS", (*INTERNALS, ("an internal that went away", lambda: "it is gone")))
    async with live_server(make_settings()) as srv:
        assert not srv.services.adapter.active
        assert logged.said("generator path", "it is gone")
        assert await _stream_through(srv.port, srv.services) is StreamState.LIVE
        async with httpx.AsyncClient(base_url=srv.url) as http:
            ready = (await http.get("/ready")).json()
            text = (await http.get("/metrics")).text
        assert ready["stream_path"] == StreamPath.GENERATOR.value
        assert metric_value(text, 'sse_stream_path{path="generator"}') == 1
        assert metric_value(text, 'sse_stream_path{path="handed_off"}') == 0


async def test_the_patch_undone_before_serving_is_seen(monkeypatch: pytest.MonkeyPatch, logged: _Records) -> None:
    """Another import puts Hypercorn's own TCPServer back after the adapter installed ours: connections would not
    be tracked; before_serving's recheck sees it and every stream takes the generator path."""
    real_install = adapter.install

    def install_then_undo() -> None:
        real_install()
        hypercorn_run.TCPServer = TCPServer  # type: ignore[attr-defined,misc]

    monkeypatch.setattr(adapter, "install", install_then_undo)
    monkeypatch.setattr(hypercorn_run, "TCPServer", TrackedTCPServer)  # restored after the test
    async with live_server(make_settings()) as srv:
        assert not srv.services.adapter.active
        assert logged.said("generator path", "patch did not take")
        assert await _stream_through(srv.port, srv.services) is StreamState.LIVE
    install()


@pytest.mark.handoff("checks the hand-off itself")
async def test_a_healthy_coupling_hands_streams_off() -> None:
    async with live_server(make_settings()) as srv:
        assert srv.services.adapter.active
        assert await _stream_through(srv.port, srv.services) is StreamState.OWNED
        async with httpx.AsyncClient(base_url=srv.url) as http:
            assert (await http.get("/ready")).json()["stream_path"] == StreamPath.HANDED_OFF.value
            assert metric_value((await http.get("/metrics")).text, 'sse_stream_path{path="handed_off"}') == 1


async def test_an_app_served_another_way_says_what_it_loses(logged: _Records) -> None:
    """Under the Quart test client (as under uvicorn or plain hypercorn) nothing is tracked: one warning."""
    from quart_sse.app import create_app

    app = create_app(make_settings())
    async with app.test_app():
        assert logged.said("python -m quart_sse serve", "generator path")
        assert app.extensions["quart_sse"].stream_path is StreamPath.GENERATOR
