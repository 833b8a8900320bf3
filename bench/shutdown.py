"""How a SIGTERM ends many open streams: every client should get `: closing shutdown`, then the end, quickly.

    python -m bench.shutdown --streams 15000 [--no-handoff] [--graceful-timeout 5]

Our service on a throwaway Redis; N streams (one user) held by plain non-blocking sockets in a subprocess; then
SIGTERM. Prints how long after the signal the last client saw its connection end, how many saw the closing
comment, and when and how the service exited.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import time

from bench import holders
from bench.jwt import make_token
from bench.server import ServerOptions, raise_nofile, start_ours, start_redis


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=5000)
    ap.add_argument("--no-handoff", action="store_true", help="STREAM_HANDOFF=false: generators hold the streams")
    ap.add_argument("--graceful-timeout", type=float, default=5.0)
    args = ap.parse_args()
    raise_nofile()
    secret = secrets.token_urlsafe(32)
    redis = start_redis()
    env = {"STREAM_HANDOFF": "false" if args.no_handoff else "true", "GRACEFUL_TIMEOUT": str(args.graceful_timeout)}
    server = start_ours(ServerOptions(secret=secret, extra_env=env), f"redis://127.0.0.1:{redis.port}/0")
    try:
        clients = holders.start(server.port, args.streams, make_token(secret, "u", "bench"))
        holders.command(clients, "watch")
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(60)
        exited = time.monotonic() - t0
        assert clients.stdout is not None
        seconds, closing = clients.stdout.readline().split()
        clients.wait(10)
        print(f"{args.streams} streams ({'generator' if args.no_handoff else 'handed off'}): the last client saw "
              f"its end {float(seconds):.2f} s after SIGTERM, {int(closing)} saw ': closing shutdown'; "
              f"the service exited after {exited:.2f} s with status {code}")
    finally:
        server.stop()
        redis.stop()


if __name__ == "__main__":
    main()
