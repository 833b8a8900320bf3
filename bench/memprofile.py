"""Where a stream's memory goes: tracemalloc over N open streams, per stream, by file and by line.

    python -m bench.memprofile --streams 2000 [--no-handoff] [--top 20]

The service runs in this process (memory broker, plain asyncio loop so that tracemalloc sees every allocation); the
clients are plain blocking sockets in a subprocess, so none of their memory is counted. The figure is Python
allocations only: RSS adds the allocator's overhead (see `python -m bench hold`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tracemalloc


async def _profile(streams: int, handoff: bool, top: int) -> None:
    from hypercorn.asyncio import serve

    from bench import holders
    from bench.server import free_port
    from quart_sse import server
    from quart_sse.app import create_app
    from quart_sse.auth import mint
    from quart_sse.settings import load_settings

    port = free_port()
    settings = load_settings(app_host="127.0.0.1", app_port=port, jwt_secret="m" * 32, log_level="WARNING",
                             stream_handoff=handoff, redis_url=None, redis_host=None)
    app = create_app(settings)
    stop = asyncio.Event()
    adapter = app.extensions["quart_sse"].adapter
    sock = server.listen_socket(settings)
    config = server.hypercorn_config(settings, sock, adapter=adapter)
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    await asyncio.sleep(0.5)
    gc.collect()
    before = tracemalloc.take_snapshot()
    token = mint(settings, "u", "bench")
    clients = await asyncio.get_running_loop().run_in_executor(None, holders.start, port, streams, token)
    await asyncio.sleep(6)  # cancelled timers of the set-up (the hub's 5 s attach time-out) leave the loop's heap
    gc.collect()
    after = tracemalloc.take_snapshot()
    hub = app.extensions["quart_sse"].hub
    owned = sum(1 for s in hub.subscribers if s.state.value == "owned")
    print(f"{len(hub.subscribers)} streams open, {owned} handed off")
    total = sum(d.size_diff for d in after.compare_to(before, "filename"))
    print(f"Python allocations per stream: {total / streams:.0f} B")
    for key in ("filename", "lineno"):
        print(f"\nby {key} (bytes and objects per stream)")
        for d in after.compare_to(before, key)[:top]:
            print(f"{d.size_diff / streams:8.0f} {d.count_diff / streams:6.2f}  {d.traceback}")
    holders.command(clients, "quit")
    clients.wait(30)
    stop.set()
    await task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--no-handoff", action="store_true", help="STREAM_HANDOFF=false: the generator holds streams")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    tracemalloc.start(1)
    asyncio.run(_profile(args.streams, not args.no_handoff, args.top))


if __name__ == "__main__":
    main()
