"""`quart-sse serve | token | publish`, the same as `python -m quart_sse ...` (README.md shows each)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import __version__
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
    p = sub.add_parser("publish", help="publish an event exactly as POST /publish does")
    p.add_argument("--app", required=True)
    p.add_argument("--user", help="omit to broadcast to every stream of the app")
    p.add_argument("--type", required=True)
    p.add_argument("--id", default=None)
    p.add_argument("data", help="the event's data, as JSON")
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

        return serve(settings)
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
    print(json.dumps({"id": msg.id}))
    return 0


def _publish_http(settings: Settings, args: argparse.Namespace, data: Any) -> int:
    """With the in-process broker only the running service can deliver: post to it with a minted token."""
    from .auth import mint

    try:
        token = mint(settings, "cli", args.app, "publish", 60)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = f"/publish/{args.app}" + (f"/{args.user}" if args.user else "")
    body: dict[str, Any] = {"type": args.type, "data": data}
    if args.id is not None:
        body["id"] = args.id
    req = urllib.request.Request(f"http://127.0.0.1:{settings.app_port}{path}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            print(resp.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"error: {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: the service is not reachable on port {settings.app_port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
