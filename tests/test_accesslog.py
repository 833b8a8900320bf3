"""quart_sse.accesslog: the same access lines as Hypercorn's own logger, without building them when not logged."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypercorn.config import Config
from hypercorn.logging import AccessLogAtoms

from quart_sse.accesslog import AccessLogger, LazyAtoms
from quart_sse.server import hypercorn_config
from tests.support import make_settings

REQUEST: Any = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "path": "/publish/a/b",
                "query_string": b"token=secret", "root_path": "", "client": ("127.0.0.1", 5555),
                "headers": [(b"host", b"x"), (b"user-agent", b"curl/8"), (b"referer", b"http://r")]}
RESPONSE: Any = {"status": 202, "headers": [(b"content-type", b"application/json"), (b"content-length", b"14")]}


@pytest.mark.parametrize("fmt", [
    hypercorn_config(make_settings()).access_log_format,
    '%(h)s %(l)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(D)s %(L)s %({user-agent}i)s %({content-type}o)s %(st)s',
])
def test_lines_are_hypercorns(fmt: str) -> None:
    for response in (RESPONSE, None):
        ours, theirs = LazyAtoms(REQUEST, response, 0.00123), AccessLogAtoms(REQUEST, response, 0.00123)
        if "%(t)s" in fmt:  # a timestamp: equal unless the second turned between the two
            ours["t"] = theirs["t"]
        assert fmt % ours == fmt % theirs


async def test_nothing_is_built_when_the_line_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    original = LazyAtoms.__init__

    def counting(self: LazyAtoms, *args: Any) -> None:
        built.append(1)
        original(self, *args)

    monkeypatch.setattr(LazyAtoms, "__init__", counting)
    cfg = Config()
    cfg.accesslog = logging.getLogger("test.access")  # type: ignore[assignment]
    logger = AccessLogger(cfg)
    cfg_logger = logging.getLogger("test.access")
    cfg_logger.setLevel(logging.WARNING)
    await logger.access(REQUEST, RESPONSE, 0.001)
    assert built == []
    cfg_logger.setLevel(logging.INFO)
    await logger.access(REQUEST, RESPONSE, 0.001)
    assert built == [1]
    assert hypercorn_config(make_settings()).logger_class is AccessLogger
