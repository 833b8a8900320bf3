"""Logging: readable lines in debug, one JSON object per line in production."""

from __future__ import annotations

import logging
import sys
import time

import orjson

from .settings import Settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for key in ("app", "user", "conn"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if hasattr(record, "conn"):
            line = f"{line} [app={getattr(record, 'app', '')} user={getattr(record, 'user', '')} " \
                   f"conn={record.conn}]"
        return line


def setup_logging(settings: Settings) -> None:
    level = settings.log_level or "INFO"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if settings.debug else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("asyncio", "hpack", "h2", "h11"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
