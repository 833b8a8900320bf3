"""`quart-sse serve | token | publish`, the same as `python -m quart_sse ...` (README.md shows each);
`publish --batch FILE` publishes JSON lines."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from . import __version__
from .broker.base import MAX_BATCH_EVENTS
from .settings import ConfigError, Settings, load_settings


def _prog() -> str:
    """How the user called us: the installed `quart-sse` script, or `python -m quart_sse` from a checkout."""
    return "quart-sse" if Path(sys.argv[0]).name == "quart-sse" else "python -m quart_sse"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=_prog(), description="quart-sse: SSE notification service")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service (settings from the environment and .env)")
    t = sub.add_parser("token", help="print a token signed with JWT_SECRET")
    t.add_argument("--sub", required=True, help="user id")
    t.add_argument("--iss", required=True, help="application id")
    t.add_argument("--scope", default="", help='space-separated scopes, e.g. "publish connections"')
    t.add_argument("--ttl", type=int, default=3600, help="seconds until the token expires (default 3600)")
    p = sub.add_parser(
        "publish", help="publish an event exactly as POST /publish does, or a batch of them (--batch)",
        description="One event: --type T [--user U] [--id I] DATA_JSON. A batch: --batch FILE (or - for stdin), one "
        'JSON event per line, {"type": ..., "data": ..., "user"?: ..., "id"?: ...} (no user: a broadcast); every '
        f"line is checked before anything is published, then they go out in their order, {MAX_BATCH_EVENTS} per "
        'request. Prints one JSON line per event: {"id": ...}, with "duplicate": true when the event\'s id had '
        "already been published on its channel (a safe retry: it was not published again).")
    p.add_argument("--app", required=True)
    p.add_argument("--user", help="omit to broadcast to every stream of the app")
    p.add_argument("--type")
    p.add_argument("--id", default=None)
    p.add_argument("--batch", metavar="FILE", help="JSON lines of events to publish ('-': standard input)")
    p.add_argument("data", nargs="?", help="the event's data, as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.command == "serve":
        from .server import serve

        try:
            return serve(settings)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                print(f"error: APP_PORT: {settings.app_host}:{settings.app_port} is already in use (another service, "
                      "or another copy of this one?)", file=sys.stderr)
                return 1
            # a name that does not resolve (getaddrinfo's codes are negative) or an address not on this host
            if isinstance(exc, socket.gaierror) or (exc.errno or 0) < 0 or exc.errno == errno.EADDRNOTAVAIL:
                reason = (exc.strerror or str(exc)).split(" (while attempting")[0]
                print(f"error: APP_HOST: cannot listen on {settings.app_host!r}: {reason}", file=sys.stderr)
                return 1
            raise
    if args.command == "token":
        from .auth import mint

        try:
            print(mint(settings, args.sub, args.iss, args.scope, args.ttl))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    return _publish(settings, args)


def _publish(settings: Settings, args: argparse.Namespace) -> int:
    if args.batch is not None:
        if args.type is not None or args.user is not None or args.id is not None or args.data is not None:
            print("error: --batch takes its events from FILE: no --type, --user, --id or DATA_JSON",
                  file=sys.stderr)
            return 2
        return _publish_batch(settings, args)
    if args.type is None or args.data is None:
        print("error: publish needs --type and DATA_JSON (or --batch FILE)", file=sys.stderr)
        return 2
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        print(f"error: DATA_JSON is not JSON: {exc}", file=sys.stderr)
        return 2
    if settings.redis_dsn:
        return asyncio.run(_publish_redis(settings, args, data))
    return _publish_http(settings, args, data)


async def _publish_redis(settings: Settings, args: argparse.Namespace, data: Any) -> int:
    from .broker.base import BrokerUnavailable
    from .events import EventError
    from .publisher import connect

    assert settings.redis_dsn
    async with connect(settings.redis_dsn, settings.history_size, settings.history_ttl,
                       cluster=settings.redis_cluster) as pub:
        try:
            msg = await pub.publish(args.app, args.user, args.type, data, args.id)
        except EventError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except BrokerUnavailable as exc:
            print(f"error: redis unavailable: {exc}", file=sys.stderr)
            return 1
    print(json.dumps({"id": msg.id, "duplicate": True} if msg.duplicate else {"id": msg.id}))
    return 0


def _publish_http(settings: Settings, args: argparse.Namespace, data: Any) -> int:
    """With the in-process broker only the running service can deliver: post to it with a minted token."""
    path = f"/publish/{args.app}" + (f"/{args.user}" if args.user else "")
    body: dict[str, Any] = {"type": args.type, "data": data}
    if args.id is not None:
        body["id"] = args.id
    rc, answer, replayed = _post(settings, path, body, args.app)
    if rc:
        print(f"error: {answer}", file=sys.stderr)
        return rc
    print(json.dumps({"id": answer["id"], "duplicate": True} if replayed else {"id": answer["id"]}))
    return 0


# ------------------------------------------------------------------------------------------------------ batch
def _read_lines(stream: IO[str]) -> tuple[list[Any], list[int]]:
    """Events and their line numbers; blank lines are skipped. ValueError names the line of bad JSON."""
    events, lines = [], []
    for n, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except ValueError as exc:
            raise ValueError(f"line {n}: not valid JSON: {exc}") from None
        lines.append(n)
    return events, lines


def _chunks(events: list[Any], lines: list[int]) -> Iterable[tuple[list[Any], list[int]]]:
    for i in range(0, len(events), MAX_BATCH_EVENTS):
        yield events[i:i + MAX_BATCH_EVENTS], lines[i:i + MAX_BATCH_EVENTS]


def _publish_batch(settings: Settings, args: argparse.Namespace) -> int:
    from .events import EventError
    from .publisher import check_batch

    try:
        if args.batch == "-":
            events, lines = _read_lines(sys.stdin)
        else:
            with open(args.batch, encoding="utf-8") as fh:
                events, lines = _read_lines(fh)
        for chunk, at in _chunks(events, lines):  # all of it is checked before anything is published
            try:
                check_batch(chunk)
            except EventError as exc:
                index, _, rest = exc.field.removeprefix("events[").partition("]")
                where = f"line {at[int(index)]}" if index.isdigit() else "batch"
                raise ValueError(f"{where}: {rest.lstrip('.') or 'event'}: {exc.message}") from None
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.redis_dsn:
        return asyncio.run(_publish_batch_redis(settings, args.app, events, lines))
    return _publish_batch_http(settings, args.app, events, lines)


def _print_results(ids: list[str], duplicates: Iterable[int]) -> None:
    dup = set(duplicates)
    for i, event_id in enumerate(ids):
        print(json.dumps({"id": event_id, "duplicate": True} if i in dup else {"id": event_id}))


async def _publish_batch_redis(settings: Settings, app: str, events: list[Any], lines: list[int]) -> int:
    from .broker.base import BrokerUnavailable
    from .events import EventError
    from .publisher import connect

    assert settings.redis_dsn
    async with connect(settings.redis_dsn, settings.history_size, settings.history_ttl,
                       cluster=settings.redis_cluster) as pub:
        for chunk, at in _chunks(events, lines):
            try:
                results = await pub.publish_many(app, chunk)
            except EventError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            except BrokerUnavailable as exc:
                print(f"error: redis unavailable from line {at[0]} on (publish again with the same ids to publish "
                      f"only what is missing): {exc}", file=sys.stderr)
                return 1
            _print_results([r.id for r in results], [i for i, r in enumerate(results) if r.duplicate])
    return 0


def _publish_batch_http(settings: Settings, app: str, events: list[Any], lines: list[int]) -> int:
    for chunk, at in _chunks(events, lines):
        rc, answer, _ = _post(settings, f"/publish/{app}", chunk, app)
        if rc:
            print(f"error from line {at[0]} on: {answer}", file=sys.stderr)
            return rc
        _print_results(answer["ids"], answer["duplicates"])
    return 0


def _post(settings: Settings, path: str, body: Any, app: str) -> tuple[int, Any, bool]:
    """POST JSON to the running service with a minted publish token: (0, answer, Idempotent-Replayed) or
    (exit code, error text, False)."""
    from .auth import mint

    try:
        token = mint(settings, "cli", app, "publish", 60)
    except ValueError as exc:
        return 2, str(exc), False
    req = urllib.request.Request(f"http://127.0.0.1:{settings.app_port}{path}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return 0, json.loads(resp.read()), resp.headers.get("Idempotent-Replayed") == "true"
    except urllib.error.HTTPError as exc:
        return 1, f"{exc.code} {exc.read().decode(errors='replace')}", False
    except OSError as exc:
        return 1, f"the service is not reachable on port {settings.app_port}: {exc}", False


if __name__ == "__main__":
    sys.exit(main())
